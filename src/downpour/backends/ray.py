"""The Ray backend: shards and workers as Ray actors, on one machine or many, surviving the death of either.

The same code as the local backend runs inside the actors: a shard actor holds a :class:`~downpour.ps.shard.Shard`
with the same rule (:func:`~downpour.ps.policies.policy_rule`), and a worker actor runs the same
:class:`~downpour.ps.worker.DownpourWorker` loop; only the transport differs. A shard keeps its buffers in a file
under ``/dev/shm`` (:mod:`downpour.backends.shm`): a worker on the same node maps it and fetches and pushes directly
under the shard's ``flock``, as the local backend's workers do, with no actor call. A worker on another node calls
the actor (:class:`RemoteShard`), and does not wait for the reply of a push before computing its next gradient
(:class:`_FanOutWorker`): the round trip overlaps compute, at the price of about one push of staleness, which the
shard records. Updates and values travel as NumPy arrays, which Ray serializes as out-of-band buffers (one copy, no
per-element Python work): inline in the call up to the cluster's ``max_direct_call_object_size`` (raised to 1 MiB
for a cluster this module starts), through the shared-memory object store beyond that. The global step budget is a
small actor (:class:`~downpour.backends.ray_coordinator.Coordinator`) that hands out steps in leases, so that a
worker asks it once per many pushes; under SSP it keeps the workers' clocks. The driver pulls push records, example
counts and losses from every worker in batches, without waiting on them.

Failures. A worker actor that dies (its process killed, its node lost) is restarted by Ray (``max_restarts``); the
driver sees its ``run`` call fail, counts a restart and calls ``run`` again, and the new process starts, like every
worker, by fetching the current parameters. A shard actor that dies is restarted by Ray too; its constructor, finding
itself reconstructed, loads the driver's last good checkpoint snapshot (which the driver hands to the coordinator
with every checkpoint that did not diverge: :meth:`RayCluster.set_restore_points`) and takes a new *incarnation*
number. Pushes computed against the dead incarnation's values are
dropped (recorded as not applied), and the worker refetches that shard; a worker that pushes directly notices the
death at its next push (the owner process is gone, or the new incarnation marked the old file retired). The updates
lost are the shard's version
before it died — the highest version any worker saw from that incarnation — minus the restored version: never more
than the pushes applied since the last checkpoint.

Counts. Every push carries its worker's push stamp (:mod:`~downpour.backends.push_stamps`), which each shard keeps
per worker before applying it: the driver counts a dead worker's pushes since its last poll from the stamps that
come with every snapshot, and a restarted worker reads them to give its dead run's unused steps back to the budget
(for a worker dead for good, the driver does: :meth:`RayCluster._settle_dead`). The rows of those pushes come back
too: each run of a worker keeps its rows in a push log under ``/dev/shm`` (:mod:`~downpour.backends.push_log`),
which its restarted process reads and sends with its polls (the driver, for a worker dead for good whose log is on
the driver's machine), and the driver keeps the rows it had not received (:meth:`RayCluster._take_rows`).

Addresses. ``cluster.address = ""`` starts a private Ray instance for this run, bound to 127.0.0.1; ``"auto"`` or
``"host:port"`` connects to a running cluster (``ray start --head`` ...). Ray's token authentication stays on: a
private instance uses it (Ray's default), and a connection does with ``RAY_AUTH_MODE=token`` (Ray's switch).
Nothing is ever unpickled from a file: checkpoints stay safetensors + JSON, written by the driver.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from downpour.backends import push_log, push_stamps, ray_missing, shm
from downpour.backends.chaos import parse_chaos
from downpour.backends.local import WorkerEvent
from downpour.backends.ray_actors import (
    SNAPSHOT_GROUP,
    ShardServer,
    roster_update,
    snapshot_from_wire,
    snapshot_to_wire,
    sync_threads,
)
from downpour.backends.ray_connect import connect, disconnect, first_line, unreachable
from downpour.backends.ray_coordinator import Coordinator
from downpour.backends.ray_workers import (
    RemoteShard,
    WorkerActor,
    logged_pushes,
    logs_being_written,
    push_log_path,
    recover_logs,
)
from downpour.config import Config
from downpour.errors import DownpourError, out_of_memory
from downpour.ps.policies import Sync, config_policy, policy_rule
from downpour.ps.shard import ShardBusy
from downpour.ps.sharding import contiguous_bounds

try:
    import ray
    from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError, RayError, RayTaskError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError:  # pragma: no cover - exercised only where Ray is missing
    raise ray_missing() from None

__all__ = [
    "Coordinator",
    "RayCluster",
    "RemoteShard",
    "ShardServer",
    "WorkerActor",
    "connect",
    "parse_chaos",
    "unreachable",
]

MAX_RESTARTS = 100  # per actor; Ray's own limit and the driver's
# CPUs a shard or worker actor asks for: nearly none (they are not CPU-bound reservations), but not zero, for Ray
# schedules a zero-resource actor on the caller's node and would ignore its (soft) node affinity.
_ACTOR_CPUS = 0.01
_POLL_TIMEOUT_S = 10.0
_COUNTS_TIMEOUT_S = 2.0  # how long a checkpoint waits for the workers' counts (a live actor answers in milliseconds)
_RETRY_S = 0.25  # between calls of ``run`` on a worker that Ray is restarting
# how long stop() waits for a worker it killed to be gone, to read its push log: Ray ended a hung (stopped) actor's
# process about 5 s after ray.kill here
_KILLED_LOG_WAIT_S = 15.0
_DIED_UNSEEN = "Ray started another process for it"  # a restart counted from the processes started
_NO_RUN_AFTER = 2**22  # a run number above every run: settle all of a worker's runs

# ---------------------------------------------------------------------------------------------------------------
# Wire format: snapshots as NumPy arrays (Ray moves them as buffers)
# ---------------------------------------------------------------------------------------------------------------


class ShardProxy:
    """The driver's handle on one shard actor, with the attributes and methods the driver uses of a local Shard."""

    def __init__(self, cluster: RayCluster, index: int, start: int, size: int, rule: Any, handle: Any) -> None:
        self.cluster, self.index, self.start, self.size = cluster, index, start, size
        self.rule, self.handle = rule, handle

    @property
    def stop(self) -> int:
        """End (exclusive) of this shard's slice of the flat parameters."""
        return self.start + self.size

    @property
    def version(self) -> int:
        """Pushes applied so far."""
        return int(ray.get(self.handle.version.remote()))

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy of this shard (torch tensors)."""
        return self.cluster.snapshots([self.index])[0]

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Load ``snapshot`` into the actor, and make it the restore point should the actor die."""
        ref = ray.put(snapshot_to_wire(snapshot))
        ray.get(self.handle.restore.remote(ref))
        self.cluster._set_restore_point(self.index, ref)


