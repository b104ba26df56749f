"""The staleness study (issue 4, item 3): how each consistency policy copes as the workers — and so the staleness
of their pushes — grow, run in the discrete-event simulator (:mod:`downpour.backends.sim`), or with ``--backend
local`` as real training runs with worker processes (:mod:`downpour.study.staleness_local`; time is then wall-clock).

``downpour study staleness --policies downpour,sync,ssp:4,staleness-lr,dc-asgd,easgd --workers 1,8,64,1000
--seeds 10 --out DIR`` runs every (policy, workers, seed) of the grid on the model and data of one config and writes
a report (:func:`write_report`): ``results.json`` (every run's numbers), ``table.md`` (policy × workers: final
held-out loss median and IQR over seeds, fraction diverged, staleness mean and p99) and four pictures: held-out loss
against gradients computed and against simulated time, staleness histograms, final-loss distributions.

The question it answers is the one of Zhang, Gupta, Lian & Liu (IJCAI 2016): with a fixed learning rate, a
stale push moves the parameters by as much as a fresh one, so as the staleness grows the run degrades and
then diverges; dividing the push's learning rate by its staleness (``staleness-lr``) keeps it converging.

What is held fixed. Every run computes the same number of gradients, ``steps``, with the same server rule and
learning rate per push; ``easgd``, which computes ``τ`` gradients per exchange, makes ``steps // τ`` exchanges;
``sync`` applies the mean of N pushes with that rate, in whole rounds: ``steps // N`` server updates (at least
one, so with more workers than steps it computes N gradients). The loss curves' x axis is gradients computed.
The data set is built once from ``train.seed``; seed index ``i`` sets the model's initialisation and the
simulator's seed to ``train.seed + i``. Everything is deterministic: the same call gives the same
``results.json``, byte for byte.

A run *diverged* when its final held-out loss is not finite, when a push was rejected (NaN/Inf), or when it ended
above its initial held-out loss.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from downpour import config as config_mod
from downpour.backends.sim import ModelGradient, SimSettings, WorkerBatches, simulate
from downpour.config import Config
from downpour.data import load_dataset
from downpour.errors import ConfigError
from downpour.held_out import HeldOutLoss
from downpour.models import RICA, build_model
from downpour.ps.flat import flat_copy
from downpour.ps.policies import EASGD, POLICIES, Sync, make_policy
from downpour.ps.rules import make_rule
from downpour.ps.staleness import StalenessHistogram
from downpour.study.earlier import as_json, check_earlier
from downpour.threads import torch_threads

DEFAULT_POLICIES = ("downpour", "sync", "ssp:4", "staleness-lr", "dc-asgd", "easgd")
DEFAULT_WORKERS = (1, 8, 64, 1000)
DEFAULT_SEEDS = 10
DEFAULT_STEPS = 1500  # gradients computed per run: the default grid (240 runs) takes a few minutes on 2 cores
OBSERVATIONS = 30  # held-out evaluations per run (plus the initial and the final one)

STUDY_DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"source": "natural-patches", "patch_size": 8, "examples": 10_000, "held_out": 512},
    "model": {"name": "rica", "features": 64},
    "train": {"batch_size": 32, "steps": DEFAULT_STEPS},
    "ps": {"rule": "sgd", "lr": 0.03},
}
"""The study's own defaults, under any config file and ``--set``: a small RICA (64 filters on whitened 8x8
natural patches), plain server-side SGD at a fixed rate of 0.03, 1,500 gradients per run. At 0.03 a fixed rate
converges with 1 worker, ends worse with 8 and diverges with 64 and 1,000 (at 0.05 it already diverges with 8;
at 0.02 it does not degrade with 8)."""

ProgressFn = Callable[[int, int, dict[str, Any]], None]
"""``progress(done, total, run)``: called after each run with the run's record."""


class Grid(NamedTuple):
    """The runs to make: every policy × every worker count × ``seeds`` seeds."""

    policies: list[str]
    workers: list[int]
    seeds: int


# ---------------------------------------------------------------------------------------------------------------
# Configuration and the grid
# ---------------------------------------------------------------------------------------------------------------


def study_config(path: Path | None = None, overrides: list[str] | None = None) -> Config:
    """The study's defaults (:data:`STUDY_DEFAULTS`), then the TOML file (if any), then ``--set`` overrides;
    validated. (``config.load`` starts from the training defaults instead: a 256-filter RICA, Adagrad.)"""
    return config_mod.load(path, overrides, base=STUDY_DEFAULTS)


def _policy_help() -> str:
    return "comma-separated, from downpour, sync[:backup], ssp[:bound], staleness-lr, dc-asgd[:lambda], easgd[:tau]"


