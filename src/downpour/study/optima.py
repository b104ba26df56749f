"""The local-optima test (issue 4, item 4): do stale gradients change which minimum SGD reaches?

One guess about Downpour SGD is that staleness helps: a push computed against old parameters lands somewhere its
author did not aim at, which might kick a run out of a poor basin. This module makes the guess testable on a task
whose minima, their losses and their basins are all known in closed form (:class:`TiltedWells`), runs the same
seeds under ``sync`` and ``downpour`` (or any policies) in the discrete-event simulator, and compares the arms
with paired tests (:func:`run_optima`; the task in :mod:`~downpour.study.tilted_wells`, the tests in
:mod:`~downpour.study.paired_tests`, the report in :mod:`~downpour.study.optima_report`, all re-exported here).

The design, in one paragraph. Seed ``s`` fixes a start ``x₀`` (uniform in ``[−start_box, start_box]^d``, from
``default_rng([s, 2])``) and the simulator's seed; both arms start from the same ``x₀`` with the same seed, so each
seed is a *pair*. Each arm gets the same number of gradient evaluations (``steps`` pushes) and the same learning
rate **per gradient** (``lr_match="gradient"``, the default): an asynchronous push applies ``lr·g``, a ``sync``
update applies ``(N−b)·lr·mean(g)`` (Goyal et al. 2017's linear scaling rule), so that both arms follow the same
gradient flow for the same time ``steps·lr`` with the same gradient-noise temperature. What differs is how the same
number of gradients is used: ``sync`` takes one large step on ``N`` fresh gradients, ``downpour`` ``N`` small steps,
each on parameters about ``N`` updates old; the arm ``downpour@1`` (one worker: plain sequential SGD, neither
staleness nor large steps) separates the two.
``lr_match="update"`` instead gives every arm the same ``lr`` per server update and the same number of server
updates (``sync`` then needs ``(N−b)·steps`` pushes: N times the compute). A run *reaches* the minimum whose basin
of attraction (under the noise-free gradient flow of the expected loss) holds its final parameters; a run whose
parameters became non-finite, whose final loss is above every start's (it left the wells), or with a rejected push,
*diverged*.
"""

from __future__ import annotations

import math
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from downpour.backends.sim import SimSettings, simulate
from downpour.errors import ConfigError
from downpour.ps.policies import Sync, make_policy
from downpour.ps.rules import make_rule
from downpour.study.earlier import as_json, check_earlier, complete_results
from downpour.study.optima_report import answer_sentence, write_report
from downpour.study.paired_tests import compare_arms, mcnemar_exact, stuart_maxwell, wilcoxon_paired
from downpour.study.tilted_wells import DIVERGED, Minimum, TiltedWells, tilted_well_roots

DEFAULTS: dict[str, Any] = {
    "workers": 64,
    "seeds": 100,
    "steps": 4000,
    "lr": 0.002,
}
DEFAULT_POLICIES = ("sync", "downpour")  # the arms of `downpour study optima`


def start_point(seed: int, dim: int, box: float) -> np.ndarray:
    """The start of seed ``seed``: uniform in ``[−box, box]^dim`` from ``default_rng([seed, 2])`` (a stream of its
    own, apart from the simulator's ``default_rng(seed)`` and ``SeedSequence([seed, 1])``)."""
    return np.random.default_rng([seed, 2]).uniform(-box, box, size=dim)


def _arm_policy(spec: str, workers: int) -> tuple[str, int]:
    """A policy name with its own worker count: ``"downpour@1"`` -> ``("downpour", 1)``, ``"sync"`` -> ``("sync",
    workers)``."""
    name, at, count = spec.partition("@")
    if not at:
        return spec, workers
    if not count.isdigit() or int(count) < 1:
        raise ConfigError(f"invalid policies: {spec!r} (the worker count after '@' must be an integer >= 1)")
    return name, int(count)


def round_pushes(policies: Sequence[str], workers: int, lr: float = DEFAULTS["lr"]) -> int:
    """The pushes of one whole round of every ``sync`` arm among ``policies`` (the least common multiple of their
    quorums; 1 without one): under ``lr_match="gradient"`` every arm's budget is a multiple of it (see
    :func:`_whole_rounds`)."""
    return _rounds(policies, workers, lr)[0]


