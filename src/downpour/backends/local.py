"""The local backend: worker processes on one machine pushing straight into shared-memory shards.

Shards live in shared memory (``torch`` tensors in ``/dev/shm``) and every worker process applies its own pushes
under the shard's ``flock`` lock: no server process, no copy through a pipe, no network port. The benchmark in the
README (``downpour bench ps``) is why: a push is one slice of the flat gradient and a rule kernel, nothing more.
Records of applied pushes travel to the driver in small batches through one one-way pipe per worker, whose write
end only that worker holds: a worker that dies, even in the middle of a message, reads as end-of-file, never as a
hang. Workers start from a fork server with torch imported already (:mod:`downpour.backends.processes`), so a
run does not wait seconds per worker for an import. A worker whose driver has died stops on its own: the fork
server exits with the driver and the kernel's parent-death signal follows (spawned workers get it from the driver
directly), and a worker also checks its driver each second. Under ``sync``, workers start training together, once
every one has built its model (or died).

Every policy runs here (:mod:`downpour.ps.policies`): the push policies through the shard's rule; ``ssp`` with
shared clocks (:mod:`downpour.ps.clocks`); ``sync`` with :class:`~downpour.ps.sync_shard.SyncShard` s, which
collect one push per worker per version and count the live workers in the same shared clocks; ``easgd`` with
:class:`~downpour.ps.worker_rounds.ElasticWorker` s exchanging with the shards (:meth:`Shard.exchange`), which
hold the center.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from downpour.backends import push_log
from downpour.backends.processes import (
    adopt_environment,
    become_worker,
    driver_alive,
    fork_server_gone,
    fork_server_pid,
    hold_while_alive,
    kill_fork_server,
    owner_gone,
    remove_dead_temp_dirs,
    worker_context,
)
from downpour.config import Config
from downpour.errors import ConfigError, out_of_memory
from downpour.models import build_model, seed_sampling
from downpour.ps.budget import GlobalSteps
from downpour.ps.clocks import SharedClocks
from downpour.ps.locks import FileLock
from downpour.ps.policies import EASGD, Sync, config_policy, policy_rule
from downpour.ps.shard import Shard
from downpour.ps.sharding import contiguous_bounds
from downpour.ps.sync_shard import SyncShard
from downpour.ps.worker import DownpourWorker, PushRecord, WorkerSettings
from downpour.ps.worker_rounds import ElasticWorker, SyncWorker
from downpour.signals import routed

_FLUSH_SECONDS = 0.2
_FLUSH_RECORDS = 256  # about 8 KB a message: well inside a pipe's buffer
_DRIVER_CHECK_SECONDS = 1.0
_START_POLL_SECONDS = 0.01


WORKER_MEMORY_BYTES = 250 * 2**20
"""Memory one worker process needs, roughly: ~150 MB of private memory once it has imported torch (measured:
``Pss_Anon`` of a freshly spawned worker), plus its model, gradients and mini-batches. Workers forked from the fork
server share the imported modules' pages, so this errs on the safe side there."""


