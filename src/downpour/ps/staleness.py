"""Staleness bookkeeping: an exact histogram of every applied push's staleness, and its summary numbers."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class StalenessHistogram:
    """Counts of applied pushes per staleness value; exact mean, percentiles and max."""

    def __init__(self, counts: Iterable[int] = ()) -> None:
        self.counts = np.asarray(list(counts), dtype=np.int64)

    def add(self, values: np.ndarray) -> None:
        """Count a batch of staleness values (non-negative integers)."""
        if values.size == 0:
            return
        binned = np.bincount(values.astype(np.int64))
        if binned.size > self.counts.size:
            binned[: self.counts.size] += self.counts
            self.counts = binned
        else:
            self.counts[: binned.size] += binned

    @property
    def total(self) -> int:
        """Pushes counted."""
        return int(self.counts.sum())

    def percentile(self, q: float) -> int:
        """The smallest staleness ``s`` with at least ``q`` percent of pushes at or below it."""
        if self.total == 0:
            return 0
        cumulative = np.cumsum(self.counts)
        return int(np.searchsorted(cumulative, q / 100.0 * self.total, side="left"))

    def summary(self) -> dict[str, float]:
        """``{"mean", "p50", "p99", "max"}`` over every push counted (zeros when none)."""
        if self.total == 0:
            return {"mean": 0.0, "p50": 0, "p99": 0, "max": 0}
        values = np.arange(self.counts.size)
        return {
            "mean": float((values * self.counts).sum() / self.total),
            "p50": self.percentile(50),
            "p99": self.percentile(99),
            "max": int(np.flatnonzero(self.counts).max()),
        }
