"""The Ray backend's worker side: :class:`WorkerActor` runs :class:`~downpour.ps.worker.DownpourWorker` (as
:class:`_FanOutWorker`) with one :class:`RemoteShard` per shard actor (:mod:`downpour.backends.ray_actors`): direct
fetches and pushes into the shards of its own node, pipelined actor calls to the others. See
:mod:`downpour.backends.ray` for the design and the driver side.
"""

from __future__ import annotations

import contextlib
import glob
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from downpour.backends import push_log, push_stamps, ray_missing, shm
from downpour.backends.local import worker_settings
from downpour.backends.ray_actors import roster_update
from downpour.config import Config
from downpour.models import build_model, seed_sampling
from downpour.ps.policies import EASGD, Sync, config_policy, policy_rule
from downpour.ps.shard import LOST, PushResult, Shard
from downpour.ps.worker import DownpourWorker, PushRecord
from downpour.ps.worker_rounds import ElasticWorker, SyncWorker

try:
    import ray
except ImportError:  # pragma: no cover - exercised only where Ray is missing
    raise ray_missing() from None

_LEASE_MAX = 32  # steps a worker claims from the coordinator at most at once
_ATTACH_TIMEOUT_S = 120.0  # how long a worker waits for a shard actor that Ray is restarting
PIPELINE_DEPTH = 1  # pushes per shard actor a worker keeps in flight while it computes
ROUND_WAIT_S = 0.25  # sync: how long one await_round call blocks before the worker checks whether to stop


