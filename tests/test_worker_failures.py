"""Local-backend worker processes that fail: what the driver says about them. Real processes, real limits: a worker
whose memory runs out is one whose address space really ends (``RLIMIT_AS``), started by multiprocessing through a
small wrapper, as a machine out of memory would make it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FAST, read_jsonl
from downpour.errors import out_of_memory

# The interpreter the driver starts its workers with: it imports what a worker imports, then ends its address space
# {margin} bytes above what it has mapped, and runs what multiprocessing's spawn asked of it
# ([interpreter flags...] -c CODE --multiprocessing-fork) in this same process.
WORKER_PYTHON = """#!{python}
import resource
import sys

import downpour.backends.local  # noqa: F401

with open("/proc/self/status") as status:
    mapped = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (mapped + {margin}, resource.getrlimit(resource.RLIMIT_AS)[1]))
args = sys.argv[1:]
code = args.index("-c")
sys.argv = ["-c", *args[code + 2 :]]
exec(compile(args[code + 1], "<string>", "exec"), {{"__name__": "__main__"}})
"""

# ``downpour ARGS`` with the workers started through WORKER_PYTHON (argv[1]); the driver itself has no limit.
DRIVER = """import multiprocessing
import sys

if __name__ == "__main__":  # the spawned workers import this file too
    multiprocessing.set_executable(sys.argv[1])
    from downpour.cli import main

    raise SystemExit(main(sys.argv[2:]))
"""


def test_a_worker_that_runs_out_of_memory_says_so_in_one_line(tmp_path: Path) -> None:
    """One worker, 5000-example mini-batches of a 16384-feature model: one activation is 312 MiB, and the worker's
    address space ends 256 MiB above what its imports mapped (its shards, examples and model fit). The driver says
    which worker ran out of memory and which keys to lower, in one line, not "worker 0 died (exit code 1)" after a
    torch allocator message; the death is still counted (every worker died: exit status 1)."""
    worker_python = tmp_path / "worker-python"
    worker_python.write_text(WORKER_PYTHON.format(python=sys.executable, margin=256 * 2**20))
    worker_python.chmod(0o755)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(driver), str(worker_python), "train", "--out", str(run_dir), "--workers", "1",
         "--steps", "20", "--seconds", "600", "--set", "model.features=16384", "--set", "train.batch_size=5000",
         *FAST],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    message = " ".join(result.stderr.split())  # the console wraps long lines
    said = (r"worker 0 ran out of memory: could not allocate [\d.,]+ [MG]iB \(reduce train\.batch_size or the model "
            r"\(model\.features\), or run fewer cluster\.workers\)")  # fmt: skip
    assert re.search(said, message), result.stderr
    assert "worker 0 died" not in message and "Traceback" not in message and "Allocator" not in message, message
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["worker"] for r in records if r["event"] == "worker_out_of_memory"] == [0]
    assert [r["worker"] for r in records if r["event"] == "worker_died"] == [0]
    assert json.loads((run_dir / "summary.json").read_text())["worker_deaths"] == 1


def test_out_of_memory_tells_failed_allocations_from_other_errors() -> None:
    """Real failures: torch's allocator and numpy asked for 2**60 bytes, and a RuntimeError that is a bug."""
    failures = {}
    for name, allocate in [("torch", lambda: torch.empty(2**60, dtype=torch.uint8)),
                           ("numpy", lambda: np.empty(2**60, dtype=np.uint8)),
                           ("bug", lambda: torch.zeros(3) + torch.zeros(4))]:  # fmt: skip
        try:
            allocate()
        except (MemoryError, RuntimeError) as exc:
            failures[name] = exc
    assert out_of_memory(failures["torch"]) == "could not allocate 1,073,741,824.0 GiB"
    assert out_of_memory(failures["numpy"]) == str(failures["numpy"])  # numpy's own words: "Unable to allocate ..."
    assert out_of_memory(MemoryError()) == "an allocation failed"
    assert out_of_memory(failures["bug"]) is None
    assert out_of_memory(ValueError("not enough memory")) is None


@pytest.mark.parametrize(("size", "said"), [(512, "512 bytes"), (16384, "16.0 KiB"), (3 * 2**19, "1.5 MiB"),
                                            (5 * 2**29, "2.5 GiB")])  # fmt: skip
def test_a_failed_allocation_names_its_size_in_a_unit_that_does_not_round_it_to_zero(size: int, said: str) -> None:
    """torch's allocator names the bytes it tried: a small one read 'could not allocate 0.0 MiB'."""
    failure = RuntimeError(f"DefaultCPUAllocator: can't allocate memory: you tried to allocate {size} bytes.")
    assert out_of_memory(failure) == f"could not allocate {said}"
