"""The staleness study on the local backend (``downpour study staleness --backend local``): every run of the grid is
a real ``downpour train`` session (:func:`~downpour.train.run_training`) with worker processes and shared-memory
shards, instead of a simulation.

Each run gets the same gradient budget as in the simulator (``steps // τ`` exchanges under easgd, whole rounds
under sync), its own run directory under ``OUT/runs/`` (config, metrics, checkpoint, summary), and
``train.eval_every`` (default :data:`EVAL_SECONDS` s) so that the held-out loss is measured during the run. Its
record has the fields of a simulated one, with ``sim_time`` holding *wall-clock* seconds from its first push (worker
start-up excluded). Runs share one data set
(built from ``train.seed``); seed index ``i`` sets ``train.seed + i`` (the model's initialisation and the workers'
mini-batches). Real processes on a shared machine are not deterministic: the same call gives similar, not
identical, results.

A worker count this machine cannot run as processes is refused before the first run
(:func:`~downpour.backends.local.check_local_workers`: each worker is a process with its own torch, about 250 MB).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from downpour import config as config_mod
from downpour import rundir
from downpour.backends.local import check_local_workers
from downpour.config import Config
from downpour.errors import ConfigError
from downpour.ps.staleness import StalenessHistogram
from downpour.study.staleness import run_record

EVAL_SECONDS = 0.25  # seconds between held-out evaluations when the config does not set train.eval_every

_POLICY_PARAMETER = {"ssp": ("staleness_bound", int), "sync": ("backup_workers", int),
                     "dc-asgd": ("dc_lambda", float), "easgd": ("easgd_tau", int)}  # fmt: skip


def run_config(config: Config, name: str, workers: int, seed_index: int, pushes: int) -> Config:
    """The training config of one run: the study's config on the local backend with ``workers`` workers, the
    policy ``name`` (its parameter after ``:`` set as its ``ps.*`` key), ``pushes`` pushes, seed ``+ seed_index``."""
    base, _, arg = name.partition(":")
    ps = {"policy": base}
    if arg:
        key, kind = _POLICY_PARAMETER[base]
        ps[key] = kind(arg)
    train = {"steps": pushes, "seconds": 0.0, "seed": config.train.seed + seed_index,
             "eval_every": config.train.eval_every or EVAL_SECONDS, "checkpoint_every": 1e9}  # fmt: skip
    run = dataclasses.replace(
        config,
        ps=dataclasses.replace(config.ps, **ps),
        train=dataclasses.replace(config.train, **train),
        # the study's small products: one thread per worker is fastest, and the same for every worker count
        cluster=dataclasses.replace(
            config.cluster, backend="local", workers=workers, threads_per_worker=config.cluster.threads_per_worker or 1
        ),
    )
    config_mod.validate(run)
    return run


def check_grid(workers: list[int]) -> None:
    """Refuse, before any run, a worker count that the machine cannot run as processes."""
    try:
        check_local_workers(max(workers))
    except ConfigError as exc:
        raise ConfigError(f"invalid --workers: {max(workers)} with --backend local: {exc}") from None


def local_run(config: Config, dataset: Any, name: str, workers: int, seed_index: int, pushes: int,
              out: Path) -> dict[str, Any]:  # fmt: skip
    """Train one (policy, workers, seed) with real worker processes into ``out/runs/``; return its record (the
    fields of a simulated run's record; ``sim_time``: wall seconds)."""
    from downpour.train import run_training

    run = run_config(config, name, workers, seed_index, pushes)
    run_dir = rundir.fresh_path(Path(out) / "runs" / f"{name.replace(':', '_')}-w{workers}-s{seed_index}")
    quiet = Console(stderr=True, quiet=True)
    summary = run_training(run, run_dir, console=quiet, show_progress=False, dataset=dataset)
    if summary["interrupted"]:  # Ctrl-C: the run is saved, cut short; the study stops (and keeps what finished)
        raise KeyboardInterrupt
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    pushes_seen = [row for row in rows if row["event"] == "push" and row["shard"] == 0]  # one row per push
    # time 0 = the first push: worker start-up (seconds of importing torch on a busy machine) is not training
    first_t = next((row["t"] for row in rows if row["event"] == "start"), 0.0)
    start = min((row["t"] for row in pushes_seen), default=first_t)
    applied = [row for row in pushes_seen if row["applied"]]
    histogram = StalenessHistogram()
    histogram.add(np.asarray([row["staleness"] for row in applied], dtype=np.int64))
    batch = run.train.batch_size
    initial, final = summary["initial_loss"], summary["final_loss"]
    curve: dict[str, list] = {"pushes": [0], "grads": [0], "time": [0.0], "loss": [initial]}
    for row in rows:
        if row["event"] == "eval":
            for key, value in (("pushes", row["step"]), ("grads", row["examples"] // batch),
                               ("time", max(0.0, row["t"] - start)), ("loss", row["held_out_loss"])):  # fmt: skip
                curve[key].append(value)
    end = max((row["t"] for row in pushes_seen), default=start)  # the last push
    for key, value in (("pushes", summary["steps"]), ("grads", summary["examples"] // batch),
                       ("time", max(0.0, end - start)), ("loss", final)):  # fmt: skip
        curve[key].append(value)
    record = run_record(policy=name, workers=workers, seed_index=seed_index, seed=run.train.seed,
                        pushes=len(pushes_seen), grad_evals=summary["examples"] // batch, applied=len(applied),
                        rejected=summary["updates_rejected"], dropped=summary["updates_dropped"],
                        time=max(0.0, end - start), initial_loss=initial, final_loss=final, histogram=histogram,
                        curve=curve)  # fmt: skip
    return {**record, "run_dir": str(run_dir), "examples_per_s": summary["examples_per_s"]}