def parse_grid(policies: str, workers: str, seeds: int | str) -> Grid:
    """Read the ``--policies``, ``--workers`` and ``--seeds`` flags; a bad one raises :class:`ConfigError` naming
    the flag and the value."""
    names = [name.strip() for name in policies.split(",")]
    if not policies.strip() or not all(names):
        raise ConfigError(f"invalid --policies: {policies!r} ({_policy_help()})")
    for name in names:
        if name.partition(":")[0] not in POLICIES:
            raise ConfigError(f"invalid --policies: {name!r} ({_policy_help()})")
        try:
            make_policy(name, workers=1 << 30, lr=1e-9)  # checks the parameter after ':'
        except ConfigError as exc:
            raise ConfigError(f"invalid --policies: {name!r} ({exc})") from None
    duplicate = next((name for i, name in enumerate(names) if name in names[:i]), None)
    if duplicate is not None:
        raise ConfigError(f"invalid --policies: {policies!r} ({duplicate} is listed twice)")

    counts: list[int] = []
    for text in workers.split(","):
        text = text.strip()
        if not (text.isascii() and text.isdigit()) or int(text) < 1:
            raise ConfigError(f"invalid --workers: {text!r} (comma-separated positive integers)")
        counts.append(int(text))
    duplicate_n = next((n for i, n in enumerate(counts) if n in counts[:i]), None)
    if duplicate_n is not None:
        raise ConfigError(f"invalid --workers: {workers!r} ({duplicate_n} is listed twice)")

    text = str(seeds).strip()
    if isinstance(seeds, bool) or not isinstance(seeds, int | str) or not (text.isascii() and text.isdigit()):
        raise ConfigError(f"invalid --seeds: {seeds!r} (a positive integer: seeds per policy and worker count)")
    if int(text) < 1:
        raise ConfigError(f"invalid --seeds: {seeds!r} (a positive integer: seeds per policy and worker count)")
    return Grid(names, counts, int(text))


def _ps(config: Config, key: str, default: Any) -> Any:
    return getattr(config.ps, key, default)


def _policy(config: Config, name: str, workers: int) -> Any:
    """The policy ``name`` for ``workers`` workers, with the ``ps.*`` hyperparameters of ``config``."""
    lr = config.ps.lr
    try:
        return make_policy(
            name,
            workers=workers,
            lr=lr,
            staleness_bound=_ps(config, "staleness_bound", 3),
            backup_workers=_ps(config, "backup_workers", 0),
            dc_lambda=_ps(config, "dc_lambda", 0.04),
            easgd_rho=_ps(config, "easgd_rho", 5.0),
            easgd_tau=_ps(config, "easgd_tau", 4),
        )
    except ConfigError as exc:
        raise ConfigError(f"invalid --policies: {name!r} with {workers} workers: {exc}") from None


def _settings(config: Config, workers: int, pushes: int, seed: int) -> SimSettings:
    """The simulated cluster: ``cluster.sim_*`` keys (the simulator's defaults where the config has none)."""
    c, d = config.cluster, SimSettings()
    settings = SimSettings(
        workers=workers,
        steps=pushes,
        seconds=0.0,
        compute_mean=getattr(c, "sim_compute_mean", d.compute_mean),
        compute_sigma=getattr(c, "sim_compute_sigma", d.compute_sigma),
        stragglers=getattr(c, "sim_stragglers", d.stragglers),
        straggler_slowdown=getattr(c, "sim_straggler_slowdown", d.straggler_slowdown),
        network_mean=getattr(c, "sim_network_mean", d.network_mean),
        network_sigma=getattr(c, "sim_network_sigma", d.network_sigma),
        seed=seed,
    )
    settings.validate()
    return settings


