"""Shared helpers: run the real ``downpour`` command in a subprocess and read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Small but real: patches from the bundled photos, fewer of them so that data loading is quick.
FAST = ["--set", "data.examples=6000", "--set", "data.held_out=512", "--no-progress"]


def downpour(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run ``python -m downpour ARGS`` and capture its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "downpour", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def read_jsonl(path: Path) -> list[dict]:
    """Every JSON line of ``path``."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A fresh run directory path (not yet created)."""
    return tmp_path / "run"
