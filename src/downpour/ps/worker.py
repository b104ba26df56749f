"""The Downpour SGD worker loop (Dean et al., NIPS 2012), independent of how shards are reached.

Every ``n_fetch`` steps the worker copies all shards into its local parameters and remembers each shard's version;
every step it computes a gradient on a mini-batch of its own examples and adds it to an accumulator (applying it
to the local copy too when ``local_apply`` is on, as the DistBelief client did); every ``n_push`` steps it sends
each shard its slice of the accumulator. It never waits for another worker, so a push may be computed against
parameters that others have changed since the fetch: its staleness, which the shard reports and the worker records.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from downpour.ps.clocks import SharedClocks
from downpour.ps.flat import FlatParameters
from downpour.ps.shard import PushResult, all_finite


class ShardClient(Protocol):
    """What a worker needs of a shard, wherever it lives: its slice, a fetch and a push."""

    index: int
    start: int
    size: int

    def fetch_into(self, out: Tensor) -> int: ...

    def push(
        self,
        update: Tensor,
        fetched_version: int,
        worker: int = -1,
        *,
        fetch_into: Tensor | None = None,
        fetched_values: Tensor | None = None,
    ) -> PushResult: ...


class StepBudget(Protocol):
    """The global step counter shared by all workers; ``reserve`` claims one push, False once the budget is spent."""

    def reserve(self) -> bool: ...


class PushRecord(NamedTuple):
    """One push applied (or rejected) by one shard: what ``metrics.jsonl`` stores per push."""

    t: float  # seconds since the run's clock started
    worker: int
    shard: int
    version: int  # the shard's version after the push
    staleness: int  # -1 when rejected
    loss: float  # mean mini-batch loss over the steps this push accumulates
    applied: bool


@dataclass(frozen=True)
class WorkerSettings:
    """The Downpour client's knobs (``train.batch_size`` and the ``ps.*`` client keys)."""

    batch_size: int = 128
    n_fetch: int = 1
    n_push: int = 1
    local_apply: bool = False
    local_lr: float = 0.01


def epoch_batches(examples: Tensor, batch_size: int, rng: np.random.Generator) -> Iterator[Tensor]:
    """Endless mini-batches ``(B, D)``: each epoch visits the examples in a new random order, without repeats."""
    count = examples.shape[0]
    batch_size = min(batch_size, count)
    while True:
        order = torch.from_numpy(rng.permutation(count))
        for start in range(0, count - batch_size + 1, batch_size):
            yield examples.index_select(0, order[start : start + batch_size])  # (B, D)


def refuse_whole(values: Tensor, shards: Sequence[object]) -> None:
    """Make every shard refuse what a worker sends (an update, or EASGD's own parameters) when it holds NaN or Inf
    anywhere: each shard checks only its own slice, so with several shards the finite slices would be applied (or
    exchanged) and the others refused. ``values`` is then all NaN; each shard rejects and counts it."""
    if len(shards) > 1 and not all_finite(values):
        values.fill_(math.nan)


