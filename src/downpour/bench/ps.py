"""``downpour bench ps``: the parameter server's throughput next to a plain loop, a Hogwild pair and memcpy.

Every figure comes from the same run, measured in alternating rounds (``repeats``), each sampled in 0.5 s windows;
the headline is each configuration's fastest window (timeit's rule: the least disturbed by other load on a shared
machine), and the medians of the windows are in ``--json`` too. Compare ratios, not absolute numbers across runs.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from downpour import rundir
from downpour.backends.local import LocalCluster
from downpour.bench.baselines import hogwild_pair, plain_loop, window_rates
from downpour.bench.transport import server_process_push_pull_gbps
from downpour.config import Config
from downpour.data import load_dataset
from downpour.models import build_model
from downpour.ps.flat import flat_copy
from downpour.ps.locks import FileLock
from downpour.ps.rules import make_rule
from downpour.ps.shard import Shard
from downpour.ps.sharding import contiguous_bounds
from downpour.train import _log_records, _RunState


def workload() -> Config:
    """The default ``rica`` workload: 16x16 whitened patches, 256 features, batch 128, Adagrad."""
    config = Config()
    config.train.seconds = 0
    config.train.steps = 0
    config.data.examples = 20_000
    return config


def local_backend(config: Config, train: torch.Tensor, *, workers: int, seconds: float) -> list[float]:
    """Examples/s of the local backend (2 shards), its records drained and logged as ``downpour train`` does."""
    config.cluster.workers = workers
    config.cluster.threads_per_worker = 1
    initial = flat_copy(build_model(config.model, train.shape[1], seed=0))
    with tempfile.TemporaryDirectory() as tmp:
        cluster = LocalCluster(config, train.clone(), initial, worker_seeds=list(range(workers)), t0=time.time())
        metrics, state = rundir.MetricsLog(Path(tmp) / rundir.METRICS), _RunState()
        cluster.start()
        try:
            while not bool((cluster._progress[:, 0] > 0).all()) and cluster.alive():
                _log_records(cluster.poll()[0], metrics, state)
                time.sleep(0.01)
            deadline = time.perf_counter() + 0.5  # warm-up
            while time.perf_counter() < deadline:
                _log_records(cluster.poll()[0], metrics, state)
                time.sleep(0.05)
            rates = window_rates(
                cluster.examples_done, seconds, poll=lambda: _log_records(cluster.poll()[0], metrics, state)
            )
        finally:
            _log_records(cluster.stop()[0], metrics, state)
            cluster.close()
            metrics.close()
    return rates


def push_pull(num_params: int, shards: int, *, seconds: float) -> dict[str, float]:
    """GB/s of pushing an update into every shard and pulling the new values back, next to plain copies.

    The parameter server's round is what a worker does each step with ``n_fetch = n_push = 1``: per shard, one
    push-pull (lock, NaN/Inf check, SGD rule into the spare buffer, publish, copy the values out). The plain copies
    move the same bytes in the same transfers (per shard: the update in, the values out) with ``Tensor.copy_``;
    ``memcpy_one_call_gbps`` moves them in one call, the best case for a copy.
    """
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rule = make_rule("sgd", lr=1e-3)
        bounds = contiguous_bounds(num_params, shards)
        shard_list = [
            Shard(i, a, torch.zeros(b - a), rule, lock=FileLock(f"{tmp}/s{i}"), shared=True)
            for i, (a, b) in enumerate(bounds)
        ]
        local, update = torch.zeros(num_params), torch.randn(num_params) * 1e-3
        inbox = torch.zeros(num_params)
        big_src, big_dst = torch.randn(2 * num_params), torch.zeros(2 * num_params)
        bytes_per_round = 2 * num_params * 4
        versions = [0] * shards
        views = [(update[a:b], inbox[a:b], local[a:b]) for a, b in bounds]  # per shard: update, inbox, values

        def ps_round() -> None:
            for shard, (upd, _, values) in zip(shard_list, views, strict=True):
                versions[shard.index] = shard.push(upd, versions[shard.index], fetch_into=values).version

        def copy_round() -> None:
            for upd, box, values in views:
                box.copy_(upd)
                values.copy_(box)

        def one_copy() -> None:
            big_dst.copy_(big_src)

        return {
            "push_pull_gbps": _gbps(ps_round, bytes_per_round, seconds),
            "memcpy_gbps": _gbps(copy_round, bytes_per_round, seconds),
            "memcpy_one_call_gbps": _gbps(one_copy, bytes_per_round, seconds),
        }


def _gbps(fn: Any, nbytes: int, seconds: float, block: int = 20) -> float:
    """Bandwidth of the fastest block of ``block`` calls within ``seconds`` (timeit's rule: the minimum is the
    least disturbed by other load on a shared machine)."""
    for _ in range(50):
        fn()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        for _ in range(block):
            fn()
        best = min(best, time.perf_counter() - t)
    return block * nbytes / best / 1e9


def run(*, seconds: float = 3.0, repeats: int = 2) -> dict[str, Any]:
    """Measure everything in alternating rounds and return the medians and the ratios to the targets."""
    config = workload()
    dataset = load_dataset(config.data, seed=0)
    train = dataset.train
    num_params = flat_copy(build_model(config.model, dataset.dim, seed=0)).numel()
    keys = (
        "plain",
        "hogwild",
        "local1",
        "local2",
        "push_pull_gbps",
        "memcpy_gbps",
        "memcpy_one_call_gbps",
        "server_process_push_pull_gbps",
    )
    samples: dict[str, list[float]] = {k: [] for k in keys}
    threads_before = torch.get_num_threads()
    try:
        for _ in range(repeats):
            kwargs = {"batch_size": config.train.batch_size, "lr": config.ps.lr, "seconds": seconds}
            samples["plain"] += plain_loop(config.model, train, **kwargs)
            samples["hogwild"] += hogwild_pair(config.model, train.clone(), **kwargs)
            samples["local1"] += local_backend(workload(), train, workers=1, seconds=seconds)
            samples["local2"] += local_backend(workload(), train, workers=2, seconds=seconds)
            for key, value in push_pull(num_params, 2, seconds=min(seconds, 1.0)).items():
                samples[key].append(value)
            samples["server_process_push_pull_gbps"].append(
                server_process_push_pull_gbps(num_params, 2, seconds=min(seconds, 1.0))
            )
    finally:
        torch.set_num_threads(threads_before)
    med = {k: max(v) for k, v in samples.items()}  # the least disturbed window (timeit's rule)
    medians = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "workload": {
            "model": "rica",
            "patch": 16,
            "features": 256,
            "batch_size": config.train.batch_size,
            "rule": config.ps.rule,
            "shards": 2,
            "num_params": num_params,
            "threads_per_process": 1,
            "cpus": os.cpu_count(),
            "seconds": seconds,
            "repeats": repeats,
        },
        "plain_examples_per_s": med["plain"],
        "hogwild_2w_examples_per_s": med["hogwild"],
        "local_1w_examples_per_s": med["local1"],
        "local_2w_examples_per_s": med["local2"],
        "push_pull_gbps": med["push_pull_gbps"],
        "memcpy_gbps": med["memcpy_gbps"],
        "memcpy_one_call_gbps": med["memcpy_one_call_gbps"],
        "server_process_push_pull_gbps": med["server_process_push_pull_gbps"],
        "ratios": {
            "local_1w_vs_plain": med["local1"] / med["plain"],
            "local_2w_vs_plain": med["local2"] / med["plain"],
            "local_2w_vs_hogwild": med["local2"] / med["hogwild"],
            "hogwild_vs_plain": med["hogwild"] / med["plain"],
            "push_pull_vs_memcpy": med["push_pull_gbps"] / med["memcpy_gbps"],
            "push_pull_vs_memcpy_one_call": med["push_pull_gbps"] / med["memcpy_one_call_gbps"],
            "shared_memory_vs_server_process": med["push_pull_gbps"] / med["server_process_push_pull_gbps"],
        },
        "median_windows": medians,
        "samples": samples,
    }


def print_table(result: dict[str, Any], console: Console) -> None:
    """The benchmark as a table: rate, ratio to the plain loop, and the target."""
    plain = result["plain_examples_per_s"]
    table = Table(title="downpour bench ps — rica, 16x16 patches, 256 features, batch 128, 1 thread per process")
    for column in ("configuration", "examples/s", "× plain", "target"):
        table.add_column(column, justify="right" if column != "configuration" else "left")
    rows = [
        ("plain PyTorch loop (1 process)", result["plain_examples_per_s"], ""),
        ("Hogwild pair (2 processes, no locks)", result["hogwild_2w_examples_per_s"], ""),
        ("local backend, 1 worker, 2 shards", result["local_1w_examples_per_s"], "≥ 0.95× plain"),
        ("local backend, 2 workers, 2 shards", result["local_2w_examples_per_s"], "≥ 1.8× plain, ≥ Hogwild"),
    ]
    for name, rate, target in rows:
        table.add_row(name, f"{rate:,.0f}", f"{rate / plain:.2f}", target)
    console.print(table)
    ratio = result["ratios"]["push_pull_vs_memcpy"]
    console.print(
        f"push+pull through 2 shards {result['push_pull_gbps']:.2f} GB/s; plain copies of the same bytes in the "
        f"same transfers {result['memcpy_gbps']:.2f} GB/s: {ratio:.0%} (target ≥ 50%); in one call "
        f"{result['memcpy_one_call_gbps']:.2f} GB/s: {result['ratios']['push_pull_vs_memcpy_one_call']:.0%}"
    )
    console.print(
        f"shards in server processes over pipes (the design not taken): "
        f"{result['server_process_push_pull_gbps']:.2f} GB/s, "
        f"{result['ratios']['shared_memory_vs_server_process']:.1f}x slower than shared-memory shards"
    )
