"""Stale synchronous parallel across worker processes: one shared clock per worker (Ho et al., NIPS 2013).

Under ``ps.policy = "sync"`` the same clocks serve as the roster of live workers (:meth:`live`).

A worker's clock counts its pushes. Before it computes the next one (clock ``c``), it waits until
``c − min(clocks) ≤ bound``, so no worker runs more than ``bound`` clocks ahead of the slowest one. A worker that
ends or dies is *retired* (its clock set very high), so it never holds the others back. The clocks live in one
shared ``int64`` tensor; an aligned 8-byte read or write is atomic, so no lock is needed.

The worker fetches after it waits, so while it computes each other worker can complete at most ``2·bound + 1``
pushes: the staleness of any update is at most ``(2·bound + 1)·(workers − 1)`` (per shard).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

RETIRED = 2**62  # the clock of a worker that ended or died


class SharedClocks:
    """The workers' clocks in shared memory; the worker side (:meth:`wait_turn`, :meth:`tick`) and the driver's
    :meth:`retire`."""

    def __init__(self, workers: int, *, bound: int, clocks: Tensor | None = None) -> None:
        if bound < 0:
            raise ValueError(f"Invalid staleness bound: {bound} (must be >= 0)")
        self.bound = bound
        self.clocks = clocks if clocks is not None else torch.zeros(workers, dtype=torch.int64).share_memory_()

    def wait_turn(self, worker: int, should_stop: Callable[[], bool], *, poll: float = 0.0005) -> bool:
        """Block until ``worker`` may start its next clock; False if ``should_stop()`` came true first."""
        view = self.clocks.numpy()
        while view[worker] - view.min() > self.bound:
            if should_stop():
                return False
            time.sleep(poll)
        return True

    def tick(self, worker: int) -> None:
        """``worker`` finished a push: its clock advances by one."""
        self.clocks[worker] += 1

    def retire(self, worker: int) -> None:
        """``worker`` ended or died: it no longer holds anyone back."""
        self.clocks[worker] = RETIRED

    def live(self) -> int:
        """Workers not retired (``ps.policy = "sync"`` closes a round with fewer pushes once workers have gone)."""
        return int((self.clocks.numpy() < RETIRED).sum())