class RemoteShard:
    """A :class:`~downpour.ps.worker.ShardClient` for a shard actor: the worker's view of one shard.

    On the shard's node it maps the shard's file and fetches and pushes directly (:attr:`direct`); elsewhere it
    calls the actor. ``*_async`` / ``accept_*`` split the actor calls so that :class:`_FanOutWorker` can keep them
    in flight while it computes.
    """

    def __init__(self, index: int, start: int, size: int, handle: Any, *, rule: Any, send_fetched: bool,
                 workers: int = 1, stamp: Callable[[], int] = lambda: 0) -> None:  # fmt: skip
        self.index, self.start, self.size, self.handle = index, start, size, handle
        self.rule = rule
        self.send_fetched = send_fetched  # the rule needs the values the update was computed at (dc-asgd)
        self.workers = workers  # how many workers the shard keeps push stamps for (its file's layout)
        self.stamp = stamp  # the worker's current push stamp (push_stamps), sent with every push
        self.incarnation = 0
        self.seen: dict[int, int] = {}  # incarnation -> highest version seen from it
        self.direct: shm.SharedShard | None = None
        self.direct_node = ""  # the worker's node: shards there are mapped
        self.shared_memory = True
        # sync: (the round's fetched version, incarnation, version, values) that the last push_round brought back
        self.closed: tuple[int, int, int, np.ndarray] | None = None
        self.round_outcome: tuple[int, bool | None] | None = None  # sync: (fetched version, applied) a reply knew

    def connect(self, node_id: str, *, shared_memory: bool = True) -> None:
        """Ask the shard actor (waiting while Ray restarts it) where it is; map its file when on ``node_id`` (and
        ``shared_memory``: False reaches every shard through actor calls)."""
        self.direct_node, self.shared_memory = node_id, shared_memory
        if self.direct is not None:
            self.direct.close()
            self.direct = None
        node, path, incarnation = ray.get(self.handle.attach_info.remote(), timeout=_ATTACH_TIMEOUT_S)
        self.incarnation = incarnation
        if node == node_id and shared_memory and path:  # a sync shard has no file
            with contextlib.suppress(FileNotFoundError):  # retired already: use the actor (a later call remaps)
                self.direct = shm.SharedShard(path, self.index, self.start, self.size, self.rule, create=False,
                                              workers=self.workers)  # fmt: skip

    def reconnect(self) -> None:
        """:meth:`connect` again (the shard's actor died: find its restored incarnation)."""
        self.connect(self.direct_node, shared_memory=self.shared_memory)

    def _live_direct(self) -> Shard | None:
        """The mapped shard if its owner lives; None for a shard reached through the actor."""
        if self.direct is None:
            return None
        if self.direct.alive():
            return self.direct.shard
        return None

    def _stamper(self, worker: int) -> Callable[[], None]:
        """Write ``worker``'s push stamp into the mapped file: called by the shard under its lock, right before the
        push commits. Written before the lock was taken, the stamp of a push whose worker was killed while it waited
        for the lock would count a push that no shard got (and keep its step from the budget)."""
        stamps, value = self.direct.stamps, self.stamp()  # type: ignore[union-attr]
        return lambda: push_stamps.note(stamps, worker, value)

    def _note(self, incarnation: int, version: int) -> None:
        if version > self.seen.get(incarnation, -1):
            self.seen[incarnation] = version

    def fetch_async(self) -> Any:
        """Start a fetch from the actor; :meth:`accept_fetch` takes its reply."""
        return self.handle.fetch.remote()

    def accept_fetch(self, reply: tuple[int, int, np.ndarray], out: Tensor) -> int:
        """Copy a fetch reply into ``out``; return its version."""
        version, incarnation, values = reply
        np.copyto(out.numpy(), values)
        self.incarnation = incarnation
        self._note(incarnation, version)
        return version

    def fetch_into(self, out: Tensor) -> int:
        """Copy the shard's current values into ``out`` (shape ``(size,)``) and return their version (under
        ``sync``, right after a round: the values its close produced, which :meth:`push_round_async` brought)."""
        if self.closed is not None:
            _, incarnation, version, values = self.closed
            self.closed = None
            return self.accept_fetch((version, incarnation, values), out)
        if self.direct is not None:
            shard = self._live_direct()
            if shard is not None:
                version = shard.fetch_into(out)
                self._note(self.incarnation, version)
                return version
            self.reconnect()  # its actor died: find the restored incarnation
            return self.fetch_into(out)
        return self.accept_fetch(ray.get(self.fetch_async()), out)

    def push_direct(self, update: Tensor, fetched_version: int, worker: int, *, fetch_into: Tensor | None,
                    fetched_values: Tensor | None) -> PushResult | None:  # fmt: skip
        """Push into the mapped shard; None when its actor has died (the caller remaps and refetches)."""
        shard = self._live_direct()
        if shard is None:
            return None
        fetched = fetched_values if self.send_fetched else None
        result = shard.push(update, fetched_version, worker, fetch_into=fetch_into, fetched_values=fetched,
                            on_commit=self._stamper(worker))  # fmt: skip
        self._note(self.incarnation, result.version)
        return result

    def push_async(self, update: Tensor, fetched_version: int, worker: int, *, pull: bool,
                   fetched_values: Tensor | None) -> Any:  # fmt: skip
        """Start a push (a push-pull when ``pull``) through the actor; :meth:`accept_push` takes its reply.

        Ray serializes the arguments during this call, so the caller may overwrite ``update`` at once.
        """
        fetched = fetched_values.numpy() if self.send_fetched and fetched_values is not None else None
        return self.handle.push.remote(update.numpy(), fetched_version, worker, self.incarnation, pull, fetched,
                                       self.stamp())  # fmt: skip

    def accept_push(self, reply: tuple[bool, int, int, int, np.ndarray | None], out: Tensor | None) -> PushResult:
        """Turn a push reply into a :class:`PushResult`, copying the pulled values into ``out``."""
        applied, staleness, version, incarnation, values = reply
        self._note(incarnation, version)
        if values is not None and out is not None:
            np.copyto(out.numpy(), values)
            self.incarnation = incarnation
        return PushResult(applied, staleness, version)

    def push(self, update: Tensor, fetched_version: int, worker: int = -1, *, fetch_into: Tensor | None = None,
             fetched_values: Tensor | None = None) -> PushResult:  # fmt: skip
        """Apply ``update`` on the shard (and copy the new values into ``fetch_into``, if given)."""
        if self.direct is not None:
            result = self.push_direct(update, fetched_version, worker, fetch_into=fetch_into,
                                      fetched_values=fetched_values)  # fmt: skip
            if result is not None:
                return result
            self.reconnect()
            return PushResult(False, LOST, self.fetch_into(fetch_into) if fetch_into is not None else fetched_version)
        ref = self.push_async(
            update, fetched_version, worker, pull=fetch_into is not None, fetched_values=fetched_values
        )
        return self.accept_push(ray.get(ref), fetch_into)

    def push_round_async(self, update: Tensor, fetched_version: int, worker: int) -> Any:
        """``ps.policy = "sync"``: start :meth:`ShardServer.push_round`; :meth:`accept_push_round` takes its reply."""
        return self.handle.push_round.remote(update.numpy(), fetched_version, worker, self.incarnation, ROUND_WAIT_S,
                                             self.stamp())  # fmt: skip

    def accept_push_round(self, reply: tuple[bool, int, int, int, tuple[int, np.ndarray, bool | None] | None],
                          fetched_version: int) -> PushResult:  # fmt: skip
        """Turn a push_round reply into a :class:`PushResult`; keep the round's values for the next fetch."""
        applied, staleness, version, incarnation, after = reply
        self._note(incarnation, version)
        self.closed = None if after is None else (fetched_version, incarnation, after[0], after[1])
        self.round_outcome = None if after is None else (fetched_version, after[2])
        return PushResult(applied, staleness, version)

    def round_applied(self, fetched_version: int) -> bool | None:
        """``ps.policy = "sync"``, once the round of ``fetched_version`` has closed: whether its mean was applied
        (the interface of :meth:`SyncShard.round_applied`; None: not known): what the push's reply said when the
        round had closed by then, else by an actor call."""
        if self.round_outcome is not None and self.round_outcome[0] == fetched_version:
            return self.round_outcome[1]
        return ray.get(self.handle.round_applied.remote(fetched_version, self.incarnation))

    def close_round(self, fetched_version: int, *, force: bool = False) -> bool:
        """``ps.policy = "sync"``: True once the shard has closed the round of ``fetched_version`` (the interface of
        :meth:`SyncShard.close_round`): at once when the push brought the round's values back, else by an actor
        call that blocks up to :data:`ROUND_WAIT_S`. A shard restored since the worker fetched reports its round
        closed (it died with the incarnation), and the worker fetches."""
        if self.closed is not None and self.closed[0] == fetched_version:
            return True
        reply = self.handle.await_round.remote(fetched_version, self.incarnation, force, ROUND_WAIT_S)
        closed, _ = ray.get(reply)
        return bool(closed)

    def exchange(self, local: Tensor, *, alpha: float, worker: int = -1, last_version: int = 0) -> PushResult:
        """EASGD's elastic exchange of ``local`` (this shard's slice of the worker's parameters, updated in place)
        with the shard's center: directly on the shard's node, else through the actor."""
        if self.direct is not None:
            shard = self._live_direct()
            if shard is not None:
                result = shard.exchange(local, alpha=alpha, worker=worker, last_version=last_version,
                                        on_commit=self._stamper(worker))  # fmt: skip
                self._note(self.incarnation, result.version)
                return result
            self.reconnect()  # the center died with its actor: start again from the restored one
            return PushResult(False, LOST, self.fetch_into(local))
        reply = ray.get(self.handle.exchange.remote(local.numpy(), alpha, worker, last_version, self.incarnation,
                                                    self.stamp()))  # fmt: skip
        applied, staleness, version, incarnation, values = reply
        np.copyto(local.numpy(), values)
        self.incarnation = incarnation
        self._note(incarnation, version)
        return PushResult(applied, staleness, version)


