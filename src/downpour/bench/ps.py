"""``downpour bench ps``: the parameter server's throughput next to a plain loop, a Hogwild pair and memcpy.

Every configuration starts once; then they take turns, each running alone for a short window while the others are
paused, for several rounds (see :mod:`downpour.bench.runners`). Rates are medians over windows; each ratio is the
median over rounds of the ratio within a round, so the slow drifts of a shared machine cancel. The transfer
micro-benchmarks report their fastest block (timeit's rule). Compare ratios, not absolute numbers across runs.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from downpour.bench.runners import LocalBackend, PlainLoops, Runner, alternate, close_all, start_all
from downpour.bench.transport import ServerProcesses, fastest_block_gbps
from downpour.config import Config
from downpour.data import load_dataset
from downpour.models import build_model
from downpour.ps.flat import flat_copy
from downpour.ps.locks import FileLock
from downpour.ps.rules import make_rule
from downpour.ps.shard import Shard
from downpour.ps.sharding import contiguous_bounds
from downpour.threads import torch_threads


def workload() -> Config:
    """The default ``rica`` workload: 16x16 whitened patches, 256 features, batch 128, Adagrad."""
    config = Config()
    config.train.seconds = 0
    config.train.steps = 0
    config.data.examples = 20_000
    return config


def push_pull(num_params: int, shards: int, *, seconds: float) -> dict[str, float]:
    """GB/s of pushing an update into every shard and pulling the new values back, next to plain copies.

    The parameter server's round is what a worker does each step with ``n_fetch = n_push = 1``: per shard, one
    push-pull (lock, NaN/Inf check, SGD rule into the spare buffer, publish, copy the values out). The plain copies
    move the same bytes in the same transfers (per shard: the update in, the values out) with ``Tensor.copy_``;
    ``memcpy_one_call_gbps`` moves them in one call, the best case for a copy.
    """
    with torch_threads(1), tempfile.TemporaryDirectory() as tmp:
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
            "push_pull_gbps": fastest_block_gbps(ps_round, bytes_per_round, seconds),
            "memcpy_gbps": fastest_block_gbps(copy_round, bytes_per_round, seconds),
            "memcpy_one_call_gbps": fastest_block_gbps(one_copy, bytes_per_round, seconds),
        }


def paired_median(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of the ratio within each round (neighbours in time); rounds whose denominator did no
    work are left out (NaN when none did)."""
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True) if b > 0]
    return statistics.median(ratios) if ratios else math.nan


def describe_workload(config: Config, num_params: int, *, seconds: float, rounds: int) -> dict[str, Any]:
    """What a ``bench ps`` run measured on (the ``workload`` entry of its JSON)."""
    return {
        "model": "rica",
        "patch": 16,
        "features": 256,
        "batch_size": config.train.batch_size,
        "rule": config.ps.rule,
        "shards": 2,
        "num_params": num_params,
        "threads_per_process": 1,
        "cpus": os.cpu_count(),
        "window_s": seconds,
        "rounds": rounds,
    }


def run(*, seconds: float = 0.5, rounds: int = 12) -> dict[str, Any]:
    """Start every configuration once, alternate ``rounds`` windows of ``seconds`` each, and report medians."""
    config = workload()
    dataset = load_dataset(config.data, seed=0)
    train = dataset.train
    num_params = flat_copy(build_model(config.model, dataset.dim, seed=0)).numel()
    runners: list[Runner] = []
    try:  # each runner joins the list as soon as it has started, so that an interrupted start stops it too
        runners.append(PlainLoops("plain", workload(), train.clone(), processes=1))
        runners.append(PlainLoops("hogwild", workload(), train.clone(), processes=2))
        runners.append(LocalBackend("local1", workload(), train, workers=1))
        runners.append(LocalBackend("local2", workload(), train, workers=2))
        start_all(runners)
        rates = alternate(runners, rounds=rounds, window=seconds)
    finally:
        close_all(runners)
    transfers: dict[str, list[float]] = {}
    with ServerProcesses(num_params, 2) as servers:
        for _ in range(min(3, rounds)):  # the fastest of up to three windows (a short run takes fewer)
            for key, value in push_pull(num_params, 2, seconds=min(0.5, seconds)).items():
                transfers.setdefault(key, []).append(value)
            transfers.setdefault("server_process_push_pull_gbps", []).append(servers.push_pull_gbps(min(0.5, seconds)))
    best = {k: max(v) for k, v in transfers.items()}  # timeit's rule for the micro-benchmarks: the fastest
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "workload": describe_workload(config, num_params, seconds=seconds, rounds=rounds),
        "plain_examples_per_s": med["plain"],
        "hogwild_2w_examples_per_s": med["hogwild"],
        "local_1w_examples_per_s": med["local1"],
        "local_2w_examples_per_s": med["local2"],
        **best,
        "ratios": {
            "local_1w_vs_plain": paired_median(rates["local1"], rates["plain"]),
            "local_2w_vs_plain": paired_median(rates["local2"], rates["plain"]),
            "local_2w_vs_hogwild": paired_median(rates["local2"], rates["hogwild"]),
            "hogwild_vs_plain": paired_median(rates["hogwild"], rates["plain"]),
            "push_pull_vs_memcpy": best["push_pull_gbps"] / best["memcpy_gbps"],
            "push_pull_vs_memcpy_one_call": best["push_pull_gbps"] / best["memcpy_one_call_gbps"],
            "shared_memory_vs_server_process": best["push_pull_gbps"] / best["server_process_push_pull_gbps"],
        },
        "windows": rates,
    }


def print_table(result: dict[str, Any], console: Console) -> None:
    """The benchmark as a table: rate, ratio to the plain loop, and the target."""
    ratios = result["ratios"]
    table = Table(title="downpour bench ps — rica, 16x16 patches, 256 features, batch 128, 1 thread per process")
    for column in ("configuration", "examples/s", "× plain", "target"):
        table.add_column(column, justify="right" if column != "configuration" else "left")
    rows = [
        ("plain PyTorch loop (1 process)", result["plain_examples_per_s"], 1.0, ""),
        ("Hogwild pair (2 processes, no locks)", result["hogwild_2w_examples_per_s"], ratios["hogwild_vs_plain"], ""),
        ("local backend, 1 worker, 2 shards", result["local_1w_examples_per_s"], ratios["local_1w_vs_plain"],
         "≥ 0.95× plain"),
        ("local backend, 2 workers, 2 shards", result["local_2w_examples_per_s"], ratios["local_2w_vs_plain"],
         f"≥ 1.8× plain, ≥ Hogwild (is {ratios['local_2w_vs_hogwild']:.2f}×)"),
    ]  # fmt: skip
    for name, rate, ratio, target in rows:
        table.add_row(name, f"{rate:,.0f}", f"{ratio:.2f}", target)
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
