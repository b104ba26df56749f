"""Long-lived training configurations that the benchmark pauses and resumes (SIGSTOP / SIGCONT).

All configurations start once and then take turns: each runs alone for a short window while the others are
stopped, round after round. Windows of different configurations are then neighbours in time, so a ratio taken
within one round is little disturbed by the slow drifts in speed of a shared machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from downpour import rundir
from downpour.backends.local import LocalCluster
from downpour.backends.processes import worker_context
from downpour.bench.baselines import shared_model, train_forever
from downpour.config import Config
from downpour.models import build_model
from downpour.ps.flat import flat_copy
from downpour.resume import RunState
from downpour.watch import log_push_records


class Runner:
    """A configuration's processes, its running example count, and what to do while it runs."""

    name: str

    def pids(self) -> list[int]:
        raise NotImplementedError

    def examples(self) -> int:
        raise NotImplementedError

    def started(self) -> bool:
        raise NotImplementedError

    def poll(self) -> None:
        """Work the benchmark's own process does for this configuration while it runs (none by default)."""

    def close(self) -> None:
        raise NotImplementedError

    def pause(self) -> None:
        for pid in self.pids():
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self.pids():
            os.kill(pid, signal.SIGCONT)


class PlainLoops(Runner):
    """``processes`` copies of the plain Adagrad loop on one shared model: 1 = the plain loop, 2 = Hogwild."""

    def __init__(self, name: str, config: Config, examples: Tensor, processes: int) -> None:
        self.name = name
        model = shared_model(config.model, examples.shape[1])
        self._counter = torch.zeros(processes, dtype=torch.int64).share_memory_()
        self._stop = torch.zeros(1, dtype=torch.int64).share_memory_()
        ctx = worker_context()
        args = (model, examples.share_memory_(), self._counter, self._stop, config.train.batch_size, config.ps.lr)
        self._procs = [ctx.Process(target=train_forever, args=(rank, processes, *args)) for rank in range(processes)]
        try:
            for proc in self._procs:
                proc.start()
        except BaseException:  # Ctrl-C while the first fork waited for the fork server: stop those started
            self._procs = [proc for proc in self._procs if proc.pid is not None]
            self.close()
            raise

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def examples(self) -> int:
        return int(self._counter.sum())

    def started(self) -> bool:
        if not all(p.is_alive() for p in self._procs):
            raise RuntimeError(f"a {self.name} benchmark process died")
        return bool((self._counter > 0).all())

    def close(self) -> None:
        self._stop[0] = 1
        self.resume()
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


class LocalBackend(Runner):
    """The local backend with ``workers`` workers and 2 shards, its records drained and logged as in training."""

    def __init__(self, name: str, config: Config, examples: Tensor, workers: int) -> None:
        self.name = name
        config.cluster.workers = workers
        config.cluster.threads_per_worker = 1
        initial = flat_copy(build_model(config.model, examples.shape[1], seed=0))
        self._tmp = tempfile.TemporaryDirectory()
        self.cluster = LocalCluster(
            config, examples.clone(), initial, worker_seeds=list(range(workers)), t0=time.time()
        )
        self._metrics = rundir.MetricsLog(Path(self._tmp.name) / rundir.METRICS)
        self._state = RunState()
        try:
            self.cluster.start()
        except BaseException:  # Ctrl-C while the workers started: the benchmark does not know this runner yet
            self.close()
            raise

    def pids(self) -> list[int]:
        return self.cluster.pids()

    def examples(self) -> int:
        return self.cluster.examples_done()

    def started(self) -> bool:
        self.poll()
        if self.cluster.alive() < len(self.pids()):
            raise RuntimeError(f"a {self.name} worker died")
        return bool((self.cluster._progress[:, 0] > 0).all())

    def poll(self) -> None:
        log_push_records(self.cluster.poll()[0], self._metrics, self._state)

    def close(self) -> None:
        self.resume()
        log_push_records(self.cluster.stop()[0], self._metrics, self._state)
        self.cluster.close()
        self._metrics.close()
        self._tmp.cleanup()


def start_all(runners: list[Runner], timeout: float = 120.0) -> None:
    """Wait until every runner trains, then pause them all."""
    deadline = time.monotonic() + timeout
    pending = list(runners)
    while pending:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{', '.join(r.name for r in pending)} did not start in {timeout:.0f} s")
        for runner in list(pending):
            if runner.started():
                runner.pause()
                pending.remove(runner)
        time.sleep(0.05)


def measure_window(runner: Runner, window: float, warmup: float = 0.1) -> float:
    """Resume ``runner`` alone, measure its examples/s over ``window`` seconds, pause it again."""
    runner.resume()
    try:
        end = time.perf_counter() + warmup
        while time.perf_counter() < end:
            runner.poll()
            time.sleep(0.02)
        first, start = runner.examples(), time.perf_counter()
        while time.perf_counter() - start < window:
            runner.poll()
            time.sleep(0.02)
        return (runner.examples() - first) / (time.perf_counter() - start)
    finally:
        runner.pause()


def alternate(runners: list[Runner], *, rounds: int, window: float) -> dict[str, list[float]]:
    """``rounds`` rounds of one window per runner, in turn; examples/s per runner per round."""
    rates: dict[str, list[float]] = {r.name: [] for r in runners}
    for _ in range(rounds):
        for runner in runners:
            rates[runner.name].append(measure_window(runner, window))
    return rates


def close_all(runners: list[Any]) -> None:
    """Stop every runner's processes, resuming the paused ones first."""
    for runner in runners:
        try:
            runner.close()
        except Exception:
            for pid in runner.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