class _Pending(NamedTuple):
    """A push sent to a shard actor whose reply the worker has not taken yet."""

    shard: RemoteShard
    reply: Any  # ObjectRef
    pulled: bool  # a push-pull: the reply brings the shard's new values
    loss: float


class _FanOutWorker(DownpourWorker):
    """The Downpour loop unchanged, with the transport of :class:`RemoteShard`: direct pushes into shards on this
    node, and actor calls to the others that stay in flight while the next step computes.

    A push to a shard actor does not wait for its reply: the worker takes the reply ``depth`` pushes later (its
    pulled values then become the local copy), so the round trip overlaps the next gradient. The cost is staleness:
    a gradient is computed on values that miss the worker's own last ``depth`` pushes, and the shard records that
    staleness with every push as usual. Errors in a call surface when its reply is taken. A reply from a restored
    shard (a new incarnation) on a push without pull makes the worker refetch that shard at once: its local values
    of that shard are from before the shard died.
    """

    shards: list[RemoteShard]  # type: ignore[assignment]

    def __init__(self, *args: Any, depth: int = PIPELINE_DEPTH, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.depth = depth
        self._inflight: deque[_Pending] = deque()
        self._versions: list[int] = []
        self._local: list[Tensor] = []

    def run(self) -> None:
        """Train (see :meth:`DownpourWorker.run`), then take the replies still in flight."""
        try:
            super().run()
        except BaseException:
            with contextlib.suppress(Exception):
                self._drain(0)
            raise
        self._drain(0)

    def _fetch(self, versions: list[int], local: list[Tensor]) -> None:
        self._versions, self._local = versions, local
        self._drain(0)  # replies still out would overwrite what this fetch brings
        remote = [(shard, shard.fetch_async()) for shard in self.shards if shard.direct is None]
        for shard in self.shards:
            if shard.direct is not None:
                versions[shard.index] = shard.fetch_into(local[shard.index])
        for (shard, _), reply in zip(remote, ray.get([ref for _, ref in remote]), strict=True):
            versions[shard.index] = shard.accept_fetch(reply, local[shard.index])

    def _push(self, updates: list[Tensor], versions: list[int], local: list[Tensor], loss: float, *,
              then_fetch: bool) -> None:  # fmt: skip
        self._versions, self._local = versions, local
        self.pushes_ += 1  # before any shard applies it: a snapshot never holds a push the count misses
        sent = 0
        for shard, update, values in zip(self.shards, updates, local, strict=True):
            fetched = versions[shard.index]
            if shard.direct is None:
                ref = shard.push_async(update, fetched, self.worker_id, pull=then_fetch, fetched_values=values)
                self._inflight.append(_Pending(shard, ref, then_fetch, loss))
                sent += 1
                continue
            result = shard.push_direct(update, fetched, self.worker_id, fetch_into=values if then_fetch else None,
                                       fetched_values=values)  # fmt: skip
            if result is None:  # the shard actor died: this push dies with it; take up its restored incarnation
                result = PushResult(False, LOST, fetched)
                shard.reconnect()
                versions[shard.index] = shard.fetch_into(values)
            elif then_fetch:
                versions[shard.index] = result.version
            self._record(shard, result, loss)
        self._drain(self.depth * sent)

    def _record(self, shard: RemoteShard, result: PushResult, loss: float) -> None:
        record = PushRecord(self.clock(), self.worker_id, shard.index, result.version, result.staleness, loss,
                            result.applied)  # fmt: skip
        self.record(record)

    def _drain(self, keep: int) -> None:
        """Take the oldest replies until at most ``keep`` pushes remain in flight."""
        while len(self._inflight) > keep:
            pending = self._inflight.popleft()
            shard = pending.shard
            known = shard.incarnation
            values = self._local[shard.index] if self._local else None
            reply = ray.get(pending.reply)
            result = shard.accept_push(reply, values if pending.pulled else None)
            if pending.pulled and self._versions:
                self._versions[shard.index] = result.version
            elif reply[3] != known and values is not None:
                self._versions[shard.index] = shard.fetch_into(values)
            self._record(shard, result, pending.loss)


class _FanOutSyncWorker(_FanOutWorker, SyncWorker):
    """:class:`~downpour.ps.worker_rounds.SyncWorker`'s rounds (its ``_run`` and ``_await_rounds``) over shard
    actors: a round's pushes go to every shard at once as :meth:`ShardServer.push_round` calls, each of which
    returns once its round has closed (or after :data:`ROUND_WAIT_S`) with the values the round produced; the
    worker's wait (:meth:`RemoteShard.close_round`) and next fetch then need no call, except for a round still
    open (the worker waits with further calls) and when the run is stopping.

    A push refused by a restored shard leaves the worker on the old incarnation until the round ends: the round of
    a dead incarnation counts as closed at once, and the values that come back are the restored ones (refetching
    before that would have the worker wait for a round of the restored shard that it never pushed to).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, depth=0, **kwargs)

    def _push(self, updates: list[Tensor], versions: list[int], local: list[Tensor], loss: float, *,
              then_fetch: bool) -> None:  # fmt: skip
        self.pushes_ += 1  # before the round can close (see _FanOutWorker._push)
        refs = [shard.push_round_async(update, versions[shard.index], self.worker_id)
                for shard, update in zip(self.shards, updates, strict=True)]  # fmt: skip
        self._round = [(shard, shard.accept_push_round(ray.get(ref), versions[shard.index]), loss)
                       for shard, ref in zip(self.shards, refs, strict=True)]  # recorded once closed  # fmt: skip

    def _fetch(self, versions: list[int], local: list[Tensor]) -> None:
        pending = [(shard, shard.fetch_async()) for shard in self.shards if shard.closed is None]
        for shard in self.shards:
            if shard.closed is not None:  # the round's values, brought back by its push
                versions[shard.index] = shard.fetch_into(local[shard.index])
        for (shard, _), reply in zip(pending, ray.get([ref for _, ref in pending]), strict=True):
            versions[shard.index] = shard.accept_fetch(reply, local[shard.index])


class _ActorRoster:
    """The worker side of a ``sync`` roster (what :class:`~downpour.ps.worker.DownpourWorker` calls ``roster``):
    joins every shard's roster (and the coordinator's) when built, before the first fetch, and leaves them in
    :meth:`retire`. ``incarnation`` is the driver's count of ``run`` calls (see :class:`Roster`)."""

    def __init__(self, targets: list[Any], worker: int, incarnation: int) -> None:
        self.targets, self.incarnation = targets, incarnation
        ray.get(roster_update(targets, worker, incarnation, True), timeout=_ATTACH_TIMEOUT_S)

    def retire(self, worker: int) -> None:
        """``worker`` ended: the rounds no longer wait for it."""
        roster_update(self.targets, worker, self.incarnation, False)


