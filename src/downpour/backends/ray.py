"""The Ray backend: shards and workers as Ray actors, on one machine or many, surviving the death of either.

The same code as the local backend runs inside the actors: a shard actor holds a :class:`~downpour.ps.shard.Shard`
with the same rule (:func:`~downpour.ps.policies.policy_rule`) in its own memory, and a worker actor runs the same
:class:`~downpour.ps.worker.DownpourWorker` loop; only the transport differs. A worker reaches its shards through
:class:`RemoteShard` clients, and sends each step's calls to all shards at once (:class:`_FanOutWorker`), so a step
waits for the slowest shard, not for their sum. Updates and values travel as NumPy arrays, which Ray serializes as
out-of-band buffers (one copy, no per-element Python work): inline in the call up to the cluster's
``max_direct_call_object_size`` (raised to 1 MiB for a cluster this module starts), through the shared-memory object
store beyond that. The global step budget is a small actor (:class:`Coordinator`) that hands out steps in leases,
so that a worker asks it once per many pushes, not once per push. The driver pulls push records, example counts and
losses from every worker in batches, without waiting on them.

Failures. A worker actor that dies (its process killed, its node lost) is restarted by Ray (``max_restarts``); the
driver sees its ``run`` call fail, counts a restart and calls ``run`` again, and the new process starts, like every
worker, by fetching the current parameters. A shard actor that dies is restarted by Ray too; its constructor, finding
itself reconstructed, loads the driver's last checkpoint snapshot (which the driver hands to the coordinator with
every checkpoint) and takes a new *incarnation* number. Pushes computed against the dead incarnation's values are
dropped (recorded as not applied), and the worker refetches that shard. The updates lost are the shard's version
before it died — the highest version any worker saw from that incarnation — minus the restored version: never more
than the pushes applied since the last checkpoint.

Addresses. ``cluster.address = ""`` starts a private Ray instance for this run, bound to 127.0.0.1; ``"auto"`` or
``"host:port"`` connects to a running cluster (``ray start --head`` ...). Ray's token authentication stays on: a
private instance uses it (Ray's default), and a connection does with ``RAY_AUTH_MODE=token`` (Ray's switch).
Nothing is ever unpickled from a file: checkpoints stay safetensors + JSON, written by the driver.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from downpour.backends import shm
from downpour.backends.chaos import parse_chaos
from downpour.backends.local import WorkerEvent, worker_settings
from downpour.backends.ray_coordinator import Coordinator
from downpour.config import Config
from downpour.errors import DownpourError
from downpour.models import build_model
from downpour.ps.policies import policy_rule
from downpour.ps.shard import PushResult, Shard
from downpour.ps.sharding import contiguous_bounds
from downpour.ps.worker import DownpourWorker, PushRecord

try:
    import ray
    from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError, RayError, RayTaskError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError:  # pragma: no cover - exercised only where Ray is missing
    raise DownpourError("cluster.backend = \"ray\" needs Ray: pip install 'downpour-sgd[ray]'") from None

__all__ = [
    "Coordinator",
    "RayCluster",
    "RemoteShard",
    "ShardServer",
    "WorkerActor",
    "connect",
    "parse_chaos",
]

INLINE_BYTES = 1 << 20  # max_direct_call_object_size of an instance we start: shards up to 256K floats go inline
OBJECT_STORE_BYTES = 200 * 1024 * 1024  # shared-memory object store of an instance we start
# Ray's settings for an instance we start (scripts/ray_cluster.sh passes the same to `ray start`): updates up to
# INLINE_BYTES inline in the call; actor processes at the driver's priority (Ray's default, nice 15, has training
# actors yield the CPU to every other process on the machine, which the local backend's workers do not).
SYSTEM_CONFIG = {"max_direct_call_object_size": INLINE_BYTES, "worker_niceness": 0}
MAX_RESTARTS = 100  # per actor; Ray's own limit and the driver's
# CPUs a shard or worker actor asks for: nearly none (they are not CPU-bound reservations), but not zero, for Ray
# schedules a zero-resource actor on the caller's node and would ignore its (soft) node affinity.
_ACTOR_CPUS = 0.01
_LEASE_MAX = 32  # steps a worker claims from the coordinator at most at once
_POLL_TIMEOUT_S = 10.0
_RETRY_S = 0.25  # between calls of ``run`` on a worker that Ray is restarting
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_ATTACH_TIMEOUT_S = 120.0  # how long a worker waits for a shard actor that Ray is restarting
PIPELINE_DEPTH = 1  # pushes per shard actor a worker keeps in flight while it computes
# Workers map the files of shards on their own node (set DOWNPOUR_RAY_SHARED_MEMORY=0 to use actor calls only).
_SHARED_MEMORY = os.environ.get("DOWNPOUR_RAY_SHARED_MEMORY", "1") != "0"

# ---------------------------------------------------------------------------------------------------------------
# Connecting
# ---------------------------------------------------------------------------------------------------------------


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def _keep_loopback() -> Iterator[None]:
    """While starting or joining Ray, keep 127.0.0.1 as this node's address instead of resolving it.

    Ray binds its servers to the node's address, and resolves 127.0.0.1 to the machine's routable address first
    (so that other machines could join). Its switch for single-machine clusters, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``
    (named for the platforms where it is the default), keeps the loopback address: read by this process at Ray's
    import, and by every process Ray starts from its environment.
    """
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(_LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_LOOPBACK_ENV, None)
        else:
            os.environ[_LOOPBACK_ENV] = saved_env


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence one logger's warnings for a moment."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def connect(address: str = "", *, num_cpus: int | None = None, object_store_bytes: int = OBJECT_STORE_BYTES
            ) -> str | None:  # fmt: skip
    """Connect this process to Ray, or start a private instance; return that instance's temporary directory.

    ``address`` ``""`` starts a local instance bound to 127.0.0.1 (``num_cpus``, default all cores; no dashboard;
    a ``object_store_bytes`` object store; updates up to :data:`INLINE_BYTES` inline), with token authentication
    (Ray's default for a new instance); ``"auto"`` or ``"host:port"`` connects (with the token Ray finds when
    ``RAY_AUTH_MODE=token``). Returns None when connecting, or when this process is connected already.
    """
    if ray.is_initialized():
        return None
    mode = os.environ.get("RAY_AUTH_MODE", "token")
    if address == "" and mode.lower() != "token":
        raise DownpourError(f"RAY_AUTH_MODE={mode} would start Ray without token authentication; unset it")
    if address == "":
        temp_dir = tempfile.mkdtemp(prefix="downpour-ray-")
        try:
            with _keep_loopback(), _quiet("ray._private.authentication.authentication_token_setup"):
                ray.init(
                    address="local",
                    _node_ip_address="127.0.0.1",
                    include_dashboard=False,
                    num_cpus=num_cpus or os.cpu_count() or 1,
                    object_store_memory=object_store_bytes,
                    _system_config=SYSTEM_CONFIG,
                    _temp_dir=temp_dir,
                    logging_level=logging.WARNING,
                    log_to_driver=False,
                )
        except (ConnectionError, RayError, RuntimeError, ValueError) as exc:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise DownpourError(f"cannot start a local Ray instance: {_first(exc)}") from None
        return temp_dir
    try:
        with _keep_loopback() if address != "auto" and _is_loopback(address) else contextlib.nullcontext():
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RayError, RuntimeError, ValueError) as exc:
        raise DownpourError(
            f"cannot reach Ray at cluster.address = {address!r}: {_first(exc)} (is it running? if it uses token "
            "authentication, export RAY_AUTH_MODE=token and the token: RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
        ) from None
    return None


# ---------------------------------------------------------------------------------------------------------------
# Wire format: snapshots as NumPy arrays (Ray moves them as buffers)
# ---------------------------------------------------------------------------------------------------------------


def _snapshot_to_wire(snapshot: dict[str, Any]) -> dict[str, Any]:
    return {
        "values": snapshot["values"].numpy(),
        "state": {name: tensor.numpy() for name, tensor in snapshot["state"].items()},
        "version": int(snapshot["version"]),
        "rejected": int(snapshot["rejected"]),
    }


def _snapshot_from_wire(wire: dict[str, Any]) -> dict[str, Any]:
    """Torch tensors owning writable copies (arrays Ray hands over are read-only views)."""
    return {
        "values": torch.from_numpy(np.array(wire["values"], dtype=np.float32)),
        "state": {name: torch.from_numpy(np.array(a, dtype=np.float32)) for name, a in wire["state"].items()},
        "version": int(wire["version"]),
        "rejected": int(wire["rejected"]),
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
    """

    def __init__(self, index: int, start: int, size: int, config: Config, cluster_name: str) -> None:
        torch.set_num_threads(1)
        coordinator = ray.get_actor(f"{cluster_name}-coordinator")
        self.index, self.size = index, size
        self._update = torch.empty(size, dtype=torch.float32)
        self._fetched = torch.empty(size, dtype=torch.float32)
        # Values come from the restore point the driver keeps with the coordinator (the start at first, the last
        # checkpoint after a death). Constructor arguments hold no object or actor reference: Ray may lose those
        # of a restartable actor (ray-project/ray#53727); actors are found by name instead.
        (ref,) = ray.get(coordinator.snapshot.remote(index))
        snapshot = _snapshot_from_wire(ray.get(ref))
        self.incarnation = 0
        if _reconstructed():
            self.incarnation = ray.get(coordinator.shard_restored.remote(index, snapshot["version"]))
        self.path = shm.segment_path(cluster_name, index, self.incarnation)
        shm.unlink(self.path)  # left by an earlier try of this incarnation's constructor
        shm.collect_orphans()  # files of runs whose driver was killed
        self._shared = shm.SharedShard(self.path, index, start, size, policy_rule(config), create=True,
                                       incarnation=self.incarnation)  # fmt: skip
        self.shard = self._shared.shard
        self.shard.restore(snapshot)
        shm.retire_others(cluster_name, index, self.path)  # workers still pushing into a dead incarnation stop

    def attach_info(self) -> tuple[str, str, int]:
        """``(node id, file, incarnation)``: what a worker needs to map this shard when it runs on the same node."""
        return ray.get_runtime_context().get_node_id(), self.path, self.incarnation

    def release(self) -> None:
        """Remove this shard's file (the run is over; mappings that remain stay valid until dropped)."""
        shm.unlink(self.path)

    def fetch(self) -> tuple[int, int, np.ndarray]:
        """``(version, incarnation, values)``."""
        out = torch.empty(self.size, dtype=torch.float32)
        version = self.shard.fetch_into(out)
        return version, self.incarnation, out.numpy()

    def push(self, update: np.ndarray, fetched_version: int, worker: int, incarnation: int, pull: bool,
             fetched_values: np.ndarray | None = None) -> tuple[bool, int, int, int, np.ndarray | None]:  # fmt: skip
        """Apply ``update``; return ``(applied, staleness, version, incarnation, values if pull else None)``.

        A push computed against another incarnation (values this shard lost when it died) is not applied.
        """
        out = torch.empty(self.size, dtype=torch.float32) if pull else None
        if incarnation != self.incarnation:
            version = self.shard.fetch_into(out) if out is not None else self.shard.version
            return False, -1, version, self.incarnation, out.numpy() if out is not None else None
        np.copyto(self._update.numpy(), update)
        fetched = None
        if fetched_values is not None:
            np.copyto(self._fetched.numpy(), fetched_values)
            fetched = self._fetched
        result = self.shard.push(self._update, fetched_version, worker, fetch_into=out, fetched_values=fetched)
        return result.applied, result.staleness, result.version, self.incarnation, None if out is None else out.numpy()

    def snapshot(self) -> tuple[int, dict[str, Any]]:
        """``(incarnation, wire snapshot)`` of values, rule state, version and rejected count."""
        return self.incarnation, _snapshot_to_wire(self.shard.snapshot())

    def restore(self, wire: dict[str, Any]) -> None:
        """Load a wire snapshot (a resumed run's checkpoint)."""
        self.shard.restore(_snapshot_from_wire(wire))

    def version(self) -> int:
        """Pushes applied so far."""
        return self.shard.version

    def where(self) -> tuple[str, int]:
        """``(node id, process id)`` of this actor."""
        return ray.get_runtime_context().get_node_id(), os.getpid()