def available_memory() -> int:
    """Bytes of memory available for new processes (``MemAvailable`` on Linux; free physical pages elsewhere)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def max_local_workers() -> int:
    """How many worker processes this machine can hold now: available memory // :data:`WORKER_MEMORY_BYTES`."""
    return max(1, available_memory() // WORKER_MEMORY_BYTES)


def check_local_workers(workers: int) -> None:
    """Raise :class:`ConfigError` when ``workers`` processes would not fit in this machine's memory."""
    limit = max_local_workers()
    if workers > limit:
        raise ConfigError(
            f"invalid cluster.workers: {workers} (the local backend runs each worker as an OS process that imports "
            f"torch, about {WORKER_MEMORY_BYTES // 2**20} MB each; {available_memory() / 2**30:.1f} GB available "
            f'here holds at most {limit}; use cluster.backend = "sim" for more workers)'
        )


def worker_threads(config: Config) -> int:
    """Intra-op threads per worker: ``cluster.threads_per_worker``, or cores // workers (at least 1)."""
    if config.cluster.threads_per_worker:
        return config.cluster.threads_per_worker
    return max(1, (os.cpu_count() or 1) // config.cluster.workers)


def worker_settings(config: Config) -> WorkerSettings:
    """The worker's knobs from a run config."""
    return WorkerSettings(
        batch_size=config.train.batch_size,
        n_fetch=config.ps.n_fetch,
        n_push=config.ps.n_push,
        local_apply=config.ps.local_apply,
        local_lr=config.ps.lr,
    )


@dataclass
class _WorkerSpec:
    worker_id: int
    config: Config
    input_dim: int
    shape: tuple[int, ...] | None  # (C, H, W) of one example, for image models
    shards: list[Shard]
    examples: Tensor
    seed: int
    budget: GlobalSteps
    control: Tensor  # (1,) int64: nonzero = stop
    progress: Tensor  # (workers, 3) float64: examples done, last loss, ready (1 once started; or dead)
    records: Any  # the write end of this worker's one-way pipe to the driver
    log_path: str  # this worker's push log (push_log): its rows again, for the driver should the process die
    t0: float
    threads: int
    environment: dict[str, str]  # the driver's environment when it started the worker
    clocks: Tensor | None = None  # (workers,) int64 shared clocks under ps.policy = "ssp" or "sync"


class _Batcher:
    """Collects push records and sends them to the driver in batches; keeps each in the worker's push log too
    (:mod:`~downpour.backends.push_log`), from which the driver takes the rows of a batch the worker died before
    sending."""

    def __init__(self, records: Any, log: push_log.PushLog | None = None) -> None:
        self.records, self.pending, self.last = records, [], time.monotonic()
        self.log = log

    def __call__(self, record: PushRecord) -> None:
        row = tuple(record)
        if self.log is not None:
            self.log.append(row)
        self.pending.append(row)
        now = time.monotonic()
        if len(self.pending) >= _FLUSH_RECORDS or now - self.last >= _FLUSH_SECONDS:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        if self.pending:
            self.records.send(self.pending)
            self.pending = []
        self.last = now if now is not None else time.monotonic()


def _worker_main(spec: _WorkerSpec) -> None:
    """Entry point of one worker process."""
    become_worker()  # Ctrl-C is the driver's to handle (it stops us cleanly); we die with the driver
    if not driver_alive():  # the driver died before we got here
        return
    adopt_environment(spec.environment)
    torch.set_num_threads(spec.threads)
    control = spec.control.numpy()
    progress = spec.progress.numpy()
    batcher = _Batcher(spec.records)
    next_driver_check = [time.monotonic() + _DRIVER_CHECK_SECONDS]

    def should_stop() -> bool:
        if control[0]:
            return True
        now = time.monotonic()
        if now >= next_driver_check[0]:  # the driver was killed: do not live on as an orphan
            next_driver_check[0] = now + _DRIVER_CHECK_SECONDS
            return not driver_alive()
        return False

    def report(examples: int, loss: float) -> None:
        progress[spec.worker_id, 0] += examples
        progress[spec.worker_id, 1] = loss

    try:
        batcher.log = log = push_log.PushLog(spec.log_path)
        model = build_model(spec.config.model, spec.input_dim, seed=spec.config.train.seed, shape=spec.shape)
        seed_sampling(model, spec.seed)  # the same initial values everywhere, each worker's own sampling noise
        policy = config_policy(spec.config)
        clocks = None if spec.clocks is None else SharedClocks(
            spec.clocks.numel(), bound=spec.config.ps.staleness_bound, clocks=spec.clocks
        )  # fmt: skip
        kind, extra = DownpourWorker, {"ssp": clocks}
        if isinstance(policy, Sync):
            kind, extra = SyncWorker, {"roster": clocks}
        elif isinstance(policy, EASGD):
            kind, extra = ElasticWorker, {"policy": policy}
        worker = kind(
            spec.worker_id,
            model,
            spec.shards,
            spec.examples,
            worker_settings(spec.config),
            rng=np.random.default_rng(spec.seed),
            budget=spec.budget,
            should_stop=should_stop,
            record=batcher,
            progress=report,
            clock=lambda: time.time() - spec.t0,
            **extra,
        )
        # sync starts together: importing torch takes seconds, and with backup workers the first one ready would
        # close its rounds alone (the others, asynchronous, just start when they are ready).
        progress[spec.worker_id, 2] = 1.0
        while isinstance(policy, Sync) and progress[:, 2].sum() < len(progress) and not should_stop():
            time.sleep(_START_POLL_SECONDS)
        worker.run()
        if driver_alive():
            batcher.flush()
            log.close()  # every row sent: nothing to take from it
        gc.freeze()  # exiting: skip the final collections over torch's objects (about a second the driver waits)
    except BrokenPipeError:  # the driver is gone: nobody to report to
        raise SystemExit(1) from None
    except BaseException as exc:
        detail = out_of_memory(exc)
        if detail is not None:  # said in one line; the failed step's tensors (its frames' locals) freed first
            traceback.clear_frames(exc.__traceback__)
            message = ("out_of_memory", spec.worker_id, detail)
        else:
            message = ("error", spec.worker_id, traceback.format_exc())
        with contextlib.suppress(OSError, MemoryError):
            batcher.flush()
            spec.records.send(message)
        raise SystemExit(1) from None


LOCK_DIR_PREFIX = "downpour-locks-"  # then the driver's pid: a folder whose driver is gone can be removed


def make_lock_dir() -> tuple[str, int]:
    """A private folder for the shards' lock files, ``downpour-locks-PID-XXXX`` in the temporary directory, and
    the descriptor that holds its ``owner.alive`` locked while this driver lives (:func:`hold_while_alive`; -1
    where the file system has no locks, and the folder is judged by its pid). It is made under a name without a pid
    and renamed once locked, so that no driver ever sees it unlocked."""
    staging = tempfile.mkdtemp(prefix=f"{LOCK_DIR_PREFIX}new-")
    alive = hold_while_alive(staging)
    folder = os.path.join(os.path.dirname(staging), f"{LOCK_DIR_PREFIX}{os.getpid()}-{staging.rsplit('-', 1)[1]}")
    os.rename(staging, folder)
    return folder, alive


def remove_dead_lock_dirs() -> int:
    """Remove the shard-lock folders in the temporary directory whose driver process is gone (a driver killed with
    SIGKILL cannot remove its own); return how many. A folder of a live driver, another user's, or one named
    before the pid was in the name is left alone."""
    removed = 0
    for path in Path(tempfile.gettempdir()).glob(f"{LOCK_DIR_PREFIX}*-*"):
        pid = path.name[len(LOCK_DIR_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or not owner_gone(path, int(pid)):
            continue  # alive, or another user's: not ours to judge
        shutil.rmtree(path, ignore_errors=True)
        removed += not path.exists()
    return removed


@dataclass
class WorkerEvent:
    """Something the driver should log about a worker (``died``, ``error``, ``out_of_memory``, ``stuck``: killed
    when it did not stop in time; ``push_rows``: rows of a dead worker taken from its push log; on the Ray backend
    also ``restarted``, ``shard_restored``, ``chaos``). ``said``: a death whose cause the worker reported already
    (``error``, ``out_of_memory``), counted, not told again; push rows that were all recovered (logged, not told).
    """

    kind: str
    worker: int
    detail: str
    said: bool = False


def exit_detail(code: int) -> str:
    """How a worker process ended, for the user: ``exit code N``, or the signal that killed it; SIGKILL is also what
    the system's out-of-memory killer sends, which a process cannot report itself."""
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    memory = " (also what the system's out-of-memory killer sends: see dmesg)" if -code == signal.SIGKILL else ""
    return f"killed by {name}{memory}"


class LocalCluster:
    """Shards in shared memory and ``workers`` OS processes running :class:`DownpourWorker`."""

    def __init__(self, config: Config, train: Tensor, initial: Tensor, *, worker_seeds: Sequence[int], t0: float,
                 shape: tuple[int, ...] | None = None):  # fmt: skip
        self.config = config
        self.bounds = contiguous_bounds(initial.numel(), config.ps.shards)
        remove_dead_lock_dirs()  # left by drivers killed with SIGKILL, which could not remove their own
        remove_dead_temp_dirs()  # and their fork servers' folders
        self._lock_dir, self._alive = make_lock_dir()
        rule = policy_rule(config)
        policy = config_policy(config)
        workers = config.cluster.workers
        # ssp: the workers' clocks; sync: the same clocks as the roster of live workers that a round waits for
        self.clocks = SharedClocks(workers, bound=config.ps.staleness_bound) if policy.name in ("ssp", "sync") else None
        self.shards: list[Shard] = []
        for i, (start, stop) in enumerate(self.bounds):
            lock = FileLock(f"{self._lock_dir}/shard{i}")
            if isinstance(policy, Sync):
                assert self.clocks is not None
                shard: Shard = SyncShard(i, start, initial[start:stop], rule, policy=policy, roster=self.clocks,
                                         lock=lock, shared=True)  # fmt: skip
            else:
                shard = Shard(i, start, initial[start:stop], rule, lock=lock, shared=True)
            self.shards.append(shard)
        self.budget = GlobalSteps(config.train.steps, lock=FileLock(f"{self._lock_dir}/steps"), shared=True)
        self.train = train.share_memory_()
        self.input_dim = train.shape[1]
        self.shape = shape
        self.worker_seeds = list(worker_seeds)
        self.t0 = t0
        self._ctx = worker_context()
        self._forked = self._ctx.get_start_method() == "forkserver"
        self._server_pid = fork_server_pid() if self._forked else None
        self._control = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._progress = torch.zeros(workers, 3, dtype=torch.float64).share_memory_()
        self._pipes = [self._ctx.Pipe(duplex=False) for _ in range(workers)]  # (read end, write end) per worker
        self._procs: list[Any] = []
        self._reported_dead: set[int] = set()
        self._failed: set[int] = set()  # workers that reported why they failed (an error, out of memory)
        self._pipe_closed: set[int] = set()
        self._rows_in = [0] * workers  # per worker: push rows received through its pipe (and from its log)
        self._logs_read: set[int] = set()

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start one process per worker, each reading only its own slice of the training examples.

        A Ctrl-C (or SIGTERM) that arrives meanwhile is raised as ``KeyboardInterrupt`` once every worker has
        started, so that :meth:`stop` knows them all: the first fork waits for the fork server to import torch,
        seconds in which the run must stay interruptible. A second one does not wait: it kills the fork server, and
        with it every worker it forked. Spawned workers would inherit a handler's default, so there SIGINT is
        ignored around each start instead (a spawn returns at once).
        """
        from downpour.data import worker_slice

        workers = self.config.cluster.workers
        threads = worker_threads(self.config)
        deferred: list[int] = []

        def defer(signum: int, frame: Any) -> None:
            deferred.append(signum)
            if len(deferred) > 1:
                kill_fork_server(self._server_pid)
                raise KeyboardInterrupt
            print("interrupted: stopping once the workers have started (again to stop at once)", file=sys.stderr,
                  flush=True)  # fmt: skip

        if self._forked:
            handler, signals = defer, [signal.SIGINT, signal.SIGTERM]
        else:  # the child inherits SIGINT ignored: no Ctrl-C mid-import
            handler, signals = signal.SIG_IGN, [signal.SIGINT]
        with routed(handler, signals):
            for worker_id in range(workers):
                spec = _WorkerSpec(
                    worker_id=worker_id,
                    config=self.config,
                    input_dim=self.input_dim,
                    shape=self.shape,
                    shards=self.shards,
                    examples=self.train[worker_slice(self.train.shape[0], workers, worker_id)],
                    seed=self.worker_seeds[worker_id],
                    budget=self.budget,
                    control=self._control,
                    progress=self._progress,
                    records=self._pipes[worker_id][1],
                    log_path=self._log_path(worker_id),
                    t0=self.t0,
                    threads=threads,
                    environment=dict(os.environ),
                    clocks=None if self.clocks is None else self.clocks.clocks,
                )
                proc = self._ctx.Process(target=_worker_main, args=(spec,), name=f"downpour-worker-{worker_id}")
                proc.daemon = True
                try:
                    proc.start()
                except (EOFError, OSError):  # the fork server died; after a deferred signal, that is no error
                    if deferred:
                        break
                    raise
                self._procs.append(proc)
                self._pipes[worker_id][1].close()  # the worker holds the only write end: its death reads as EOF
        if deferred:
            raise KeyboardInterrupt

    def request_stop(self) -> None:
        """Ask every worker to stop after its current step."""
        self._control[0] = 1

    def stop(self, timeout: float = 10.0, grace: float = 5.0) -> tuple[list[tuple], list[WorkerEvent]]:
        """Stop the workers, wait for them, and return the records and events still in flight.

        When the step budget is spent, the workers end by themselves within a step (a sync round they pushed to
        closes first), so they get up to ``grace`` seconds to do so before they are asked to stop.
        """
        records: list[tuple] = []
        events: list[WorkerEvent] = []

        def drain(until: float) -> None:
            while any(p.is_alive() for p in self._procs) and time.monotonic() < until:
                more, more_events = self.poll()
                records.extend(more)
                events.extend(more_events)
                time.sleep(0.02)

        if self.budget.limit and self.budget.value >= self.budget.limit:
            drain(time.monotonic() + grace)
        self.request_stop()
        drain(time.monotonic() + timeout)
        for worker_id, proc in enumerate(self._procs):
            if proc.is_alive():
                proc.kill()
                detail = f"did not stop within {timeout:g} s of being asked; killed"
                events.append(WorkerEvent("stuck", worker_id, detail))
            proc.join(timeout=5)
        more, more_events = self.poll()
        return records + more, events + more_events

    def close(self) -> None:
        """Release the pipes, locks and lock files; kill the worker processes still running (``stop`` was never
        reached: an error in the driver), stopped ones included, which would otherwise outlive it."""
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for reader, _ in self._pipes:
            reader.close()
        for lock in [shard.lock for shard in self.shards] + [self.budget.lock]:
            if isinstance(lock, FileLock):
                lock.close()
        shutil.rmtree(self._lock_dir, ignore_errors=True)
        self._release_lock_dir()

    def _release_lock_dir(self) -> None:
        if self._alive >= 0:
            os.close(self._alive)
            self._alive = -1

    # -- observation -----------------------------------------------------------------------------------------
    def poll(self) -> tuple[list[tuple], list[WorkerEvent]]:
        """Records sent since the last poll, and workers found dead or failed."""
        records: list[tuple] = []
        events: list[WorkerEvent] = []
        for worker_id, (reader, _) in enumerate(self._pipes):
            if worker_id in self._pipe_closed or reader.closed:
                continue
            try:
                while reader.poll():
                    item = reader.recv()
                    if isinstance(item, tuple) and item and item[0] in ("error", "out_of_memory"):
                        events.append(WorkerEvent(item[0], worker_id, item[2]))
                        self._failed.add(worker_id)
                    else:
                        records.extend(item)
                        self._rows_in[worker_id] += len(item)
            except (EOFError, OSError):  # the worker exited (or died, perhaps mid-message): nothing more will come
                self._pipe_closed.add(worker_id)
        for worker_id, proc in enumerate(self._procs):
            if worker_id in self._reported_dead or proc.exitcode is None:
                continue
            self._progress[worker_id, 2] = 1.0  # nor keep the others waiting to start
            if self.clocks is not None:
                self.clocks.retire(worker_id)  # a dead worker must not hold the others back (ssp, sync)
            if proc.exitcode != 0 and not self._control[0]:
                self._reported_dead.add(worker_id)  # (a worker sends its failure before it exits: read above)
                detail = exit_detail(proc.exitcode)
                if proc.exitcode == 255 and fork_server_gone(self._server_pid):  # None when spawned: False
                    detail = "killed with the fork server it was started from, which is gone"
                events.append(WorkerEvent("died", worker_id, detail, worker_id in self._failed))
        for worker_id in sorted(self._pipe_closed - self._logs_read):
            if self._procs[worker_id].exitcode is not None:  # gone: its log holds what its pipe never brought
                self._logs_read.add(worker_id)
                records += self._read_log(worker_id, events)
        return records, events

    def _log_path(self, worker_id: int) -> str:
        return os.path.join(self._lock_dir, f"worker{worker_id}.rows")

    def _read_log(self, worker_id: int, events: list[WorkerEvent]) -> list[tuple]:
        """The push rows of a dead worker that its pipe did not bring (it died between two batches, or was killed
        as it did not stop), from its push log; a ``push_rows`` event says how many. Nothing for a worker that
        ended normally: it sent every row and removed its log."""
        got = push_log.recover(self._log_path(worker_id))
        if got is None:
            return []
        rows, self._rows_in[worker_id], lost = push_log.take_new(self._rows_in[worker_id], *got)
        if rows or lost:
            detail = push_log.recovered_detail(len(rows), lost)
            events.append(WorkerEvent("push_rows", worker_id, detail, said=not lost))  # told only when rows are lost
        return rows

    def alive(self) -> int:
        """Worker processes still running."""
        return sum(p.is_alive() for p in self._procs)

    def examples_done(self) -> int:
        """Examples processed by all workers so far (this session)."""
        return int(self._progress[:, 0].sum())

    def recent_loss(self) -> float:
        """Mean of the workers' latest mini-batch losses."""
        return float(self._progress[:, 1].mean())

    def steps(self) -> int:
        """The global step: pushes across all workers (claimed before each push, so rejected ones count)."""
        return self.budget.value

    def snapshots(self, *, wait: float | None = None) -> list[dict[str, Any]]:
        """A consistent copy of every shard (each shard consistent on its own, as in Downpour). ``wait``: seconds to
        wait for each shard's lock before :class:`~downpour.ps.shard.ShardBusy` (None: however long)."""
        return [shard.snapshot(wait=wait) for shard in self.shards]

    def set_restore_points(self, snapshots: Sequence[dict[str, Any]]) -> None:
        """Nothing to do: these shards live in shared memory and never die on their own, so nothing is restored
        during a session (the Ray backend's shard actors come back at the snapshots given here)."""

    def pids(self) -> list[int]:
        """Worker process ids (for tests that kill one)."""
        return [p.pid for p in self._procs]

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            shutil.rmtree(self._lock_dir, ignore_errors=True)
            self._release_lock_dir()