class DownpourWorker:
    """One model replica: fetch, compute, accumulate, push; never waits for the others."""

    def __init__(
        self,
        worker_id: int,
        model: nn.Module,
        shards: Sequence[ShardClient],
        examples: Tensor,
        settings: WorkerSettings,
        *,
        rng: np.random.Generator,
        budget: StepBudget,
        should_stop: Callable[[], bool],
        record: Callable[[PushRecord], None],
        progress: Callable[[int, float], None] = lambda examples, loss: None,
        clock: Callable[[], float] = time.perf_counter,
        ssp: SharedClocks | None = None,
        roster: SharedClocks | None = None,
    ) -> None:
        self.worker_id, self.model, self.shards, self.settings = worker_id, model, list(shards), settings
        self.examples, self.rng, self.budget = examples, rng, budget
        self.should_stop, self.record, self.progress, self.clock = should_stop, record, progress, clock
        self.ssp = ssp  # ps.policy = "ssp": wait for the slowest worker before running too far ahead
        self.roster = roster  # ps.policy = "sync": the live workers (this one retires when it ends)
        self.flat = FlatParameters(model)
        self.steps_ = 0
        self.pushes_ = 0

    def _fetch(self, versions: list[int], local: list[Tensor]) -> None:
        for shard, values in zip(self.shards, local, strict=True):
            versions[shard.index] = shard.fetch_into(values)

    def _push(
        self, updates: list[Tensor], versions: list[int], local: list[Tensor], loss: float, *, then_fetch: bool
    ) -> None:
        for shard, update, values in zip(self.shards, updates, local, strict=True):
            fetched = versions[shard.index]
            extra = {"fetched_values": values} if getattr(shard, "needs_fetched", False) else {}  # dc-asgd
            result = shard.push(update, fetched, self.worker_id, fetch_into=values if then_fetch else None, **extra)
            if then_fetch:
                versions[shard.index] = result.version
            self.record(
                PushRecord(
                    self.clock(), self.worker_id, shard.index, result.version, result.staleness, loss, result.applied
                )
            )
        self.pushes_ += 1

    def _step(self, batches: Iterator[Tensor], accumulated: Tensor | None, *, apply_lr: float = 0.0) -> float:
        """One mini-batch: its gradient into ``flat.grads``, added into ``accumulated`` (when that is a buffer of its
        own), applied to the local parameters at ``apply_lr`` (when > 0); returns the mini-batch loss."""
        flat = self.flat
        batch = next(batches)  # (B, D)
        flat.zero_grad()
        loss = self.model.loss(batch)
        loss.backward()
        if accumulated is not None and accumulated is not flat.grads:
            accumulated.add_(flat.grads)
        if apply_lr:
            with torch.no_grad():
                flat.values.add_(flat.grads, alpha=-apply_lr)
        value = float(loss.detach())
        self.steps_ += 1
        self.progress(batch.shape[0], value)
        return value

    def run(self) -> None:
        """Train until ``should_stop()`` is true or the global step budget is spent."""
        try:
            self._run()
        finally:
            for clocks in (self.ssp, self.roster):
                if clocks is not None:
                    clocks.retire(self.worker_id)

    def _buffers(self) -> tuple[Tensor, list[Tensor], list[Tensor], Iterator[Tensor]]:
        """The accumulator (``flat.grads`` itself when ``n_push`` is 1), the per-shard views of the local
        parameters and of the accumulator (made once), and the endless mini-batches."""
        s, flat = self.settings, self.flat
        accumulated = torch.zeros_like(flat.grads) if s.n_push > 1 else flat.grads
        local = [flat.values[shard.start : shard.start + shard.size] for shard in self.shards]
        updates = [accumulated[shard.start : shard.start + shard.size] for shard in self.shards]
        return accumulated, local, updates, epoch_batches(self.examples, s.batch_size, self.rng)

    def _run(self) -> None:
        s = self.settings
        versions = [0] * len(self.shards)
        accumulated, local, updates, batches = self._buffers()
        loss_sum, pending = 0.0, 0
        fetched_with_push = False
        while not self.should_stop():
            starts_clock = self.ssp is not None and self.steps_ % s.n_push == 0
            if starts_clock and not self.ssp.wait_turn(self.worker_id, self.should_stop):  # type: ignore[union-attr]
                break
            if self.steps_ % s.n_fetch == 0 and not fetched_with_push:
                self._fetch(versions, local)
            fetched_with_push = False
            loss_sum += self._step(batches, accumulated, apply_lr=s.local_lr if s.local_apply else 0.0)
            pending += 1
            if self.steps_ % s.n_push == 0:
                if not self.budget.reserve():
                    break
                mean_loss = loss_sum / pending
                # When the next step would fetch anyway, fetch under the same lock as the push (push-pull).
                # (Not under SSP: there the fetch waits for the slowest worker, so it comes after the wait.)
                fetched_with_push = self.steps_ % s.n_fetch == 0 and self.ssp is None
                refuse_whole(accumulated, self.shards)
                self._push(updates, versions, local, mean_loss, then_fetch=fetched_with_push)
                if self.ssp is not None:
                    self.ssp.tick(self.worker_id)
                if s.n_push > 1:
                    accumulated.zero_()
                loss_sum, pending = 0.0, 0