class BudgetProxy:
    """The driver's view of the global step budget (what ``LocalCluster.budget`` offers)."""

    def __init__(self, cluster: RayCluster, limit: int) -> None:
        self.cluster, self.limit = cluster, limit

    @property
    def value(self) -> int:
        """Pushes made so far (as last reported by the workers)."""
        return self.cluster.steps()

    def set(self, value: int) -> None:
        """Start counting from ``value`` (on resume)."""
        ray.get(self.cluster.coordinator.set_steps.remote(value))
        self.cluster._steps_before = value


@dataclass
class _WorkerState:
    handle: Any
    run: Any = None  # ObjectRef of the running ``run`` call, None when finished or dead
    poll: Any = None  # ObjectRef of the pending ``poll`` call
    incarnation: int = 0
    done: bool = False  # finished (budget spent or stopped), failed with an error, or dead for good
    failing: bool = False  # its process died; no ``run`` of the restarted process has answered yet
    retry_at: float | None = None  # when to call ``run`` again (monotonic seconds)
    loss: float = float("nan")


def _spread(nodes: list[str], count: int, offset: int = 0) -> list[Any]:
    """Scheduling strategies that place ``count`` actors round-robin over ``nodes``, starting at ``offset``.

    Soft node affinity: Ray may move an actor it restarts when that node is gone. (Ray's own ``"SPREAD"`` is best
    effort and put three of four small actors on one of two nodes here.)
    """
    if len(nodes) < 2:
        return ["DEFAULT"] * count
    return [NodeAffinitySchedulingStrategy(nodes[(offset + i) % len(nodes)], soft=True) for i in range(count)]


