"""``downpour bench ps --backend ray``: the Ray backend next to Ray's documented parameter-server pattern and the
local backend, side by side in one run, on the ``rica`` workload with 2 workers.

Three configurations start once and then take turns, each running alone for a short window while the others'
processes are paused (SIGSTOP/SIGCONT), for several rounds, as in ``downpour bench ps`` (see
:mod:`downpour.bench.runners`); ratios are medians over rounds of the ratio within a round.

- ``ray_2w``: :class:`~downpour.backends.ray.RayCluster`, 2 worker actors, 2 shard actors, the run's own settings
  (``n_fetch = n_push = 1``: every step pushes to and pulls from both shards).
- ``ray_doc_pattern``: the pattern of Ray's documented asynchronous parameter-server example, written here for this
  model: one server actor holding all the weights, worker actors that receive the weights with every call and
  return gradients, and a ``ray.wait`` loop on the driver that sends each finished gradient to the server and the
  server's new weights to that worker.
- ``local_2w``: the local backend (:class:`~downpour.backends.local.LocalCluster`), 2 worker processes, 2 shards.
- ``ray_2w_n4`` (for information): the Ray backend with ``n_fetch = n_push = 4``, Downpour's way of trading
  staleness for fewer messages.
- ``ray_2w_calls`` (for information): the Ray backend with its same-node shared memory off, so that every fetch
  and push is an actor call (pipelined: the worker computes while its push-pull is in flight), as between nodes.

Then :func:`transport_cost` times one step's messages alone (2 echo actors, a shard's slice each way): the cost
of an actor call that every configuration built on Ray actor calls pays.

All train the same model on the same data with Adagrad, one intra-op thread per process. The Ray instance is a
private one on 127.0.0.1 (``num_cpus`` = the machine's cores, no dashboard), started and shut down here.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

from downpour import rundir
from downpour.bench.ps import describe_workload, paired_median, workload
from downpour.bench.runners import LocalBackend, Runner, alternate, close_all, start_all
from downpour.config import Config
from downpour.data import load_dataset, worker_slice
from downpour.models import build_model
from downpour.ps.flat import flat_copy
from downpour.resume import RunState
from downpour.watch import log_push_records

TARGET_VS_DOC_PATTERN = 5.0
TARGET_VS_LOCAL = 0.8


class RayBackend(Runner):
    """:class:`RayCluster` with ``workers`` workers and 2 shards, its records drained and logged as in training."""

    def __init__(self, name: str, config: Config, examples: Tensor, workers: int, *, every: int = 1,
                 shared_memory: bool = True) -> None:  # fmt: skip
        import tempfile

        from downpour.backends.ray import RayCluster

        self.name = name
        config.cluster.workers = workers
        config.cluster.threads_per_worker = 1
        config.ps.n_fetch = config.ps.n_push = every
        initial = flat_copy(build_model(config.model, examples.shape[1], seed=0))
        self.cluster = RayCluster(config, examples.clone(), initial, worker_seeds=list(range(workers)), t0=time.time(),
                                  shared_memory=shared_memory)  # fmt: skip
        self._tmp = tempfile.TemporaryDirectory()
        self._metrics = rundir.MetricsLog(Path(self._tmp.name) / rundir.METRICS)
        self._state = RunState()
        self._pids: list[int] = []
        self.cluster.start()

    def pids(self) -> list[int]:
        return self._pids

    def examples(self) -> int:
        return self.cluster.examples_done()

    def started(self) -> bool:
        self.poll()
        if self.cluster.alive() < self.cluster.config.cluster.workers:
            raise RuntimeError(f"a {self.name} worker stopped")
        if not all(count > 0 for count in self.cluster.worker_examples()):
            return False
        pids = self.cluster.actor_pids()
        self._pids = pids["workers"] + pids["shards"] + pids["coordinator"]
        return True

    def poll(self) -> None:
        log_push_records(self.cluster.poll()[0], self._metrics, self._state)

    def close(self) -> None:
        self.resume()
        try:
            log_push_records(self.cluster.stop()[0], self._metrics, self._state)
        finally:
            self.cluster.close()
            self._metrics.close()
            self._tmp.cleanup()


class GradientWorker:
    """A worker of the documented pattern: set the weights it is sent, return one mini-batch's gradients."""

    def __init__(self, config: Config, examples: np.ndarray, seed: int) -> None:
        torch.set_num_threads(1)
        self.model = build_model(config.model, examples.shape[1], seed=0)
        self.examples = torch.from_numpy(np.array(examples))  # (N, D)
        self.batch_size = config.train.batch_size
        self.rng = np.random.default_rng(seed)

    def compute_gradients(self, weights: dict[str, Tensor]) -> list[np.ndarray]:
        self.model.load_state_dict(weights)
        self.model.zero_grad()
        rows = torch.from_numpy(self.rng.integers(0, self.examples.shape[0], self.batch_size))
        self.model.loss(self.examples.index_select(0, rows)).backward()  # (B, D) batch
        return [p.grad.numpy().copy() for p in self.model.parameters()]

    def pid(self) -> int:
        return os.getpid()