class _ActorClocks:
    """Stale synchronous parallel (Ho et al., NIPS 2013) with the clocks in the coordinator actor: the worker side
    of :class:`~downpour.ps.clocks.SharedClocks` (``wait_turn``, ``tick``, ``retire``) for workers on many nodes.

    A worker may start clock ``c`` once ``c − min(clocks) ≤ bound``. The minimum only grows, so a minimum read
    earlier is a safe lower bound: the worker asks the coordinator only when that old minimum holds it back.
    """

    def __init__(self, coordinator: Any, worker: int, *, bound: int, poll_s: float = 0.002) -> None:
        self.coordinator, self.bound, self.poll_s = coordinator, bound, poll_s
        clocks = ray.get(coordinator.clocks.remote())
        self.own, self.min = clocks[worker], min(clocks)  # a restarted worker goes on from its clock

    def wait_turn(self, worker: int, should_stop: Any) -> bool:
        """Block until ``worker`` may start its next clock; False if ``should_stop()`` came true first."""
        while self.own - self.min > self.bound:
            if should_stop():
                return False
            self.min = min(ray.get(self.coordinator.clocks.remote()))
            if self.own - self.min > self.bound:
                time.sleep(self.poll_s)
        return True

    def tick(self, worker: int) -> None:
        """``worker`` finished a push (the call is ordered before this worker's later ``clocks`` calls)."""
        self.own += 1
        self.coordinator.tick.remote(worker)

    def retire(self, worker: int) -> None:
        """``worker`` ended: it no longer holds anyone back."""
        self.coordinator.retire.remote(worker)


