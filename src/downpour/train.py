"""The training driver: build data, model and cluster; run a session (its watch loop, logging and checkpoints in
:mod:`downpour.watch`; a resume's checks in :mod:`downpour.resume`); write the summary.

Backend-agnostic: it talks to a cluster object (``start``, ``poll``, ``stop``, ``snapshots`` ...) and never to a
shard or worker directly, so every backend gets the same run directory, progress bar and checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from downpour import checkpoint as ckpt
from downpour import config as config_mod
from downpour import rundir
from downpour.backends import require_ray
from downpour.backends.local import LocalCluster, check_local_workers
from downpour.backends.processes import worker_context
from downpour.config import Config
from downpour.console import say, warn
from downpour.data import (
    Dataset,
    as_recorded,
    capped_batch_warning,
    data_warnings,
    load_dataset,
    worker_slice,
)
from downpour.data.own import READER_VERSION
from downpour.errors import CheckpointError, ConfigError, DownpourError, human_size
from downpour.held_out import HeldOutLoss, warn_if_every_field_is_flat
from downpour.models import build_model, size_settings
from downpour.ps.flat import flat_copy
from downpour.ps.sharding import contiguous_bounds
from downpour.report.filters import save_filter_grid
from downpour.report.gabor_fit import gabor_fraction
from downpour.report.html import write_report_after_training
from downpour.report.tensorboard import open_metrics_log, require_tensorboard
from downpour.resume import (
    FAULT_COUNTERS,
    RunState,
    changes_from,
    claimed_run_dir,
    has_checkpoint,
    load_previous,
    model_signature,
    prepare_run_dir,
    sessions_logged,
    stopped_before_checkpoint,
)
from downpour.signals import as_interrupt, routed
from downpour.threads import torch_threads
from downpour.watch import Taken, WorkWindow, checkpoint_now, log_events, log_push_records, watch


class TrainingDiverged(DownpourError):
    """A session ended with a non-finite held-out loss or parameters (the summary says which checkpoint was kept)."""


def _worker_seeds(seed: int, session: int, workers: int) -> list[int]:
    children = np.random.SeedSequence([seed, session]).spawn(workers)
    return [int(child.generate_state(1)[0]) for child in children]


def _keeps_previous_config(run_state: RunState, diverged: bool, *, resume: bool) -> bool:
    """Whether a session leaves the run as the previous one left it: it diverged, and the checkpoint kept holds
    the values it resumed from (``run_state.steps``: the step it resumed at), which the run's earlier
    ``config.toml`` trained; ``run_training`` then writes that back, so that a plain ``--resume`` goes on from there.
    """
    return resume and diverged and run_state.checkpoint_step == run_state.steps


def _divergence(taken: Taken, run_state: RunState, config: Config, *, resume: bool) -> str:
    """The one line that says a session diverged and what became of its checkpoint."""
    if taken.saved:
        kept = SAVED_FIRST_CHECKPOINT
    elif _keeps_previous_config(run_state, taken.diverged, resume=resume):
        kept = f"kept the checkpoint of step {run_state.checkpoint_step} and the config.toml it was trained with"
    else:
        kept = f"kept the checkpoint of step {run_state.checkpoint_step}"
    return divergence_line(taken.loss, taken.values_finite, taken.step, kept, config.ps.lr)


SAVED_FIRST_CHECKPOINT = "saved its checkpoint (there was no earlier one to keep; it cannot be resumed)"


def divergence_line(loss: float, values_finite: bool, step: int, kept: str, lr: float) -> str:
    """``training diverged: <what> at step <step>; <kept>; lower ps.lr``: what every backend ends a diverged
    session with (``kept``: what became of its checkpoint)."""
    what = f"held-out loss {loss:.4g}" if values_finite else "parameters hold NaN or Inf"
    return f"training diverged: {what} at step {step}; {kept}; lower ps.lr (now {lr:g})"


def _build_cluster(config: Config, dataset: Dataset, initial: torch.Tensor, seeds: list[int], t0: float) -> Any:
    """The cluster of ``cluster.backend``: :class:`LocalCluster`, or the Ray backend's ``RayCluster`` (Ray is
    imported only then); both offer the driver the same methods."""
    if config.cluster.backend == "ray":
        from downpour.backends.ray import RayCluster

        return RayCluster(config, dataset.train.clone(), initial, worker_seeds=seeds, t0=t0, shape=dataset.shape)
    return LocalCluster(config, dataset.train.clone(), initial, worker_seeds=seeds, t0=t0, shape=dataset.shape)


def _build_model(config: Config, dataset: Dataset, out: Path, *, resume: bool) -> torch.nn.Module:
    """The run's model. Resuming with a model or data setting the run was not trained with, whose network cannot
    be built (``--set model.name=cat`` on a rica run of 16x16 patches), is refused for the change, as a network
    that builds is by the checkpoint's checks, not for the new design's sizes."""
    try:
        return build_model(config.model, dataset.dim, seed=config.train.seed, shape=dataset.shape)
    except ConfigError:
        saved = config_mod.read_toml(out / rundir.CONFIG) if resume and has_checkpoint(out) else None
        changed = config_mod.trained_differently(saved, config) if saved is not None else []
        if changed:
            raise CheckpointError(f"checkpoint {out / rundir.CHECKPOINT} does not match this config: "
                                  + "; ".join(changed)) from None  # fmt: skip
        raise


def _responses_per_example(model: torch.nn.Module, input_dim: int) -> int:
    """The values of the model's output for one example, from a forward pass on the meta device (shapes only:
    nothing is computed or allocated, and the model is left as it was); 0 where a design cannot run there (the
    cat network's skip of faint fields reads values)."""
    meta = {name: torch.empty_like(value, device="meta") for name, value in model.state_dict(keep_vars=True).items()}
    try:
        with torch.no_grad():
            out = torch.func.functional_call(model, meta, (torch.empty(1, input_dim, device="meta"),))
    except (RuntimeError, NotImplementedError, ValueError, TypeError):
        return 0
    return out[0].numel()


def check_worker_memory(config: Config, model: torch.nn.Module, dataset: Dataset, params: int) -> None:
    """Refuse a local-backend run whose workers certainly cannot fit in this machine's available memory, before any
    starts: a :class:`ConfigError` naming the need, the memory and the settings to lower. ``params``: the model's
    parameter count (:func:`model_signature`'s ``num_params``).

    What is counted is a floor, not an estimate: the shards' copy of the parameters, then per worker its model and
    gradient (2 copies of the parameters) and one batch's examples and the model's responses to them, all float32.
    A worker needs more (torch itself, about 150 MB, saved activations, the accumulated update, the allocator's
    slack: 2.4 GB was seen at 250,000 RICA features on 16x16 patches, batch 128, against a floor of 0.6 GB; 0.4 GB
    of private memory at 32,768 features against 0.08 GB), in amounts that depend on the design, its kernels and
    the allocator; refusing on an estimate of those would refuse runs that fit. So only a run that cannot
    fit is refused; what is between the floor and the need shows as an out-of-memory error or a worker's death."""
    from downpour.backends.local import available_memory

    workers = config.cluster.workers
    batch = min(config.train.batch_size, len(dataset.train) // workers)  # a worker's batches hold its share at most
    per_batch = 4 * batch * (dataset.dim + _responses_per_example(model, dataset.dim))
    per_worker = 4 * 2 * params + per_batch
    needed, available = 4 * params + workers * per_worker, available_memory()
    if needed <= available:
        return
    size = size_settings(config.model.name)
    raise ConfigError(
        f"the model's {params:,} parameters with train.batch_size = {config.train.batch_size:,} and cluster.workers = "
        f"{workers} need at least {human_size(needed)} ({human_size(per_worker)} a worker: its copy of the parameters "
        f"and their gradient, and one batch's examples and the model's responses, {human_size(per_batch)}); "
        f"{human_size(available)} is available here: lower {size}, train.batch_size or cluster.workers"
    )


def run_training(
    config: Config, out: Path | str, *, resume: bool = False, console: Console | None = None,
    show_progress: bool = True, dataset: Dataset | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Train ``config`` into the run directory ``out`` (a path or a string; continuing it when ``resume``); return
    the summary.

    ``dataset``: what ``load_dataset(config.data, seed=config.train.seed)`` returns, when the caller already has it
    (a study running many short runs on one data set).
    """
    out = Path(out)
    console = console or Console(stderr=True)
    if config.train.tensorboard:
        require_tensorboard()  # before anything is written into the run directory
    if config.cluster.backend == "ray":
        require_ray()  # likewise
    if config.cluster.backend == "sim":
        from downpour.train_sim import run_sim_training

        return run_sim_training(config, out, resume=resume, console=console, show_progress=show_progress)
    prepare_run_dir(out, resume=resume)
    if config.cluster.backend == "local":  # Ray places its worker actors on the cluster's machines
        check_local_workers(config.cluster.workers)
        worker_context()  # the fork server (where there is one) imports torch while the data loads
    with claimed_run_dir(out, resume=resume):
        if dataset is None:
            dataset = load_dataset(config.data, seed=config.train.seed)
        for note in data_warnings(dataset):
            warn(console, note)
        worker_slice(dataset.train.shape[0], config.cluster.workers, 0)  # more workers than examples fails here
        if (note := capped_batch_warning(len(dataset.train), config.cluster.workers,
                                         config.train.batch_size)) is not None:  # fmt: skip
            warn(console, note)
        model = _build_model(config, dataset, out, resume=resume)
        signature = model_signature(model)
        contiguous_bounds(signature["num_params"], config.ps.shards)  # more shards than parameters fails here
        if config.cluster.backend == "local":
            check_worker_memory(config, model, dataset, signature["num_params"])
        held_out_loss = HeldOutLoss(config, dataset, model)  # one copy: the session starts from flat_copy(model)
        checkpoint = None
        run_state = RunState()
        previous_config = None
        if resume and stopped_before_checkpoint(out, console):
            resume = False  # as a new run would, in the same directory (its earlier rows moved to aborted/)
        if resume:  # every check that can refuse the checkpoint runs here, before anything is written
            checkpoint, run_state = load_previous(out, config, signature, dataset)
            # a session that saved no checkpoint (killed before its first, or diverged) still had its number: the
            # next one takes a new one, and with it other worker seeds
            run_state.session = max(run_state.session, sessions_logged(out))
            if run_state.missed_pushes:
                say(console, f"counted {run_state.missed_pushes:,} pushes the checkpoint holds in its staleness "
                             "histogram: their rows came after it, and no later checkpoint of its session was kept "
                             "(killed, or diverged)")  # fmt: skip
            if 0 < config.train.steps <= run_state.steps:
                raise DownpourError(
                    f"run {out} is already at step {run_state.steps:,}, and train.steps = "
                    f"{config.train.steps:,}: nothing to train (raise --steps, or 0 for no limit)"
                )
            previous_config = (out / rundir.CONFIG).read_text()
        # config.toml records the real held-out count (after the checks against the checkpoint's config: one saved
        # before it was recorded says 1024 where the cap held out fewer, and resumes on the same examples)
        config = dataclasses.replace(config, data=as_recorded(config.data, dataset))
        run_state.data_counts = {"train": len(dataset.train), "held_out": len(dataset.held_out)}
        if dataset.read_report and dataset.read_report.get("digest"):
            run_state.data_counts["pictures_digest"] = dataset.read_report["digest"]
            run_state.data_counts["pictures_reader"] = READER_VERSION
        config_mod.write(config, out / rundir.CONFIG)
        if dataset.whitening is not None:
            rundir.save_tensors(dataset.whitening_tensors(), out / rundir.WHITENING)
        resumed_from = run_state.checkpoint_step
        try:
            with contextlib.ExitStack() as winding_down:  # signals ignored from the workers' stop to the report
                summary = _train_session(config, out, dataset, model, signature, held_out_loss, checkpoint, run_state,
                                         winding_down, resume=resume, console=console,
                                         show_progress=show_progress)  # fmt: skip
        except BaseException:  # e.g. a Ray cluster that cannot be reached, Ctrl-C while it starts
            if previous_config is not None and run_state.checkpoint_step == resumed_from:  # no checkpoint of its
                rundir.atomic_write_text(out / rundir.CONFIG, previous_config)  # own: the run is as it was left
            raise
        if previous_config is not None and _keeps_previous_config(run_state, summary["diverged"], resume=resume):
            rundir.atomic_write_text(out / rundir.CONFIG, previous_config)  # a plain --resume goes on from there
        return summary


def _driver_threads(config: Config) -> int:
    """The driver's intra-op threads while its workers run: one on the local backend, whose workers use the
    machine's cores (on cores it shares, a parallel held-out loss waits at OpenMP barriers for descheduled threads:
    60-120 ms instead of 5-13 ms for the default RICA); on Ray, whose driver may have a machine to itself, as many
    as it had."""
    return 1 if config.cluster.backend == "local" else torch.get_num_threads()


def _train_session(config: Config, out: Path, dataset: Dataset, model: torch.nn.Module, signature: dict[str, Any],
                   held_out_loss: HeldOutLoss, checkpoint: ckpt.Checkpoint | None, run_state: RunState,
                   winding_down: contextlib.ExitStack, *, resume: bool, console: Console,
                   show_progress: bool) -> dict[str, Any]:  # fmt: skip
    """One session: train until the budget, Ctrl-C or the workers' deaths, checkpoint, and write the summary and
    report. From the workers' stop on, Ctrl-C and SIGTERM are ignored until ``winding_down`` (the caller's) closes:
    a second Ctrl-C must lose neither the final checkpoint nor the summary and report."""
    seeds = _worker_seeds(config.train.seed, run_state.session, config.cluster.workers)
    run_state.lost_before = run_state.lost_updates
    run_state.restores_before = run_state.shard_restores
    run_state.deaths_before = run_state.worker_deaths
    t0 = time.time()
    initial = flat_copy(model)
    if checkpoint is None:
        run_state.initial_loss = held_out_loss(initial)
    elif config.model.skip_variance > 0:
        held_out_loss(initial)  # for its skip statistics only: a field flat at τ is flat whatever the parameters
    warn_if_every_field_is_flat(held_out_loss, config, console)
    metrics = open_metrics_log(out, tensorboard=config.train.tensorboard)
    interrupted = starved = False
    window = WorkWindow(time.time(), None, 0)
    session_examples_start = run_state.examples
    session_steps_start = run_state.steps
    cluster = _build_cluster(config, dataset, initial, seeds, t0)
    try:
        if checkpoint is not None:
            for shard, snap in zip(cluster.shards, checkpoint.shard_snapshots(), strict=True):
                missing = set(shard.rule.state_names) - set(snap["state"])
                if missing or snap["values"].shape != (shard.size,):
                    raise CheckpointError(f"corrupt checkpoint in {out}: shard {shard.index} lacks {sorted(missing)}")
                shard.restore(snap)
            cluster.budget.set(run_state.steps)
        changed = changes_from(checkpoint.state.get("config"), config) if checkpoint is not None else {}
        if changed:  # said, not only recorded: a change the user did not mean shows before it trains
            say(console, "resumed with " + "; ".join(f"{key} {before!r} -> {after!r}"
                                                     for key, (before, after) in changed.items()))  # fmt: skip
        start_row = {"session": run_state.session, "resume": resume, "step": run_state.steps,
                     "workers": config.cluster.workers, "shards": config.ps.shards,
                     "initial_loss": run_state.initial_loss, **({"changed": changed} if changed else {})}  # fmt: skip
        with routed(as_interrupt), torch_threads(_driver_threads(config)):  # the driver beside its running workers
            try:
                cluster.start()
                metrics.write("start", t=time.time() - t0, **start_row, pids=cluster.pids())
                metrics.flush()  # the session's number and initial loss survive a kill (sessions_logged counts them)
                start_row = {}
                interrupted, window, starved = watch(
                    cluster, config, out, metrics, run_state, seeds, signature, console, show_progress, t0,
                    held_out_loss=held_out_loss,
                )  # fmt: skip
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM before the watch loop took over
                interrupted = True
                if start_row:  # while the workers started: the session still has its start row (and the report
                    metrics.write("start", t=time.time() - t0, **start_row)  # the run's initial loss)
        winding_down.enter_context(routed(signal.SIG_IGN))  # shutting down
        records, last_events = cluster.stop()
        stopped = time.time()  # the workers finished their last steps by now
        log_push_records(records, metrics, run_state)
        log_events(last_events, metrics, run_state, console, t0, config.cluster.workers)
        cluster_examples = cluster.examples_done()
        run_state.examples = session_examples_start + cluster_examples
        taken = checkpoint_now(out, cluster, config, run_state, seeds, signature, held_out_loss, final=True)
        snapshots, final_loss, steps = taken.snapshots, taken.loss, taken.step
        metrics.write("end", t=time.time() - t0, step=steps, final_loss=final_loss, interrupted=interrupted,
                      diverged=taken.diverged, checkpoint_step=run_state.checkpoint_step)  # fmt: skip
        if starved:
            _warn_starved(console, config.train.seconds, steps - session_steps_start)
    finally:
        cluster.close()
        metrics.close()

    if taken.diverged and not taken.saved:  # the picture and Gabor fit of the checkpoint kept, not of the thrown away
        kept = ckpt.load(out / rundir.CHECKPOINT).shard_snapshots()
        held_out_loss.flat.values.copy_(torch.cat([snapshot["values"] for snapshot in kept]))
    final_model = held_out_loss.model  # holds the final parameters since final_loss was measured (or the kept ones)
    filter_shape = getattr(final_model, "filter_shape", dataset.shape)
    save_filter_grid(final_model.filters(), filter_shape, out / rundir.FILTERS)
    gabor_fit = gabor_fraction(final_model.filters(), filter_shape)  # first-layer filters with Gabor R² > 0.8

    summary = {
        "run_dir": str(out),
        "model": config.model.name,
        "data": config.data.source,
        "backend": config.cluster.backend,
        "policy": config.ps.policy,
        "workers": config.cluster.workers,
        "shards": config.ps.shards,
        "num_params": signature["num_params"],
        "examples_per_s": window.rate(cluster_examples, stopped),
        "initial_loss": run_state.initial_loss,
        "final_loss": final_loss,
        "gabor_fit": gabor_fit,
        **({"skip_variance": held_out_loss.skip} if held_out_loss.skip is not None else {}),
        "steps": steps,
        "examples": run_state.examples,
        "seconds": run_state.elapsed_s,
        "updates_applied": sum(s.get("applied", s["version"]) for s in snapshots),  # sync: pushes, not rounds
        "updates_rejected": sum(s["rejected"] for s in snapshots),
        "updates_dropped": sum(s.get("dropped", 0) for s in snapshots),  # late pushes (sync with backup workers)
        "staleness": run_state.staleness.summary(),
        "worker_deaths": run_state.worker_deaths,
        "session_worker_deaths": run_state.worker_deaths - run_state.deaths_before,  # this session's alone
        **{key: getattr(run_state, key) for key in FAULT_COUNTERS},
        "interrupted": interrupted,
        "diverged": taken.diverged,
        "checkpoint_step": run_state.checkpoint_step,  # the step of the checkpoint in the run directory
        **({"divergence": _divergence(taken, run_state, config, resume=resume)} if taken.diverged else {}),
        "sessions": run_state.session + 1,
        **({"data_files": dataset.read_report} if dataset.read_report else {}),
    }
    rundir.write_json(out / rundir.SUMMARY, summary)
    write_report_after_training(out, lambda text: warn(console, text))
    warn_if_training_failed(console, summary, config)
    return summary


LOSS_GREW = 10.0  # a final held-out loss this many times the initial one: training blew up without NaN


def warn_if_training_failed(console: Console, summary: dict[str, Any], config: Config) -> None:
    """In a run not reported as diverged (that one's own line says so), warn when more than 1% of the updates were
    rejected (NaN or Inf), or when the held-out loss ended over :data:`LOSS_GREW` times where it began (Adagrad at
    a fixed rate with 1,000 simulated workers: 67 -> 6.7e8, all finite)."""
    if summary["diverged"]:
        return
    attempted = summary["updates_applied"] + summary["updates_rejected"]
    if summary["updates_rejected"] > 0.01 * attempted:
        warn(console, f"{summary['updates_rejected']:,} of {attempted:,} updates were rejected (NaN or Inf); "
                      f"training diverged: lower ps.lr (now {config.ps.lr})")  # fmt: skip
    initial, final = summary["initial_loss"], summary["final_loss"]
    if math.isfinite(initial) and math.isfinite(final) and initial > 0 and final > LOSS_GREW * initial:
        warn(console, f"the held-out loss grew from {initial:.4g} to {final:.4g}: training diverged (without "
                      f"NaN); lower ps.lr (now {config.ps.lr}), or with many workers try "
                      "ps.policy = 'staleness-lr'")  # fmt: skip


def _warn_starved(console: Console, seconds: float, trained: int) -> None:
    """Say that ``train.seconds`` ran out before any worker finished a step, and what the session trained: nothing,
    or only the mini-batches in flight, which the workers finish and push when they are stopped."""
    what = "nothing" if trained <= 0 else f"only the {trained} step{'s' if trained > 1 else ''} in flight"
    warn(console, f"train.seconds = {seconds:g} ran out before any worker finished a step (their start-up and first "
                  f"mini-batch took longer): this session trained {what}; raise --seconds")  # fmt: skip


def headline(summary: dict[str, Any]) -> str:
    """The one line ``downpour train`` ends with (a diverged session ends with its ``divergence`` line instead:
    see :func:`raise_if_diverged`)."""
    stale = summary["staleness"]
    skip = summary.get("skip_variance")
    return (
        f"run {summary['run_dir']}: {summary['examples_per_s']:,.0f} examples/s, "
        f"held-out loss {summary['initial_loss']:.4g} -> {summary['final_loss']:.4g}, "
        f"staleness mean {stale['mean']:.2f} p99 {stale['p99']}, "
        f"{summary['updates_applied']:,} updates applied, {summary['updates_rejected']:,} rejected"
        + (
            f", flat fields zeroed {skip['zeroed_fraction']:.1%} (not computed {skip['skipped_fraction']:.1%})"
            if skip
            else ""
        )
    )


def raise_if_diverged(summary: dict[str, Any]) -> None:
    """:class:`TrainingDiverged` with the summary's one line when the session diverged (its summary and metrics are
    written by then): the CLI prints it and exits with status 2, as for other input it refuses (a learning rate
    too high). Studies that run many sessions read ``summary["diverged"]`` instead."""
    if summary.get("diverged"):
        raise TrainingDiverged(summary["divergence"])


def summary_json(summary: dict[str, Any]) -> str:
    """The summary as standard JSON text (NaN and Inf as null, as in ``summary.json``)."""
    return rundir.json_text(summary)