class WeightServer:
    """The server of the documented pattern: all the weights in one actor; apply gradients, return the weights."""

    def __init__(self, config: Config, input_dim: int) -> None:
        torch.set_num_threads(1)
        self.model = build_model(config.model, input_dim, seed=0)
        self.optimizer = torch.optim.Adagrad(self.model.parameters(), lr=config.ps.lr, eps=config.ps.adagrad_eps)

    def apply_gradients(self, *gradients: list[np.ndarray]) -> dict[str, Tensor]:
        self.optimizer.zero_grad()
        for param, grads in zip(self.model.parameters(), zip(*gradients, strict=True), strict=True):
            param.grad = torch.from_numpy(np.sum(grads, axis=0))
        self.optimizer.step()
        return self.get_weights()

    def get_weights(self) -> dict[str, Tensor]:
        return {name: tensor.detach().clone() for name, tensor in self.model.state_dict().items()}

    def pid(self) -> int:
        return os.getpid()


class RayDocPattern(Runner):
    """Ray's documented asynchronous parameter server, driven by a ``ray.wait`` loop on a thread of this process."""

    def __init__(self, name: str, config: Config, examples: Tensor, workers: int) -> None:
        import ray

        self.name = name
        self._ray = ray
        self.batch_size = config.train.batch_size
        self.server = ray.remote(WeightServer).options(num_cpus=0).remote(config, examples.shape[1])
        self.workers = [
            ray.remote(GradientWorker)
            .options(num_cpus=0)
            .remote(config, examples[worker_slice(examples.shape[0], workers, i)].numpy(), i)
            for i in range(workers)
        ]
        self._pids = ray.get([self.server.pid.remote()] + [w.pid.remote() for w in self.workers])
        self._done = 0
        self._pending: dict[Any, Any] = {}  # ObjectRef of a gradient being computed -> its worker
        self._running = threading.Event()
        self._closing = threading.Event()
        self._error: BaseException | None = None
        self._running.set()
        self._thread = threading.Thread(target=self._drive, name=f"{name}-driver", daemon=True)
        self._thread.start()

    def _drive(self) -> None:
        ray = self._ray
        try:
            weights = self.server.get_weights.remote()
            pending = self._pending
            pending.update({worker.compute_gradients.remote(weights): worker for worker in self.workers})
            while not self._closing.is_set():
                if not self._running.wait(timeout=0.05):
                    continue
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.05)
                if not ready:
                    continue
                worker = pending.pop(ready[0])
                weights = self.server.apply_gradients.remote(ready[0])
                pending[worker.compute_gradients.remote(weights)] = worker
                self._done += self.batch_size
        except BaseException as exc:  # surfaced by started() / examples()
            self._error = exc

    def pids(self) -> list[int]:
        return list(self._pids)

    def examples(self) -> int:
        if self._error is not None:
            raise RuntimeError(f"{self.name} failed: {self._error}")
        return self._done

    def started(self) -> bool:
        return self.examples() >= 2 * self.batch_size

    def pause(self) -> None:
        self._running.clear()
        super().pause()

    def resume(self) -> None:
        super().resume()
        self._running.set()

    def close(self) -> None:
        self._closing.set()
        self.resume()
        self._thread.join(timeout=10)
        for ref in list(self._pending):  # take the last replies, so that none is left unread (Ray logs those)
            with contextlib.suppress(Exception):
                self._ray.get(ref, timeout=10)
        for actor in [self.server, *self.workers]:
            self._ray.kill(actor)


