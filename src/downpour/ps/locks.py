"""A lock shared by processes that the kernel releases when its holder dies (``flock`` on a file).

A ``multiprocessing.Lock`` held by a worker that is killed stays held forever and hangs every other worker; an
``flock`` lock is released with the dead process's file descriptors, so the run goes on. No network port is used.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from types import TracebackType


class FileLock:
    """An exclusive inter-process lock on ``path``; picklable, each process opens its own descriptor."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._fd: int | None = None
        self._pid: int | None = None

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            self._pid = os.getpid()
        return self._fd

    def __enter__(self) -> FileLock:
        fcntl.flock(self._descriptor(), fcntl.LOCK_EX)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def acquire_within(self, seconds: float) -> bool:
        """Take the lock if it comes free within ``seconds`` (True), else give up (False): for a reader that must
        not wait forever on a holder that never lets go (a worker stopped, Ctrl-Z'd, while it held it)."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                fcntl.flock(self._descriptor(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.001)

    def release(self) -> None:
        """Release the lock (taken with ``with``, or :meth:`acquire_within`)."""
        fcntl.flock(self._fd, fcntl.LOCK_UN)  # type: ignore[arg-type]

    def close(self) -> None:
        """Close this process's descriptor (releasing the lock if held); the next use opens a new one."""
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = self._pid = None

    def __getstate__(self) -> dict[str, object]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]
