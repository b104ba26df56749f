"""``train.tensorboard`` (``downpour train --tensorboard``): the metrics log, mirrored live into TensorBoard event
files under ``RUN_DIR/tensorboard/`` (``tensorboard --logdir RUN_DIR/tensorboard``).

Scalars, each against the global step (pushes):

- ``loss/held_out``: the held-out loss (start, ``eval`` rows, end);
- ``loss/push``: the mean mini-batch loss of each block of ``BLOCK`` pushes;
- ``staleness/shard_K``: the mean staleness of each block of ``BLOCK`` updates applied by shard K;
- ``throughput/examples_per_s``: examples per second, each second (local backend).

Pushes are averaged in blocks because one scalar costs about 0.1 ms to write, and a run makes thousands of pushes a
second; ``metrics.jsonl`` keeps every push.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from downpour.errors import DownpourError
from downpour.rundir import MetricsLog

TENSORBOARD_DIR = "tensorboard"
BLOCK = 20  # pushes (per shard) averaged into one scalar


def require_tensorboard() -> None:
    """Raise a one-line :class:`DownpourError` naming the missing package when TensorBoard's writer cannot load."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as exc:
        raise DownpourError(
            f"train.tensorboard = true needs the tensorboard package ({exc}): pip install 'downpour-sgd[tensorboard]'"
        ) from None


class _Block:
    """A running sum over at most ``BLOCK`` values, emitted as their mean."""

    def __init__(self) -> None:
        self.total, self.count, self.seen = 0.0, 0, 0

    def add(self, value: Any) -> bool:
        """Count one record (its value when finite); True when the block is full."""
        self.seen += 1
        if isinstance(value, int | float) and math.isfinite(value):
            self.total += float(value)
            self.count += 1
        return self.seen % BLOCK == 0

    def take(self) -> float | None:
        """The block's mean (None when it held no finite value), and start a new block."""
        mean = self.total / self.count if self.count else None
        self.total, self.count = 0.0, 0
        return mean


class TensorBoardMetricsLog(MetricsLog):
    """A :class:`MetricsLog` that also writes its events as TensorBoard scalars into ``log_dir``."""

    def __init__(self, path: Path, log_dir: Path) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        super().__init__(path)
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self._offset = 0  # the global step when this session started (a resumed run continues its steps)
        self._loss = _Block()
        self._staleness: dict[int, _Block] = {}

    def _scalar(self, tag: str, value: Any, step: Any) -> None:
        if isinstance(value, int | float) and math.isfinite(value) and isinstance(step, int | float):
            self.writer.add_scalar(tag, float(value), int(step))

    def write(self, event: str, **fields: Any) -> None:
        """Append one event to ``metrics.jsonl`` and mirror it into TensorBoard."""
        super().write(event, **fields)
        if event == "push":
            shard = int(fields.get("shard", 0))
            if shard == 0 and self._loss.add(fields.get("loss")):
                self._scalar("loss/push", self._loss.take(), self._offset + self._loss.seen)
            if fields.get("applied", True):
                block = self._staleness.setdefault(shard, _Block())
                if block.add(fields.get("staleness")):
                    self._scalar(f"staleness/shard_{shard}", block.take(), self._offset + block.seen)
        elif event == "start":
            self._offset = int(fields.get("step", 0) or 0)
            self._loss, self._staleness = _Block(), {}
            if not fields.get("resume"):
                self._scalar("loss/held_out", fields.get("initial_loss"), self._offset)
        elif event == "eval":
            self._scalar("loss/held_out", fields.get("held_out_loss"), fields.get("step"))
        elif event == "end":
            self._scalar("loss/held_out", fields.get("final_loss"), fields.get("step"))
        elif event == "throughput":
            self._scalar("throughput/examples_per_s", fields.get("examples_per_s"), fields.get("step"))

    def flush(self) -> None:
        """Push buffered lines and events to their files."""
        super().flush()
        self.writer.flush()

    def close(self) -> None:
        """Write the last partial blocks, then close both files."""
        if self._loss.seen % BLOCK:
            self._scalar("loss/push", self._loss.take(), self._offset + self._loss.seen)
        for shard, block in self._staleness.items():
            if block.seen % BLOCK:
                self._scalar(f"staleness/shard_{shard}", block.take(), self._offset + block.seen)
        self.writer.close()
        super().close()


def open_metrics_log(out: Path, *, tensorboard: bool) -> MetricsLog:
    """``RUN_DIR/metrics.jsonl``, mirrored into ``RUN_DIR/tensorboard/`` when ``tensorboard``."""
    from downpour import rundir

    path = out / rundir.METRICS
    return TensorBoardMetricsLog(path, out / TENSORBOARD_DIR) if tensorboard else MetricsLog(path)