class RemoteShard:
    """A :class:`~downpour.ps.worker.ShardClient` for a shard actor: the worker's view of one shard.

    On the shard's node it maps the shard's file and fetches and pushes directly (:attr:`direct`); elsewhere it
    calls the actor. ``*_async`` / ``accept_*`` split the actor calls so that :class:`_FanOutWorker` can keep them
    in flight while it computes.
    """

    def __init__(self, index: int, start: int, size: int, handle: Any, *, rule: Any, send_fetched: bool) -> None:
        self.index, self.start, self.size, self.handle = index, start, size, handle
        self.rule = rule
        self.send_fetched = send_fetched  # the rule needs the values the update was computed at (dc-asgd)
        self.incarnation = 0
        self.seen: dict[int, int] = {}  # incarnation -> highest version seen from it
        self.direct: shm.SharedShard | None = None
        self.direct_node = ""  # the worker's node: shards there are mapped

    def connect(self, node_id: str) -> None:
        """Ask the shard actor (waiting while Ray restarts it) where it is; map its file when on ``node_id``."""
        self.direct_node = node_id
        if self.direct is not None:
            self.direct.close()
            self.direct = None
        node, path, incarnation = ray.get(self.handle.attach_info.remote(), timeout=_ATTACH_TIMEOUT_S)
        self.incarnation = incarnation
        if node == node_id and _SHARED_MEMORY:
            with contextlib.suppress(FileNotFoundError):  # retired already: use the actor (a later call remaps)
                self.direct = shm.SharedShard(path, self.index, self.start, self.size, self.rule, create=False)

    def _live_direct(self) -> Shard | None:
        """The mapped shard if its owner lives; None for a shard reached through the actor."""
        if self.direct is None:
            return None
        if self.direct.alive():
            return self.direct.shard
        return None

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
        """Copy the shard's current values into ``out`` (shape ``(size,)``) and return their version."""
        if self.direct is not None:
            shard = self._live_direct()
            if shard is not None:
                version = shard.fetch_into(out)
                self._note(self.incarnation, version)
                return version
            self.connect(self.direct_node)  # its actor died: find the restored incarnation
            return self.fetch_into(out)
        return self.accept_fetch(ray.get(self.fetch_async()), out)

    def push_direct(self, update: Tensor, fetched_version: int, worker: int, *, fetch_into: Tensor | None,
                    fetched_values: Tensor | None) -> PushResult | None:  # fmt: skip
        """Push into the mapped shard; None when its actor has died (the caller remaps and refetches)."""
        shard = self._live_direct()
        if shard is None:
            return None
        fetched = fetched_values if self.send_fetched else None
        result = shard.push(update, fetched_version, worker, fetch_into=fetch_into, fetched_values=fetched)
        self._note(self.incarnation, result.version)
        return result

    def push_async(self, update: Tensor, fetched_version: int, worker: int, *, pull: bool,
                   fetched_values: Tensor | None) -> Any:  # fmt: skip
        """Start a push (a push-pull when ``pull``) through the actor; :meth:`accept_push` takes its reply.

        Ray serializes the arguments during this call, so the caller may overwrite ``update`` at once.
        """
        fetched = fetched_values.numpy() if self.send_fetched and fetched_values is not None else None
        return self.handle.push.remote(update.numpy(), fetched_version, worker, self.incarnation, pull, fetched)

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
            self.connect(self.direct_node)
            return PushResult(False, -1, self.fetch_into(fetch_into) if fetch_into is not None else fetched_version)
        ref = self.push_async(
            update, fetched_version, worker, pull=fetch_into is not None, fetched_values=fetched_values
        )
        return self.accept_push(ray.get(ref), fetch_into)


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
                result = PushResult(False, -1, fetched)
                shard.connect(shard.direct_node)
                versions[shard.index] = shard.fetch_into(values)
            elif then_fetch:
                versions[shard.index] = result.version
            self._record(shard, result, loss)
        self.pushes_ += 1
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
    """A worker's side of the global step budget: steps claimed from the coordinator in leases, used one by one."""

    def __init__(self, coordinator: Any, limit: int) -> None:
        self.coordinator, self.limit = coordinator, limit
        self.credits = 0
        self.spent = False

    def reserve(self) -> bool:
        """Claim one push; False once the budget is spent."""
        if not self.limit:
            return True
        if self.credits == 0:
            if self.spent:
                return False
            self.credits = int(ray.get(self.coordinator.claim.remote(_LEASE_MAX)))
            if self.credits == 0:
                self.spent = True
                return False
        self.credits -= 1
        return True

    def release(self) -> None:
        """Give unused steps back (without waiting: the coordinator takes calls in order)."""
        if self.credits:
            self.coordinator.release.remote(self.credits)
            self.credits = 0