class _LeasedSteps:
    """A worker's side of the global step budget: steps claimed from the coordinator in leases, used one by one.

    Under ``sync`` the lease is one step: workers claim in lockstep, one push per round each, so that the budget
    ends on a round every worker pushed to when it is a multiple of the live workers (with longer leases one
    worker could be left holding steps, and spend them in rounds of its own).

    Leases are granted to ``(worker, run)``: what a run that is killed never used, its restarted process gives
    back, or the driver for a worker dead for good (:meth:`~downpour.backends.ray_coordinator.Coordinator.settle`)."""

    def __init__(self, coordinator: Any, limit: int, *, lease: int = _LEASE_MAX, worker: int = -1,
                 run: int = 0) -> None:  # fmt: skip
        self.coordinator, self.limit, self.lease = coordinator, limit, lease
        self.worker, self.run = worker, run
        self.credits = 0
        self.spent = False

    def reserve(self) -> bool:
        """Claim one push; False once the budget is spent."""
        if not self.limit:
            return True
        if self.credits == 0:
            if self.spent:
                return False
            self.credits = int(ray.get(self.coordinator.claim.remote(self.lease, self.worker, self.run)))
            if self.credits == 0:
                self.spent = True
                return False
        self.credits -= 1
        return True

    def release(self) -> None:
        """Give unused steps back, and mark the run's leases settled (without waiting: the coordinator takes calls
        in order)."""
        if self.limit:
            self.coordinator.release.remote(self.credits, self.worker, self.run)
            self.credits = 0


