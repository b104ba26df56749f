"""``downpour train`` with ``cluster.backend = "sim"``: the run goes through the discrete-event simulator
(:mod:`downpour.backends.sim`) instead of worker processes.

Same run directory as the local backend (``config.toml``, ``metrics.jsonl``, ``summary.json``, ``checkpoint/``,
``filters.png``): one ``push`` row per simulated push (its simulated time, worker, version, staleness), an
``eval`` row with the held-out loss about 50 times per run (every ``train.steps`` / 50 pushes and every
``train.seconds`` / 50 simulated seconds), and the final parameters as a checkpoint that the
evaluation tools read like any other. ``train.steps`` counts pushes; ``train.seconds`` is *simulated* time.
A simulated run is deterministic and quick, so it is not resumed: rerun it (same seed, same result). One killed
before it wrote its checkpoint is simulated again from the start by ``--resume``, in its own directory.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from downpour import checkpoint as ckpt
from downpour import config as config_mod
from downpour import rundir
from downpour.backends.sim import ModelGradient, SimSettings, parameter_copies, simulate
from downpour.config import Config
from downpour.console import say, warn
from downpour.data import as_recorded, data_warnings, load_dataset, worker_slice
from downpour.errors import ConfigError, DownpourError, human_size
from downpour.held_out import HeldOutLoss, warn_if_every_field_is_flat
from downpour.models import build_model, size_settings
from downpour.ps.flat import flat_copy
from downpour.ps.policies import Policy, config_policy
from downpour.ps.rules import make_rule
from downpour.report.filters import save_filter_grid
from downpour.report.gabor_fit import gabor_fraction
from downpour.report.html import write_report_after_training
from downpour.report.tensorboard import open_metrics_log
from downpour.resume import claimed_run_dir, has_checkpoint, model_signature, prepare_run_dir, stopped_before_checkpoint
from downpour.signals import StopRequest, routed
from downpour.threads import torch_threads

EVALUATIONS = 50  # held-out evaluations per run


def sim_settings(config: Config) -> SimSettings:
    """The simulated cluster of ``config``."""
    c, t = config.cluster, config.train
    settings = SimSettings(
        workers=c.workers, steps=t.steps, seconds=t.seconds, compute_mean=c.sim_compute_mean,
        compute_sigma=c.sim_compute_sigma, stragglers=c.sim_stragglers, straggler_slowdown=c.sim_straggler_slowdown,
        network_mean=c.sim_network_mean, network_sigma=c.sim_network_sigma, seed=t.seed,
    )  # fmt: skip
    settings.validate()
    return settings


def check_sim_memory(config: Config, settings: SimSettings, policy: Policy, num_params: int) -> None:
    """Refuse, before simulating, a run whose copies of the parameters (:func:`parameter_copies`: one per version in
    flight, so growing with ``cluster.workers`` × the model's size) cannot fit in this machine's available memory.
    Unchecked, a 2,000-worker run of 2,048 RICA features was killed by the kernel partway (or, under a memory limit,
    failed to allocate after 1,260 pushes), leaving no summary and naming neither the workers nor the model."""
    from downpour.backends.local import available_memory

    copies = parameter_copies(policy, settings)
    needed, available = copies * 4 * num_params, available_memory()
    if needed <= available:
        return
    size = size_settings(config.model.name)
    raise ConfigError(
        f"cluster.workers = {settings.workers:,} simulated workers under ps.policy = {config.ps.policy!r} hold up to "
        f"{copies:,} copies of the model's {num_params:,} parameters (one per version in flight), "
        f"{human_size(needed)}; {human_size(available)} is available here: lower cluster.workers or {size}"
    )


def run_sim_training(config: Config, out: Path, *, resume: bool, console: Console,
                     show_progress: bool) -> dict[str, Any]:  # fmt: skip
    """Simulate ``config``'s run into the run directory ``out``; return the summary."""
    deterministic = f"cannot resume {out}: simulated runs are deterministic; rerun with a new --out"
    if resume and has_checkpoint(out):
        backend = ckpt.saved_backend(out / rundir.CHECKPOINT)
        if backend not in (None, "sim"):
            raise DownpourError(f"cannot resume {out} on the simulator (cluster.backend = 'sim'): it was trained on "
                                f"the {backend} backend; resume it with --backend {backend}, or simulate into a new "
                                "--out")  # fmt: skip
        raise DownpourError(deterministic)
    prepare_run_dir(out, resume=resume)
    settings = sim_settings(config)
    with claimed_run_dir(out, resume=resume):
        # a checkpoint that appeared before the claim is refused as any other
        if resume and not stopped_before_checkpoint(out, console, resumable=False):
            raise DownpourError(deterministic)
        dataset = load_dataset(config.data, seed=config.train.seed)
        config = dataclasses.replace(config, data=as_recorded(config.data, dataset))  # config.toml: the real held_out
        for note in data_warnings(dataset):
            warn(console, note)
        worker_slice(dataset.train.shape[0], config.cluster.workers, 0)  # more workers than examples fails here
        model = build_model(config.model, dataset.dim, seed=config.train.seed, shape=dataset.shape)
        signature = model_signature(model)
        held_out_loss = HeldOutLoss(config, dataset)
        rule = make_rule(config.ps.rule, lr=config.ps.lr, adagrad_eps=config.ps.adagrad_eps)
        policy = config_policy(config)
        check_sim_memory(config, settings, policy, signature["num_params"])
        # Small products: one thread is fastest.
        with torch_threads(config.cluster.threads_per_worker or 1):
            config_mod.write(config, out / rundir.CONFIG)
            if dataset.whitening is not None:
                rundir.save_tensors(dataset.whitening_tensors(), out / rundir.WHITENING)
            stop = StopRequest()  # from here Ctrl-C or SIGTERM ends the simulation after the push in progress
            with routed(stop):  # and what was simulated is written out like a finished run's
                return _simulate_run(config, out, settings, model, signature, held_out_loss, rule, policy, dataset,
                                     stop, console=console, show_progress=show_progress)  # fmt: skip


def _simulate_run(config: Config, out: Path, settings: SimSettings, model: torch.nn.Module,
                  signature: dict[str, Any], held_out_loss: Any, rule: Any, policy: Any, dataset: Any,
                  stop: StopRequest, *, console: Console, show_progress: bool) -> dict[str, Any]:  # fmt: skip
    from downpour.report.live import SimulatedProgress
    from downpour.train import SAVED_FIRST_CHECKPOINT, divergence_line, warn_if_training_failed

    t0 = time.time()
    initial = flat_copy(model)
    initial_loss = held_out_loss(initial)
    warn_if_every_field_is_flat(held_out_loss, config, console)
    metrics = open_metrics_log(out, tensorboard=config.train.tensorboard)
    grad = ModelGradient(model, dataset.train, batch_size=config.train.batch_size, workers=settings.workers)
    # every steps / 50 pushes and every seconds / 50 simulated seconds: about 50 evaluations over whichever budget
    # ends the run (up to 100 when both end it together). A seconds-only run evaluated every 20 × workers pushes:
    # once in 20 simulated seconds at 200 workers, never in 10 at 1,000, its progress bar standing still till the end.
    every = max(1, settings.steps // EVALUATIONS) if settings.steps else 0
    tick = settings.seconds / EVALUATIONS
    due = [every or math.inf, tick or math.inf]  # the next push count and simulated time to evaluate at
    try:
        metrics.write("start", t=0.0, session=0, resume=False, step=0, workers=settings.workers, shards=1,
                      backend="sim", policy=config.ps.policy, initial_loss=initial_loss)  # fmt: skip
        with SimulatedProgress(steps=settings.steps, console=console, enabled=show_progress) as progress:

            def observe(t: float, pushes: int, params: torch.Tensor) -> None:
                if pushes < due[0] and t < due[1]:
                    return
                if every:
                    due[0] = (pushes // every + 1) * every
                if tick:
                    due[1] = (math.floor(t / tick) + 1) * tick
                loss = held_out_loss(params)
                metrics.write("eval", t=round(t, 6), step=pushes, held_out_loss=loss)
                progress(pushes, t, loss)

            result = simulate(initial, rule, policy, grad, settings, observe=observe, observe_every=1,
                              stop=stop.requested)  # fmt: skip
        interrupted = stop.requested()
        r = result.records
        if interrupted:
            say(console, f"interrupted: stopped the simulation after {len(r):,} pushes; writing its checkpoint")
        elif len(r) == 0:
            computes = config.ps.easgd_tau if config.ps.policy == "easgd" else 1  # easgd: tau steps per push
            cycle = computes * config.cluster.sim_compute_mean + 2 * config.cluster.sim_network_mean  # the fastest
            warn(console, f"train.seconds = {settings.seconds:g} simulated seconds ran out before the first push "
                          f"(one takes about {cycle:g}): this run trained nothing; raise --seconds")  # fmt: skip
        elif settings.steps > 0 and len(r) < settings.steps and settings.seconds > 0:
            say(console, f"train.seconds = {settings.seconds:g} simulated seconds ran out after {len(r):,} of the "
                         f"train.steps = {settings.steps:,} pushes (--seconds 0: no time budget)")  # fmt: skip
        for i in range(len(r)):
            metrics.write(
                "push", t=round(float(r.t[i]), 6), worker=int(r.worker[i]), shard=0, version=int(r.version[i]),
                staleness=int(r.staleness[i]), loss=float(r.loss[i]), applied=bool(r.applied[i]),
            )  # fmt: skip
        final_loss = held_out_loss(result.params)
        values_finite = bool(torch.isfinite(result.params).all())
        diverged = not (math.isfinite(final_loss) and values_finite)
        metrics.write("end", t=round(result.sim_time, 6), step=len(r), final_loss=final_loss, interrupted=interrupted)
    finally:
        metrics.close()
    histogram = result.staleness_histogram()
    applied = int(r.applied.sum())
    state = {
        "model": {"name": config.model.name, **signature}, "rule": config.ps.rule, "step": len(r),
        "examples": result.grad_evals * config.train.batch_size, "elapsed_s": time.time() - t0,
        "initial_loss": initial_loss, "staleness_histogram": histogram.counts.tolist(), "worker_deaths": 0,
        "config": config.to_dict(), "rng": {"seed": config.train.seed, "session": 0, "worker_seeds": []},
        "saved_at": time.time(), "backend": "sim", "resumable": False,
    }  # fmt: skip
    snapshot = {"values": result.params, "state": result.rule_state, "version": applied, "rejected": result.rejected}
    ckpt.save(out / rundir.CHECKPOINT, [snapshot], state)
    final_model = held_out_loss.model  # holds the final parameters since final_loss was measured
    filter_shape = getattr(final_model, "filter_shape", dataset.shape)
    save_filter_grid(final_model.filters(), filter_shape, out / rundir.FILTERS)
    gabor_fit = gabor_fraction(final_model.filters(), filter_shape)  # first-layer filters with Gabor R² > 0.8
    wall = time.time() - t0
    interrupted = stop.requested()  # also a signal during the write-out, which finishes first: exit 130, as asked
    summary = {
        "run_dir": str(out), "model": config.model.name, "data": config.data.source, "backend": "sim",
        "policy": config.ps.policy, "workers": settings.workers, "shards": 1, "num_params": signature["num_params"],
        "examples_per_s": result.grad_evals * config.train.batch_size / wall if wall > 0 else 0.0,
        "initial_loss": initial_loss, "final_loss": final_loss, "gabor_fit": gabor_fit,
        **({"skip_variance": held_out_loss.skip} if held_out_loss.skip is not None else {}),
        "steps": len(r), "examples": result.grad_evals * config.train.batch_size, "seconds": wall,
        "simulated_seconds": result.sim_time, "gradient_evaluations": result.grad_evals,
        "updates_applied": applied, "updates_rejected": result.rejected, "updates_dropped": result.dropped,
        "stragglers": len(result.stragglers), "staleness": histogram.summary(), "worker_deaths": 0,
        "session_worker_deaths": 0,
        "interrupted": interrupted, "diverged": diverged, "checkpoint_step": len(r), "sessions": 1,
        **({"divergence": divergence_line(final_loss, values_finite, len(r), SAVED_FIRST_CHECKPOINT, config.ps.lr)}
           if diverged else {}),  # a simulated run has no earlier checkpoint to keep
        **({"data_files": dataset.read_report} if dataset.read_report else {}),
    }  # fmt: skip
    rundir.write_json(out / rundir.SUMMARY, summary)
    write_report_after_training(out, lambda text: warn(console, text))
    warn_if_training_failed(console, summary, config)
    return summary