def _rounds(policies: Sequence[str], workers: int, lr: float) -> tuple[int, list[int]]:
    """:func:`round_pushes` and the quorum of each ``sync`` arm."""
    quorums = []
    for spec in policies:
        name, count = _arm_policy(spec, workers)
        policy = make_policy(name, workers=count, lr=lr)
        if isinstance(policy, Sync) and policy.backup_workers:
            raise ConfigError(
                f"invalid policies: {spec!r} with lr_match='gradient' (a sync arm with backup workers drops late "
                "pushes, which count toward the budget, so its rounds cannot be whole: use lr_match='update')"
            )
        if isinstance(policy, Sync):
            quorums.append(policy.quorum)
    return (math.lcm(*quorums) if quorums else 1), quorums


def _whole_rounds(steps: int, policies: Sequence[str], workers: int, lr: float) -> int:
    """The largest budget up to ``steps`` pushes that is a whole number of rounds for every ``sync`` arm (every arm
    then gets it, so that all compute the same number of gradients). A last round of the leftover pushes would
    take sync's full-size step on the mean of fewer gradients: over 300 seeds at 64 workers (4,000 pushes: 62
    rounds and 32 pushes) that alone made sync's final losses worse than downpour's (Wilcoxon p = 6e-12, against
    0.067 with whole rounds)."""
    unit, quorums = _rounds(policies, workers, lr)
    if steps < unit:
        raise ConfigError(f"invalid steps: {steps} (fewer than {unit} pushes: a whole number of rounds of every sync "
                          f"arm, whose rounds take {', '.join(map(str, quorums))})")  # fmt: skip
    return steps - steps % unit


def _arm_names(policies: Sequence[str]) -> list[str]:
    names: list[str] = []
    for policy in policies:
        name, k = policy, 2
        while name in names:
            name, k = f"{policy}#{k}", k + 1
        names.append(name)
    return names


