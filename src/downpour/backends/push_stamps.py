"""Push stamps: how many pushes each worker process had made, as the Ray backend's shards last heard it.

A worker counts a push before any shard receives it, but the driver learns the count only when it polls the worker,
so a worker actor that dies takes the pushes it made since its last poll with it. Each shard therefore keeps, per
worker, the highest stamp it has seen, written before the push commits: ``run << 40 | count``, where ``run`` is
the driver's number of the ``run`` call (:meth:`~downpour.backends.ray_workers.WorkerActor.run`) and ``count`` that
call's pushes so far. One int64 a worker, so a plain store is atomic and a later run's stamp is larger than any of an
earlier run's. The driver takes, per worker and run, the larger of its polled count and the stamps (which come with
every snapshot), and a restarted worker (the driver, for a worker dead for good) reads its dead run's count from the
shards to give back the steps of the budget that run claimed and never used
(:meth:`~downpour.backends.ray_coordinator.Coordinator.settle`).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

_RUN_SHIFT = 40  # counts below 2**40 pushes per run; runs below 2**23
_COUNT_MASK = (1 << _RUN_SHIFT) - 1


def stamp(run: int, count: int) -> int:
    """The stamp of a run's ``count``-th push."""
    return (run << _RUN_SHIFT) | count


def unstamp(value: int) -> tuple[int, int]:
    """``(run, count)`` of a stamp (0 for none: run 0, no push)."""
    return int(value) >> _RUN_SHIFT, int(value) & _COUNT_MASK


def note(stamps: np.ndarray, worker: int, value: int) -> None:
    """Keep ``value`` as ``worker``'s stamp in ``stamps`` (int64, one a worker) if it is higher.

    An entry has one writer at a time: a worker's pushes are serial, a worker on the shard's node writes its own
    under the shard's lock just before its push commits, and the shard actor writes those pushed through it."""
    if value > stamps[worker]:
        stamps[worker] = value


def counts_by_run(values: Iterable[int]) -> dict[int, int]:
    """The highest count per run among stamps (one worker's, from several shards); runs with no push left out."""
    out: dict[int, int] = {}
    for value in values:
        run, count = unstamp(value)
        if count and count > out.get(run, 0):
            out[run] = count
    return out
