"""A checkpoint's pushes whose rows came after it (a killed driver's): read back from metrics.jsonl on resume."""

from __future__ import annotations

import json
from pathlib import Path

from downpour.late_pushes import missed_staleness


def _push(shard: int, version: int, staleness: int, applied: bool = True) -> dict:
    return {"event": "push", "t": 0.1, "worker": 0, "shard": shard, "version": version, "staleness": staleness,
            "loss": 1.0, "applied": applied}  # fmt: skip


def _write(path: Path, rows: list[dict | str]) -> Path:
    text = "".join((row if isinstance(row, str) else json.dumps(row, separators=(",", ":"))) + "\n" for row in rows)
    path.write_text(text)
    return path


def test_the_rows_after_the_counted_ones_that_the_shards_hold_are_the_missed_ones(tmp_path: Path) -> None:
    """Session 1 saved its checkpoint after 3 push rows, with shard 0 at version 5 and shard 1 at version 4."""
    metrics = _write(tmp_path / "metrics.jsonl", [
        {"event": "start", "t": 0.0, "session": 0, "step": 0},
        _push(0, 1, 9),  # session 0's rows: never this checkpoint's
        _push(0, 2, 8),
        {"event": "start", "t": 0.0, "session": 1, "step": 2},
        _push(0, 3, 0), _push(1, 3, 1), _push(0, 4, 0, applied=False),  # counted in the histogram
        {"event": "checkpoint", "t": 1.0, "step": 6, "saved": True},
        _push(0, 5, 2),  # held (5 <= 5): missed
        _push(1, 4, 3),  # held (4 <= 4): missed
        _push(1, 5, 4),  # applied after the snapshot: not held
        _push(0, 5, 6, applied=False),  # refused: not counted
        _push(0, 4, -1),  # a negative staleness is no applied push's
        _push(7, 1, 5),  # no such shard
        '{"event":"push","t":1.5,"worker":1,"shard":0,"version":3,"stal',  # cut off by the kill
        {"event": "throughput", "t": 2.0},
        _push(1, 2, 7),  # held: missed
        {"event": "start", "t": 0.0, "session": 2, "step": 6},
        _push(0, 5, 11),  # the next session's: after the restore
    ])  # fmt: skip
    missed = missed_staleness(metrics, 1, 3, [5, 4])
    assert sorted(missed.tolist()) == [2, 3, 7]
    assert missed.dtype.name == "int64"


def test_the_session_that_saved_it_is_its_last_start_row_of_that_number(tmp_path: Path) -> None:
    rows = [{"event": "start", "session": 0}, _push(0, 1, 1), {"event": "start", "session": 1}, _push(0, 1, 2),
            {"event": "start", "session": 0}, _push(0, 1, 3), _push(0, 1, 4)]  # fmt: skip
    metrics = _write(tmp_path / "metrics.jsonl", rows)
    assert missed_staleness(metrics, 0, 1, [1]).tolist() == [4]  # the second start of session 0, its first row counted
    assert missed_staleness(metrics, 1, 0, [1]).tolist() == [2]
    assert missed_staleness(metrics, 3, 0, [1]).tolist() == []  # no such session


def test_nothing_is_missed_when_every_row_was_counted_or_the_log_is_gone(tmp_path: Path) -> None:
    metrics = _write(tmp_path / "metrics.jsonl", [{"event": "start", "session": 0}, _push(0, 1, 1), _push(0, 2, 0)])
    assert missed_staleness(metrics, 0, 2, [2]).size == 0
    assert missed_staleness(tmp_path / "absent.jsonl", 0, 0, [2]).size == 0
