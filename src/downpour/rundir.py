"""The run directory: where a run's config, metrics, summary, checkpoint and pictures live."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

CONFIG = "config.toml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint"
FILTERS = "filters.png"
WHITENING = "whitening.safetensors"


def new_run_dir(root: Path = Path("runs")) -> Path:
    """``runs/<timestamp>``, with a numeric suffix if that name is taken."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = root / stamp
    suffix = 1
    while candidate.exists():
        candidate = root / f"{stamp}-{suffix}"
        suffix += 1
    return candidate


def _clean(value: Any) -> Any:
    """JSON has no NaN or Inf: write them as null (recursively through dicts and lists)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


class MetricsLog:
    """``metrics.jsonl``: one JSON object per event, appended (a resumed run continues the same file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = open(path, "a", buffering=1 << 16)  # noqa: SIM115 - closed by close()

    def write(self, event: str, **fields: Any) -> None:
        """Append one event."""
        record = {"event": event, **{k: _clean(v) for k, v in fields.items()}}
        self._handle.write(json.dumps(record, separators=(",", ":")) + "\n")

    def flush(self) -> None:
        """Push buffered lines to the file."""
        self._handle.flush()

    def close(self) -> None:
        """Flush and close."""
        self._handle.close()


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON (NaN and Inf become null)."""
    path.write_text(json.dumps(_clean(payload), indent=2, default=str) + "\n")
