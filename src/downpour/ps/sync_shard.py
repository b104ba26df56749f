"""A shard for ``ps.policy = "sync"``: it applies the mean of one push per worker per version (Chen, Pan, Monga,
Bengio & Jozefowicz 2016, synchronous SGD with backup workers).

Every worker fetches version ``v``, computes, and pushes; the shard adds the push to a running sum (a shared
:class:`~downpour.ps.policies.SyncAggregator`, the same one the simulator uses) and, once ``N − b`` pushes for
``v`` have arrived, applies their mean with the server rule and publishes version ``v + 1``. A push computed on an
older version is *late*: dropped and counted. A refused push (NaN or Inf) still counts toward the quorum, so the
round closes, but not toward the mean.

No deadlock. The quorum is ``min(N − b, live workers)``, the live workers being those not retired in the shared
:class:`~downpour.ps.clocks.SharedClocks` (a worker retires when it ends; the driver retires one that died), and a
worker waiting for the round calls :meth:`SyncShard.close_round`, which closes it as soon as the arrived pushes
reach that quorum, or at once (with whatever arrived) when the run is stopping. So the version counts *rounds
closed*: a round whose mean was refused closes too, without changing the values.

What was applied is counted per push, as on a shard of the other policies: ``applied`` counts the pushes whose
round's mean was applied; a refused push (NaN or Inf) and every push of a round whose mean the rule refused (it
would make a value NaN or Inf) count in ``rejected``. Whether a push was applied is known only once its round has
closed: :meth:`SyncShard.round_applied` says so, for the last :data:`ROUNDS_KEPT` rounds.

A worker killed in the middle of adding its push (a few microseconds) may leave part of that push in the round's
sum. One killed while it closes a round leaves the round open with its pushes, for the survivors to close (before
the commit), or closed with the aggregator still on it, which the next push catches up (after the commit; the round
then goes uncounted in ``applied`` or ``rejected`` if the kill fell in the few stores between the commit and the
count). Everything else keeps the :class:`~downpour.ps.shard.Shard` guarantees (double buffer, atomic publish).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from downpour.ps.policies import Sync
from downpour.ps.rules import PushMeta, Rule
from downpour.ps.shard import _ACTIVE, _REJECTED, _VERSION0, PushResult, Shard, all_finite

ROUNDS_KEPT = 1024  # rounds whose outcome round_applied can still tell (a worker asks right after its round closed)
_APPLIED, _OUTCOMES = 0, 1  # the counters: pushes applied, then the outcome ring (v + 1: applied, -(v + 1): not)


class LiveWorkers(Protocol):
    """What a sync shard asks of its roster: how many workers a round still waits for. The local backend's
    :class:`~downpour.ps.clocks.SharedClocks` (workers not retired) and the Ray backend's
    :class:`~downpour.backends.ray_coordinator.Roster` (workers whose latest process joined)."""

    def live(self) -> int: ...


class SyncShard(Shard):
    """A :class:`~downpour.ps.shard.Shard` whose pushes are collected per version and applied as their mean."""

    def __init__(
        self,
        index: int,
        start: int,
        initial: Tensor,
        rule: Rule,
        *,
        policy: Sync,
        roster: LiveWorkers,
        lock: AbstractContextManager[Any] | None = None,
        shared: bool = False,
    ) -> None:
        super().__init__(index, start, initial, rule, lock=lock, shared=shared)
        self.policy, self.roster = policy, roster
        self.aggregator = policy.aggregator(self.size)
        self._rounds = torch.zeros(_OUTCOMES + ROUNDS_KEPT, dtype=torch.int64)  # [applied pushes, outcome ring]
        self._rounds_np: np.ndarray | None = None
        if shared:
            self.aggregator.share_memory_()
            self._rounds.share_memory_()

    def _r(self) -> np.ndarray:
        if self._rounds_np is None:  # a NumPy view of the shared counters, as Shard._m
            self._rounds_np = self._rounds.numpy()
        return self._rounds_np

    @property
    def applied(self) -> int:
        """Pushes whose round's mean was applied so far."""
        return int(self._r()[_APPLIED])

    def round_applied(self, fetched_version: int) -> bool | None:
        """Whether the round of ``fetched_version`` closed with its mean applied: True; False when its mean was
        refused (or every push of it was); None when that is not known (the round is open, or closed more than
        :data:`ROUNDS_KEPT` rounds ago, or before a restore)."""
        slot = int(self._r()[_OUTCOMES + fetched_version % ROUNDS_KEPT])
        return True if slot == fetched_version + 1 else False if slot == -(fetched_version + 1) else None

    @property
    def dropped(self) -> int:
        """Late pushes dropped so far."""
        return self.aggregator.dropped_

    def quorum(self) -> int:
        """Pushes that close a round now: ``min(N − b, live workers)``."""
        return min(self.policy.quorum, self.roster.live())

    def push(
        self,
        update: Tensor,
        fetched_version: int,
        worker: int = -1,
        *,
        fetch_into: Tensor | None = None,
        fetched_values: Tensor | None = None,
    ) -> PushResult:
        """Add ``update`` to the round of ``fetched_version``; the push that completes the quorum applies the mean.

        The result of an accepted push: applied, staleness 0 and the version its round produces (``v + 1``);
        of a late one: not applied, its staleness (``version − fetched_version``) and the current version; of a
        refused one (NaN or Inf): not applied, staleness −1; of a second push from one worker for one version (a
        restarted worker, on the Ray backend, whose previous process pushed to the round): not applied, staleness
        0. ``fetch_into`` is not supported: a worker fetches only after its round has closed. As for
        :meth:`Shard.push`, ``0 <= fetched_version <= version`` (ValueError otherwise: nothing counted).
        """
        if fetch_into is not None:
            raise ValueError("a sync shard does not push-pull: fetch after the round has closed")
        finite = self._finite_slice(update, "an update")
        with self.lock:
            meta = self._m()
            version = int(meta[_VERSION0 + meta[_ACTIVE]])
            self._check_had(version, fetched_version, "a push fetched at version")
            self.aggregator.catch_up(version)
            if not self.aggregator.accepts(fetched_version):
                return PushResult(False, version - fetched_version, version)
            if worker in self.aggregator.arrived:  # a restarted worker (Ray backend) whose dead process pushed here
                return PushResult(False, 0, version)  # not applied: the round has this worker's push already
            if not finite:
                meta[_REJECTED] += 1
            self.aggregator.take(update if finite else None, worker=worker, fetched_version=fetched_version)
            self._close(self.quorum())
            return PushResult(True, 0, version + 1) if finite else PushResult(False, -1, version)

    def close_round(self, fetched_version: int, *, force: bool = False) -> bool:
        """True once the round of ``fetched_version`` is closed: close it now if the arrived pushes reach the
        quorum (or, with ``force``, if any has arrived: the run is stopping). Cheap when nothing changed. A
        ``fetched_version`` the shard never had is a ValueError: a negative one would read as closed, a future one
        would close the current round for it."""
        meta = self._m()
        current = int(meta[_VERSION0 + meta[_ACTIVE]])
        self._check_had(current, fetched_version, "a round closed for version")  # still true later: versions grow
        if current > fetched_version:  # a lock-free hint; versions only grow
            return True
        if not force and self.aggregator.pending < self.quorum():
            return False
        with self.lock:
            current = int(meta[_VERSION0 + meta[_ACTIVE]])
            if current > fetched_version:
                return True
            self.aggregator.catch_up(current)
            return self._close(1 if force else self.quorum())

    def _close(self, quorum: int) -> bool:
        """Close the current round if at least ``max(1, quorum)`` pushes have arrived (under the lock): apply their
        mean with the server rule, commit the next version, and only then let the aggregator collect for it. A
        round whose pushes were all refused, or whose mean would make a value NaN or Inf, closes without changing
        the values; the pushes of the latter count as rejected (the refused ones were counted on arrival).

        A process killed before the commit (most likely in the rule's arithmetic) leaves the round open with its
        pushes, for the next worker that waits on it to close; one killed after it leaves the aggregator on the
        closed round, which the next push or close catches up (:meth:`SyncAggregator.catch_up`)."""
        mean = self.aggregator.round_mean(quorum)
        if mean is None:
            return False
        meta, rounds = self._m(), self._r()
        live = int(meta[_ACTIVE])
        version = int(meta[_VERSION0 + live])
        summed = self.aggregator.summed
        applied = False
        if summed:
            spare = 1 - live
            out = self._buffer(spare)
            self.rule(PushMeta(-1, version, version), mean, self._buffer(live), out)
            applied = all_finite(out.values)
        rounds[_OUTCOMES + version % ROUNDS_KEPT] = version + 1 if applied else -(version + 1)  # a redo rewrites it
        if applied:
            meta[_VERSION0 + spare] = version + 1
            meta[_ACTIVE] = spare  # the commit point
            rounds[_APPLIED] += summed
        else:
            meta[_VERSION0 + live] = version + 1  # the commit point: the round is over; the values stay as they were
            meta[_REJECTED] += summed
        self.aggregator.start_next()
        return True

    def snapshot(self, *, wait: float | None = None) -> dict[str, Any]:
        """As :meth:`Shard.snapshot`, with ``dropped`` (late pushes) and ``applied`` (pushes applied) too."""
        with self._held(wait):
            return {**self._snapshot_locked(), "dropped": self.aggregator.dropped_, "applied": self.applied}

    def restore(self, snapshot: dict[str, Any]) -> None:
        """As :meth:`Shard.restore`; the aggregator then collects for the restored version. A snapshot without
        ``applied`` (saved before it was counted) estimates it as rounds times the quorum."""
        super().restore(snapshot)
        self.aggregator.restore(version=int(snapshot["version"]), dropped=int(snapshot.get("dropped", 0)))
        with self.lock:
            rounds = self._r()
            rounds[:] = 0
            # a snapshot saved before pushes were counted: its rounds times the quorum (exact without late pushes)
            rounds[_APPLIED] = int(snapshot.get("applied", int(snapshot["version"]) * self.policy.quorum))

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_rounds_np"] = None  # a per-process view, rebuilt lazily
        return state
