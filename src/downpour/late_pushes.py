"""The pushes a checkpoint holds that its staleness histogram missed, read back from ``metrics.jsonl``.

A worker's push rows reach the driver after its push was applied, so a periodic checkpoint's shards can hold pushes
whose rows the driver logs only after saving it. A session that goes on counts them in its next checkpoint; one whose
driver is killed (``kill -9``) does not, nor does one whose next checkpoints diverged (not saved: the run keeps this
one), and a resume from that checkpoint would lack them for good. The checkpoint records how many push rows its session
had logged (``push_rows``): the rows after those, up to the next session's start, whose push a shard applied at a
version the checkpoint holds, are the ones it missed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from downpour.rundir import json_object, row_start

_START, _PUSH = row_start("start"), row_start("push")


def missed_staleness(metrics: Path, session: int, push_rows: int, versions: Sequence[int]) -> np.ndarray:
    """Staleness of each applied push that a checkpoint saved by ``session`` after ``push_rows`` of its push rows
    holds (its shard's version then was ``versions[shard]``) but whose row came after: ``int64``, empty when none or
    when ``metrics`` cannot be read. Rows that are cut off or malformed are passed over.

    One pass over the log: counting starts again at each start row of ``session`` (its last one counts) and stops
    at the next start row (the next session's rows: pushes applied after the checkpoint was restored)."""
    missed: list[int] = []
    counting, skipped = False, 0
    try:
        with open(metrics, "rb") as lines:
            for line in lines:
                if line.startswith(_START):
                    counting = (row := json_object(line)) is not None and _int(row.get("session")) == session
                    if counting:
                        missed, skipped = [], 0
                    continue
                if not counting or not line.startswith(_PUSH):
                    continue
                if skipped < push_rows:  # counted in the checkpoint's histogram
                    skipped += 1
                    continue
                if (staleness := _held_push(line, versions)) is not None:
                    missed.append(staleness)
    except OSError:
        return np.zeros(0, dtype=np.int64)
    return np.asarray(missed, dtype=np.int64)


def _held_push(line: bytes, versions: Sequence[int]) -> int | None:
    """The staleness of the push row ``line`` when its push was applied at a version the checkpoint holds."""
    row = json_object(line)
    if row is None or row.get("applied") is not True:
        return None
    shard, version, staleness = _int(row.get("shard")), _int(row.get("version")), _int(row.get("staleness"))
    if shard is None or version is None or staleness is None or not 0 <= shard < len(versions) or staleness < 0:
        return None
    return staleness if 0 < version <= versions[shard] else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