class EchoShard:
    """A stand-in shard for timing the transport alone: take an update, return values of the same size."""

    def __init__(self, size: int) -> None:
        self.values = np.zeros(size, dtype=np.float32)

    def push_pull(self, update: np.ndarray) -> np.ndarray:
        np.subtract(self.values, update, out=self.values)
        return self.values.copy()

    def cpu_seconds(self) -> float:
        return time.process_time()


def transport_cost(num_params: int, shards: int, *, calls: int = 300) -> dict[str, float]:
    """What one training step's messages cost through Ray actor calls, without training: ``shards`` echo actors
    each take their slice of an update and return their values, all at once, ``calls`` times from this process.

    Returns the median round trip (ms) and the CPU time (ms) spent per call in an echo actor and per round here.
    """
    import ray

    from downpour.ps.sharding import contiguous_bounds

    sizes = [stop - start for start, stop in contiguous_bounds(num_params, shards)]
    actors = [ray.remote(EchoShard).options(num_cpus=0).remote(size) for size in sizes]
    updates = [np.full(size, 1e-3, dtype=np.float32) for size in sizes]
    try:
        for _ in range(20):
            ray.get([actor.push_pull.remote(u) for actor, u in zip(actors, updates, strict=True)])
        callee_before = ray.get([actor.cpu_seconds.remote() for actor in actors])
        caller_before = time.process_time()
        rounds = []
        for _ in range(calls):
            start = time.perf_counter()
            ray.get([actor.push_pull.remote(u) for actor, u in zip(actors, updates, strict=True)])
            rounds.append(time.perf_counter() - start)
        caller = time.process_time() - caller_before
        callee = sum(ray.get([actor.cpu_seconds.remote() for actor in actors])) - sum(callee_before)
    finally:
        for actor in actors:
            ray.kill(actor)
    return {
        "push_pull_round_ms": 1e3 * statistics.median(rounds),
        "callee_cpu_ms_per_call": 1e3 * callee / (calls * shards),
        "caller_cpu_ms_per_round": 1e3 * caller / calls,
    }


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send what anything writes to file descriptor 1 (Ray's raylet warnings among them) to stderr meanwhile, so
    that ``--json`` prints one clean JSON object on stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run(*, seconds: float = 0.5, rounds: int = 12, address: str = "") -> dict[str, Any]:
    """Start the configurations once, alternate ``rounds`` windows of ``seconds`` each; report medians and ratios.

    ``address``: the Ray cluster to use (``""``: a private instance on this machine, shut down at the end).
    """
    with _stdout_to_stderr():
        return _run(seconds=seconds, rounds=rounds, address=address)


def _run(*, seconds: float, rounds: int, address: str) -> dict[str, Any]:
    import ray

    from downpour.backends.ray_connect import INLINE_BYTES, connect, disconnect

    config = workload()
    dataset = load_dataset(config.data, seed=0)
    train = dataset.train
    num_params = flat_copy(build_model(config.model, dataset.dim, seed=0)).numel()
    temp_dir = connect(address)
    runners: list[Runner] = []
    try:
        runners.append(RayBackend("ray_2w", workload(), train, workers=2))
        runners.append(RayDocPattern("ray_doc_pattern", workload(), train, workers=2))
        runners.append(LocalBackend("local_2w", workload(), train, workers=2))
        runners.append(RayBackend("ray_2w_n4", workload(), train, workers=2, every=4))
        runners.append(RayBackend("ray_2w_calls", workload(), train, workers=2, shared_memory=False))
        start_all(runners, timeout=300)
        rates = alternate(runners, rounds=rounds, window=seconds)
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        measured = list(runners)
        close_all(runners)
        runners = []
        # Staleness of every push applied during the whole run (windows, start-up and pauses alike).
        staleness = {r.name: r._state.staleness.summary() for r in measured if hasattr(r, "_state")}
        transport = transport_cost(num_params, 2)
    finally:
        close_all(runners)
        disconnect(temp_dir)
    med = {name: statistics.median(values) for name, values in rates.items()}
    return {
        "workload": {
            **describe_workload(config, num_params, seconds=seconds, rounds=rounds),
            "ray_version": ray.__version__,
            "ray_nodes": nodes,
            "ray_inline_bytes": INLINE_BYTES if temp_dir is not None else None,
        },
        "ray_2w_examples_per_s": med["ray_2w"],
        "ray_doc_pattern_examples_per_s": med["ray_doc_pattern"],
        "local_2w_examples_per_s": med["local_2w"],
        "ray_2w_n4_examples_per_s": med["ray_2w_n4"],
        "ray_2w_calls_examples_per_s": med["ray_2w_calls"],
        "ratios": {
            "ray_vs_doc_pattern": paired_median(rates["ray_2w"], rates["ray_doc_pattern"]),
            "ray_vs_local": paired_median(rates["ray_2w"], rates["local_2w"]),
            "ray_n4_vs_local": paired_median(rates["ray_2w_n4"], rates["local_2w"]),
            "ray_calls_vs_doc_pattern": paired_median(rates["ray_2w_calls"], rates["ray_doc_pattern"]),
            "ray_calls_vs_local": paired_median(rates["ray_2w_calls"], rates["local_2w"]),
        },
        "targets": {"ray_vs_doc_pattern": TARGET_VS_DOC_PATTERN, "ray_vs_local": TARGET_VS_LOCAL},
        "transport": transport,
        "staleness": staleness,
        "windows": rates,
    }


def print_table(result: dict[str, Any], console: Console) -> None:
    """The benchmark as a table: rate, ratio to the doc pattern and to the local backend, and the targets."""
    ratios = result["ratios"]
    doc, local = result["ray_doc_pattern_examples_per_s"], result["local_2w_examples_per_s"]
    table = Table(title="downpour bench ps --backend ray — rica, 16x16 patches, 256 features, batch 128, 2 workers")
    for column in ("configuration", "examples/s", "× doc pattern", "× local", "target"):
        table.add_column(column, justify="right" if column != "configuration" else "left")

    def met(value: float, target: float) -> str:
        return f"≥ {target:g}×: {'met' if value >= target else 'not met'}"

    rows = [
        ("Ray backend, 2 worker + 2 shard actors", result["ray_2w_examples_per_s"], ratios["ray_vs_doc_pattern"],
         ratios["ray_vs_local"], f"{met(ratios['ray_vs_doc_pattern'], TARGET_VS_DOC_PATTERN)} doc; "
         f"{met(ratios['ray_vs_local'], TARGET_VS_LOCAL)} local"),
        ("Ray's documented pattern (1 server, ray.wait)", doc, 1.0, doc / local, ""),
        ("local backend, 2 workers, 2 shards", local, local / doc, 1.0, ""),
        ("Ray backend, n_fetch = n_push = 4 (information)", result["ray_2w_n4_examples_per_s"],
         result["ray_2w_n4_examples_per_s"] / doc, ratios["ray_n4_vs_local"], ""),
        ("Ray backend, actor calls only, pipelined (information)", result["ray_2w_calls_examples_per_s"],
         ratios["ray_calls_vs_doc_pattern"], ratios["ray_calls_vs_local"], ""),
    ]  # fmt: skip
    for name, rate, vs_doc, vs_local, target in rows:
        table.add_row(name, f"{rate:,.0f}", f"{vs_doc:.2f}", f"{vs_local:.2f}", target)
    console.print(table)
    stale = ", ".join(f"{name} mean {s['mean']:.2f} p99 {s['p99']}" for name, s in result["staleness"].items())
    console.print(f"Staleness of the pushes applied: {stale}")
    w, t = result["workload"], result["transport"]
    console.print(
        f"Ray {w['ray_version']}, {w['ray_nodes']} node(s), {w['cpus']} cores; {w['rounds']} rounds of "
        f"{w['window_s']:g} s windows; ratios are medians of within-round ratios"
    )
    console.print(
        f"One step's messages alone (2 shards, {w['num_params'] // 2:,} float32 each way per shard, no training): "
        f"{t['push_pull_round_ms']:.2f} ms a round; CPU {t['callee_cpu_ms_per_call']:.2f} ms per call in a shard "
        f"actor and {t['caller_cpu_ms_per_round']:.2f} ms per round in the caller"
    )
