"""The Ray backend's shard side: :class:`ShardServer` holds a :class:`~downpour.ps.shard.Shard` in a file under
``/dev/shm``, and snapshots travel in the wire format here. The workers that push to it are in
:mod:`downpour.backends.ray_workers`; see :mod:`downpour.backends.ray` for the design and the driver side.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from typing import Any

import numpy as np
import torch

from downpour.backends import push_stamps, ray_missing, shm
from downpour.backends.ray_coordinator import Roster
from downpour.config import Config
from downpour.ps.policies import Sync, config_policy, policy_rule
from downpour.ps.shard import LOST, Shard, ShardBusy
from downpour.ps.sync_shard import SyncShard

try:
    import ray
except ImportError:  # pragma: no cover - exercised only where Ray is missing
    raise ray_missing() from None


# A shard actor's snapshots run in a thread of their own, beside the calls of workers on other nodes (which wait for
# the shard's lock without a limit): queued behind one of those, a snapshot's ``wait`` never began
SNAPSHOT_GROUP = "snapshot"


def sync_threads(workers: int) -> int:
    """Threads of a sync shard actor: one per worker waiting for its round, and room for pushes and the driver."""
    return workers + 4


def roster_update(targets: list[Any], worker: int, incarnation: int, live: bool) -> list[Any]:
    """Send one roster event (:class:`Roster`) to the coordinator and shard actors in ``targets``; the refs."""
    return [target.roster_update.remote(worker, incarnation, live) for target in targets]


# ---------------------------------------------------------------------------------------------------------------


def _counts(snapshot: dict[str, Any]) -> dict[str, int]:
    """A snapshot's counters: version, rejected, and a sync shard's late pushes (``dropped``) and applied pushes
    (``applied``) when it has them."""
    return {key: int(snapshot[key]) for key in ("version", "rejected", "dropped", "applied") if key in snapshot}


def snapshot_to_wire(snapshot: dict[str, Any]) -> dict[str, Any]:
    """A shard snapshot with NumPy arrays in place of tensors (what Ray moves as buffers)."""
    return {
        "values": snapshot["values"].numpy(),
        "state": {name: tensor.numpy() for name, tensor in snapshot["state"].items()},
        **_counts(snapshot),
    }


def snapshot_from_wire(wire: dict[str, Any]) -> dict[str, Any]:
    """Torch tensors owning writable copies (arrays Ray hands over are read-only views)."""
    return {
        "values": torch.from_numpy(np.array(wire["values"], dtype=np.float32)),
        "state": {name: torch.from_numpy(np.array(a, dtype=np.float32)) for name, a in wire["state"].items()},
        **_counts(wire),
    }


def _reconstructed() -> bool:
    """Whether this actor is a restart of one that died."""
    with warnings.catch_warnings():  # Ray 2.60 warns about a deprecated call of its own inside this one
        warnings.simplefilter("ignore")
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


# ---------------------------------------------------------------------------------------------------------------
# Actors (plain classes; :class:`RayCluster` turns them into actors with the options each needs)
# ---------------------------------------------------------------------------------------------------------------


class ShardServer:
    """One shard in a Ray actor: a :class:`Shard` with the run's rule in a file under ``/dev/shm`` that worker
    actors on the same node map and push into directly (:mod:`downpour.backends.shm`); other workers call
    :meth:`push` and :meth:`fetch`, which work on the same memory under the same lock.

    Values leave as fresh NumPy arrays; an update arrives as a read-only array and is copied once into the shard's
    receive buffer.

    Under ``ps.policy = "sync"`` the shard is a :class:`~downpour.ps.sync_shard.SyncShard` in this process's memory
    (no file: every worker pushes through the actor, so that every push meets the round's aggregator), with a
    :class:`~downpour.backends.ray_coordinator.Roster` of live workers that workers and the driver update
    (:meth:`roster_update`). The actor then runs ``workers + 4`` threads (:func:`sync_threads`), so that a worker
    waiting for a round (:meth:`await_round`) does not hold up the pushes that close it.
    """

    def __init__(self, index: int, start: int, size: int, config: Config, cluster_name: str) -> None:
        torch.set_num_threads(1)
        coordinator = ray.get_actor(f"{cluster_name}-coordinator")
        self.index, self.size = index, size
        self._update = torch.empty(size, dtype=torch.float32)
        self._fetched = torch.empty(size, dtype=torch.float32)
        # Values come from the restore point the driver keeps with the coordinator (the start at first, the last
        # checkpoint that did not diverge after a death). Constructor arguments hold no object or actor reference:
        # Ray may lose those of a restartable actor (ray-project/ray#53727); actors are found by name instead.
        (ref,) = ray.get(coordinator.snapshot.remote(index))
        snapshot = snapshot_from_wire(ray.get(ref))
        self.incarnation = 0
        if _reconstructed():
            self.incarnation = ray.get(coordinator.shard_restored.remote(index, snapshot["version"]))
        policy = config_policy(config)
        self.sync = isinstance(policy, Sync)
        shm.collect_orphans()  # files of runs whose driver was killed
        if self.sync:
            assert isinstance(policy, Sync)
            self.roster = Roster(config.cluster.workers)
            self.roster.merge(ray.get(coordinator.roster.remote()))  # workers that left before this incarnation
            self._changed = threading.Condition()  # notified when a push arrives or the roster changes
            self._generation = 0
            self.path = ""
            self.stamps = np.zeros(config.cluster.workers, dtype=np.int64)  # push_stamps, in this process
            self.shard: Shard = SyncShard(index, start, snapshot["values"], policy_rule(config), policy=policy,
                                          roster=self.roster, lock=threading.Lock())  # fmt: skip
            self.shard.restore(snapshot)
            self._reader = self.shard  # a threading lock: shared by the snapshot's thread
            return
        self.path = shm.segment_path(cluster_name, index, self.incarnation)
        shm.unlink(self.path)  # left by an earlier try of this incarnation's constructor
        self._shared = shm.SharedShard(self.path, index, start, size, policy_rule(config), create=True,
                                       incarnation=self.incarnation, workers=config.cluster.workers)  # fmt: skip
        self.shard = self._shared.shard
        self._reader = self._shared.view()  # the snapshot's thread takes the lock through a descriptor of its own
        self.stamps = self._shared.stamps  # push_stamps, in the file: workers on this node write theirs directly
        self.shard.restore(snapshot)
        shm.retire_others(cluster_name, index, self.path)  # workers still pushing into a dead incarnation stop

    def attach_info(self) -> tuple[str, str, int]:
        """``(node id, file, incarnation)``: what a worker needs to map this shard when it runs on the same node."""
        return ray.get_runtime_context().get_node_id(), self.path, self.incarnation

    def release(self) -> None:
        """Remove this shard's file (the run is over; mappings that remain stay valid until dropped)."""
        if self.path:
            shm.unlink(self.path)

    def fetch(self) -> tuple[int, int, np.ndarray]:
        """``(version, incarnation, values)``."""
        out = torch.empty(self.size, dtype=torch.float32)
        version = self.shard.fetch_into(out)
        return version, self.incarnation, out.numpy()

    def push(self, update: np.ndarray, fetched_version: int, worker: int, incarnation: int, pull: bool,
             fetched_values: np.ndarray | None = None, stamp: int = 0
             ) -> tuple[bool, int, int, int, np.ndarray | None]:  # fmt: skip
        """Apply ``update``; return ``(applied, staleness, version, incarnation, values if pull else None)``.
        ``stamp``: the worker's push stamp (:mod:`~downpour.backends.push_stamps`), kept first.

        A push computed against another incarnation (values this shard lost when it died) is not applied.
        """
        push_stamps.note(self.stamps, worker, stamp)
        out = torch.empty(self.size, dtype=torch.float32) if pull else None
        if incarnation != self.incarnation:
            version = self.shard.fetch_into(out) if out is not None else self.shard.version
            return False, LOST, version, self.incarnation, out.numpy() if out is not None else None
        received = torch.empty(self.size, dtype=torch.float32) if self.sync else self._update  # sync: threads
        np.copyto(received.numpy(), update)
        fetched = None
        if fetched_values is not None:
            np.copyto(self._fetched.numpy(), fetched_values)
            fetched = self._fetched
        result = self.shard.push(received, fetched_version, worker, fetch_into=out, fetched_values=fetched)
        if self.sync:
            self._notify()
        return result.applied, result.staleness, result.version, self.incarnation, None if out is None else out.numpy()

    def _notify(self) -> None:
        """Wake the workers waiting in :meth:`await_round`: a push arrived or the roster changed."""
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def await_round(self, fetched_version: int, incarnation: int, force: bool, timeout_s: float
                    ) -> tuple[bool, int]:  # fmt: skip
        """``ps.policy = "sync"``: wait up to ``timeout_s`` until the round of ``fetched_version`` has closed
        (:meth:`SyncShard.close_round`, which closes it once the arrived pushes reach the live quorum, or with
        ``force`` at once: the worker is stopping). Return ``(closed, incarnation)``.

        A round of another incarnation died with it (this shard was restored from a checkpoint): closed at once,
        and the worker fetches the restored values.
        """
        if incarnation != self.incarnation:
            return True, self.incarnation
        assert isinstance(self.shard, SyncShard)
        deadline = time.monotonic() + timeout_s
        while True:
            with self._changed:
                generation = self._generation
            if self.shard.close_round(fetched_version, force=force):
                return True, self.incarnation
            with self._changed:
                while self._generation == generation:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False, self.incarnation
                    self._changed.wait(left)

    def push_round(self, update: np.ndarray, fetched_version: int, worker: int, incarnation: int, timeout_s: float,
                   stamp: int = 0
                   ) -> tuple[bool, int, int, int, tuple[int, np.ndarray, bool | None] | None]:  # fmt: skip
        """``ps.policy = "sync"``: :meth:`push`, then :meth:`await_round` up to ``timeout_s``, then the values the
        round produced: ``(accepted, staleness, version, incarnation, (version, values, whether the round's mean was
        applied) once the round has closed, else None)``. One call per shard and round where a push, a wait, a fetch
        and the round's outcome would take four."""
        applied, staleness, version, _, _ = self.push(update, fetched_version, worker, incarnation, False, None, stamp)
        closed, current = self.await_round(fetched_version, incarnation, False, timeout_s)
        if not closed:
            return applied, staleness, version, current, None
        out = torch.empty(self.size, dtype=torch.float32)
        outcome = self.round_applied(fetched_version, incarnation)
        return applied, staleness, version, current, (self.shard.fetch_into(out), out.numpy(), outcome)

    def round_applied(self, fetched_version: int, incarnation: int) -> bool | None:
        """``ps.policy = "sync"``: whether the round of ``fetched_version`` closed with its mean applied
        (:meth:`SyncShard.round_applied`); None for a round of another incarnation (it died with it)."""
        assert isinstance(self.shard, SyncShard)
        return self.shard.round_applied(fetched_version) if incarnation == self.incarnation else None

    def roster_update(self, worker: int, incarnation: int, live: bool) -> None:
        """``ps.policy = "sync"``: worker ``worker`` (its ``incarnation``-th ``run``) joined or left the rounds
        (:meth:`Roster.update`); waiting workers re-check their round against the new quorum."""
        if self.roster.update(worker, incarnation, live):
            self._notify()

    def exchange(self, local: np.ndarray, alpha: float, worker: int, last_version: int, incarnation: int,
                 stamp: int = 0) -> tuple[bool, int, int, int, np.ndarray]:  # fmt: skip
        """EASGD's elastic exchange (:meth:`Shard.exchange`) with a worker's ``local`` values; return ``(applied,
        staleness, version, incarnation, the worker's new local values)``. A worker that exchanged with another
        incarnation (a center this shard lost when it died) is sent the current center instead. ``stamp`` as in
        :meth:`push`."""
        push_stamps.note(self.stamps, worker, stamp)
        np.copyto(self._fetched.numpy(), local)
        if incarnation != self.incarnation:
            version = self.shard.fetch_into(self._fetched)
            return False, LOST, version, self.incarnation, self._fetched.numpy().copy()
        result = self.shard.exchange(self._fetched, alpha=alpha, worker=worker, last_version=last_version)
        return result.applied, result.staleness, result.version, self.incarnation, self._fetched.numpy().copy()

    @ray.method(concurrency_group=SNAPSHOT_GROUP)
    def snapshot(self, wait: float | None = None) -> tuple[int, dict[str, Any]]:
        """``(incarnation, wire snapshot)`` of values, rule state, version and rejected count, and under ``stamps``
        the workers' push stamps, read after the values: they cover every push the values hold. ``wait``: give up
        after that many seconds when a worker on this node holds the shard's lock that long (stopped, or hung): the
        snapshot is then ``{"busy": why}``, which the driver raises as :class:`~downpour.ps.shard.ShardBusy`. Runs in a
        thread of its own (:data:`SNAPSHOT_GROUP`): a push or fetch of a worker on another node that waits for the
        same lock in the actor's thread does not hold it up."""
        try:
            wire = snapshot_to_wire(self._reader.snapshot(wait=wait))
        except ShardBusy as busy:
            return self.incarnation, {"busy": str(busy)}
        return self.incarnation, {**wire, "stamps": self.stamps.tolist()}

    def push_stamps(self) -> list[int]:
        """Every worker's push stamp (:mod:`~downpour.backends.push_stamps`)."""
        return self.stamps.tolist()

    def restore(self, wire: dict[str, Any]) -> None:
        """Load a wire snapshot (a resumed run's checkpoint)."""
        self.shard.restore(snapshot_from_wire(wire))

    def version(self) -> int:
        """Pushes applied so far."""
        return self.shard.version

    def where(self) -> tuple[str, int]:
        """``(node id, process id)`` of this actor."""
        return ray.get_runtime_context().get_node_id(), os.getpid()
