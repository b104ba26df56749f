"""``downpour bench sim``: the simulator's wall-time overhead over a plain loop making the same gradient calls.

Both sides call the same gradient callable (the ``rica`` model on scikit-learn's digits, through
:class:`~downpour.backends.sim.ModelGradient`) the same number of times. The plain loop does nothing else but an
in-place SGD step with one random stream; the simulator adds everything it is: the event heap, random durations
(lognormal compute times, stragglers, network delay, from streams of their own), one fetched copy per in-flight
version, the policy and server rule, the NaN/Inf check and the per-push records.

A shared 2-core machine drifts by ±25% over seconds, so the two sides take turns every ``chunk`` pushes (tens of
milliseconds) within one simulated run: the simulator's ``observe`` hook hands over to the plain loop, which makes
as many gradient calls as the simulator made since the last turn. ``ratio`` is simulator seconds / plain seconds
(median over repeats); ``in_run_ratio`` is simulator seconds / seconds inside its own gradient calls.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from downpour.backends.sim import GradFn, ModelGradient, SimSettings, Simulation
from downpour.config import DataConfig, ModelConfig
from downpour.data import load_dataset
from downpour.errors import DownpourError
from downpour.models import build_model
from downpour.ps.policies import Policy, make_policy
from downpour.ps.rules import Rule, make_rule
from downpour.threads import torch_threads


def workload(*, features: int = 64, batch_size: int = 32, seed: int = 0,
             workers: int | None = None) -> tuple[torch.Tensor, GradFn]:  # fmt: skip
    """Initial flat parameters and a gradient callable: ``rica`` on whitened digits (64 values per example).

    ``workers``, when given, is checked against the training examples before anything per worker is allocated, and
    each simulated worker then reads its own slice of them, as in ``train --backend sim`` (None: every worker reads
    all of them).
    """
    dataset = load_dataset(DataConfig(source="digits", held_out=64), seed=seed)
    if workers is not None and workers > len(dataset.train):
        raise DownpourError(f"invalid --workers: {workers} (more than the {len(dataset.train)} training examples of "
                            "the digits workload; each simulated worker reads its own slice)")  # fmt: skip
    model = build_model(ModelConfig(name="rica", features=features), dataset.dim, seed=seed)
    grad = ModelGradient(model, dataset.train, batch_size=batch_size, workers=workers)  # each worker its slice
    return grad.flat.values.clone(), grad


class PlainLoop:
    """The baseline: gradient calls (round-robin over ``workers``) each followed by ``w ← w − lr·g``, one stream."""

    def __init__(self, params: torch.Tensor, grad: GradFn, *, workers: int, lr: float, seed: int = 0) -> None:
        self.w, self.grad, self.workers, self.lr = params.clone(), grad, workers, lr
        self.rng = np.random.default_rng(seed)
        self.steps_ = 0

    def run(self, steps: int) -> float:
        """Seconds for ``steps`` more gradient calls and updates."""
        w, grad, rng, workers, lr = self.w, self.grad, self.rng, self.workers, self.lr
        start = time.perf_counter()
        for step in range(self.steps_, self.steps_ + steps):
            _, g = grad(w, step % workers, rng)
            w.add_(g, alpha=-lr)
        self.steps_ += steps
        return time.perf_counter() - start


def interleaved(
    params: torch.Tensor, grad: GradFn, rule: Rule, policy: Policy, settings: SimSettings, *, lr: float, chunk: int
) -> dict[str, float]:
    """One simulated run and the plain loop, taking turns every ``chunk`` pushes (about as many gradient calls).

    Both sides see the same drift of the machine. Returns the seconds of each side, the seconds spent inside the
    simulator's gradient calls, and the gradient calls made.
    """
    plain = PlainLoop(params, grad, workers=settings.workers, lr=lr)
    totals = {"sim_s": 0.0, "plain_s": 0.0, "inside_s": 0.0}
    done = 0  # gradient calls the plain loop has matched so far

    def timed_grad(p: torch.Tensor, worker: int, rng: np.random.Generator) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        out = grad(p, worker, rng)
        totals["inside_s"] += time.perf_counter() - start
        return out

    def take_turn(t: float, pushes: int, values: torch.Tensor) -> None:
        nonlocal done, mark
        totals["sim_s"] += time.perf_counter() - mark
        totals["plain_s"] += plain.run(sim.grad_evals - done)
        done = sim.grad_evals
        mark = time.perf_counter()

    mark = time.perf_counter()
    sim = Simulation(params, rule, policy, timed_grad, settings, observe=take_turn, observe_every=chunk)
    sim.run()
    totals["sim_s"] += time.perf_counter() - mark
    totals["plain_s"] += plain.run(sim.grad_evals - done)
    return {**totals, "grad_evals": sim.grad_evals}


def run(
    *,
    workers: int = 1000,
    steps: int = 3000,
    repeats: int = 5,
    chunk: int = 50,
    policy: str = "downpour",
    lr: float = 1e-5,
    features: int = 64,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Time the simulator against the plain loop, interleaved every ``chunk`` pushes, ``repeats`` times.

    ``ratio`` is the median over repeats of sim seconds / plain seconds; ``in_run_ratio`` the median of sim
    seconds / seconds inside the simulator's own gradient calls.
    """
    with torch_threads(1):  # both sides single-threaded, as a worker process would be
        params, grad = workload(features=features, batch_size=batch_size, workers=workers)
        settings = SimSettings(
            workers=workers,
            steps=steps,
            compute_sigma=0.5,
            stragglers=0.1,
            straggler_slowdown=4.0,
            network_mean=0.05,
            network_sigma=0.5,
        )
        rule = make_rule("sgd", lr=lr)
        PlainLoop(params, grad, workers=workers, lr=lr).run(min(steps, 200))  # warm-up
        runs = [
            interleaved(params, grad, rule, make_policy(policy, workers=workers, lr=lr), settings, lr=lr, chunk=chunk)
            for _ in range(repeats)
        ]
    sim_s = statistics.median(r["sim_s"] for r in runs)
    plain_s = statistics.median(r["plain_s"] for r in runs)
    evals = int(runs[0]["grad_evals"])
    return {
        "workers": workers,
        "policy": policy,
        "pushes": steps,
        "grad_evals": evals,
        "repeats": repeats,
        "ratio": statistics.median(r["sim_s"] / r["plain_s"] for r in runs),
        "in_run_ratio": statistics.median(r["sim_s"] / r["inside_s"] for r in runs),
        "sim_s": sim_s,
        "plain_s": plain_s,
        "events_per_s": steps / sim_s,
        "grad_us": plain_s / evals * 1e6,
        "overhead_us_per_push": (sim_s - plain_s) / steps * 1e6,
        "model": f"rica features={features} batch={batch_size} on digits",
    }


def print_table(result: dict[str, Any], console: Console) -> None:
    """One table of the measured numbers."""
    table = Table(title=f"simulator overhead: {result['workers']} workers, {result['policy']}, {result['model']}")
    for column in ("pushes", "sim s", "plain s", "ratio", "in-run ratio", "pushes/s", "grad µs", "overhead µs/push"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{result['pushes']:,}",
        f"{result['sim_s']:.3f}",
        f"{result['plain_s']:.3f}",
        f"{result['ratio']:.3f}",
        f"{result['in_run_ratio']:.3f}",
        f"{result['events_per_s']:,.0f}",
        f"{result['grad_us']:.0f}",
        f"{result['overhead_us_per_push']:.1f}",
    )
    console.print(table)
