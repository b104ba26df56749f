"""The alternative the local backend was chosen against: shards in a server process, reached through a pipe.

A minimal server holding one shard per connection receives each update as raw bytes, applies SGD, and sends the
new values back (a push-pull), with no pickling of tensors. ``downpour bench ps`` times it next to the
shared-memory shards that the local backend uses.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def fastest_block_gbps(fn: Callable[[], None], nbytes: int, seconds: float, block: int = 20) -> float:
    """GB/s of the fastest block of ``block`` calls of ``fn`` (each moving ``nbytes``) within ``seconds``.

    timeit's rule: the fastest run is the one least disturbed by other load on a shared machine.
    """
    for _ in range(50):
        fn()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        for _ in range(block):
            fn()
        best = min(best, time.perf_counter() - t)
    return block * nbytes / best / 1e9


def _serve(conn: Any, size: int, lr: float) -> None:
    values = np.zeros(size, dtype=np.float32)
    update = np.empty(size, dtype=np.float32)
    while True:
        received = conn.recv_bytes_into(update)
        if received == 0:  # an empty message asks the server to stop
            return
        values -= lr * update
        conn.send_bytes(values)


class ServerProcesses:
    """One server process per shard, reached through a pipe: started once, then timed in as many windows as asked.

    The servers need only NumPy, so they start in a fraction of a second (no PyTorch import in the children).
    """

    def __init__(self, num_params: int, shards: int) -> None:
        ctx = mp.get_context("spawn")
        self.num_params = num_params
        sizes = [len(part) for part in np.array_split(np.arange(num_params), shards)]
        self._pipes: list[Any] = []
        self._servers: list[Any] = []
        try:
            for size in sizes:
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_serve, args=(child, size, 1e-3), daemon=True)
                proc.start()
                self._pipes.append(parent)
                self._servers.append(proc)
        except BaseException:
            self.close()
            raise
        self._updates = [np.full(size, 1e-3, dtype=np.float32) for size in sizes]
        self._values = [np.empty(size, dtype=np.float32) for size in sizes]

    def _round_trip(self) -> None:
        for conn, update in zip(self._pipes, self._updates, strict=True):
            conn.send_bytes(update)
        for conn, out in zip(self._pipes, self._values, strict=True):
            conn.recv_bytes_into(out)

    def push_pull_gbps(self, seconds: float) -> float:
        """GB/s of push-pulls of the whole parameter vector (the fastest block within ``seconds``)."""
        return fastest_block_gbps(self._round_trip, 2 * self.num_params * 4, seconds)

    def close(self) -> None:
        """Ask every server to stop, then reap it (killed if it does not stop within 5 s)."""
        for conn in self._pipes:
            with contextlib.suppress(OSError):
                conn.send_bytes(b"")
        for proc in self._servers:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()

    def __enter__(self) -> ServerProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