def push_log_path(cluster: str, worker: int, run: int | str) -> str:
    """The push log (:mod:`~downpour.backends.push_log`) of ``worker``'s run ``run`` in the cluster named
    ``cluster``, on the node it runs on (``"*"`` for every run: a glob)."""
    return os.path.join(shm.shm_dir(), f"{cluster}-worker{worker}-run{run}.rows")


def recover_logs(cluster: str, worker: int, before: int | None = None, *, remove: bool = True,
                 skip: Collection[str] = (), paths: list[str] | None = None
                 ) -> list[tuple[int, int, list[tuple], bool]]:  # fmt: skip
    """The rows in the push logs of ``worker``'s dead runs on this node (those before run ``before``, or all), as
    :meth:`WorkerActor.poll`'s chunks ``(run, number of the first row, rows, True)``; each log is removed once read
    (unless ``remove`` is False). A log whose writer lives is left, and so are those in ``skip``. ``paths``: gets
    the paths of the logs read."""
    chunks = []
    for path in glob.glob(push_log_path(cluster, worker, "*")):
        if path in skip:
            continue
        run = _log_run(path)
        got = push_log.recover(path, remove=remove) if before is None or run < before else None
        if got is not None:
            chunks.append((run, *got, True))
            if paths is not None:
                paths.append(path)
    return sorted(chunks)


def logs_being_written(cluster: str, worker: int) -> bool:
    """Whether a log of ``worker`` on this node still has a live writer (a killed process not gone yet)."""
    return any(push_log.writer_lives(path) for path in glob.glob(push_log_path(cluster, worker, "*")))


def _log_run(path: str) -> int:
    """The run of a push log's path (:func:`push_log_path`; the cluster's name has no "run" after its last one)."""
    return int(path.rsplit("run", 1)[1].split(".", 1)[0])