def _pushes(policy: Any, steps: int) -> int:
    """The push budget for ``steps`` gradients: ``steps // τ`` exchanges under easgd; whole rounds of N pushes
    under sync (which stops only at the end of a round; at least one round); else ``steps``."""
    if isinstance(policy, EASGD):
        return max(1, steps // policy.tau)
    if isinstance(policy, Sync):
        return max(policy.workers, steps // policy.workers * policy.workers)
    return steps


# ---------------------------------------------------------------------------------------------------------------
# Running the grid
# ---------------------------------------------------------------------------------------------------------------


class RICAGradient:
    """``grad(params, worker, rng)`` for :class:`~downpour.models.RICA` in closed form, no autograd (about 3x
    faster than :class:`~downpour.backends.sim.ModelGradient` on 64x64 filters; the same batches, the same loss).

    With ``H = XWᵀ`` and ``R = HW − X`` on a batch of ``B`` examples, ``L = ‖R‖²/B + λ Σ sqrt(ε + H²)/B`` and
    ``∂L/∂W = Hᵀ(2R/B) + (2R/B · Wᵀ + λH / (B·sqrt(ε + H²)))ᵀ X``.
    """

    def __init__(self, model: RICA, examples: Tensor, *, batch_size: int, workers: int | None = None) -> None:
        self.batches = WorkerBatches(examples.flatten(1), batch_size=batch_size, workers=workers)  # (N, D)
        self.batch_size = batch_size
        self.shape = tuple(model.weight.shape)  # (K, D)
        self.sparsity, self.epsilon = model.sparsity, model.epsilon
        self.grads = torch.empty(model.weight.numel(), dtype=torch.float32)

    def __call__(self, params: Tensor, worker: int, rng: np.random.Generator) -> tuple[float, Tensor]:
        """The mini-batch loss at ``params`` and its gradient ``(K·D,)`` (a buffer reused by the next call)."""
        x = self.batches.draw(worker, rng)  # (B, D)
        w = params.view(self.shape)  # (K, D)
        b = float(self.batch_size)
        h = x @ w.t()  # (B, K)
        r = h @ w - x  # (B, D)
        smooth = torch.sqrt(h * h + self.epsilon)  # (B, K)
        loss = float((r * r).sum() / b + self.sparsity * smooth.sum() / b)
        g_r = r.mul_(2.0 / b)  # (B, D): ∂L/∂(HW)
        g_h = torch.addcdiv(g_r @ w.t(), h, smooth, value=self.sparsity / b)  # (B, K): ∂L/∂H
        out = self.grads.view(self.shape)  # (K, D)
        torch.mm(h.t(), g_r, out=out)
        out.addmm_(g_h.t(), x)
        return loss, self.grads


def gradient_fn(model: torch.nn.Module, examples: Tensor, *, batch_size: int, workers: int) -> Any:
    """The gradient callable for the simulator: :class:`RICAGradient` for a RICA model, else autograd through
    :class:`~downpour.backends.sim.ModelGradient`."""
    if type(model) is RICA:
        return RICAGradient(model, examples, batch_size=batch_size, workers=workers)
    return ModelGradient(model, examples, batch_size=batch_size, workers=workers)


def finite_or_none(x: float | None) -> float | None:
    """``x`` as a float when it is finite, else None (JSON has no NaN)."""
    return float(x) if x is not None and math.isfinite(x) else None


def divergence_reasons(initial_loss: float, final_loss: float, rejected: int) -> list[str]:
    """Why a run *diverged* (empty when it did not): a non-finite final loss, a rejected push, or a final loss
    above the initial one."""
    reasons = []
    if not math.isfinite(final_loss):
        reasons.append("non-finite held-out loss")
    if rejected:
        reasons.append(f"{rejected} pushes rejected (NaN/Inf)")
    if math.isfinite(final_loss) and final_loss > initial_loss:
        reasons.append("final loss above the initial loss")
    return reasons


def _one_run(
    config: Config, dataset: Any, held_out: HeldOutLoss, name: str, workers: int, seed_index: int, steps: int
) -> dict[str, Any]:
    """Simulate one (policy, workers, seed) and return its record (JSON-ready: non-finite losses are None)."""
    seed = config.train.seed + seed_index
    policy = _policy(config, name, workers)
    settings = _settings(config, workers, _pushes(policy, steps), seed)
    model = build_model(config.model, dataset.dim, seed=seed, shape=dataset.shape)
    grad = gradient_fn(model, dataset.train, batch_size=config.train.batch_size, workers=workers)
    initial = flat_copy(model)
    calls = [0]

    def counted(params: Tensor, worker: int, rng: np.random.Generator) -> tuple[float, Tensor]:
        calls[0] += 1
        return grad(params, worker, rng)

    initial_loss = held_out(initial)
    curve: dict[str, list] = {"pushes": [0], "grads": [0], "time": [0.0], "loss": [initial_loss]}

    def observe(t: float, pushes: int, params: Tensor) -> None:
        for key, value in (("pushes", pushes), ("grads", calls[0]), ("time", t), ("loss", held_out(params))):
            curve[key].append(value)

    rule = make_rule(config.ps.rule, lr=config.ps.lr, adagrad_eps=config.ps.adagrad_eps)
    every = max(1, settings.steps // OBSERVATIONS)
    result = simulate(initial, rule, policy, counted, settings, observe=observe, observe_every=every)
    records = result.records
    final_loss = held_out(result.params)
    if curve["pushes"][-1] != len(records):
        for key, value in (("pushes", len(records)), ("grads", calls[0]), ("time", result.sim_time)):
            curve[key].append(value)
        curve["loss"].append(final_loss)
    return run_record(policy=name, workers=workers, seed_index=seed_index, seed=seed, pushes=len(records),
                      grad_evals=result.grad_evals, applied=int(records.applied.sum()), rejected=result.rejected,
                      dropped=result.dropped, time=result.sim_time, initial_loss=initial_loss, final_loss=final_loss,
                      histogram=result.staleness_histogram(), curve=curve)  # fmt: skip


def run_record(*, policy: str, workers: int, seed_index: int, seed: int, pushes: int, grad_evals: int, applied: int,
               rejected: int, dropped: int, time: float, initial_loss: float, final_loss: float | None,
               histogram: StalenessHistogram, curve: dict[str, list]) -> dict[str, Any]:  # fmt: skip
    """One run's record in the study's results, simulated or real (JSON-ready: non-finite losses are None;
    ``sim_time``: simulated seconds, or wall seconds of a real run)."""
    reasons = divergence_reasons(initial_loss, float("nan") if final_loss is None else final_loss, rejected)
    staleness = {key: float(v) if key == "mean" else int(v) for key, v in histogram.summary().items()}
    values = np.flatnonzero(histogram.counts)
    return {
        "policy": policy,
        "workers": workers,
        "seed_index": seed_index,
        "seed": seed,
        "pushes": pushes,
        "grad_evals": grad_evals,
        "applied": applied,
        "rejected": rejected,
        "dropped": dropped,
        "sim_time": float(time),
        "initial_loss": finite_or_none(initial_loss),
        "final_loss": finite_or_none(final_loss),
        "diverged": bool(reasons),
        "diverged_because": reasons,
        "staleness": {**staleness, "values": values.tolist(), "counts": histogram.counts[values].tolist()},
        "curve": {**curve, "loss": [finite_or_none(x) for x in curve["loss"]]},
    }


def check_study(config: Config, *, policies: list[str], workers: list[int], seeds: int, steps: int | None,
                backend: str) -> tuple[Grid, int]:  # fmt: skip
    """Every setting of a study checked before its first run (and before a progress bar is drawn): the grid and the
    gradients per run (``steps``, default ``train.steps`` when set, else :data:`DEFAULT_STEPS`); ConfigError names
    what is wrong."""
    if steps is None:
        steps = config.train.steps or DEFAULT_STEPS
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"invalid --steps: {steps!r} (gradients per run, a positive integer)")
    grid = parse_grid(",".join(policies), ",".join(str(n) for n in workers), seeds)
    for name in grid.policies:  # every (policy, N)
        for n in grid.workers:
            _policy(config, name, n)
            _settings(config, n, 1, config.train.seed)
    make_rule(config.ps.rule, lr=config.ps.lr, adagrad_eps=config.ps.adagrad_eps)
    if backend not in ("sim", "local"):
        raise ConfigError(f"invalid --backend: {backend!r} (choose sim or local)")
    if backend == "local":
        from downpour.study import staleness_local

        staleness_local.check_grid(grid.workers)
        for name in grid.policies:  # each run's own config, validated as train validates it (ssp with n_fetch > 1)
            for n in grid.workers:
                staleness_local.run_config(config, name, n, 0, _pushes(_policy(config, name, n), steps))
    return grid, steps


def run_study(
    config: Config,
    *,
    policies: list[str],
    workers: list[int],
    seeds: int,
    out: Path,
    steps: int | None = None,
    progress: ProgressFn | None = None,
    backend: str = "sim",
) -> dict[str, Any]:
    """Run every (policy, workers, seed) of the grid in the simulator (or, with ``backend="local"``, as real
    training runs with worker processes: :mod:`downpour.study.staleness_local`) and write the report into ``out``.

    ``steps`` is the gradients computed per run (default: ``train.steps`` when set, else :data:`DEFAULT_STEPS`).
    The model, data, rule, learning rate, batch size and ``cluster.sim_*`` timing come from ``config``
    (:func:`study_config` gives the study's defaults). Returns the results (what ``results.json`` holds, plus
    ``wall_s`` and ``files``, the report's paths). Deterministic: the same call gives the same results.
    """
    grid, steps = check_study(config, policies=policies, workers=workers, seeds=seeds, steps=steps, backend=backend)
    grid_json = {"policies": grid.policies, "workers": grid.workers, "seeds": grid.seeds, "steps": steps}
    header = {"study": "staleness", "grid": grid_json, "config": config.to_dict(), "backend": backend}
    settings = as_json(header)
    check_earlier(Path(out) / "results.json", lambda earlier: {key: earlier.get(key) for key in settings} == settings)
    if backend == "local":
        from downpour.study import staleness_local

    start = time.perf_counter()
    with torch_threads(1):  # small products: one thread is fastest, and leaves the other core to others
        dataset = load_dataset(config.data, seed=config.train.seed)
        if max(grid.workers) > dataset.train.shape[0]:
            raise ConfigError(
                f"invalid --workers: {max(grid.workers)} (more than the {dataset.train.shape[0]} training "
                "examples; raise data.examples)"
            )
        held_out = HeldOutLoss(config, dataset)
        runs: list[dict[str, Any]] = []
        total = len(grid.policies) * len(grid.workers) * grid.seeds
        try:
            for name in grid.policies:
                for n in grid.workers:
                    for index in range(grid.seeds):
                        if backend == "local":
                            pushes = _pushes(_policy(config, name, n), steps)
                            runs.append(staleness_local.local_run(config, dataset, name, n, index, pushes, out))
                        else:
                            runs.append(_one_run(config, dataset, held_out, name, n, index, steps))
                        if progress is not None:
                            progress(len(runs), total, runs[-1])
        except KeyboardInterrupt:  # Ctrl-C: the report of the runs that finished, marked incomplete, then stop
            if runs and not _complete_results(Path(out) / "results.json"):  # a repeat cut short keeps the first
                _write_result(config, header, runs, out, start, complete=False)
            raise
    return _write_result(config, header, runs, out, start, complete=True)


def _complete_results(path: Path) -> bool:
    """Whether ``path`` holds a whole study's results (those written before ``complete`` was recorded were)."""
    try:
        return bool(json.loads(path.read_text()).get("complete", True))
    except (OSError, ValueError, AttributeError):
        return False


def _write_result(config: Config, header: dict[str, Any], runs: list[dict[str, Any]], out: Path, start: float, *,
                  complete: bool) -> dict[str, Any]:  # fmt: skip
    """The study's results and report from ``header`` (the study, its config, backend and grid) and ``runs``
    (``complete``: every run of the grid finished)."""
    result: dict[str, Any] = {**header, "complete": complete, "runs": runs, "cells": summarize(runs)}
    if header["backend"] == "sim":
        simulated = vars(_settings(config, 1, 1, 0))
        result["simulator"] = {k: v for k, v in simulated.items() if k not in ("workers", "steps")}
    result["wall_s"] = time.perf_counter() - start
    result["files"] = [str(path) for path in write_report(result, out)]
    return result


# ---------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------


def _final(run: dict[str, Any]) -> float:
    """A run's final loss for statistics: +inf when it is not finite."""
    x = run["final_loss"]
    return math.inf if x is None else float(x)


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1, linear interpolation) of values that may hold +inf (then so may the result)."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = q * (len(xs) - 1)
    low, high = math.floor(pos), math.ceil(pos)
    if low == high or xs[low] == xs[high]:
        return xs[low]
    if math.isinf(xs[high]):
        return math.inf
    return xs[low] + (xs[high] - xs[low]) * (pos - low)


def _pooled_histogram(runs: list[dict[str, Any]]) -> StalenessHistogram:
    histogram = StalenessHistogram()
    for run in runs:
        s = run["staleness"]
        histogram.add(np.repeat(np.asarray(s["values"], dtype=np.int64), np.asarray(s["counts"], dtype=np.int64)))
    return histogram


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (policy, workers), in grid order: final held-out loss median and quartiles over seeds (+inf for
    a non-finite loss; None in the JSON), fraction diverged, staleness mean and p99 pooled over seeds."""
    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        cells.setdefault((run["policy"], run["workers"]), []).append(run)
    rows = []
    for (name, n), group in cells.items():
        finals = [_final(run) for run in group]
        initials = [run["initial_loss"] for run in group if run["initial_loss"] is not None]
        staleness = _pooled_histogram(group).summary()
        rows.append(
            {
                "policy": name,
                "workers": n,
                "runs": len(group),
                "initial_loss_median": finite_or_none(quantile(initials, 0.5)) if initials else None,
                "final_loss_median": finite_or_none(quantile(finals, 0.5)),
                "final_loss_q25": finite_or_none(quantile(finals, 0.25)),
                "final_loss_q75": finite_or_none(quantile(finals, 0.75)),
                "diverged": sum(run["diverged"] for run in group) / len(group),
                "staleness_mean": float(staleness["mean"]),
                "staleness_p99": int(staleness["p99"]),
                "sim_time_median": quantile([run["sim_time"] for run in group], 0.5),
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------


def _fmt(x: float | None) -> str:
    return "∞" if x is None or math.isinf(x) else f"{x:.4g}"


def table_markdown(result: dict[str, Any]) -> str:
    """The report's table (and a few lines saying what was run) as Markdown."""
    grid, config = result["grid"], result["config"]
    d, m, t, p = config["data"], config["model"], config["train"], config["ps"]
    sim = result.get("simulator", {})
    lines = [
        "# Staleness study",
        "",
        f"Model `{m['name']}` ({m['features']} features) on `{d['source']}` (patch {d['patch_size']}, "
        f"{d['examples']:,} examples, {d['held_out']} held out); rule `{p['rule']}`, lr {p['lr']:g}, "
        f"batch {t['batch_size']}; {grid['steps']:,} gradients per run (easgd: steps // τ exchanges); "
        f"{grid['seeds']} seeds (train.seed + 0..{grid['seeds'] - 1}).",
    ]
    if result.get("complete") is False:
        total = len(grid["policies"]) * len(grid["workers"]) * grid["seeds"]
        lines.append(f"**Incomplete: interrupted after {len(result['runs'])} of {total} runs**; the cells below hold "
                     "the runs that finished.")  # fmt: skip
    if result.get("backend", "sim") == "local":
        lines.append(
            "Local backend: every run is a real training session, worker processes pushing into shared-memory "
            "shards on this machine; times are wall-clock seconds from each run's first push, not simulated."
        )
    else:
        lines.append(
            "Simulated cluster: "
            + ", ".join(f"{k} {v:g}" for k, v in sim.items() if k not in ("seed", "seconds"))
            + "."
        )
    if sim and not sim.get("compute_sigma") and not sim.get("stragglers") and not sim.get("network_sigma"):
        lines.append(
            "Every worker takes the same time per push, so the workers run in lockstep: after the first round every "
            "asynchronous push has staleness N − 1, and an SSP bound never binds (ssp runs as downpour). Set "
            "cluster.sim_compute_sigma / cluster.sim_stragglers for a busier cluster."
        )
    lines += [
        "",
        "Final held-out loss over seeds (∞: not finite); *diverged*: non-finite loss, a rejected push, or a final "
        "loss above the initial one. Staleness pooled over the seeds' applied pushes.",
        "",
        "| policy | workers | final loss median | IQR (q25–q75) | diverged | staleness mean | staleness p99 "
        f"| {'wall' if result.get('backend') == 'local' else 'sim.'} time (median) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["cells"]:
        lines.append(
            f"| {row['policy']} | {row['workers']:,} | {_fmt(row['final_loss_median'])} "
            f"| {_fmt(row['final_loss_q25'])}–{_fmt(row['final_loss_q75'])} "
            f"| {row['diverged']:.0%} | {row['staleness_mean']:.1f} | {row['staleness_p99']} "
            f"| {row['sim_time_median']:.4g} s |"
        )
    initials = [row["initial_loss_median"] for row in result["cells"] if row["initial_loss_median"] is not None]
    if initials:
        lines += ["", f"Initial held-out loss (median over seeds): {quantile(initials, 0.5):.4g}."]
    if "wall_s" in result:
        runs = len(result["runs"])
        wall = result["wall_s"]
        verb = "trained" if result.get("backend") == "local" else "simulated"
        lines += ["", f"{runs} runs {verb} in {wall:.1f} s of wall time ({wall / runs:.2f} s per run)."]
    return "\n".join(lines) + "\n"


CAP_FACTOR = 10.0  # the plots show losses up to this many times the largest initial loss; above it: diverged


def _cap(result: dict[str, Any]) -> float:
    """The plots' ceiling: ``CAP_FACTOR`` × the largest initial held-out loss."""
    initials = [run["initial_loss"] for run in result["runs"] if run["initial_loss"] is not None]
    return CAP_FACTOR * max(initials, default=1.0)


def _capped(values: Sequence[float | None], cap: float) -> np.ndarray:
    """Losses with None (not finite) and anything above ``cap`` set to ``cap``."""
    array = np.array([cap if v is None else v for v in values], dtype=np.float64)
    array[~np.isfinite(array)] = cap
    return np.minimum(array, cap)


def _band(runs: list[dict[str, Any]], xkey: str, cap: float, points: int = 60) -> tuple[np.ndarray, ...]:
    """Every run's loss curve on a common x grid (log-linear interpolation): x, median, q25, q75 over runs."""
    end = min(run["curve"][xkey][-1] for run in runs)
    x = np.linspace(0.0, end, points)
    logs = np.stack(
        [np.interp(x, run["curve"][xkey], np.log(_capped(run["curve"]["loss"], cap))) for run in runs]
    )  # (R, points)
    q25, median, q75 = np.exp(np.percentile(logs, [25, 50, 75], axis=0))
    return x, median, q25, q75


def _cells(result: dict[str, Any]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in result["runs"]:
        cells.setdefault((run["policy"], run["workers"]), []).append(run)
    return cells


def _save(fig: Any, path: Path, *, bottom: float, hspace: float = 0.2, wspace: float = 0.2) -> Path:
    """Fixed margins in inches (``tight_layout`` costs seconds on a busy machine), then write the PNG."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=0.85 / width, right=1 - 0.15 / width, bottom=bottom / height, top=1 - 0.75 / height,
                        hspace=hspace, wspace=wspace)  # fmt: skip
    fig.savefig(path, dpi=100)
    return path


def _log_y(ax: Any) -> None:
    """A log y axis ticked at 1, 2, 5 × 10ᵏ in plain numbers, without minor ticks (slow to lay out)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_locator(NullLocator())


def _mark_cap(ax: Any, cap: float) -> None:
    """A dashed line at the plots' ceiling, where diverged runs sit, and room above it."""
    ax.axhline(cap, color="0.4", linestyle="--", linewidth=0.8)
    ax.text(0.99, cap * 1.1, f"diverged (≥ {CAP_FACTOR:g}× initial or not finite)", transform=ax.get_yaxis_transform(),
            va="bottom", ha="right", fontsize=7, color="0.3")  # fmt: skip
    ax.set_ylim(top=cap * 4)


def _curves_figure(result: dict[str, Any], xkey: str, xlabel: str, title: str, path: Path) -> Path:
    """One panel per worker count, one line per policy: median held-out loss over seeds with an IQR band."""
    import matplotlib
    from matplotlib.figure import Figure

    grid, cells, cap = result["grid"], _cells(result), _cap(result)
    workers = grid["workers"]
    fig = Figure(figsize=(4.3 * len(workers), 4.0))
    axes = fig.subplots(1, len(workers), squeeze=False)
    colors = matplotlib.colormaps["tab10"]
    for col, n in enumerate(workers):
        ax = axes[0, col]
        for i, name in enumerate(grid["policies"]):
            runs = cells.get((name, n), [])
            if not runs:
                continue
            x, median, q25, q75 = _band(runs, xkey, cap)
            diverged = sum(run["diverged"] for run in runs)
            label = f"{name} ({diverged}/{len(runs)} diverged)" if diverged else name
            ax.plot(x, median, color=colors(i % 10), linewidth=1.5, label=label)
            ax.fill_between(x, q25, q75, color=colors(i % 10), alpha=0.18, linewidth=0)
        _log_y(ax)
        if any((_capped(run["curve"]["loss"], cap) >= cap).any() for name in grid["policies"]
               for run in cells.get((name, n), [])):  # fmt: skip
            _mark_cap(ax, cap)
        ax.set_title(f"{n:,} worker{'s' if n > 1 else ''}")
        ax.set_xlabel(xlabel)
        ax.grid(True, which="major", alpha=0.3)
        if ax.get_legend_handles_labels()[1]:  # a panel of an interrupted study may hold no run
            ax.legend(fontsize=7, loc="best")
    axes[0, 0].set_ylabel("held-out loss (median over seeds, IQR band)")
    fig.suptitle(title)
    return _save(fig, path, bottom=0.6, wspace=0.22)


def _staleness_figure(result: dict[str, Any], path: Path) -> Path:
    """A grid of staleness histograms: one row per policy, one column per worker count (pooled over seeds)."""
    from matplotlib.figure import Figure

    grid, cells = result["grid"], _cells(result)
    rows, cols = len(grid["policies"]), len(grid["workers"])
    fig = Figure(figsize=(3.5 * cols, 2.3 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, name in enumerate(grid["policies"]):
        for c, n in enumerate(grid["workers"]):
            ax = axes[r, c]
            histogram = _pooled_histogram(cells.get((name, n), []))
            ax.set_title(f"{name}, {n:,} worker{'s' if n > 1 else ''}", fontsize=9)
            if histogram.total == 0:
                ax.text(0.5, 0.5, "no applied push", ha="center", va="center", transform=ax.transAxes)
                continue
            s = histogram.summary()
            fraction = histogram.counts / histogram.total
            ax.stairs(fraction, np.arange(fraction.size + 1) - 0.5, fill=True, color="tab:blue", alpha=0.8)
            _log_y(ax)
            ax.set_ylim(max(fraction[fraction > 0].min() / 3, 1e-7), 3.0)
            pad = 0.02 * fraction.size
            ax.set_xlim(-0.5 - pad, max(fraction.size - 0.5 + pad, 1.5))
            ax.text(0.5, 0.95, f"mean {s['mean']:.1f}, p99 {s['p99']}", transform=ax.transAxes, ha="center",
                    va="top", fontsize=8, bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0})  # fmt: skip
            if r == rows - 1:
                ax.set_xlabel("staleness (versions)")
            if c == 0:
                ax.set_ylabel("fraction of pushes")
    fig.suptitle("Staleness of applied pushes (pooled over seeds)")
    return _save(fig, path, bottom=0.55, hspace=0.55, wspace=0.25)


def _final_loss_figure(result: dict[str, Any], path: Path) -> Path:
    """One panel per worker count: final held-out loss per policy over seeds (box + points; diverged as red x)."""
    from matplotlib.figure import Figure

    grid, cells, cap = result["grid"], _cells(result), _cap(result)
    workers, policies = grid["workers"], grid["policies"]
    fig = Figure(figsize=(max(4.0, 0.5 * len(policies) + 1.0) * len(workers), 4.4))
    axes = fig.subplots(1, len(workers), squeeze=False)
    for col, n in enumerate(workers):
        ax = axes[0, col]
        capped = False
        for i, name in enumerate(policies):
            runs = cells.get((name, n), [])
            if not runs:
                continue
            finals = _capped([run["final_loss"] for run in runs], cap)
            capped = capped or bool((finals >= cap).any())
            ax.boxplot([finals], positions=[i], widths=0.6, showfliers=False, medianprops={"color": "black"})
            jitter = np.linspace(-0.18, 0.18, len(runs)) if len(runs) > 1 else np.zeros(1)
            diverged = np.array([run["diverged"] for run in runs])
            ax.scatter(i + jitter[~diverged], finals[~diverged], s=12, color="tab:blue", zorder=3)
            first = diverged.any() and not ax.get_legend_handles_labels()[1]
            ax.scatter(i + jitter[diverged], finals[diverged], s=22, color="tab:red", marker="x", zorder=3,
                       label="diverged" if first else None)  # fmt: skip
        _log_y(ax)
        if capped:
            _mark_cap(ax, cap)
        ax.set_xticks(range(len(policies)), policies, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{n:,} worker{'s' if n > 1 else ''}")
        ax.grid(True, axis="y", which="major", alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=7, loc="best")
    axes[0, 0].set_ylabel("final held-out loss (each point a seed)")
    fig.suptitle(f"Final held-out loss after {grid['steps']:,} gradients, over {grid['seeds']} seeds")
    return _save(fig, path, bottom=0.9, wspace=0.22)


def write_plots(result: dict[str, Any], out: Path) -> list[Path]:
    """The report's four PNGs (matplotlib figures without pyplot) in ``out``; returns their paths."""
    steps = result["grid"]["steps"]
    when = "wall-clock" if result.get("backend") == "local" else "simulated"
    return [
        _curves_figure(
            result, "grads", "gradients computed (pushes; easgd: τ per exchange)",
            f"Held-out loss against updates ({steps:,} gradients per run)", out / "loss_vs_updates.png",
        ),
        _curves_figure(
            result, "time", f"{when} time (s)", f"Held-out loss against {when} time", out / "loss_vs_time.png"
        ),
        _staleness_figure(result, out / "staleness_histograms.png"),
        _final_loss_figure(result, out / "final_loss.png"),
    ]  # fmt: skip


def _deterministic(result: dict[str, Any]) -> dict[str, Any]:
    """What ``results.json`` holds: the result without wall-clock times and file paths."""
    return {k: v for k, v in result.items() if k not in ("wall_s", "files")}


def write_report(result: dict[str, Any], out: Path) -> list[Path]:
    """Write ``results.json``, ``table.md`` and the PNGs into ``out``; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    results.write_text(json.dumps(_deterministic(result), indent=1, allow_nan=False) + "\n")
    table = out / "table.md"
    table.write_text(table_markdown(result))
    return [results, table, *write_plots(result, out)]


__all__ = [
    "DEFAULT_POLICIES",
    "DEFAULT_SEEDS",
    "DEFAULT_STEPS",
    "DEFAULT_WORKERS",
    "STUDY_DEFAULTS",
    "Grid",
    "check_study",
    "parse_grid",
    "quantile",
    "run_study",
    "study_config",
    "summarize",
    "table_markdown",
    "write_report",
]
