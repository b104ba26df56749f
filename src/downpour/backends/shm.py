"""A shard in a memory-mapped file that every process of one machine opens by name (the Ray backend's fast path).

A shard actor keeps its :class:`~downpour.ps.shard.Shard` (both buffers, rule state, version counters) in a file
under ``/dev/shm``; a worker actor on the same node maps the same file and fetches and pushes directly, under the
shard's :class:`~downpour.ps.locks.FileLock`, as the local backend's worker processes do: no actor call, no copy
through Ray. Workers on other nodes reach the shard actor through Ray, which applies their pushes to the same
memory under the same lock.

Layout (bytes): a header of 8 int64 ``[owner pid, incarnation, retired, workers, owner locked, 0...]`` at 0, the
shard's meta (4 int64) at 64, the workers' push stamps (int64, one a worker: :mod:`downpour.backends.push_stamps`)
at 128, then from the next multiple of 64 float32 ``(1 + len(state_names), 2, size)``: values, then each rule
state, two buffers each.
A worker treats the shard as gone when its owner process has died or a newer incarnation marked it retired.

The owner holds an ``flock`` on its file while it lives ("owner locked" is 1 once it does): the kernel releases it
however the owner ends, so a shard actor cleaning up after killed runs (:func:`collect_orphans`) tells a dead
owner's file from a live one's even where pids mislead: another pid namespace sharing ``/dev/shm`` (a live owner's
pid looks gone there) or a dead owner's pid reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import mmap
import os
import tempfile

import numpy as np
import torch

from downpour.backends import push_log
from downpour.backends.processes import file_owner_gone
from downpour.ps.locks import FileLock
from downpour.ps.rules import Rule
from downpour.ps.shard import Shard

_HEADER, _META, _STAMPS = 0, 64, 128
_PID, _INCARNATION, _RETIRED, _WORKERS, _OWNER_LOCKED = range(5)


def shm_dir() -> str:
    """``/dev/shm`` where it exists (memory, not disk), else the temporary directory."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def segment_path(cluster: str, shard: int, incarnation: int) -> str:
    """The file of ``shard``'s ``incarnation`` in the cluster named ``cluster``."""
    return os.path.join(shm_dir(), f"{cluster}-shard{shard}-{incarnation}")


