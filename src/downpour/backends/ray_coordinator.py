"""The Ray backend's coordinator actor: the global step budget, restore points, shard restores, SSP clocks, and
the roster of live workers that ``ps.policy = "sync"`` rounds wait for (:class:`Roster`, also kept by each shard).

Kept free of torch (and of the rest of the backend), so that its actor process starts in a fraction of the time a
shard's or worker's does.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

RETIRED = 2**62  # the SSP clock of a worker that ended or died (as downpour.ps.clocks.RETIRED)


class Roster:
    """Which workers a ``sync`` round waits for, on a Ray cluster where workers die and come back.

    Every change is an event ``(worker, incarnation, live)``: a worker's process joins when its ``run`` starts
    (``incarnation`` counts the driver's calls of ``run``) and leaves when it ends, or when the driver sees it
    died. Events reach the coordinator and every shard actor by separate calls, in any order, so each is kept as a
    key ``2·incarnation + (0 if live else 1)`` and a worker's key only grows: a late "died" of an old incarnation
    never retires the restarted one, and a copy can be merged into another by taking the larger key
    (:meth:`merge`). All workers start live (key 0). :meth:`live` is what
    :meth:`~downpour.ps.sync_shard.SyncShard.quorum` counts, as it does the local backend's shared clocks.
    """

    def __init__(self, workers: int) -> None:
        self.keys = [0] * workers
        self._lock = threading.Lock()  # a sync shard actor runs several threads

    def update(self, worker: int, incarnation: int, live: bool) -> bool:
        """Apply one event; True when it changed the roster."""
        key = 2 * incarnation + (0 if live else 1)
        with self._lock:
            if key <= self.keys[worker]:
                return False
            self.keys[worker] = key
            return True

    def merge(self, keys: list[int]) -> None:
        """Take in another copy's keys (a restarted shard reading the coordinator's)."""
        with self._lock:
            self.keys = [max(a, b) for a, b in zip(self.keys, keys, strict=True)]

    def live(self) -> int:
        """Workers whose latest event is a join."""
        return sum(key % 2 == 0 for key in self.keys)


class Coordinator:
    """The small actor every other one can reach: the global step budget, the last good checkpoint (the shards'
    restore points), shard restores."""

    def __init__(self, limit: int, workers: int, shards: int) -> None:
        self.limit, self.workers = limit, workers
        self.claimed = 0
        self._snapshots: list[list[Any]] = [[] for _ in range(shards)]  # per shard: [ObjectRef of a wire snapshot]
        self._incarnations = [0] * shards
        self._restores: list[tuple[int, int, int, float]] = []  # (shard, new incarnation, restored version, time)
        self._examples: dict[int, list[Any]] = {}  # per worker: [ObjectRef of its examples]
        self._clocks = [0] * workers  # ps.policy = "ssp": pushes per worker (downpour.ps.clocks)
        self._starts = [0] * workers  # per worker: its actor's processes started (every one after the first restarts)
        self._roster = Roster(workers)  # ps.policy = "sync": the copy a restarted shard actor starts from
        self._leased: dict[tuple[int, int], int] = {}  # (worker, run) -> steps granted (read while unsettled)
        self._last: dict[tuple[int, int], int] = {}  # (worker, run) -> steps its latest claim was granted
        self._settled: set[tuple[int, int]] = set()  # runs whose unused steps came back (released or settled)
        self._stamped: dict[tuple[int, int], int] = {}  # (worker, run) -> its pushes, as settle was told them

    def clocks(self) -> list[int]:
        """Every worker's SSP clock."""
        return list(self._clocks)

    def tick(self, worker: int) -> None:
        """``worker`` finished a push: its SSP clock advances."""
        self._clocks[worker] += 1

    def retire(self, worker: int) -> None:
        """``worker`` ended or died for good: it no longer holds anyone back."""
        self._clocks[worker] = RETIRED

    def roster_update(self, worker: int, incarnation: int, live: bool) -> None:
        """``ps.policy = "sync"``: a worker joined or left (:meth:`Roster.update`)."""
        self._roster.update(worker, incarnation, live)

    def roster(self) -> list[int]:
        """The roster's keys (:class:`Roster`)."""
        return list(self._roster.keys)

    def set_steps(self, value: int) -> None:
        """Count the budget from ``value`` (on resume)."""
        self.claimed = value

    def claim(self, most: int, worker: int = -1, run: int = 0) -> int:
        """Grant up to ``most`` steps to ``worker``'s ``run`` (fewer as the budget runs out, so workers share its
        end); 0 when spent, or when the run was settled: its unused steps came back already, so a process still
        running it (one cut off from the cluster while Ray restarted its actor elsewhere) gets no more and stops."""
        if not self.limit:
            self.claimed += most
            return most
        if (worker, run) in self._settled:
            return 0
        remaining = self.limit - self.claimed
        granted = max(0, min(most, remaining, max(1, remaining // (2 * self.workers))))
        self.claimed += granted
        self._leased[(worker, run)] = self._leased.get((worker, run), 0) + granted
        self._last[(worker, run)] = granted  # a worker claims once it has used its lease: all before were used
        return granted

    def release(self, unused: int, worker: int = -1, run: int = 0) -> None:
        """Give back steps ``worker``'s ``run`` claimed and did not use (it stopped): its leases are settled."""
        if (worker, run) in self._settled:
            return
        self.claimed -= unused
        self._settled.add((worker, run))

    def settle(self, worker: int, run: int, used: dict[int, int]) -> int:
        """``worker``'s runs before ``run`` that ended without :meth:`release` (their process was killed) give
        back the steps they claimed beyond ``used`` (pushes per run, from the shards' stamps), at most their last
        lease: a worker claims only once it has used the lease before, so where the stamps are gone (every shard
        restored while the run died) not every step the run claimed and pushed comes back. Return the steps given
        back."""
        for r, count in used.items():  # kept for the driver, which may never poll the restarted run that read them
            self._stamped[(worker, r)] = max(count, self._stamped.get((worker, r), 0))
        back = 0
        for (w, r), leased in self._leased.items():
            if w == worker and r < run and (w, r) not in self._settled:
                back += max(0, min(leased - used.get(r, 0), self._last.get((w, r), 0)))
                self._settled.add((w, r))
        self.claimed -= back
        return back

    def set_snapshot(self, shard: int, ref: list[Any]) -> None:
        """Keep ``ref`` (one ObjectRef in a list, so that Ray passes the reference) as ``shard``'s restore point."""
        self._snapshots[shard] = ref

    def snapshot(self, shard: int) -> list[Any]:
        """``[ObjectRef]`` of the snapshot a restarted ``shard`` loads."""
        return self._snapshots[shard]

    def set_examples(self, worker: int, ref: list[Any]) -> None:
        """Keep ``[ObjectRef]`` of ``worker``'s training examples."""
        self._examples[worker] = ref

    def examples(self, worker: int) -> list[Any]:
        """``[ObjectRef]`` of ``worker``'s training examples."""
        return self._examples[worker]

    def shard_restored(self, shard: int, version: int) -> int:
        """Note that ``shard`` came back at ``version``; return its new incarnation number."""
        self._incarnations[shard] += 1
        self._restores.append((shard, self._incarnations[shard], version, time.time()))
        return self._incarnations[shard]

    def restores(self) -> list[tuple[int, int, int, float]]:
        """Every restore so far: ``(shard, incarnation, restored version, unix time)``."""
        return list(self._restores)

    def worker_started(self, worker: int) -> None:
        """A process of ``worker``'s actor has started (its constructor calls this first, on every restart)."""
        self._starts[worker] += 1

    def restores_and_starts(self) -> tuple[list[tuple[int, int, int, float]], list[int], dict[tuple[int, int], int]]:
        """:meth:`restores`, how many processes each worker's actor has started, and the pushes of dead runs that
        :meth:`settle` was told (``(worker, run) -> count``)."""
        return list(self._restores), list(self._starts), dict(self._stamped)

    def pid(self) -> int:
        """This actor's process id."""
        return os.getpid()