class RayCluster:
    """Shard actors and worker actors on a Ray cluster, with the driver-side interface of ``LocalCluster``.

    ``start``, ``poll``, ``stop``, ``close``; ``snapshots``, ``steps``, ``examples_done``, ``recent_loss``,
    ``alive``, ``pids``, ``set_restore_points``; ``shards`` (proxies with ``restore``) and ``budget`` (with ``set``)
    for a resumed run.
    Fault counters: :attr:`worker_restarts`, :attr:`shard_restores`, :attr:`lost_updates` (:meth:`faults`).
    """

    def __init__(self, config: Config, train: Tensor, initial: Tensor, *, worker_seeds: Sequence[int], t0: float,
                 shape: tuple[int, ...] | None = None, address: str | None = None, chaos: str | None = None,
                 max_restarts: int = MAX_RESTARTS, num_cpus: int | None = None, shared_memory: bool = True
                 ) -> None:  # fmt: skip
        self.config = config
        self.address = address if address is not None else str(getattr(config.cluster, "address", ""))
        self.chaos = parse_chaos(chaos if chaos is not None else str(getattr(config.cluster, "chaos", "")))
        self.max_restarts = max_restarts
        self.shared_memory = shared_memory  # False: workers reach even the shards of their own node by actor calls
        self.bounds = contiguous_bounds(initial.numel(), config.ps.shards)
        self.input_dim, self.shape = train.shape[1], shape
        self.worker_seeds, self.t0 = list(worker_seeds), t0
        self._train = train
        self._temp_dir = connect(self.address, num_cpus=num_cpus)
        self._owns_ray = self._temp_dir is not None
        self._workers: list[_WorkerState] = []
        self._example_refs: list[Any] = []
        self._progress: dict[tuple[int, int], tuple[int, int]] = {}  # (worker, incarnation) -> (examples, pushes)
        self._seen: dict[tuple[int, int], int] = {}  # (shard, incarnation) -> highest version seen
        self._rows_in: dict[tuple[int, int], int] = {}  # (worker, incarnation) -> push rows received (push_log)
        self._row_events: list[WorkerEvent] = []  # push rows taken from dead runs' logs, for the next poll to tell
        self._late_rows: list[tuple] = []  # rows the driver read from the logs of workers dead for good, to return
        self._steps_before = 0
        self._stopping = False
        self._restores_logged = 0
        self._restores: list[tuple[int, int, int, float]] = []
        policy = config_policy(config)
        # sync: pushes per round so far, per shard (from its restore point; before one, the quorum)
        quorum = policy.quorum if isinstance(policy, Sync) else 1
        self._pushes_per_round: dict[int, float] = dict.fromkeys(range(config.ps.shards), float(quorum))
        self._restores_ref: Any = None
        self._chaos_t0: float | None = None
        self._chaos_rng = random.Random(config.train.seed)
        self._chaos_next = 0
        self.chaos_log: list[tuple[float, str, int]] = []  # (time.monotonic(), kind, target) of each fault injected
        self.worker_restarts = 0
        workers = config.cluster.workers
        self._deaths_seen = [0] * workers  # per worker: process deaths its failed ``run`` calls told of
        self._starts = [0] * workers  # per worker: its actor's processes started (the coordinator's count)
        self._restarts = [0] * workers  # per worker: restarts reported so far (``restarted`` events)
        self._sync = isinstance(policy, Sync)
        try:
            rule = policy_rule(config)
            self._send_fetched = bool(getattr(rule, "needs_fetched", False))
            self.nodes = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
            self._name = f"downpour-{uuid.uuid4().hex[:12]}"
            self.coordinator = (
                ray.remote(Coordinator)
                .options(name=f"{self._name}-coordinator", num_cpus=0, max_restarts=0)
                .remote(config.train.steps, config.cluster.workers, config.ps.shards)
            )
            self._restore_points: list[Any] = [None] * len(self.bounds)
            for i, (start, stop) in enumerate(self.bounds):  # the start is the first restore point
                state = {name: torch.zeros(stop - start) for name in rule.state_names}
                start_point = {"values": initial[start:stop].clone(), "state": state, "version": 0, "rejected": 0}
                self._set_restore_point(i, ray.put(snapshot_to_wire(start_point)))
            shard_actor = ray.remote(concurrency_groups={SNAPSHOT_GROUP: 1})(ShardServer)  # snapshots: a thread
            placements = _spread(self.nodes, len(self.bounds))
            # sync: threads, so that workers waiting for a round do not hold up the pushes that close it; otherwise
            # one, so that a worker's pipelined pushes are applied in the order it sent them
            threads = sync_threads(config.cluster.workers) if self._sync else 1
            handles = [
                shard_actor.options(
                    name=f"{self._name}-shard{i}",
                    num_cpus=_ACTOR_CPUS,
                    max_restarts=max_restarts,
                    max_task_retries=-1,
                    max_concurrency=threads,
                    scheduling_strategy=placement,
                ).remote(i, start, stop - start, config, self._name)
                for i, ((start, stop), placement) in enumerate(zip(self.bounds, placements, strict=True))
            ]
            self.shards = [
                ShardProxy(self, i, start, stop - start, rule, handle)
                for i, ((start, stop), handle) in enumerate(zip(self.bounds, handles, strict=True))
            ]
            self.budget = BudgetProxy(self, config.train.steps)
            self._create_workers()  # their processes start while the shards' do; they train from ``start``
            ray.get([shard.handle.version.remote() for shard in self.shards])  # the shard actors are up
        except BaseException:
            self.close()
            raise

    # -- lifecycle -------------------------------------------------------------------------------------------
    def _create_workers(self) -> None:
        """One worker actor per worker, each with only its own slice of the training examples (not training yet)."""
        from downpour.data import worker_slice

        config = self.config
        workers = config.cluster.workers
        threads = config.cluster.threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
        shard_specs = [(shard.start, shard.size, f"{self._name}-shard{shard.index}") for shard in self.shards]
        worker_actor = ray.remote(WorkerActor)
        placements = _spread(self.nodes, workers, offset=1)  # worker i away from shard i when there are 2 nodes
        for worker_id in range(workers):
            examples = self._train[worker_slice(self._train.shape[0], workers, worker_id)].numpy()
            ref = ray.put(examples)
            self._example_refs.append(ref)  # kept (the driver owns it): a restarted worker reads its examples again
            ray.get(self.coordinator.set_examples.remote(worker_id, [ref]))
            handle = worker_actor.options(
                num_cpus=_ACTOR_CPUS,
                max_restarts=self.max_restarts,
                max_task_retries=0,
                max_concurrency=3,
                scheduling_strategy=placements[worker_id],
            ).remote(
                worker_id,
                config,
                self.input_dim,
                self.shape,
                self.worker_seeds[worker_id],
                shard_specs,
                f"{self._name}-coordinator",
                self.t0,
                threads,
                self._send_fetched,
                self.shared_memory,
                self._name,
            )
            self._workers.append(_WorkerState(handle))

    def start(self) -> None:
        """Have every worker actor train, once all are up."""
        # Start training once every worker actor is up (a process each, importing torch: seconds on a busy node),
        # so that no worker spends the budget before the others have started.
        try:
            ray.get([state.handle.where.remote() for state in self._workers])
        except RayError as exc:
            raise DownpourError(f"a Ray worker actor did not start: {first_line(exc)}") from None
        for state in self._workers:
            state.run = state.handle.run.remote(0)

    def request_stop(self) -> None:
        """Ask every worker to stop after its current step."""
        self._stopping = True
        for state in self._workers:
            if not state.done:
                state.handle.stop.remote()

    def stop(self, timeout: float = 30.0) -> tuple[list[tuple], list[WorkerEvent]]:
        """Stop the workers, wait for them, and return the records and events still in flight. A worker still
        running after ``timeout`` seconds is killed (a ``stuck`` event, as on the local backend); the rows it had not
        sent come from its push log where that is on this machine."""
        self.request_stop()
        records: list[tuple] = []
        events: list[WorkerEvent] = []
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            more, more_events = self.poll()
            records += more
            events += more_events
            time.sleep(0.02)
        more, more_events = self.poll()
        records += more
        events += more_events
        for worker_id, state in enumerate(self._workers):  # a last poll of each worker, after its run returned
            # one still running answers at once unless its process hangs (stopped): where its log is on this machine,
            # that has its rows, so it gets a short wait; elsewhere its reply is all there is
            log_here = os.path.exists(push_log_path(self._name, worker_id, state.incarnation))
            wait = _COUNTS_TIMEOUT_S if log_here else _POLL_TIMEOUT_S
            if state.poll is not None and (state.done or ray.wait([state.poll], timeout=wait)[0]):
                records += self._take_poll(state, block=True)
            if state.done:
                with contextlib.suppress(RayError, GetTimeoutError):
                    reply = ray.get(state.handle.poll.remote(), timeout=_POLL_TIMEOUT_S)
                    records += self._apply_poll(worker_id, reply)
        killed = []
        for worker_id, state in enumerate(self._workers):
            if not state.done:  # did not stop in time: end it
                with contextlib.suppress(RayError):
                    ray.kill(state.handle, no_restart=True)
                state.done = True
                killed.append(worker_id)
                events.append(WorkerEvent("stuck", worker_id, f"did not stop within {timeout:g} s of being asked; "
                                                              "killed"))  # fmt: skip
        # the logs of runs that died while stopping (their restarts never ran) or were just killed, where they are on
        # this machine (rows already in are skipped); a killed process's log is read once its lock is free
        wait_until = time.monotonic() + _KILLED_LOG_WAIT_S
        while killed and time.monotonic() < wait_until and any(logs_being_written(self._name, w) for w in killed):
            time.sleep(0.05)
        for worker_id in range(len(self._workers)):
            records += self._take_rows(worker_id, recover_logs(self._name, worker_id))
        self._update_restores(block=True)
        events += self._row_events  # rows from dead runs' logs that the last polls brought
        self._row_events = []
        return records, events

    def close(self) -> None:
        """End every actor; shut down the Ray instance if this cluster started it."""
        handles = [state.handle for state in self._workers]
        shards = [shard.handle for shard in getattr(self, "shards", [])]
        with contextlib.suppress(Exception):  # each shard removes its file on its node
            ray.get([handle.release.remote() for handle in shards], timeout=_POLL_TIMEOUT_S)
        live = [state.handle for state in self._workers if not state.failing]  # (a log left: unlink_cluster, orphans)
        with contextlib.suppress(Exception):  # and each worker its push log (one dead for good fails at once)
            ray.get([handle.release.remote() for handle in live], timeout=_COUNTS_TIMEOUT_S)
        handles += shards
        if getattr(self, "coordinator", None) is not None:
            handles.append(self.coordinator)
        for handle in handles:
            with contextlib.suppress(Exception):
                ray.kill(handle, no_restart=True)
        self._workers, self._example_refs = [], []
        self._restore_points = []
        if self._owns_ray:
            disconnect(self._temp_dir)
            self._owns_ray = False
        self._temp_dir = None
        if getattr(self, "_name", None):
            shm.unlink_cluster(self._name)  # files of dead incarnations on this machine

    # -- observation -----------------------------------------------------------------------------------------
    def _apply_poll(self, worker_id: int, reply: dict[str, Any]) -> list[tuple]:
        state = self._workers[worker_id]
        if state.failing and reply["incarnation"] == state.incarnation:
            state.failing = False  # the restarted process runs the latest ``run``
        key = (worker_id, reply["incarnation"])  # counts only grow: a later one (_refresh_counts) stands
        examples, pushes = self._progress.get(key, (0, 0))
        self._progress[key] = (max(examples, reply["examples"]), max(pushes, reply["pushes"]))
        self._count_stamped(worker_id, reply.get("earlier", {}))
        if math.isfinite(reply["loss"]):
            state.loss = reply["loss"]
        for key, version in reply["seen"].items():
            if version > self._seen.get(key, -1):
                self._seen[key] = version
        return self._take_rows(worker_id, reply["chunks"])

    def _take_rows(self, worker_id: int, chunks: list[tuple[int, int, list[tuple], bool]]) -> list[tuple]:
        """The push rows of ``chunks`` (``(run, number of the first row, rows, recovered from a dead run's log)``)
        that the driver has not received yet (a run's rows can come twice: polled, then read from its log). A dead
        run's log also counts its pushes, at least (:func:`~downpour.backends.ray_workers.logged_pushes`): counted
        here, whoever read it (a restarted process that never settles, the stopping driver), for where every shard
        was restored since, the stamps no longer count them and no settle may ever tell the driver."""
        out: list[tuple] = []
        for run, first, rows, recovered in chunks:
            key = (worker_id, run)
            new, self._rows_in[key], lost = push_log.take_new(self._rows_in.get(key, 0), first, rows)
            out += new
            if recovered and (new or lost):
                detail = push_log.recovered_detail(len(new), lost)
                self._row_events.append(WorkerEvent("push_rows", worker_id, detail, said=not lost))
        self._count_stamped(worker_id, logged_pushes(chunks, len(self.shards)))
        return out

    def _take_poll(self, state: _WorkerState, *, block: bool = False) -> list[tuple]:
        ref, state.poll = state.poll, None
        try:
            reply = ray.get(ref, timeout=_POLL_TIMEOUT_S if block else None)
        except (RayError, GetTimeoutError):  # the worker died (or is restarting): its unsent records are lost
            return []
        return self._apply_poll(self._workers.index(state), reply)

    def _check_runs(self) -> list[WorkerEvent]:
        """Notice finished, failed and dead workers; start ``run`` again on workers Ray restarted."""
        events: list[WorkerEvent] = []
        now = time.monotonic()
        for state in self._workers:
            if state.retry_at is not None and now >= state.retry_at and not state.done:
                state.retry_at = None
                if self._stopping:
                    state.done = True
                else:  # a call made while Ray is still restarting the actor fails at once: then we try again
                    state.incarnation += 1
                    state.run = state.handle.run.remote(state.incarnation)
        running = {state.run: i for i, state in enumerate(self._workers) if state.run is not None}
        if not running:
            return events
        ready, _ = ray.wait(list(running), num_returns=len(running), timeout=0)
        for ref in ready:
            worker_id = running[ref]
            state = self._workers[worker_id]
            state.run = None
            try:
                ray.get(ref)
                state.done = True  # the budget is spent, or it was asked to stop
            except RayTaskError as exc:  # the worker's own code failed (before the actor checks: see as_instanceof)
                state.done = True
                self.coordinator.retire.remote(worker_id)  # it may have failed before leaving SSP's clocks
                self._leave_rounds(worker_id, state.incarnation)  # or sync's rounds (before it even joined them)
                cause = exc.cause if exc.cause is not None else exc
                oom = out_of_memory(cause)  # said in one line, as the local backend's workers do
                events.append(WorkerEvent("error", worker_id, str(cause)) if oom is None else
                              WorkerEvent("out_of_memory", worker_id, oom))  # fmt: skip
                # and it is gone, as a local worker whose process exits after the error: a death, said already
                events.append(WorkerEvent("died", worker_id, "its run failed", said=True))
            except ActorDiedError as exc:  # dead for good: restarts used up, or its node is gone
                state.done = True
                logs = recover_logs(self._name, worker_id)  # where its logs are on this machine: its rows
                settled = self._settle_dead(worker_id, logged_pushes(logs, len(self.shards)))
                self._late_rows += self._take_rows(worker_id, logs)
                self.coordinator.retire.remote(worker_id)  # under SSP it must not hold the others back
                self._leave_rounds(worker_id, state.incarnation)
                unsettled = "" if settled else "; a shard did not answer: its unused steps stay claimed"
                events.append(WorkerEvent("died", worker_id, first_line(exc) + unsettled))
            except RayActorError as exc:  # the process died and Ray restarts it (or is restarting it)
                self._leave_rounds(worker_id, state.incarnation)  # its restarted process joins them again
                if self._stopping:
                    state.done = True
                    continue
                if not state.failing:  # one restart per death, however many calls fail while it comes back
                    state.failing = True
                    self._deaths_seen[worker_id] += 1
                    events += self._restarts_up_to_date(worker_id, first_line(exc))
                state.retry_at = now + _RETRY_S
        return events

    def _count_stamped(self, worker_id: int, counts: dict[int, int]) -> None:
        """Count pushes of ``worker_id``'s runs that the shards' push stamps hold (``run -> count``): those a run
        that died made after the driver last polled it (:mod:`~downpour.backends.push_stamps`)."""
        for run, count in counts.items():
            examples, pushes = self._progress.get((worker_id, run), (0, 0))
            if count > pushes:
                self._progress[(worker_id, run)] = (examples, count)

    def _settle_dead(self, worker_id: int, logged: dict[int, int]) -> bool:
        """A worker dead for good: count its last run's pushes from the shards' stamps (or its logs, where they say
        more: ``logged``, :func:`~downpour.backends.ray_workers.logged_pushes`), and give the steps it claimed and
        did not use back to the budget (a restarted process would have done both). False when a shard did not
        answer within :data:`_POLL_TIMEOUT_S` (nothing settled; the logs' counts count when their rows are taken,
        :meth:`_take_rows`)."""
        refs = [shard.handle.push_stamps.remote() for shard in self.shards]
        try:
            stamps = ray.get(refs, timeout=_POLL_TIMEOUT_S)
        except (RayError, GetTimeoutError):
            return False
        counts = push_stamps.counts_by_run(values[worker_id] for values in stamps)
        for run, count in logged.items():
            counts[run] = max(counts.get(run, 0), count)
        self._count_stamped(worker_id, counts)
        self.coordinator.settle.remote(worker_id, _NO_RUN_AFTER, counts)
        return True

    def _leave_rounds(self, worker_id: int, incarnation: int) -> None:
        """``ps.policy = "sync"``: the process running ``incarnation`` of a worker died; its rounds stop waiting
        for it (the coordinator's roster and every shard's; see :class:`~downpour.backends.ray_coordinator.Roster`).
        """
        if self._sync:
            roster_update([self.coordinator, *(shard.handle for shard in self.shards)], worker_id, incarnation, False)

    def _restarts_up_to_date(self, worker_id: int, detail: str) -> list[WorkerEvent]:
        """``restarted`` events for the restarts of ``worker_id`` not reported yet: as many as the deaths its
        failed ``run`` calls told of, or as its actor's processes started after the first, whichever is more. The
        second count also has a process that died before it answered a call (whose death no failed call tells
        apart from the one before), and neither counts a death twice, whichever is seen first."""
        restarts = max(self._deaths_seen[worker_id], self._starts[worker_id] - 1)
        events = []
        while self._restarts[worker_id] < restarts:
            seen = self._restarts[worker_id] < self._deaths_seen[worker_id]
            self._restarts[worker_id] += 1
            self.worker_restarts += 1
            events.append(WorkerEvent("restarted", worker_id, detail if seen else _DIED_UNSEEN))
        return events

    def _update_restores(self, *, block: bool = False) -> list[WorkerEvent]:
        """Events of the shard restores and worker restarts the coordinator knows of and the driver has not told."""
        if self._restores_ref is None:
            self._restores_ref = self.coordinator.restores_and_starts.remote()
        ready, _ = ray.wait([self._restores_ref], timeout=_POLL_TIMEOUT_S if block else 0)
        if not ready:
            return []
        ref, self._restores_ref = self._restores_ref, None
        try:
            self._restores, starts, stamped = ray.get(ref)
        except RayError:
            return []
        events = [
            WorkerEvent("shard_restored", shard, f"shard {shard} restored at version {version} (incarnation {inc})")
            for shard, inc, version, _ in self._restores[self._restores_logged :]
        ]
        self._restores_logged = len(self._restores)
        self._starts = [max(a, b) for a, b in zip(self._starts, starts, strict=True)]
        for (worker_id, run), count in stamped.items():  # a dead run's pushes, as a restarted run read them
            self._count_stamped(worker_id, {run: count})  # (that one may have died too before the driver polled it)
        for worker_id in range(len(self._starts)):
            events += self._restarts_up_to_date(worker_id, _DIED_UNSEEN)
        return events

    def poll(self) -> tuple[list[tuple], list[WorkerEvent]]:
        """Records sent since the last poll, and events: workers restarted, died or failed, shards restored.

        Never waits on a worker: a poll reply not yet in is taken next time. Also applies the chaos schedule.
        """
        events = self._check_runs()
        records, self._late_rows = self._late_rows, []
        pending = [state.poll for state in self._workers if state.poll is not None]
        ready = set(ray.wait(pending, num_returns=len(pending), timeout=0)[0]) if pending else set()
        for state in self._workers:
            if state.poll is not None and state.poll in ready:
                records += self._take_poll(state)
            if state.poll is None and not state.done:
                state.poll = state.handle.poll.remote()
        events += self._update_restores()
        events += self._row_events
        self._row_events = []
        if self._chaos_t0 is None and self.examples_done() > 0:
            self._chaos_t0 = time.monotonic()  # the schedule counts from the first examples trained
        events += self._apply_chaos()
        return records, events

    def alive(self) -> int:
        """Workers still training (running, or being restarted)."""
        return sum(not state.done for state in self._workers)

    def examples_done(self) -> int:
        """Examples processed by all workers so far (this session), every incarnation included."""
        return sum(examples for examples, _ in self._progress.values())

    def worker_examples(self) -> list[int]:
        """Examples processed by each worker so far (this session), every incarnation included."""
        counts = [0] * len(self._workers)
        for (worker_id, _), (examples, _) in self._progress.items():
            counts[worker_id] += examples
        return counts

    def recent_loss(self) -> float:
        """Mean of the workers' latest mini-batch losses."""
        losses = [state.loss for state in self._workers if math.isfinite(state.loss)]
        return float(np.mean(losses)) if losses else float("nan")

    def steps(self) -> int:
        """The global step: pushes made across all workers (as last reported), plus those of earlier sessions."""
        return self._steps_before + sum(pushes for _, pushes in self._progress.values())

    def snapshots(self, indices: Sequence[int] | None = None, *, wait: float | None = None) -> list[dict[str, Any]]:
        """A consistent copy of every shard (each on its own, as in Downpour). None becomes a restore point until
        the driver has judged it (:meth:`set_restore_points`). ``wait``: a shard actor gives up after that many
        seconds when a worker on its node holds its lock that long (stopped, or hung), and this raises
        :class:`~downpour.ps.shard.ShardBusy`, as the local backend does; None waits however long."""
        chosen = list(range(len(self.shards))) if indices is None else list(indices)
        refs = [self.shards[i].handle.snapshot.remote(wait) for i in chosen]
        replies = ray.get(refs)
        if busy := [wire["busy"] for _, wire in replies if "busy" in wire]:
            raise ShardBusy("; ".join(busy))
        out = []
        restored = False
        for i, (incarnation, wire) in zip(chosen, replies, strict=True):
            self._seen[(i, incarnation)] = max(self._seen.get((i, incarnation), -1), int(wire["version"]))
            for worker_id, value in enumerate(wire["stamps"]):  # pushes a dead worker made after its last poll
                self._count_stamped(worker_id, push_stamps.counts_by_run([value]))
            restored |= incarnation > sum(shard == i for shard, *_ in self._restores)
            out.append(snapshot_from_wire(wire))
        if restored:  # a restore the polls have not reported yet: the checkpoint counts it (and the updates lost)
            self._restores = max(self._restores, ray.get(self.coordinator.restores.remote()), key=len)
        self._refresh_counts()
        return out

    def _refresh_counts(self) -> None:
        """Bring each running worker's counts up to date (polls report them up to a poll interval late), so that
        :meth:`steps` and :attr:`lost_updates` read after a snapshot count every push it holds (a worker counts a
        push before sending it) and every version a dead shard reached. A worker that does not answer in time
        (restarting) keeps its last counts, and so does one known to be restarting, which pushed nothing since."""
        running = [(i, state) for i, state in enumerate(self._workers) if not (state.done or state.failing)]
        refs = [state.handle.counts.remote() for _, state in running]
        if not refs:
            return
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=_COUNTS_TIMEOUT_S)[0])
        for (worker_id, _), ref in zip(running, refs, strict=True):
            if ref in ready:
                with contextlib.suppress(RayError):  # died since: its counts stay as last polled
                    self._apply_poll(worker_id, {"chunks": [], **ray.get(ref)})

    def set_restore_points(self, snapshots: Sequence[dict[str, Any]]) -> None:
        """Make ``snapshots`` (one per shard, from :meth:`snapshots`) what a shard actor that dies comes back at.
        The driver calls this with a checkpoint that did not diverge (finite tensors and held-out loss), never with
        one that did: a restored shard then holds the last good values."""
        if len(snapshots) != len(self.shards):
            raise ValueError(f"{len(snapshots)} snapshots for {len(self.shards)} shards")
        for i, snapshot in enumerate(snapshots):
            self._set_restore_point(i, ray.put(snapshot_to_wire(snapshot)))
            if "applied" in snapshot and snapshot["version"] > 0:  # a sync shard: its rounds hold several pushes
                self._pushes_per_round[i] = snapshot["applied"] / snapshot["version"]

    def _set_restore_point(self, index: int, ref: Any) -> None:
        self._restore_points[index] = ref  # owned by the driver (it lives while this reference does); a restarted
        ray.get(self.coordinator.set_snapshot.remote(index, [ref]))  # shard reads it through the coordinator

    def pids(self) -> list[int]:
        """Worker actors' process ids (for tests that kill one); -1 for one that does not answer."""
        refs = [state.handle.where.remote() for state in self._workers]
        out = []
        for ref in refs:
            try:
                out.append(int(ray.get(ref, timeout=_POLL_TIMEOUT_S)[1]))
            except (RayError, GetTimeoutError):
                out.append(-1)
        return out

    def placement(self) -> dict[str, list[str]]:
        """Node id of every shard actor and worker actor."""
        shards = ray.get([shard.handle.where.remote() for shard in self.shards])
        workers = ray.get([state.handle.where.remote() for state in self._workers])
        return {"shards": [node for node, _ in shards], "workers": [node for node, _ in workers]}

    def actor_pids(self) -> dict[str, list[int]]:
        """Process ids of the worker, shard and coordinator actors (the benchmark pauses them)."""
        return {
            "workers": self.pids(),
            "shards": [pid for _, pid in ray.get([shard.handle.where.remote() for shard in self.shards])],
            "coordinator": [int(ray.get(self.coordinator.pid.remote()))],
        }

    # -- faults ----------------------------------------------------------------------------------------------
    @property
    def shard_restores(self) -> int:
        """Shard actors restored from a restore point after dying."""
        return len(self._restores)

    @property
    def lost_updates(self) -> int:
        """Applied updates that restores undid: per restore, the version the dead incarnation reached (the highest
        any worker or snapshot saw) minus the version restored. A sync shard's version counts rounds: its lost
        rounds count as the pushes per round of its restore point (exact while every round holds the quorum; an
        estimate when rounds were smaller, with workers dead)."""
        lost = 0.0
        for shard, incarnation, version, _ in self._restores:
            rounds = max(0, self._seen.get((shard, incarnation - 1), version) - version)
            lost += rounds * self._pushes_per_round[shard]
        return round(lost)

    def restores(self) -> list[tuple[int, int, int, float]]:
        """Every shard restore seen so far: ``(shard, incarnation, restored version, unix time)``."""
        return list(self._restores)

    def faults(self) -> dict[str, int]:
        """``worker_restarts``, ``shard_restores``, ``lost_updates`` (for the run's summary)."""
        return {
            "worker_restarts": self.worker_restarts,
            "shard_restores": self.shard_restores,
            "lost_updates": self.lost_updates,
        }

    def kill_worker(self, worker_id: int) -> None:
        """Kill a worker actor's process the way a crash would; Ray restarts it."""
        ray.kill(self._workers[worker_id].handle, no_restart=False)

    def kill_shard(self, index: int) -> None:
        """Kill a shard actor's process the way a crash would; Ray restarts it and it restores itself."""
        ray.kill(self.shards[index].handle, no_restart=False)

    def _apply_chaos(self) -> list[WorkerEvent]:
        """Kill the actors that ``cluster.chaos`` schedules for now (seconds since the first examples trained)."""
        if self._chaos_t0 is None or self._stopping:
            return []
        events: list[WorkerEvent] = []
        elapsed = time.monotonic() - self._chaos_t0
        while self._chaos_next < len(self.chaos) and self.chaos[self._chaos_next][1] <= elapsed:
            kind, when = self.chaos[self._chaos_next]
            self._chaos_next += 1
            if kind == "kill-worker":
                candidates = [i for i, state in enumerate(self._workers) if not state.done]
                if not candidates:
                    continue
                target = self._chaos_rng.choice(candidates)
                self.kill_worker(target)
            else:
                target = self._chaos_rng.randrange(len(self.shards))
                self.kill_shard(target)
            self.chaos_log.append((time.monotonic(), kind, target))
            events.append(WorkerEvent("chaos", target, f"{kind} at {when:g}s (cluster.chaos)"))
        return events
