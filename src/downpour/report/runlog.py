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
    starts: list[dict[str, Any]] = field(default_factory=list)  # each session's start row (its step, what changed)
    discarded: int = 0  # pushes logged after the checkpoint that a later session resumed from (their work was lost:
    # a killed driver, a diverged session), left out of every count and curve above
    bad_lines: int = 0  # lines that are not JSON objects (a cut-off last line of a killed driver), or hold fields no
    # driver writes (a shard that is not a count, a staleness beyond the rows in the file)
    session_t: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (S,) seconds since the run started when
    # each session started, on the throughput_t clock (the first 0; each later one where the earlier sessions ended)
    push_late: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # (P,) as push_loss: not
    # applied for being late (sync) or lost with a restored shard; not refused


MAX_COUNT = 2**53  # a count beyond it is no driver's (as checkpoint.MAX_COUNT; not imported: it imports torch)
_APPLIED, _REJECTED, _NOT_APPLIED = 0, 1, 2  # a push row's outcome: applied; refused (NaN or Inf); not applied


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
        too_large = value > (most if name == "staleness" else MAX_COUNT) if isinstance(value, int) else False
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or too_large:
            raise ValueError(f"{name} = {value!r}")
    return wanted


def read_run_log(path: Path) -> RunLog:
    """Parse ``metrics.jsonl`` at ``path`` (a missing file reads as a run with no events).

    A resumed session goes on from its checkpoint's step S; the pushes an earlier session logged after S (a driver
    killed between checkpoints, a diverged session whose checkpoint was not saved) were undone with it, so they are
    left out and counted in ``discarded``.
    """
    pushes: list[tuple[int, int, int, int, float]] = []  # (global step, shard, outcome, staleness, loss) per row
    starts: list[dict[str, Any]] = []
    session_t: list[float] = []
    discarded = 0
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
    counted: dict[int, int] = {}  # rows this session per shard: a push's row on each shard takes its step (the
    # Ray backend writes a push's rows in no fixed shard order)
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):  # RecursionError: a line nested past the parser's limit
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
            counted[shard] = counted.get(shard, 0) + 1  # each shard has one row per push, in push order
            if row.get("applied", True):
                outcome = _APPLIED
            else:  # staleness -1: a shard refused it (NaN or Inf); else late (sync) or lost with its shard
                outcome = _REJECTED if row.get("staleness") == -1 else _NOT_APPLIED
            loss = _number(row.get("loss"))
            pushes.append((step_offset + counted[shard], shard, outcome, checked.get("staleness", -1), loss))
        elif kind == "throughput":
            thr_t.append(t_offset + _number(row.get("t")))
            thr.append(_number(row.get("examples_per_s")))
        elif kind in ("start", "eval", "end"):
            if kind == "start":
                sessions += 1
                step_offset, counted, t_offset = checked["step"], {}, last_t
                starts.append(row)
                session_t.append(t_offset)
                if row.get("resume"):  # what earlier sessions logged past the checkpoint this one goes on from
                    kept = [push for push in pushes if push[0] <= step_offset]
                    discarded += sum(push[1] == 0 for push in pushes) - sum(push[1] == 0 for push in kept)
                    pushes = kept
                    held = [(s, loss) for s, loss in zip(held_step, held_loss, strict=True) if s <= step_offset]
                    held_step, held_loss = [s for s, _ in held], [loss for _, loss in held]
            key = {"start": "initial_loss", "eval": "held_out_loss", "end": "final_loss"}[kind]
            if kind != "start" or not row.get("resume"):  # a resumed session repeats no initial loss
                held_step.append(_number(row.get("step")))
                held_loss.append(_number(row.get(key)))
        elif kind is not None:
            events.append(row)
        if math.isfinite(_number(row.get("t"))):
            last_t = max(last_t, t_offset + _number(row.get("t")))
    staleness: dict[int, list[int]] = {}
    for _, shard, outcome, stale, _ in pushes:
        if outcome == _APPLIED:
            staleness.setdefault(shard, []).append(stale)
    histograms = {}
    for shard, values in sorted(staleness.items()):
        histogram = StalenessHistogram()
        histogram.add(np.asarray(values, dtype=np.int64))
        histograms[shard] = histogram
    first_shard = [push for push in pushes if push[1] == 0]
    return RunLog(
        push_step=np.asarray([push[0] for push in first_shard], dtype=np.int64),
        push_loss=np.asarray([push[4] for push in first_shard], dtype=np.float64),
        push_late=np.asarray([push[2] == _NOT_APPLIED for push in first_shard], dtype=bool),
        staleness=histograms,
        rejected=sum(push[2] == _REJECTED for push in pushes),
        not_applied=sum(push[2] == _NOT_APPLIED for push in pushes),
        starts=starts,
        discarded=discarded,
        throughput_t=np.asarray(thr_t, dtype=np.float64),
        throughput=np.asarray(thr, dtype=np.float64),
        held_out_step=np.asarray(held_step, dtype=np.float64),
        held_out_loss=np.asarray(held_loss, dtype=np.float64),
        sessions=sessions,
        events=events,
        bad_lines=bad,
        session_t=np.asarray(session_t, dtype=np.float64),
    )
