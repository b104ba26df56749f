"""A worker's push rows, kept also in a file of its own, so that a worker process that dies does not take the rows
its driver had not received yet with it.

A worker sends its push rows (:class:`~downpour.ps.worker.PushRecord`) to the driver in batches: through a pipe on
the local backend, in the replies to the driver's polls on Ray. A process killed between two batches lost the rows
of the pushes it had made since the last one, although the shards had applied those pushes: a gap in the run's
staleness record. Every row now also goes into a ring of the last :data:`CAPACITY` rows in a memory-mapped file
(:class:`PushLog`, a few microseconds a row). Once the process is dead, the driver (local backend), or the worker's
restarted process (Ray), reads the rows the driver lacks from the file (:func:`recover`) and removes it.

The process that writes a log holds an ``flock`` on it while it lives, so a reader knows the writer is gone, whatever
its pid says, and a log is only ever read once nothing writes to it. The rows are numbered from 0 in the order they
were written; the driver counts the rows it has received per log and keeps the recovered ones it lacks
(:func:`take_new`), so a row is never counted twice, in whatever order batches and recoveries arrive.

Layout: a header of 8 int64 ``[rows written, capacity, owner pid, owner locked, heartbeat (float64 seconds since
the epoch), 0...]``, then float64 ``(capacity, 7)``: row ``n`` in slot ``n % capacity``. A row is written before
the count that includes it, so a process killed halfway through a row leaves the count before it; that row's slot
held the row ``capacity`` earlier, which is therefore never read back.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import mmap
import os
import time

import numpy as np

from downpour.backends.processes import file_owner_gone

CAPACITY = 8192
"""Rows a log keeps (about 450 KB): what a worker writes between two of the driver's polls (0.05 s apart) is a few
hundred rows, so only a driver held up for many seconds before the worker died loses any to the ring."""

FIELDS = 7  # t, worker, shard, version, staleness, loss, applied: PushRecord's fields
_COUNT, _CAPACITY, _PID, _OWNER_LOCKED, _HEARTBEAT = range(5)
_HEADER_BYTES = 64
ORPHAN_AGE_S = 600.0
"""A log whose writer is dead and that nobody has touched for this long is a leftover (its driver died, or no
process of its worker came back on this machine) that a later run may remove (:func:`remove_orphans`)."""


def log_bytes(capacity: int = CAPACITY) -> int:
    """Bytes of a log file that keeps ``capacity`` rows."""
    return _HEADER_BYTES + 8 * FIELDS * capacity


class PushLog:
    """The writer's side: a new log file at ``path``, locked by this process while it lives (or until :meth:`close`).

    ``append`` keeps one row; the file holds the last ``capacity`` of them.
    """

    def __init__(self, path: str, capacity: int = CAPACITY) -> None:
        if capacity < 2:
            raise ValueError(f"a push log keeps at least 2 rows, not {capacity}")
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, log_bytes(capacity))  # zero-filled: no row written
            self._map = mmap.mmap(fd, log_bytes(capacity))
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        self._fd = fd  # kept open (and locked) while this log is in use
        self.header = np.frombuffer(self._map, dtype=np.int64, count=8)
        self.rows = np.frombuffer(self._map, dtype=np.float64, offset=_HEADER_BYTES).reshape(capacity, FIELDS)
        self.capacity = capacity
        self.count = 0
        self.header[_CAPACITY] = capacity
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.header[_OWNER_LOCKED] = 1
        except OSError:  # a file system without flock: judged by the owner's pid
            pass
        self.header[_PID] = os.getpid()
        self.beat()

    def append(self, record: tuple) -> None:
        """Keep ``record`` (a :class:`~downpour.ps.worker.PushRecord` or its tuple) as the next row."""
        self.rows[self.count % self.capacity] = record
        self.count += 1
        self.header[_COUNT] = self.count  # after the row: a reader never takes a half-written one

    def beat(self) -> None:
        """Note the time: a log whose writer died long ago is a leftover (:data:`ORPHAN_AGE_S`)."""
        self.header[_HEARTBEAT : _HEARTBEAT + 1].view(np.float64)[0] = time.time()

    def close(self, *, remove: bool = True) -> None:
        """Release the lock and the mapping, and remove the file (unless ``remove`` is False)."""
        if self._fd < 0:
            return
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self.header = self.rows = None  # type: ignore[assignment]
        with contextlib.suppress(BufferError, ValueError):
            self._map.close()
        os.close(self._fd)
        self._fd = -1


def _writer_gone(header: np.ndarray, path: str) -> bool:
    """Whether the process that wrote the log at ``path`` is gone: its lock is free, or (where it could not lock
    the file) its pid is gone."""
    return file_owner_gone(path, locked=int(header[_OWNER_LOCKED]) == 1, pid=int(header[_PID]))


def _header(path: str) -> np.ndarray | None:
    """A log's header (8 int64); None for a missing or unreadable file, or one that is not a log."""
    try:
        header = np.fromfile(path, dtype=np.int64, count=8)
    except (OSError, ValueError):
        return None
    return header if len(header) == 8 and int(header[_CAPACITY]) >= 2 else None