def logged_pushes(chunks: list[tuple[int, int, list[tuple], bool]], shards: int) -> dict[int, int]:
    """Pushes each dead run made at least, by its log: a push writes at most one row a shard, so a run whose log
    numbered ``n`` rows made at least ``ceil(n / shards)`` (what its stamps say, where every shard that kept them
    was restored from a checkpoint since). Chunks as :func:`recover_logs` gives them."""
    counts: dict[int, int] = {}
    for run, first, rows, recovered in chunks:
        if recovered:
            counts[run] = max(counts.get(run, 0), -(-(first + len(rows)) // shards))
    return counts


def _unlink(paths: list[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class WorkerActor:
    """One model replica in a Ray actor: :class:`_FanOutWorker` on its slice of the examples.

    ``run`` trains on one thread while the driver calls ``poll`` and ``stop`` on another (the actor has three
    threads: a second ``run`` may wait on the first).
    """

    def __init__(self, worker_id: int, config: Config, input_dim: int, shape: tuple[int, ...] | None,
                 seed: int, shards: list[tuple[int, int, str]], coordinator_name: str, t0: float, threads: int,
                 send_fetched: bool, shared_memory: bool = True, cluster_name: str = "downpour") -> None:  # fmt: skip
        torch.set_num_threads(threads)
        self.worker_id, self.config, self.input_dim, self.shape = worker_id, config, input_dim, shape
        # Examples and actors are found through the coordinator and by name, not passed (see ShardServer).
        self.coordinator = ray.get_actor(coordinator_name)
        ray.get(self.coordinator.worker_started.remote(worker_id))  # counted first: a restart that dies soon counts
        (ref,) = ray.get(self.coordinator.examples.remote(worker_id))
        self.examples = torch.from_numpy(np.array(ray.get(ref), dtype=np.float32))  # (N, D), a writable copy
        self.shards = [(start, size, ray.get_actor(name)) for start, size, name in shards]
        self.seed, self.t0 = seed, t0
        self.send_fetched, self.shared_memory = send_fetched, shared_memory
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._running = threading.Lock()
        self.cluster_name = cluster_name
        self._records: list[tuple] = []  # rows of the current run not polled yet: numbered from _records_first
        self._records_run, self._records_first = 0, 0
        self._chunks: list[tuple[int, int, list[tuple], bool]] = []  # (run, first row, rows, from a dead run's log)
        self._log: push_log.PushLog | None = None
        # dead runs' logs this process read: kept until the driver has their rows (a process that dies before its
        # next poll would otherwise take them along), removed by the poll after the one that sent them once their
        # runs are settled
        self._taken: set[str] = set()
        self._unsent: list[str] = []  # logs whose rows are in _chunks
        self._sent: list[str] = []  # logs whose rows a poll sent
        # runs below this one are settled (_settle_earlier): until then a dead run's log also holds the count of its
        # pushes that the settle needs (logged_pushes), should this process die before it, so it is kept
        self._settled_below = 0
        self._examples, self._loss = 0, float("nan")
        self._worker: DownpourWorker | None = None
        self._clients: list[RemoteShard] = []
        self.incarnation = -1
        self._earlier: dict[int, int] = {}  # pushes of earlier runs the shards' stamps hold (run -> count)
        self._logged: dict[int, int] = {}  # pushes of dead runs their logs tell of, at least (logged_pushes)
        # the logs of this worker's dead processes on this node, now: a restarted process that is never asked to run
        # (the driver stopping meanwhile) still sends their rows with its polls
        self._take_dead_logs(None)

    def _record(self, record: PushRecord) -> None:
        row = tuple(record)
        with self._lock:
            self._records.append(row)
            if self._log is not None:
                self._log.append(row)

    def _progress(self, examples: int, loss: float) -> None:
        self._examples += examples
        self._loss = loss

    def run(self, incarnation: int) -> int:
        """Train until stopped or the budget is spent; ``incarnation`` counts calls. Return the pushes made.

        A second call while one runs (the driver lost sight of the first, e.g. through a network fault) waits for
        the first to end, so that one process never trains twice at once.
        """
        with self._running:
            return self._run(incarnation)

    def _run(self, incarnation: int) -> int:
        self.incarnation = incarnation
        model = build_model(self.config.model, self.input_dim, seed=self.config.train.seed, shape=self.shape)
        rule = policy_rule(self.config)
        workers = self.config.cluster.workers
        self._worker = None
        self._clients = [
            RemoteShard(index, start, size, handle, rule=rule, send_fetched=self.send_fetched, workers=workers,
                        stamp=lambda: push_stamps.stamp(incarnation, self._worker.pushes_ if self._worker else 0))
            for index, (start, size, handle) in enumerate(self.shards)
        ]  # fmt: skip
        node_id = ray.get_runtime_context().get_node_id()
        for client in self._clients:
            client.connect(node_id, shared_memory=self.shared_memory)
        self._start_log(incarnation)
        if incarnation:  # earlier runs of this worker: what their pushes the shards saw, and their unused leases back
            with self._lock:
                logged = dict(self._logged)
            self._settle_earlier(incarnation, logged)
        policy = config_policy(self.config)
        sync = isinstance(policy, Sync)
        budget = _LeasedSteps(self.coordinator, self.config.train.steps, lease=1 if sync else _LEASE_MAX,
                              worker=self.worker_id, run=incarnation)  # fmt: skip
        ssp = policy.name == "ssp"
        # the first process draws the local backend's batches (its worker seed); a restarted one draws new ones
        restarted = np.random.SeedSequence([self.seed, incarnation]) if incarnation else None
        seed = self.seed if restarted is None else restarted
        seed_sampling(model, self.seed if restarted is None else int(restarted.generate_state(1)[0]))
        common: dict[str, Any] = {
            "rng": np.random.default_rng(seed),
            "budget": budget,
            "should_stop": self._stop.is_set,
            "record": self._record,
            "progress": self._progress,
            "clock": lambda: time.time() - self.t0,
        }
        args = (self.worker_id, model, self._clients, self.examples, worker_settings(self.config))
        if isinstance(policy, EASGD):  # the elastic exchange, one shard at a time (RemoteShard.exchange)
            self._worker = ElasticWorker(*args, policy=policy, **common)
        elif sync:
            targets = [self.coordinator, *(handle for _, _, handle in self.shards)]
            roster = _ActorRoster(targets, self.worker_id, incarnation)
            self._worker = _FanOutSyncWorker(*args, roster=roster, **common)
        else:
            clocks = (
                _ActorClocks(self.coordinator, self.worker_id, bound=self.config.ps.staleness_bound) if ssp else None
            )
            # SSP's staleness bound counts pushes applied: none left in flight
            self._worker = _FanOutWorker(*args, ssp=clocks, depth=0 if ssp else PIPELINE_DEPTH, **common)
        try:
            self._worker.run()
        finally:
            budget.release()
        return self._worker.pushes_

    def _start_log(self, run: int) -> None:
        """Keep run ``run``'s rows in a push log of its own (:mod:`~downpour.backends.push_log`), after taking those
        of this worker's earlier runs that died on this node from their logs: :meth:`poll` sends them, and the
        driver keeps the ones it lacks."""
        self._take_dead_logs(run)
        with self._lock:
            if self._records:  # rows of an earlier run of this process not polled yet
                self._chunks.append((self._records_run, self._records_first, self._records, False))
            self._records, self._records_run, self._records_first = [], run, 0
            old, self._log = self._log, None
            if old is not None:
                old.close()
            try:
                self._log = push_log.PushLog(push_log_path(self.cluster_name, self.worker_id, run))
            except OSError:  # no log for this run: its rows still come with the polls, but not after a death
                self._log = None

    def _take_dead_logs(self, before: int | None) -> None:
        """Take the rows of this worker's dead runs' logs on this node (runs before ``before``, or all) that this
        process has not taken yet, for :meth:`poll` to send."""
        paths: list[str] = []
        recovered = recover_logs(self.cluster_name, self.worker_id, before, remove=False, skip=set(self._taken),
                                 paths=paths)  # fmt: skip
        with self._lock:
            self._chunks += recovered
            self._taken.update(paths)
            self._unsent += paths
            for run, count in logged_pushes(recovered, len(self.shards)).items():
                self._logged[run] = max(self._logged.get(run, 0), count)

    def release(self) -> None:
        """Remove this worker's push log (the run is over and its rows polled)."""
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None
            done, self._sent, self._unsent = self._sent + self._unsent, [], []
        _unlink(done)

    def _settle_earlier(self, run: int, logged: dict[int, int]) -> None:
        """Before run ``run`` pushes: read this worker's stamps from every shard (the pushes of the run before it,
        which may have died before the driver polled them; or, where its logs say more, ``logged``: see
        :func:`logged_pushes`) and have the coordinator give back what earlier runs claimed and did not use."""
        stamps = ray.get([handle.push_stamps.remote() for _, _, handle in self.shards], timeout=_ATTACH_TIMEOUT_S)
        earlier = push_stamps.counts_by_run(values[self.worker_id] for values in stamps)
        for r, count in logged.items():
            earlier[r] = max(earlier.get(r, 0), count)
        self._earlier = {r: count for r, count in earlier.items() if r < run}
        ray.get(self.coordinator.settle.remote(self.worker_id, run, self._earlier))
        with self._lock:
            self._settled_below = max(self._settled_below, run)

    def poll(self) -> dict[str, Any]:
        """Push rows since the last poll, as ``chunks`` of ``(run, number of the first row, rows, recovered)``
        (recovered: from the log of an earlier run that died), and this incarnation's examples, latest loss,
        pushes and versions seen."""
        with self._lock:
            chunks = [*self._chunks, (self._records_run, self._records_first, self._records, False)]
            self._records_first += len(self._records)
            self._chunks, self._records = [], []
            if self._log is not None:
                self._log.beat()
            # the driver polls again only once it has taken the last reply: the logs that reply sent can go, once
            # their runs are settled
            done = [path for path in self._sent if _log_run(path) < self._settled_below]
            self._sent = [path for path in self._sent if _log_run(path) >= self._settled_below] + self._unsent
            self._unsent = []
        _unlink(done)
        return {"chunks": chunks, **self.counts()}

    def counts(self) -> dict[str, Any]:
        """What :meth:`poll` reports but the records: incarnation, examples, latest loss, pushes and versions seen."""
        worker = self._worker
        return {
            "incarnation": self.incarnation,
            "examples": self._examples,
            "loss": self._loss,
            "pushes": worker.pushes_ if worker is not None else 0,
            "seen": {(c.index, inc): v for c in self._clients for inc, v in c.seen.items()},
            "earlier": dict(self._earlier),
        }

    def stop(self) -> None:
        """Stop after the current step (for good: a ``run`` started later returns at once)."""
        self._stop.set()

    def where(self) -> tuple[str, int]:
        """``(node id, process id)`` of this actor."""
        return ray.get_runtime_context().get_node_id(), os.getpid()