class WorkerActor:
    """One model replica in a Ray actor: :class:`_FanOutWorker` on its slice of the examples.

    ``run`` trains on one thread while the driver calls ``poll`` and ``stop`` on another (the actor has three
    threads: a second ``run`` may wait on the first).
    """

    def __init__(self, worker_id: int, config: Config, input_dim: int, shape: tuple[int, ...] | None,
                 seed: int, shards: list[tuple[int, int, str]], coordinator_name: str, t0: float, threads: int,
                 send_fetched: bool) -> None:  # fmt: skip
        torch.set_num_threads(threads)
        self.worker_id, self.config, self.input_dim, self.shape = worker_id, config, input_dim, shape
        # Examples and actors are found through the coordinator and by name, not passed (see ShardServer).
        self.coordinator = ray.get_actor(coordinator_name)
        (ref,) = ray.get(self.coordinator.examples.remote(worker_id))
        self.examples = torch.from_numpy(np.array(ray.get(ref), dtype=np.float32))  # (N, D), a writable copy
        self.shards = [(start, size, ray.get_actor(name)) for start, size, name in shards]
        self.seed, self.t0 = seed, t0
        self.send_fetched = send_fetched
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._running = threading.Lock()
        self._records: list[tuple] = []
        self._examples, self._loss = 0, float("nan")
        self._worker: _FanOutWorker | None = None
        self._clients: list[RemoteShard] = []
        self.incarnation = -1

    def _record(self, record: PushRecord) -> None:
        with self._lock:
            self._records.append(tuple(record))

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
        self._clients = [
            RemoteShard(index, start, size, handle, rule=rule, send_fetched=self.send_fetched)
            for index, (start, size, handle) in enumerate(self.shards)
        ]
        node_id = ray.get_runtime_context().get_node_id()
        for client in self._clients:
            client.connect(node_id)
        budget = _LeasedSteps(self.coordinator, self.config.train.steps)
        ssp = self.config.ps.policy == "ssp"
        self._worker = _FanOutWorker(
            self.worker_id,
            model,
            self._clients,
            self.examples,
            worker_settings(self.config),
            rng=np.random.default_rng(np.random.SeedSequence([self.seed, incarnation])),
            budget=budget,
            should_stop=self._stop.is_set,
            record=self._record,
            progress=self._progress,
            clock=lambda: time.time() - self.t0,
            ssp=_ActorClocks(self.coordinator, self.worker_id, bound=self.config.ps.staleness_bound) if ssp else None,
            depth=0 if ssp else PIPELINE_DEPTH,  # SSP's staleness bound counts pushes applied: none left in flight
        )
        try:
            self._worker.run()
        finally:
            budget.release()
        return self._worker.pushes_

    def poll(self) -> dict[str, Any]:
        """Records since the last poll, and this incarnation's examples, latest loss, pushes and versions seen."""
        with self._lock:
            records, self._records = self._records, []
        worker = self._worker
        return {
            "incarnation": self.incarnation,
            "records": records,
            "examples": self._examples,
            "loss": self._loss,
            "pushes": worker.pushes_ if worker is not None else 0,
            "seen": {(c.index, inc): v for c in self._clients for inc, v in c.seen.items()},
        }

    def stop(self) -> None:
        """Stop after the current step (for good: a ``run`` started later returns at once)."""
        self._stop.set()

    def where(self) -> tuple[str, int]:
        """``(node id, process id)`` of this actor."""
        return ray.get_runtime_context().get_node_id(), os.getpid()