def _floats_at(workers: int) -> int:
    """Where the float32 buffers start: after the stamps, on a 64-byte boundary."""
    return -(-(_STAMPS + 8 * workers) // 64) * 64


def segment_bytes(size: int, state_names: tuple[str, ...], workers: int = 1) -> int:
    """Bytes of the file holding a shard of ``size`` values with the given rule state, pushed to by ``workers``."""
    return _floats_at(workers) + 4 * (1 + len(state_names)) * 2 * size


class SharedShard:
    """A :class:`Shard` mapped from its file: created by the shard actor (``create=True``), opened by workers."""

    def __init__(self, path: str, index: int, start: int, size: int, rule: Rule, *, create: bool,
                 incarnation: int = 0, workers: int = 1) -> None:  # fmt: skip
        self.path = path
        self._owner_fd = -1  # the owner's descriptor of its file, locked while it lives (module docstring)
        nbytes = segment_bytes(size, rule.state_names, workers)
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)  # FileNotFoundError when a worker comes too late: the shard is gone
        try:
            if create:
                os.ftruncate(fd, nbytes)  # zero-filled
                self._owner_fd = _locked(fd)
            elif os.fstat(fd).st_size != nbytes:
                raise ValueError(f"{path} holds {os.fstat(fd).st_size} bytes, not a shard of {size} values "
                                 f"for {workers} workers")  # fmt: skip
            self._map = mmap.mmap(fd, nbytes)
        finally:
            if fd != self._owner_fd:
                os.close(fd)
        raw = torch.frombuffer(self._map, dtype=torch.uint8)  # (nbytes,) shares the mapping
        self.header = np.frombuffer(self._map, dtype=np.int64, count=8)
        if create:
            self.header[_WORKERS] = workers
            self.header[_OWNER_LOCKED] = int(self._owner_fd >= 0)  # before the pid: see collect_orphans
        elif self.header[_WORKERS] != workers:  # one size can fit two counts: the stamps end on a 64-byte boundary
            raise ValueError(f"{path} is a shard for {int(self.header[_WORKERS])} workers, not {workers}")
        self.stamps = np.frombuffer(self._map, dtype=np.int64, count=workers, offset=_STAMPS)  # (workers,)
        floats = raw[_floats_at(workers) :].view(torch.float32)
        floats = floats.view(1 + len(rule.state_names), 2, size)  # (1 + S, 2, size)
        state = {name: floats[1 + i] for i, name in enumerate(rule.state_names)}
        meta = raw[_META : _META + 32].view(torch.int64)  # (4,)
        self.shard = Shard.over(index, start, rule, values=floats[0], state=state, meta=meta,
                                lock=FileLock(path + ".lock"))  # fmt: skip
        self._over: tuple[int, int, Rule, torch.Tensor, dict[str, torch.Tensor], torch.Tensor] | None = (
            index, start, rule, floats[0], state, meta)  # fmt: skip
        if create:
            self.header[_PID], self.header[_INCARNATION] = os.getpid(), incarnation

    def view(self) -> Shard:
        """Another :class:`Shard` over the same memory, with a descriptor of the lock file of its own: for a second
        thread of this process (``flock`` excludes descriptors, not threads, so two threads sharing one would both
        hold the lock at once)."""
        assert self._over is not None, "closed"
        index, start, rule, values, state, meta = self._over
        return Shard.over(index, start, rule, values=values, state=state, meta=meta, lock=FileLock(self.path + ".lock"))

    @property
    def incarnation(self) -> int:
        """The shard actor's incarnation that owns this file."""
        return int(self.header[_INCARNATION])

    def alive(self) -> bool:
        """Whether the owning shard actor still lives: its process exists and no newer incarnation retired it."""
        if self.header[_RETIRED]:
            return False
        try:
            os.kill(int(self.header[_PID]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # a process of another user: the pid was reused, so the owner is gone
            return False
        return True

    def retire(self) -> None:
        """Mark this file's shard as superseded (workers that still map it stop using it)."""
        self.header[_RETIRED] = 1

    def close(self) -> None:
        """Drop this process's mapping (it stays while tensors or arrays view it, ``header`` and ``stamps``
        included) and an owner's descriptor of its file. The owner's lock goes with both: the mapping holds a copy
        of the locked descriptor."""
        self.shard = None  # type: ignore[assignment]
        self._over = None
        with contextlib.suppress(BufferError, ValueError):
            self._map.close()
        if self._owner_fd >= 0:
            os.close(self._owner_fd)
            self._owner_fd = -1


def _locked(fd: int) -> int:
    """``fd``, locked (``flock``) for as long as it is open; -1 where the file system refuses the lock (the file is
    then judged by its owner's pid)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return -1
    return fd


def _owner_gone(path: str) -> bool:
    """Whether the process that made the shard file ``path`` is gone: its lock is free (an owner that locks its
    file, :data:`_OWNER_LOCKED`), else its pid is gone. A file being made has neither yet (pid 0, which is never
    gone): it is kept."""
    header = np.fromfile(path, dtype=np.int64, count=8)  # OSError, or fewer values: being made or not ours
    return file_owner_gone(path, locked=int(header[_OWNER_LOCKED]) == 1, pid=int(header[_PID]))


def unlink(path: str) -> None:
    """Remove a shard's file and its lock file (processes that map it keep their mapping)."""
    for name in (path, path + ".lock"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def retire_others(cluster: str, shard: int, mine: str) -> None:
    """Mark every other incarnation's file of ``shard`` on this machine retired, and remove it."""
    for path in glob.glob(os.path.join(shm_dir(), f"{cluster}-shard{shard}-*")):
        if path == mine or path.endswith(".lock"):
            continue
        with contextlib.suppress(OSError, ValueError):
            header = np.memmap(path, dtype=np.int64, mode="r+", shape=(8,))
            header[_RETIRED] = 1
            header.flush()
            del header
        unlink(path)


def collect_orphans(prefix: str = "downpour-") -> int:
    """Remove shard files on this machine whose owner process is gone (a driver killed before it could clean up;
    judged by the owner's lock, see the module's docstring), and workers' push logs whose writers are gone and that
    have been silent for 10 minutes (:func:`~downpour.backends.push_log.remove_orphans`); return how many. Called by
    every new shard actor."""
    removed = push_log.remove_orphans(os.path.join(shm_dir(), f"{prefix}*-worker*-run*.rows"))
    for path in glob.glob(os.path.join(shm_dir(), f"{prefix}*-shard*-*")):
        if path.endswith(".lock"):
            continue
        try:
            gone = _owner_gone(path)
        except (OSError, ValueError, IndexError):  # unreadable, locked, or being created: leave it
            continue
        if gone:
            unlink(path)
            removed += 1
    return removed


def unlink_cluster(cluster: str) -> None:
    """Remove every shard file and push log of ``cluster`` on this machine (the driver's clean-up)."""
    for path in glob.glob(os.path.join(shm_dir(), f"{cluster}-shard*")) + glob.glob(
        os.path.join(shm_dir(), f"{cluster}-worker*")
    ):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
