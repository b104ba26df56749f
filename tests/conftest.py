"""Shared helpers: run the real ``downpour`` command (in a subprocess, or in this process through ``cli.main``)
and read what it wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

from downpour.backends.processes import process_state
from downpour.cli import main
from downpour.threads import torch_threads

# Small but real: patches from the bundled photos, fewer of them so that data loading is quick.
FAST = ["--set", "data.examples=6000", "--set", "data.held_out=512", "--no-progress"]


def downpour(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run ``python -m downpour ARGS`` and capture its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "downpour", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


class CliResult(NamedTuple):
    """What one in-process ``downpour`` command returned and printed (the fields of a completed subprocess)."""

    returncode: int
    stdout: str
    stderr: str


def finish_all(processes: Mapping[str, subprocess.Popen[str]], timeout: float) -> dict[str, CliResult]:
    """Wait for ``processes`` (started together, to run side by side) and return what each returned and printed.
    If one does not finish within ``timeout`` seconds, or anything else fails, every one still running is killed
    and reaped: no process outlives the test."""
    results = {}
    try:
        for key, process in processes.items():
            stdout, stderr = process.communicate(timeout=timeout)
            results[key] = CliResult(process.returncode, stdout, stderr)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.communicate()
    return results


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """``cli(*args)`` runs ``downpour ARGS`` in this process through :func:`downpour.cli.main` (the command's own
    parsing, checks and error handling, without the seconds a fresh interpreter spends importing torch) and returns
    its exit status and output. For what is about the command's behaviour; the real entry point is tested with
    :func:`downpour` in a subprocess."""

    def run(*args: str) -> CliResult:
        capsys.readouterr()  # what the test printed before is not this command's output
        try:
            status = main(list(args))
        except SystemExit as exc:  # argparse's usage errors and --help exit, as they do from the shell
            status = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return CliResult(status, out, err)

    return run


def read_jsonl(path: Path, *, growing: bool = False) -> list[dict]:
    """Every JSON line of ``path``. ``growing``: a log that a running driver is writing, whose last line may be
    half written (the log's buffer is flushed in pieces): that line is left out until its newline is there."""
    text = path.read_text()
    if growing and not text.endswith("\n"):
        text = text.rpartition("\n")[0]
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests grouped for one pytest-xdist process (``xdist_group``: the Ray tests, which share one cluster) go first,
    so that group, the longest run of tests that cannot be split, starts while the other process takes the rest."""
    items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)  # stable: order kept within each part


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The suite's own process computes on one intra-op thread, as a local-backend worker or driver does. Its tensors
    are small, and it shares this machine's two cores with the Ray cluster and the commands it starts: there two
    OpenMP threads wait at every barrier for one the system has descheduled (the layer, pooling and eval tests took
    119 s so, 36 s on one thread). Tests of several threads ask for them (``downpour.threads.torch_threads``)."""
    with torch_threads(1):
        yield


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A fresh run directory path (not yet created)."""
    return tmp_path / "run"


def holds_flock(pid: int, path: str) -> bool:
    """Whether process ``pid`` holds an flock on ``path`` (from /proc/locks: pid, then major:minor:inode)."""
    if not os.path.exists(path):  # made by the first process that takes it
        return False
    inode = os.stat(path).st_ino
    with open("/proc/locks") as locks:
        rows = [line.split() for line in locks]  # "1: FLOCK ADVISORY WRITE <pid> <major:minor:inode> 0 EOF"
    return any(len(row) > 5 and row[1] == "FLOCK" and row[4] == str(pid) and row[5].endswith(f":{inode}")
               for row in rows)  # fmt: skip


def stop_process(pid: int, timeout: float = 5.0) -> None:
    """SIGSTOP ``pid`` and wait until it is stopped: the signal is delivered asynchronously, and a process still
    running on the other core could take a lock after a check that found it holding none."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = process_state(pid)
        if state is None or state in ("T", "t", "Z", "X"):  # (None: no /proc, or gone: nothing more to wait for)
            return
        time.sleep(0.0005)


def rows_written(log_path: str) -> int:
    """How many rows a worker has written into its push log so far (the count at its start): 0 before the worker
    has made it."""
    try:
        return int(np.fromfile(log_path, dtype=np.int64, count=1)[0])
    except (OSError, IndexError):  # not made yet, or not sized yet
        return 0


def unsent_rows(cluster: Any, worker: int) -> int:
    """How many push rows a local worker has written into its push log beyond those its driver ``cluster`` (a
    ``LocalCluster``) has received: 0 before the worker has made its log."""
    written = rows_written(cluster._log_path(worker))
    return written - cluster._rows_in[worker] if written else 0


class Collected:
    """The push rows and worker events a test's driver gets as it polls a cluster (local or Ray) and stops it."""

    def __init__(self) -> None:
        self.records: list[tuple] = []
        self.events: list[Any] = []

    def add(self, polled: tuple[list[tuple], list[Any]]) -> None:
        """Keep what one ``poll()`` or ``stop()`` returned."""
        more, more_events = polled
        self.records += more
        self.events += more_events

    def poll_until(self, cluster: Any, done: Callable[[], bool], *, deadline: float, pause: float = 0.05) -> None:
        """Poll ``cluster`` until ``done()`` or ``deadline`` (``time.monotonic()`` seconds)."""
        while not done() and time.monotonic() < deadline:
            self.add(cluster.poll())
            time.sleep(pause)
