"""The global step counter: how many pushes all workers together have had applied."""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from typing import Any

import torch


class GlobalSteps:
    """Counts pushes across workers; ``reserve`` claims one unless ``limit`` (0 = none) is reached.

    Claiming before pushing makes ``train.steps`` exact: the run applies that many pushes, not one more.
    """

    def __init__(self, limit: int = 0, *, lock: AbstractContextManager[Any] | None = None, shared: bool = False):
        self.limit = limit
        self.lock = lock if lock is not None else threading.Lock()
        self._count = torch.zeros(1, dtype=torch.int64)
        if shared:
            self._count.share_memory_()

    @property
    def value(self) -> int:
        """Pushes claimed so far."""
        return int(self._count[0])

    def set(self, value: int) -> None:
        """Start counting from ``value`` (on resume)."""
        self._count[0] = value

    def reserve(self) -> bool:
        """Claim one push; False once the limit is reached."""
        with self.lock:
            count = int(self._count[0])
            if self.limit and count >= self.limit:
                return False
            self._count[0] = count + 1
            return True