# ---------------------------------------------------------------------------------------------------------------
# Driver side
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
        ref = ray.put(_snapshot_to_wire(snapshot))
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
    ``alive``, ``pids``; ``shards`` (proxies with ``restore``) and ``budget`` (with ``set``) for a resumed run.
    Fault counters: :attr:`worker_restarts`, :attr:`shard_restores`, :attr:`lost_updates` (:meth:`faults`).
    """

    def __init__(self, config: Config, train: Tensor, initial: Tensor, *, worker_seeds: Sequence[int], t0: float,
                 shape: tuple[int, ...] | None = None, address: str | None = None, chaos: str | None = None,
                 max_restarts: int = MAX_RESTARTS, num_cpus: int | None = None) -> None:  # fmt: skip
        self.config = config
        self.address = address if address is not None else str(getattr(config.cluster, "address", ""))
        self.chaos = parse_chaos(chaos if chaos is not None else str(getattr(config.cluster, "chaos", "")))
        self.max_restarts = max_restarts
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
        self._steps_before = 0
        self._stopping = False
        self._restores_logged = 0
        self._restores: list[tuple[int, int, int, float]] = []
        self._restores_ref: Any = None
        self._chaos_t0: float | None = None
        self._chaos_rng = random.Random(config.train.seed)
        self._chaos_next = 0
        self.chaos_log: list[tuple[float, str, int]] = []  # (time.monotonic(), kind, target) of each fault injected
        self.worker_restarts = 0
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
                self._set_restore_point(i, ray.put(_snapshot_to_wire(start_point)))
            shard_actor = ray.remote(ShardServer)
            placements = _spread(self.nodes, len(self.bounds))
            handles = [
                shard_actor.options(
                    name=f"{self._name}-shard{i}",
                    num_cpus=_ACTOR_CPUS,
                    max_restarts=max_restarts,
                    max_task_retries=-1,
                    scheduling_strategy=placement,
                ).remote(i, start, stop - start, config, self._name)
                for i, ((start, stop), placement) in enumerate(zip(self.bounds, placements, strict=True))
            ]
            self.shards = [
                ShardProxy(self, i, start, stop - start, rule, handle)
                for i, ((start, stop), handle) in enumerate(zip(self.bounds, handles, strict=True))
            ]
            self.budget = BudgetProxy(self, config.train.steps)
            ray.get([shard.handle.version.remote() for shard in self.shards])  # the shard actors are up
        except BaseException:
            self.close()
            raise

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start one worker actor per worker, each with only its own slice of the training examples."""
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
            )
            self._workers.append(_WorkerState(handle))
        # Start training once every worker actor is up (a process each, importing torch: seconds on a busy node),
        # so that no worker spends the budget before the others have started.
        try:
            ray.get([state.handle.where.remote() for state in self._workers])
        except RayError as exc:
            raise DownpourError(f"a Ray worker actor did not start: {_first(exc)}") from None
        for state in self._workers:
            state.run = state.handle.run.remote(0)

    def request_stop(self) -> None:
        """Ask every worker to stop after its current step."""
        self._stopping = True
        for state in self._workers:
            if not state.done:
                state.handle.stop.remote()

    def stop(self, timeout: float = 30.0) -> tuple[list[tuple], list[WorkerEvent]]:
        """Stop the workers, wait for them, and return the records and events still in flight."""
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
            if state.poll is not None:
                records += self._take_poll(state, block=True)
            if state.done:
                with contextlib.suppress(RayError, GetTimeoutError):
                    reply = ray.get(state.handle.poll.remote(), timeout=_POLL_TIMEOUT_S)
                    records += self._apply_poll(worker_id, reply)
        for state in self._workers:
            if not state.done:  # did not stop in time: end it
                with contextlib.suppress(RayError):
                    ray.kill(state.handle, no_restart=True)
                state.done = True
        self._update_restores(block=True)
        return records, events

    def close(self) -> None:
        """End every actor; shut down the Ray instance if this cluster started it."""
        handles = [state.handle for state in self._workers]
        shards = [shard.handle for shard in getattr(self, "shards", [])]
        with contextlib.suppress(Exception):  # each shard removes its file on its node
            ray.get([handle.release.remote() for handle in shards], timeout=_POLL_TIMEOUT_S)
        handles += shards
        if getattr(self, "coordinator", None) is not None:
            handles.append(self.coordinator)
        for handle in handles:
            with contextlib.suppress(Exception):
                ray.kill(handle, no_restart=True)
        self._workers, self._example_refs = [], []
        self._restore_points = []
        if self._owns_ray:
            with contextlib.suppress(Exception):
                ray.shutdown()
            self._owns_ray = False
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None
        if getattr(self, "_name", None):
            shm.unlink_cluster(self._name)  # files of dead incarnations on this machine

    # -- observation -----------------------------------------------------------------------------------------
    def _apply_poll(self, worker_id: int, reply: dict[str, Any]) -> list[tuple]:
        state = self._workers[worker_id]
        if state.failing and reply["incarnation"] == state.incarnation:
            state.failing = False  # the restarted process runs the latest ``run``
        self._progress[(worker_id, reply["incarnation"])] = (reply["examples"], reply["pushes"])
        if math.isfinite(reply["loss"]):
            state.loss = reply["loss"]
        for key, version in reply["seen"].items():
            if version > self._seen.get(key, -1):
                self._seen[key] = version
        return reply["records"]

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
                events.append(WorkerEvent("error", worker_id, str(exc.cause if exc.cause is not None else exc)))
            except ActorDiedError as exc:  # dead for good: restarts used up, or its node is gone
                state.done = True
                self.coordinator.retire.remote(worker_id)  # under SSP it must not hold the others back
                events.append(WorkerEvent("died", worker_id, _first(exc)))
            except RayActorError as exc:  # the process died and Ray restarts it (or is restarting it)
                if self._stopping:
                    state.done = True
                    continue
                if not state.failing:  # one restart per death, however many calls fail while it comes back
                    state.failing = True
                    self.worker_restarts += 1
                    events.append(WorkerEvent("restarted", worker_id, _first(exc)))
                state.retry_at = now + _RETRY_S
        return events

    def _update_restores(self, *, block: bool = False) -> list[WorkerEvent]:
        if self._restores_ref is None:
            self._restores_ref = self.coordinator.restores.remote()
        ready, _ = ray.wait([self._restores_ref], timeout=_POLL_TIMEOUT_S if block else 0)
        if not ready:
            return []
        ref, self._restores_ref = self._restores_ref, None
        try:
            self._restores = ray.get(ref)
        except RayError:
            return []
        events = [
            WorkerEvent("shard_restored", shard, f"shard {shard} restored at version {version} (incarnation {inc})")
            for shard, inc, version, _ in self._restores[self._restores_logged :]
        ]
        self._restores_logged = len(self._restores)
        return events

    def poll(self) -> tuple[list[tuple], list[WorkerEvent]]:
        """Records sent since the last poll, and events: workers restarted, died or failed, shards restored.

        Never waits on a worker: a poll reply not yet in is taken next time. Also applies the chaos schedule.
        """
        records: list[tuple] = []
        events = self._check_runs()
        pending = [state.poll for state in self._workers if state.poll is not None]
        ready = set(ray.wait(pending, num_returns=len(pending), timeout=0)[0]) if pending else set()
        for state in self._workers:
            if state.poll is not None and state.poll in ready:
                records += self._take_poll(state)
            if state.poll is None and not state.done:
                state.poll = state.handle.poll.remote()
        events += self._update_restores()
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

    def snapshots(self, indices: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """A consistent copy of every shard (each on its own, as in Downpour); each becomes its restore point."""
        chosen = list(range(len(self.shards))) if indices is None else list(indices)
        refs = [self.shards[i].handle.snapshot.remote() for i in chosen]
        out = []
        for i, (incarnation, wire) in zip(chosen, ray.get(refs), strict=True):
            self._set_restore_point(i, ray.put(wire))  # owned by the driver; a restarted shard reads it from here
            self._seen[(i, incarnation)] = max(self._seen.get((i, incarnation), -1), int(wire["version"]))
            out.append(_snapshot_from_wire(wire))
        return out

    def _set_restore_point(self, index: int, ref: Any) -> None:
        self._restore_points[index] = ref  # the driver owns it: it lives while this reference does
        ray.get(self.coordinator.set_snapshot.remote(index, [ref]))

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
        any worker or snapshot saw) minus the version restored."""
        lost = 0
        for shard, incarnation, version, _ in self._restores:
            lost += max(0, self._seen.get((shard, incarnation - 1), version) - version)
        return lost

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


def _first(exc: BaseException) -> str:
    """The first line of an exception's message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