def run_optima(
    *,
    workers: int = DEFAULTS["workers"],
    seeds: int = DEFAULTS["seeds"],
    steps: int = DEFAULTS["steps"],
    lr: float = DEFAULTS["lr"],
    policies: Sequence[str] = DEFAULT_POLICIES,
    out: Path | None = None,
    task: TiltedWells | None = None,
    lr_match: str = "gradient",
    start_box: float = 1.6,
    first_seed: int = 0,
    compute_sigma: float = 0.5,
    network_mean: float = 0.0,
    alpha: float = 0.05,
    trace_seeds: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every policy on the same ``seeds`` paired starts in the simulator and compare each with the first.

    ``policies``: :func:`~downpour.ps.policies.make_policy` names, each optionally with ``@N`` to run that arm on
    ``N`` workers instead of ``workers`` (``downpour@1`` is plain sequential SGD: the control with neither
    staleness nor averaging). ``steps``: pushes (gradient evaluations) per run, for every arm (with
    ``lr_match="update"``, server updates per run: ``sync`` then runs ``(N−b)·steps`` pushes). ``lr``: the
    server's SGD learning rate per push; under ``lr_match="gradient"`` a ``sync`` update uses ``(N−b)·lr`` (see the
    module docstring). ``task``: the objective (default :class:`TiltedWells()`). The cluster: ``workers`` workers,
    lognormal compute times with ``compute_sigma``, one-way network delay ``network_mean``. ``trace_seeds``: how
    many seeds' trajectories to keep for the landscape picture. ``out``: when given, :func:`write_report` writes
    there. ``progress``: called with one line after each arm.

    Returns a JSON-ready dict: ``settings``, ``task`` (minima, barriers), ``arms`` (per policy: per seed the start,
    end, start basin, minimum reached, final expected loss, distance to that minimum; plus counts per minimum and
    summaries), ``comparisons`` (each arm against the first: :func:`compare_arms`), ``answer`` (one sentence),
    ``call`` and ``command`` (how to reproduce it), ``seconds`` (wall time), and ``files`` when ``out`` is given.
    """
    started = time.perf_counter()
    task = task or TiltedWells()
    if lr_match not in ("gradient", "update"):
        raise ConfigError(f"invalid lr_match: {lr_match!r} (choose gradient or update)")
    for key, value, low in (("workers", workers, 1), ("seeds", seeds, 1), ("steps", steps, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"invalid {key}: {value!r} (must be an integer >= {low})")
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"invalid lr: {lr!r} (must be a finite number > 0)")
    if len(policies) < 2:
        raise ConfigError(f"invalid policies: {list(policies)!r} (name at least two to compare)")
    if not (math.isfinite(start_box) and start_box > 0):
        raise ConfigError(f"invalid start_box: {start_box!r} (must be > 0)")
    names = _arm_names(policies)
    if lr_match == "gradient":
        steps = _whole_rounds(steps, policies, workers, lr)
    study_settings = {"workers": workers, "seeds": seeds, "first_seed": first_seed, "steps": steps, "lr": lr,
                      "lr_match": lr_match, "policies": list(policies), "start_box": start_box,
                      "compute_sigma": compute_sigma, "network_mean": network_mean, "alpha": alpha,
                      "task": asdict(task)}  # fmt: skip
    if out is not None:  # before any run
        check_earlier(Path(out) / "optima.json", lambda earlier: earlier.get("settings") == as_json(study_settings))
    minima = task.minima()
    seed_list = list(range(first_seed, first_seed + seeds))
    starts = np.stack([start_point(s, task.dim, start_box) for s in seed_list])  # (S, d)
    arms: list[dict[str, Any]] = []

    def finish(*, complete: bool) -> dict[str, Any]:
        """The result of the arms run so far (``complete``: all of them), its report written into ``out``."""
        comparisons = [compare_arms(arms[0], arm, categories=len(minima)) for arm in arms[1:]]
        call = (
            f"run_optima(workers={workers}, seeds={seeds}, steps={steps}, lr={lr}, policies={tuple(policies)!r}, "
            f"lr_match={lr_match!r}, start_box={start_box}, first_seed={first_seed}, compute_sigma={compute_sigma}, "
            f"network_mean={network_mean}, task={task!r})"
        )
        result: dict[str, Any] = {
            "settings": study_settings,
            "complete": complete,
            "task": {
                "formula": "f(x) = sum_i (x_i^2 - 1)^2 + c_i x_i; one example: c ~ N(c, noise^2 I)",
                "minima": [m._asdict() for m in minima],
                "basin_boundaries": [r[1] for r in task.roots()],
                "barriers": task.barriers(),
                "gradient_noise": task.gradient_noise,
            },
            "arms": arms,
            "comparisons": comparisons,
            "call": call,
            "command": _command(
                workers, seeds, steps, lr, policies, lr_match, start_box, first_seed, compute_sigma, network_mean, task
            ),
        }
        result["answer"] = answer_sentence(result, alpha=alpha)
        result["seconds"] = time.perf_counter() - started
        if out is not None:
            result["files"] = [str(p) for p in write_report(result, Path(out))]
        return result

    try:
        for name, policy_name in zip(names, policies, strict=True):
            arms.append(_run_arm(name, policy_name, workers=workers, steps=steps, lr=lr, lr_match=lr_match,
                                 starts=starts, seed_list=seed_list, task=task, compute_sigma=compute_sigma,
                                 network_mean=network_mean, trace_seeds=trace_seeds))  # fmt: skip
            if progress is not None:
                progress(f"{name}: {arms[-1]['counts']} ({time.perf_counter() - started:.1f} s)")
    except KeyboardInterrupt:  # Ctrl-C: the arms that finished, when two can be compared, as an incomplete study
        if out is not None and len(arms) >= 2 and not complete_results(Path(out) / "optima.json"):
            finish(complete=False)
        raise
    return finish(complete=True)


def _run_arm(name: str, policy_name: str, *, workers: int, steps: int, lr: float, lr_match: str,
             starts: np.ndarray, seed_list: list[int], task: TiltedWells, compute_sigma: float,
             network_mean: float, trace_seeds: int) -> dict[str, Any]:  # fmt: skip
    """One arm of :func:`run_optima`: ``policy_name`` from every start of ``starts`` (one per seed)."""
    base_name, arm_workers = _arm_policy(policy_name, workers)
    policy = make_policy(base_name, workers=arm_workers, lr=lr)
    is_sync = isinstance(policy, Sync)
    quorum = policy.quorum if isinstance(policy, Sync) else 1
    arm_lr = lr * quorum if (is_sync and lr_match == "gradient") else lr
    arm_steps = steps * quorum if (is_sync and lr_match == "update") else steps
    rule = make_rule("sgd", lr=arm_lr)
    ends, rejected, traces, sim_time, updates, pushes = [], [], [], [], [], []
    for k, seed in enumerate(seed_list):
        settings = SimSettings(
            workers=arm_workers,
            steps=arm_steps,
            compute_sigma=compute_sigma,
            network_mean=network_mean,
            seed=seed,
        )
        path: list[list[float]] = []
        keep = k < trace_seeds
        observe = (lambda t, n, p, path=path: path.append(p.tolist())) if keep else None
        every = max(1, arm_steps // 400) if keep else 0
        params = torch.from_numpy(starts[k].copy())
        result = simulate(params, rule, policy, task, settings, observe=observe, observe_every=every)
        ends.append(result.params.tolist())
        rejected.append(result.rejected)
        sim_time.append(result.sim_time)
        updates.append(result.records.version[-1] if len(result.records) else 0)
        pushes.append(len(result.records))
        if keep:
            traces.append([starts[k].tolist(), *path])
    end = np.asarray(ends, dtype=np.float64)  # (S, d)
    with np.errstate(over="ignore", invalid="ignore"):
        final_loss = task.loss(end)
    # Blown up: a finite point far out (sync at 1,024 workers ended at (-6e41, -1e23)) lies in some orthant, but
    # reached no minimum. A run that ends above every start's loss has left the wells: it diverged.
    left = ~np.isfinite(final_loss) | (final_loss > float(np.max(task.loss(starts))))
    minimum = np.where((np.asarray(rejected) > 0) | left, DIVERGED, task.classify(end))
    final_loss = np.where(np.isfinite(final_loss), final_loss, np.inf)
    counts = {m.name: int((minimum == k).sum()) for k, m in enumerate(task.minima())}
    counts["diverged"] = int((minimum == DIVERGED).sum())
    start_min = task.classify(starts)
    finite = final_loss[np.isfinite(final_loss)]
    return {
        "name": name,
        "policy": policy_name,
        "workers": arm_workers,
        "lr": arm_lr,
        "steps": arm_steps,
        "pushes": int(max(pushes)),  # pushes handled (the most over seeds)
        "updates": int(max(updates)),  # server updates applied (the most over seeds)
        "seeds": seed_list,
        "start": starts.tolist(),
        "end": end.tolist(),
        "start_minimum": start_min.tolist(),
        "minimum": minimum.tolist(),
        "final_loss": final_loss.tolist(),
        "distance": task.distance_to_minimum(end).tolist(),
        "rejected": rejected,
        "sim_time_mean": float(np.mean(sim_time)),
        "counts": counts,
        "escaped_to_better": int(((minimum >= 0) & (minimum < start_min)).sum()),
        "fell_to_worse": int((minimum > start_min).sum()),
        "final_loss_median": float(np.median(final_loss)),
        "final_loss_mean": float(np.mean(finite)) if len(finite) else math.nan,
        "traces": traces,
    }


def _command(
    workers: int,
    seeds: int,
    steps: int,
    lr: float,
    policies: Sequence[str],
    lr_match: str,
    start_box: float,
    first_seed: int,
    compute_sigma: float,
    network_mean: float,
    task: TiltedWells,
) -> str | None:
    """The ``downpour study optima`` command line for these settings, or None when one of them has no flag."""
    other = (lr, tuple(policies), lr_match, start_box, compute_sigma, network_mean, task)
    plain = (DEFAULTS["lr"], ("sync", "downpour"), "gradient", 1.6, 0.5, 0.0, TiltedWells())
    if other != plain:
        return None
    args = ["downpour", "study", "optima"]
    for flag, value in (("--workers", workers), ("--seeds", seeds), ("--steps", steps)):
        if value != DEFAULTS[flag[2:]]:
            args += [flag, str(value)]
    if first_seed:
        args += ["--first-seed", str(first_seed)]
    return shlex.join(args)


__all__ = [
    "DEFAULTS",
    "DIVERGED",
    "Minimum",
    "TiltedWells",
    "answer_sentence",
    "compare_arms",
    "mcnemar_exact",
    "run_optima",
    "start_point",
    "stuart_maxwell",
    "tilted_well_roots",
    "wilcoxon_paired",
    "write_report",
]