def writer_lives(path: str) -> bool:
    """Whether ``path`` is a log whose writer still lives (so it may hold rows once the writer is gone); False for
    a missing or unreadable file, or one that is not a log."""
    header = _header(path)
    return header is not None and not _writer_gone(header, path)


def recover(path: str, *, remove: bool = True) -> tuple[int, list[tuple]] | None:
    """The rows a dead writer's log still holds: ``(number of the first, rows)``, each row a PushRecord's tuple
    (ints and a bool where the record has them). None when there is no such file, it is not a log, or its writer
    still lives (it may still write). ``remove``: delete the file once read."""
    try:
        with open(path, "rb", buffering=0) as handle:  # unbuffered: the rows are read only after the check
            head = handle.read(_HEADER_BYTES)
            if len(head) < _HEADER_BYTES:
                return None
            # the writer is judged gone before its rows are read: rows read while it lived could be torn or newer
            # than the count read with them, even if it died a moment later
            owner = np.frombuffer(head, dtype=np.int64, count=8)
            if int(owner[_CAPACITY]) < 2 or not _writer_gone(owner, path):
                return None
            handle.seek(0)
            raw = handle.read()  # nothing writes to it any more
    except OSError:
        return None
    header = np.frombuffer(raw, dtype=np.int64, count=8)
    count, capacity = int(header[_COUNT]), int(header[_CAPACITY])
    if capacity < 2 or len(raw) != log_bytes(capacity) or count < 0:
        return None
    rows = np.frombuffer(raw, dtype=np.float64, offset=_HEADER_BYTES).reshape(capacity, FIELDS)
    first = max(0, count - capacity + 1)  # the slot of row ``count`` may hold half of it: its old row is not read
    out = [_record(rows[n % capacity]) for n in range(first, count)]
    if remove:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return first, out


def _record(row: np.ndarray) -> tuple:
    """A PushRecord's tuple from a row: ``(t, worker, shard, version, staleness, loss, applied)``."""
    t, worker, shard, version, staleness, loss, applied = row.tolist()
    return t, int(worker), int(shard), int(version), int(staleness), loss, bool(applied)


def take_new(received: int, first: int, rows: list[tuple]) -> tuple[list[tuple], int, int]:
    """Of ``rows`` numbered from ``first``, those a driver that has received rows ``0 .. received - 1`` of the same
    log lacks: ``(new rows, rows received now, rows lost)``, where lost are those numbered between ``received``
    and ``first`` (a ring that had overwritten them)."""
    new = rows[max(0, received - first) :]
    return new, max(received, first + len(rows)), max(0, first - received)


def recovered_detail(rows: int, lost: int) -> str:
    """What a ``push_rows`` event says: rows taken from a dead worker's log, and rows the ring had overwritten."""
    text = f"{rows} push rows it had not sent, taken from its push log"
    return text + (f"; {lost} older ones the log no longer held are lost" if lost else "")


def remove_orphans(pattern: str, *, max_age_s: float = ORPHAN_AGE_S) -> int:
    """Remove the logs matching ``pattern`` (a glob) whose writer is gone and whose last heartbeat is older than
    ``max_age_s``; return how many."""
    removed = 0
    now = time.time()
    for path in glob.glob(pattern):
        header = _header(path)
        if header is None:
            continue
        beat = float(header[_HEARTBEAT : _HEARTBEAT + 1].view(np.float64)[0])
        if now - beat < max_age_s or not _writer_gone(header, path):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed += 1
    return removed
