"""The staleness study (issue 4, item 3): how each consistency policy copes as the workers — and so the staleness
of their pushes — grow, run in the discrete-event simulator (:mod:`downpour.backends.sim`), or with ``--backend
local`` as real training runs with worker processes (:mod:`downpour.study.staleness_local`; time is then wall-clock).

``downpour study staleness --policies downpour,sync,ssp:4,staleness-lr,dc-asgd,easgd --workers 1,8,64,1000
--seeds 10 --out DIR`` runs every (policy, workers, seed) of the grid on the model and data of one config and writes
a report (:func:`write_report`, in :mod:`~downpour.study.staleness_report`): ``results.json`` (every run's
numbers), ``table.md`` (policy × workers: final held-out loss median and IQR over seeds, fraction diverged,
staleness mean and p99) and four pictures: held-out loss against gradients computed and against simulated time,
staleness histograms, final-loss distributions.

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

import dataclasses
import math
import time
from collections.abc import Callable
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
from downpour.study.earlier import as_json, check_earlier, complete_results
from downpour.study.staleness_report import finite_or_none, quantile, summarize, table_markdown, write_report
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


def _policy_key(name: str) -> tuple[str, float | None]:
    """A policy name as what it runs: its base and the number after ``:`` (``ssp:04`` is ``ssp:4``)."""
    base, _, arg = name.partition(":")
    return base, float(arg) if arg else None


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
    same = [_policy_key(name) for name in names]  # ssp:4 and ssp:04 are one policy
    duplicate = next((name for i, name in enumerate(names) if same[i] in same[:i]), None)
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


def _as_ran(results: dict[str, Any]) -> dict[str, Any]:
    """Earlier results with their config's ``cluster.backend`` the backend their runs used (results written before
    2026-11-28 recorded the default, ``"local"``, for simulated runs), so that repeating such a study is allowed."""
    config, backend = results.get("config"), results.get("backend")
    if not (isinstance(config, dict) and isinstance(config.get("cluster"), dict) and isinstance(backend, str)):
        return results
    return {**results, "config": {**config, "cluster": {**config["cluster"], "backend": backend}}}


def _on_backend(config: Config, backend: str) -> Config:
    """``config`` as the study's runs use it: on ``backend`` (the study's flag, not ``cluster.backend``)."""
    return dataclasses.replace(config, cluster=dataclasses.replace(config.cluster, backend=backend))


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
            policy = _policy(config, name, n)
            if isinstance(policy, Sync) and policy.backup_workers:
                how = f"{name!r}" if ":" in name else f"{name!r} with ps.backup_workers = {policy.backup_workers}"
                raise ConfigError(
                    f"invalid --policies: {how} (backup workers drop late pushes, which count toward the push "
                    "budget: such runs would compute fewer gradients than the others, and the budget would cut "
                    "their last round short; study backup workers with `downpour train --set ps.backup_workers=B`)"
                )
            _settings(config, n, 1, config.train.seed)
    make_rule(config.ps.rule, lr=config.ps.lr, adagrad_eps=config.ps.adagrad_eps)
    if backend not in ("sim", "local"):
        raise ConfigError(f"invalid --backend: {backend!r} (choose sim or local)")
    if backend == "sim":  # what the simulator cannot model, refused as `train --backend sim` refuses it
        config_mod.validate(_on_backend(config, "sim"))
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
    header = {"study": "staleness", "grid": grid_json, "config": _on_backend(config, backend).to_dict(),
              "backend": backend}  # fmt: skip
    settings = as_json(header)
    check_earlier(Path(out) / "results.json", lambda earlier: {key: _as_ran(earlier).get(key) for key in settings}
                  == settings)  # fmt: skip
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
            if runs and not complete_results(Path(out) / "results.json"):  # a repeat cut short keeps the first
                _write_result(config, header, runs, out, start, complete=False)
            raise
    return _write_result(config, header, runs, out, start, complete=True)


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
