"""The alternative the local backend was chosen against: shards in a server process, reached through a pipe.

A minimal server holding one shard per connection receives each update as raw bytes, applies SGD, and sends the
new values back (a push-pull), with no pickling of tensors. ``downpour bench ps`` times it next to the
shared-memory shards that the local backend uses.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch.multiprocessing as mp


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


def server_process_push_pull_gbps(num_params: int, shards: int, *, seconds: float) -> float:
    """GB/s of push-pulls of the whole parameter vector through one server process per shard, over pipes."""
    ctx = mp.get_context("spawn")
    sizes = [len(part) for part in np.array_split(np.arange(num_params), shards)]
    pipes, servers = [], []
    for size in sizes:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(child, size, 1e-3), daemon=True)
        proc.start()
        pipes.append(parent)
        servers.append(proc)
    updates = [np.full(size, 1e-3, dtype=np.float32) for size in sizes]
    values = [np.empty(size, dtype=np.float32) for size in sizes]
    try:

        def round_trip() -> None:
            for conn, update in zip(pipes, updates, strict=True):
                conn.send_bytes(update)
            for conn, out in zip(pipes, values, strict=True):
                conn.recv_bytes_into(out)

        return fastest_block_gbps(round_trip, 2 * num_params * 4, seconds)
    finally:
        for conn in pipes:
            conn.send_bytes(b"")
        for proc in servers:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
