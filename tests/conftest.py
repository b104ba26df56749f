"""Shared helpers: run the real ``downpour`` command in a subprocess and read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

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
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread for the test, as in a simulated or local-backend worker (small products run
    fastest so, and a busy 2-core machine stays usable)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A fresh run directory path (not yet created)."""
    return tmp_path / "run"
