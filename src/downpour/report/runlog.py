"""Read a run's ``metrics.jsonl`` back into arrays: pushes, throughput, held-out losses, worker events.

A driver killed mid-write can leave a cut-off last line; such lines are skipped and counted, never fatal.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from downpour.ps.staleness import StalenessHistogram


@dataclass
class RunLog:
    """The events of one run directory's ``metrics.jsonl``, as arrays in file order."""

    push_step: np.ndarray  # (P,) global step of each push (counted on its lowest shard, continuing across sessions)
    push_loss: np.ndarray  # (P,) the worker's mini-batch loss (NaN when not finite)
    staleness: dict[int, StalenessHistogram]  # shard -> histogram of its applied updates
    rejected: int  # updates a shard refused (NaN or Inf): unapplied pushes of staleness -1
    throughput_t: np.ndarray  # (T,) seconds since the run started (sessions of a resumed run follow each other)
    throughput: np.ndarray  # (T,) examples/s over the last second
    held_out_step: np.ndarray  # (H,) global step of each held-out loss (start, eval rows, end)
    held_out_loss: np.ndarray  # (H,)
    sessions: int
    events: list[dict[str, Any]] = field(default_factory=list)  # worker_died / worker_error / checkpoint rows
    not_applied: int = 0  # other unapplied pushes: late ones that sync dropped, those lost with a restored shard
    bad_lines: int = 0  # lines that are not JSON objects (a cut-off last line of a killed driver), or hold fields no
    # driver writes (a shard that is not a count, a staleness beyond the rows in the file)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def _checked(row: dict[str, Any], kind: Any, most: int) -> dict[str, int]:
    """The integer fields a row of ``kind`` is read for: a push's shard and staleness (at most ``most``, the rows in
    the file: no push waited for more pushes than there are), a start's step. ValueError if one is not a
    non-negative integer (a rejected push's staleness is not read)."""
    wanted: dict[str, Any] = {}
    if kind == "push":
        wanted["shard"] = row.get("shard", 0)
        if row.get("applied", True):
            wanted["staleness"] = row.get("staleness", 0)
    elif kind == "start":
        wanted["step"] = row.get("step", 0) or 0
    for name, value in wanted.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (name == "staleness" and value > most):
            raise ValueError(f"{name} = {value!r}")
    return wanted


def read_run_log(path: Path) -> RunLog:
    """Parse ``metrics.jsonl`` at ``path`` (a missing file reads as a run with no events)."""
    push_step: list[int] = []
    push_loss: list[float] = []
    staleness: dict[int, list[int]] = {}
    rejected = not_applied = 0
    thr_t: list[float] = []
    thr: list[float] = []
    held_step: list[float] = []
    held_loss: list[float] = []
    events: list[dict[str, Any]] = []
    sessions = 0
    bad = 0
    step_offset = 0  # the global step when the current session started
    t_offset = 0.0  # seconds of earlier sessions, so that a resumed run's times continue
    last_t = 0.0
    counted = 0  # pushes this session: a push is one record per shard, counted once, on shard 0
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if not isinstance(row, dict):
            bad += 1
            continue
        kind = row.get("event")
        try:
            checked = _checked(row, kind, most=len(lines))
        except ValueError:  # a row of the right shape with a field no driver writes: counted, not read
            bad += 1
            continue
        if kind == "push":
            shard = checked["shard"]
            if row.get("applied", True):
                staleness.setdefault(shard, []).append(checked["staleness"])
            elif row.get("staleness") == -1:  # a shard refused it
                rejected += 1
            else:
                not_applied += 1
            if shard == 0:
                counted += 1
                push_step.append(step_offset + counted)
                push_loss.append(_number(row.get("loss")))
        elif kind == "throughput":
            thr_t.append(t_offset + _number(row.get("t")))
            thr.append(_number(row.get("examples_per_s")))
        elif kind in ("start", "eval", "end"):
            if kind == "start":
                sessions += 1
                step_offset, counted, t_offset = checked["step"], 0, last_t
            key = {"start": "initial_loss", "eval": "held_out_loss", "end": "final_loss"}[kind]
            if kind != "start" or not row.get("resume"):  # a resumed session repeats no initial loss
                held_step.append(_number(row.get("step")))
                held_loss.append(_number(row.get(key)))
        elif kind is not None:
            events.append(row)
        if math.isfinite(_number(row.get("t"))):
            last_t = max(last_t, t_offset + _number(row.get("t")))
    histograms = {}
    for shard, values in sorted(staleness.items()):
        histogram = StalenessHistogram()
        histogram.add(np.asarray(values, dtype=np.int64))
        histograms[shard] = histogram
    return RunLog(
        push_step=np.asarray(push_step, dtype=np.int64),
        push_loss=np.asarray(push_loss, dtype=np.float64),
        staleness=histograms,
        rejected=rejected,
        not_applied=not_applied,
        throughput_t=np.asarray(thr_t, dtype=np.float64),
        throughput=np.asarray(thr, dtype=np.float64),
        held_out_step=np.asarray(held_step, dtype=np.float64),
        held_out_loss=np.asarray(held_loss, dtype=np.float64),
        sessions=sessions,
        events=events,
        bad_lines=bad,
    )
