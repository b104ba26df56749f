"""The training driver: build data, model and cluster; watch, log, checkpoint; write the summary.

Backend-agnostic: it talks to a cluster object (``start``, ``poll``, ``stop``, ``snapshots`` ...) and never to a
shard or worker directly, so every backend gets the same run directory, progress bar and checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from rich.console import Console

from downpour import checkpoint as ckpt
from downpour import config as config_mod
from downpour import rundir
from downpour.backends import require_ray
from downpour.backends.local import LocalCluster, WorkerEvent, check_local_workers
from downpour.backends.processes import worker_context
from downpour.config import Config, DataConfig, ModelConfig, data_key_read, model_key_read
from downpour.console import say, warn
from downpour.data import (
    Dataset,
    as_recorded,
    capped_batch_warning,
    counts_before_exact_examples,
    data_warnings,
    load_dataset,
    worker_slice,
)
from downpour.data.own import READER_VERSION
from downpour.errors import CheckpointError, DownpourError
from downpour.models import build_model
from downpour.ps.flat import FlatParameters, flat_copy
from downpour.ps.policies import policy_rule
from downpour.ps.sharding import contiguous_bounds
from downpour.ps.staleness import StalenessHistogram
from downpour.report.filters import save_filter_grid
from downpour.report.gabor_fit import gabor_fraction
from downpour.report.html import REPORT, write_report_after_training
from downpour.report.live import LiveProgress
from downpour.report.tensorboard import TENSORBOARD_DIR, open_metrics_log, require_tensorboard
from downpour.signals import as_interrupt, routed
from downpour.threads import torch_threads

_POLL_SECONDS = 0.05
_THROUGHPUT_SECONDS = 1.0


@dataclass
class RunState:
    """What the driver tracks across sessions of one run (saved in ``checkpoint/state.json``)."""

    session: int = 0
    steps: int = 0
    examples: int = 0
    elapsed_s: float = 0.0
    initial_loss: float = float("nan")
    staleness: StalenessHistogram = field(default_factory=StalenessHistogram)
    worker_deaths: int = 0
    # Ray backend's faults: worker actors restarted, shard actors restored from a checkpoint, applied updates lost
    worker_restarts: int = 0
    shard_restores: int = 0
    lost_updates: int = 0
    lost_before: int = 0  # lost_updates of the earlier sessions (not saved: read back as lost_updates)
    restores_before: int = 0  # shard_restores of the earlier sessions (likewise)
    deaths_before: int = 0  # worker_deaths of the earlier sessions (likewise)
    checkpoint_step: int | None = None  # step of the checkpoint in the run directory (not saved; None: none yet)
    data_counts: dict[str, Any] = field(default_factory=dict)  # training and held-out examples (its split's check),
    # and for users' folders and videos the digest of the pictures read


class TrainingDiverged(DownpourError):
    """A session ended with a non-finite held-out loss or parameters (the summary says which checkpoint was kept)."""


FAULT_COUNTERS = ("worker_restarts", "shard_restores", "lost_updates")
WORKER_MEMORY_HINT = "reduce train.batch_size or the model (model.features), or run fewer cluster.workers"


class HeldOutLoss:
    """The model's loss on the fixed held-out batch for any flat parameter vector."""

    def __init__(self, config: Config, dataset: Dataset) -> None:
        self.model = build_model(config.model, dataset.dim, seed=config.train.seed, shape=dataset.shape)
        self.flat = FlatParameters(self.model)
        self.batch = dataset.held_out
        self.skip: dict[str, float] | None = None  # fields skipped in the last evaluation (model.skip_variance)

    @torch.no_grad()
    def __call__(self, params: torch.Tensor) -> float:
        self.flat.values.copy_(params)
        skip_summary = getattr(self.model, "skip_summary", None)
        if skip_summary is not None:
            skip_summary()  # start counting afresh
        loss = float(self.model.loss(self.batch))
        if skip_summary is not None:
            self.skip = skip_summary()
        return loss


def warn_if_every_field_is_flat(held_out_loss: HeldOutLoss, config: Config, console: Console) -> None:
    """Warn, before training, when ``model.skip_variance`` zeroed every receptive field of the held-out batch in its
    last evaluation: no field varies that much, so the network outputs zeros and learns nothing."""
    if held_out_loss.skip is not None and held_out_loss.skip["zeroed_fraction"] >= 1.0:
        warn(console, f"model.skip_variance = {config.model.skip_variance:g} zeroes every receptive field of the "
                      "held-out examples (none varies that much): the network outputs zeros and learns nothing; "
                      "lower model.skip_variance")  # fmt: skip


def model_signature(model: torch.nn.Module) -> dict[str, Any]:
    """The parameter count and shapes that a checkpoint must match to be resumed."""
    return {
        "num_params": sum(p.numel() for p in model.parameters()),
        "param_shapes": {name: list(p.shape) for name, p in model.named_parameters()},
    }


# Model keys a resumed session may change: how it trains, not the network or its cost (recorded in its start row)
RESUMABLE_MODEL_KEYS = ("cd_k", "freeze_first")


def _check_compatible(state: dict[str, Any], config: Config, signature: dict[str, Any], where: Path) -> None:
    """Refuse a checkpoint written for another model, shape, shard layout or rule (nothing is overwritten)."""
    saved_model = state.get("model", {})
    problems = []
    if saved_model.get("name") != config.model.name:
        problems.append(f"model {saved_model.get('name')!r} vs config's {config.model.name!r}")
    if saved_model.get("param_shapes") != signature["param_shapes"]:
        problems.append(f"parameter shapes {saved_model.get('param_shapes')} vs {signature['param_shapes']}")
    if len(state.get("shards", [])) != config.ps.shards:
        problems.append(f"{len(state.get('shards', []))} shards vs ps.shards={config.ps.shards}")
    if state.get("rule") != config.ps.rule:
        problems.append(f"rule {state.get('rule')!r} vs ps.rule={config.ps.rule!r}")
    saved_config = state.get("config", {})
    # The data and the seed fix the training examples and the held-out batch that every loss is measured on; the
    # model keys, the network and its cost (keys the source or design does not read aside, and where torchvision
    # sets are cached).
    saved_data, saved_model = saved_config.get("data", {}), saved_config.get("model", {})
    for key, value in config.to_dict()["data"].items():  # a key newer than the checkpoint had its default then
        if key == "cache_dir" or not data_key_read(config.data, key):
            continue
        if (before := saved_data.get(key, getattr(DataConfig, key))) != value:
            problems.append(f"data.{key} {before!r} vs {value!r}")
    for key, value in config.to_dict()["model"].items():
        if key in RESUMABLE_MODEL_KEYS or not model_key_read(config.model, key):
            continue
        if (before := saved_model.get(key, getattr(ModelConfig, key))) != value:
            problems.append(f"model.{key} {before!r} vs {value!r}")
    before = saved_config.get("ps", {}).get("policy", "downpour")
    if (before == "sync") != (config.ps.policy == "sync"):  # a sync shard's version counts rounds, others' pushes
        problems.append(f"ps.policy {before!r} vs {config.ps.policy!r} (a sync shard's version counts rounds and "
                        "another's counts pushes: a run cannot switch to or from sync)")  # fmt: skip
    if saved_config.get("train", {}).get("seed") != config.train.seed:
        problems.append(f"train.seed {saved_config.get('train', {}).get('seed')!r} vs {config.train.seed!r}")
    if problems:
        raise CheckpointError(f"checkpoint {where} does not match this config: " + "; ".join(problems))


# each session's own budget (they change on every resume); and data.held_out, which a resume cannot change (the same
# split is checked): an older checkpoint says the default 1024 where config.toml now records the count held out
UNRECORDED_CHANGES = ("train.steps", "train.seconds", "data.held_out")


def _changes(saved: Any, config: Config) -> dict[str, list[Any]]:
    """What this session's config changes from the one its checkpoint was saved with: ``{"ps.lr": [0.02, 0.05]}``
    (the budget keys aside); recorded in its ``start`` row so that the run keeps what each session trained with."""
    if not isinstance(saved, dict):
        return {}
    changes = {}
    for section, values in config.to_dict().items():
        before = saved.get(section) if isinstance(saved.get(section), dict) else {}
        for key, value in values.items():
            name = f"{section}.{key}"
            if name not in UNRECORDED_CHANGES and key in before and before[key] != value:
                changes[name] = [before[key], value]
    return changes


def _worker_seeds(seed: int, session: int, workers: int) -> list[int]:
    children = np.random.SeedSequence([seed, session]).spawn(workers)
    return [int(child.generate_state(1)[0]) for child in children]


def _check_same_examples(saved: dict[str, Any], config: Config, dataset: Dataset, out: Path) -> None:
    """Refuse to resume on a different split of the data: ``data_counts`` in the checkpoint (or, in one written
    before it was recorded, the counts the rule of that time gave) must be what ``dataset`` holds."""
    counts = (len(dataset.train), len(dataset.held_out))
    recorded = saved.get("data_counts")
    if isinstance(recorded, dict):
        before = (recorded.get("train"), recorded.get("held_out"))
    else:
        before = counts_before_exact_examples(config.data) or counts
    if before != counts:
        raise DownpourError(
            f"run {out} was trained on {before[0]} training and {before[1]} held-out examples; its config now cuts "
            f"{counts[0]} and {counts[1]} (data.examples became exact on 2026-11-27), so it cannot be resumed on the "
            "same examples: start a new run"
        )
    then = recorded.get("pictures_digest") if isinstance(recorded, dict) else None  # users' folders and videos
    now = (dataset.read_report or {}).get("digest")
    if then and now and then != now:
        reader = recorded.get("pictures_reader", 1)  # written before it was recorded: the first reader
        if reader != READER_VERSION:
            raise DownpourError(
                f"run {out} was saved by an earlier downpour that decoded pictures differently (before 2026-11-27: "
                "gray by BT.601 weights, EXIF orientation and video rotation ignored), or files in "
                f"{config.data.source!r} changed since; either way it cannot be resumed on the same examples: "
                "start a new run"
            )
        raise DownpourError(
            f"data.source {config.data.source!r} holds other pictures than when run {out} was saved (files added, "
            "removed or changed), so it cannot be resumed on the same examples: start a new run, or restore the files"
        )


def _load_previous(out: Path, config: Config, signature: dict[str, Any],
                   dataset: Dataset) -> tuple[ckpt.Checkpoint, RunState]:  # fmt: skip
    """The run's checkpoint and counters, every field checked: a checkpoint this refuses (CheckpointError naming
    the field) is refused before anything in ``out`` is written."""
    where = out / rundir.CHECKPOINT / ckpt.STATE_FILE
    if (diverged := ckpt.saved_diverged(out / rundir.CHECKPOINT)) is not None:
        config_saved = diverged.get("config")
        ps = config_saved.get("ps") if isinstance(config_saved, dict) else None
        lr = f" (it was {ps['lr']:g})" if isinstance(ps, dict) and isinstance(ps.get("lr"), int | float) else ""
        raise DownpourError(
            f"run {out} cannot be resumed: its checkpoint (step {diverged.get('step')}) was saved after training "
            f"diverged in its first session, with no earlier one to keep; start a new run with a lower ps.lr{lr}"
        )
    checkpoint = ckpt.load(out / rundir.CHECKPOINT)
    saved = checkpoint.state
    ckpt.require_objects(saved, where)  # a resume reads every one of them
    if saved.get("backend") == "sim":  # its own checks would blame whatever differs, e.g. data counts it has none of
        raise DownpourError(f"cannot resume {out}: it was simulated (cluster.backend = 'sim'), and simulated runs are "
                            "deterministic; rerun with a new --out")  # fmt: skip
    _check_compatible(saved, config, signature, out / rundir.CHECKPOINT)
    _check_same_examples(saved, config, dataset, out)
    _check_snapshots(checkpoint, config, signature, where)
    initial_loss = saved.get("initial_loss")
    if initial_loss is not None and (
        isinstance(initial_loss, bool) or not isinstance(initial_loss, int | float) or not math.isfinite(initial_loss)
    ):
        raise CheckpointError(f"corrupt checkpoint {where}: initial_loss must be a finite number or null, "
                              f"got {initial_loss!r}")  # fmt: skip
    if not isinstance(saved.get("diverged", False), bool):  # True was refused above
        raise CheckpointError(f"corrupt checkpoint {where}: diverged must be true or false, got {saved['diverged']!r}")
    histogram = saved.get("staleness_histogram", [])
    if not isinstance(histogram, list):
        raise CheckpointError(f"corrupt checkpoint {where}: staleness_histogram must be a list, got {histogram!r}")
    run_state = RunState(
        session=ckpt.count(saved["rng"].get("session"), "rng.session", where) + 1,
        steps=ckpt.count(saved.get("step"), "step", where),
        examples=ckpt.count(saved.get("examples"), "examples", where),
        elapsed_s=ckpt.non_negative_float(saved.get("elapsed_s"), "elapsed_s", where),
        initial_loss=float(initial_loss) if initial_loss is not None else float("nan"),
        staleness=StalenessHistogram(
            [ckpt.count(n, f"staleness_histogram[{i}]", where) for i, n in enumerate(histogram)]
        ),
        worker_deaths=ckpt.count(saved.get("worker_deaths", 0), "worker_deaths", where),
        **{key: ckpt.count(saved.get(key, 0), key, where) for key in FAULT_COUNTERS},
    )
    run_state.checkpoint_step = run_state.steps
    return checkpoint, run_state


def _check_snapshots(checkpoint: ckpt.Checkpoint, config: Config, signature: dict[str, Any], where: Path) -> None:
    """Each saved shard fits the shard this config builds (its size, its rule's state): checked before the run
    directory is written, where the restore would find it only after."""
    bounds = contiguous_bounds(signature["num_params"], config.ps.shards)
    state_names = set(policy_rule(config).state_names)
    for index, (snap, (start, stop)) in enumerate(zip(checkpoint.shard_snapshots(), bounds, strict=True)):
        missing = state_names - set(snap["state"])
        if missing or snap["values"].shape != (stop - start,):
            raise CheckpointError(
                f"corrupt checkpoint {where}: shard {index} holds {snap['values'].numel()} values and state "
                f"{sorted(snap['state'])}; this config's shard {index} needs {stop - start} and {sorted(state_names)}"
            )


def _save_checkpoint(
    out: Path,
    snapshots: list[dict[str, Any]],
    step: int,
    config: Config,
    run_state: RunState,
    seeds: list[int],
    signature: dict[str, Any],
    *,
    diverged: bool = False,
) -> None:
    """Write ``snapshots`` (taken before ``step`` was read, so no shard holds a push the step does not count);
    ``diverged``: saved although training diverged (a first session's, with no earlier checkpoint to keep)."""
    state = {
        "model": {"name": config.model.name, **signature},
        "rule": config.ps.rule,
        "step": step,
        "examples": run_state.examples,
        "elapsed_s": run_state.elapsed_s,
        "initial_loss": run_state.initial_loss if np.isfinite(run_state.initial_loss) else None,
        "staleness_histogram": run_state.staleness.counts.tolist(),
        "worker_deaths": run_state.worker_deaths,
        **{key: getattr(run_state, key) for key in FAULT_COUNTERS},
        "config": config.to_dict(),
        "rng": {"seed": config.train.seed, "session": run_state.session, "worker_seeds": seeds},
        "saved_at": time.time(),
        "diverged": diverged,
        "data_counts": run_state.data_counts,
    }
    ckpt.save(out / rundir.CHECKPOINT, snapshots, state)


@dataclass
class Taken:
    """What :func:`_checkpoint_now` measured and did."""

    snapshots: list[dict[str, Any]]
    step: int
    loss: float  # held-out loss of the snapshots' values
    values_finite: bool  # no parameter is NaN or Inf
    diverged: bool  # a tensor (parameters or rule state) is NaN or Inf, or the held-out loss is not finite
    saved: bool  # written into the run directory (not when it diverged, or nothing was pushed since the last one)


def _checkpoint_now(out: Path, cluster: LocalCluster, config: Config, run_state: RunState, seeds: list[int],
                    signature: dict[str, Any], held_out_loss: HeldOutLoss, *, final: bool) -> Taken:  # fmt: skip
    """Snapshot the shards and save them, unless they diverged (a tensor NaN or Inf, or the held-out loss not
    finite) and the run directory holds a checkpoint already: a diverged one never replaces it. ``final``: the
    session's last checkpoint, saved even when diverged if there is no earlier one (nothing to lose, and the run
    keeps a checkpoint). Snapshots that did not diverge become the shards' restore points (what a Ray shard actor
    that dies comes back at); diverged ones never do, even when saved."""
    snapshots = cluster.snapshots()
    _count_restores(cluster, run_state)
    step = cluster.steps()
    params = torch.cat([snap["values"] for snap in snapshots])
    values_finite = bool(torch.isfinite(params).all())
    state_finite = all(bool(torch.isfinite(t).all()) for snap in snapshots for t in snap["state"].values())
    loss = held_out_loss(params)  # also leaves the model holding these values
    diverged = not (values_finite and state_finite and math.isfinite(loss))
    if not diverged:
        cluster.set_restore_points(snapshots)
    # A periodic checkpoint at the step of the one in the run directory has nothing new to save, and would only stamp
    # that one with this session's config (a resume whose workers are still starting, then diverge, would leave a
    # state.json naming the diverging settings beside the config.toml that trained its values).
    unchanged = not final and step == run_state.checkpoint_step
    saved = (not diverged and not unchanged) or (final and run_state.checkpoint_step is None)
    if saved:
        _save_checkpoint(out, snapshots, step, config, run_state, seeds, signature, diverged=diverged)
        run_state.checkpoint_step = step
    return Taken(snapshots, step, loss, values_finite, diverged, saved)


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


def _count_restores(cluster: Any, run_state: RunState) -> None:
    """Bring ``run_state.shard_restores`` and ``lost_updates`` up to date from the cluster (Ray backend only):
    earlier sessions' plus this session's, including a restore the polls have not reported yet that the snapshots
    just taken came after."""
    faults = getattr(cluster, "faults", None)
    if faults is not None:
        counts = faults()
        run_state.shard_restores = run_state.restores_before + counts["shard_restores"]
        run_state.lost_updates = run_state.lost_before + counts["lost_updates"]


def prepare_run_dir(out: Path, *, resume: bool, locked: bool = False) -> None:
    """Make sure ``out`` can hold a new run (or holds one to resume); never overwrite an existing run. ``locked``:
    this process holds ``out``'s lock (so a missing config is not another run still starting)."""
    if out.exists() and not out.is_dir():
        raise DownpourError(f"run directory {out} exists and is not a directory")
    if resume:
        if not (out / rundir.CONFIG).exists():
            raise CheckpointError(rundir.not_resumable(out, ours=locked))
        return
    if has_checkpoint(out):
        raise DownpourError(f"run directory {out} already holds a run; use --resume {out} or another --out")
    if (out / rundir.CONFIG).exists():
        if locked:  # no checkpoint, no live driver (unlocked: one may be starting)
            if (step := _checkpoint_recorded(out)) is not None:
                raise DownpourError(f"run directory {out} holds a run whose checkpoint (step {step:,}) is missing "
                                    "(deleted or moved): restore it, or use another --out")  # fmt: skip
            raise DownpourError(f"run directory {out} holds a run that stopped before its first checkpoint; "
                                f"--resume {out} trains it again from step 0, or use another --out")  # fmt: skip
        return
    names = (rundir.METRICS, rundir.SUMMARY, rundir.CHECKPOINT, rundir.FILTERS, rundir.WHITENING, REPORT,
             TENSORBOARD_DIR)  # fmt: skip
    if taken := [name for name in names if (out / name).exists()]:  # a folder that is not a run: its files stay
        raise DownpourError(f"--out {out} is not a run directory but holds {', '.join(taken)}, which a run would "
                            "overwrite or append to: use another --out (an empty or new folder)")  # fmt: skip


def has_checkpoint(out: Path) -> bool:
    """Whether the run directory ``out`` holds a committed checkpoint (its ``state.json``, written last: a save cut
    off before it, by a kill or a full disk, leaves files that commit nothing)."""
    return (out / rundir.CHECKPOINT / ckpt.STATE_FILE).is_file()


def stopped_before_checkpoint(out: Path, console: Console, *, resumable: bool = True) -> bool:
    """Whether the run in ``out`` (held by this process) has no checkpoint: it stopped (killed, or failed to start
    its cluster) before its first one, so that resuming it means training it again from step 0. Then the rows and
    TensorBoard files of the session that stopped move to ``out/aborted`` (``aborted-2``, ...): the restarted run's
    report and curves are its own. Says so. A run whose summary or metrics say it saved a checkpoint lost it
    instead: refused, with advice for a run that can be resumed (``resumable``) or a simulated one."""
    if has_checkpoint(out):
        return False
    if (step := _checkpoint_recorded(out)) is not None:
        advice = (
            "restore it to resume, or start a new run"
            if resumable
            else "a simulated run is not resumed: simulate into a new --out"
        )
        raise DownpourError(f"run {out} saved a checkpoint at step {step:,}, but {out / rundir.CHECKPOINT} is missing "
                            f"(deleted or moved): {advice}")  # fmt: skip
    moved = [out / name for name in (rundir.METRICS, TENSORBOARD_DIR) if (out / name).exists()]
    aside = ""
    if moved:
        aborted = rundir.fresh_path(out / "aborted")
        aborted.mkdir()
        for path in moved:
            path.rename(aborted / path.name)
        aside = f" (the stopped session's metrics moved to {aborted})"
    warn(console, f"run {out} stopped before its first checkpoint: training it again from step 0{aside}")
    return True


def _sessions_logged(out: Path) -> int:
    """How many sessions ``out``'s metrics.jsonl has start rows of."""
    with contextlib.suppress(OSError), open(out / rundir.METRICS, "rb") as lines:
        return sum(line.startswith(b'{"event":"start"') for line in lines)
    return 0


def _checkpoint_recorded(out: Path) -> int | None:
    """The step of a checkpoint that ``out``'s summary or metrics say was saved (None when they say of none): a run
    without its checkpoint then lost it, rather than stopping before its first."""
    try:
        summary = json.loads((out / rundir.SUMMARY).read_text())
        step = summary.get("checkpoint_step") if isinstance(summary, dict) else None
        if isinstance(step, int) and not isinstance(step, bool) and step > 0:
            return step
    except (OSError, ValueError):
        pass
    steps = []  # periodic checkpoints saved (their rows' step), and the one each session ended with
    with contextlib.suppress(OSError), open(out / rundir.METRICS, "rb") as lines:
        for line in lines:
            if line.startswith((b'{"event":"checkpoint"', b'{"event":"end"')):
                with contextlib.suppress(ValueError, AttributeError):
                    row = json.loads(line)
                    step = row.get("step") if row["event"] == "checkpoint" and row.get("saved") is True else None
                    steps.append(row.get("checkpoint_step") if row["event"] == "end" else step)
    return max((step for step in steps if isinstance(step, int) and step > 0), default=None)


@contextlib.contextmanager
def claimed_run_dir(out: Path, *, resume: bool) -> Iterator[None]:
    """Hold ``out`` for a training session from before its data loads (:func:`rundir.claimed`), so that a second
    command sees this run at once, and check it again (:func:`prepare_run_dir`) now that no other driver can start
    one there. A SIGTERM meanwhile stops the run as Ctrl-C does (the session routes both itself), so that a refused
    claim is cleaned up."""
    with routed(as_interrupt, [signal.SIGTERM]), rundir.claimed(out):
        prepare_run_dir(out, resume=resume, locked=True)
        yield


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
        model = build_model(config.model, dataset.dim, seed=config.train.seed, shape=dataset.shape)
        signature = model_signature(model)
        contiguous_bounds(signature["num_params"], config.ps.shards)  # more shards than parameters fails here
        held_out_loss = HeldOutLoss(config, dataset)
        checkpoint = None
        run_state = RunState()
        previous_config = None
        if resume and stopped_before_checkpoint(out, console):
            resume = False  # as a new run would, in the same directory (its earlier rows moved to aborted/)
        if resume:  # every check that can refuse the checkpoint runs here, before anything is written
            checkpoint, run_state = _load_previous(out, config, signature, dataset)
            # a session that saved no checkpoint (killed before its first, or diverged) still had its number: the
            # next one takes a new one, and with it other worker seeds
            run_state.session = max(run_state.session, _sessions_logged(out))
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
            summary = _train_session(config, out, dataset, model, signature, held_out_loss, checkpoint, run_state,
                                     resume=resume, console=console, show_progress=show_progress)  # fmt: skip
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
                   held_out_loss: HeldOutLoss, checkpoint: ckpt.Checkpoint | None, run_state: RunState, *,
                   resume: bool, console: Console, show_progress: bool) -> dict[str, Any]:  # fmt: skip
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
        changed = _changes(checkpoint.state.get("config"), config) if checkpoint is not None else {}
        start_row = {"session": run_state.session, "resume": resume, "step": run_state.steps,
                     "workers": config.cluster.workers, "shards": config.ps.shards,
                     "initial_loss": run_state.initial_loss, **({"changed": changed} if changed else {})}  # fmt: skip
        with routed(as_interrupt), torch_threads(_driver_threads(config)):  # the driver beside its running workers
            try:
                cluster.start()
                metrics.write("start", t=time.time() - t0, **start_row, pids=cluster.pids())
                start_row = {}
                interrupted, window, starved = _watch(
                    cluster, config, out, metrics, run_state, seeds, signature, console, show_progress, t0,
                    held_out_loss=held_out_loss,
                )  # fmt: skip
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM before the watch loop took over
                interrupted = True
                if start_row:  # while the workers started: the session still has its start row (and the report
                    metrics.write("start", t=time.time() - t0, **start_row)  # the run's initial loss)
        with routed(signal.SIG_IGN):  # shutting down: a second Ctrl-C must not lose the final checkpoint
            records, last_events = cluster.stop()
            stopped = time.time()  # the workers finished their last steps by now
            log_push_records(records, metrics, run_state)
            _log_events(last_events, metrics, run_state, console, t0)
            cluster_examples = cluster.examples_done()
            run_state.examples = session_examples_start + cluster_examples
            taken = _checkpoint_now(out, cluster, config, run_state, seeds, signature, held_out_loss, final=True)
            snapshots, final_loss, steps = taken.snapshots, taken.loss, taken.step
            metrics.write("end", t=time.time() - t0, step=steps, final_loss=final_loss, interrupted=interrupted,
                          diverged=taken.diverged, checkpoint_step=run_state.checkpoint_step)  # fmt: skip
        if starved:
            _warn_starved(console, config.train.seconds, steps - session_steps_start)
    finally:
        cluster.close()
        metrics.close()

    final_model = held_out_loss.model  # holds the final parameters since final_loss was measured
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


def log_push_records(records: list[tuple], metrics: rundir.MetricsLog, run_state: RunState) -> None:
    if not records:
        return
    applied = []
    for t, worker, shard, version, staleness, loss, ok in records:
        metrics.write(
            "push",
            t=round(t, 4),
            worker=worker,
            shard=shard,
            version=version,
            staleness=staleness,
            loss=loss,
            applied=ok,
        )
        if ok:
            applied.append(staleness)
    run_state.staleness.add(np.asarray(applied, dtype=np.int64))


def _log_events(
    events: list[WorkerEvent], metrics: rundir.MetricsLog, run_state: RunState, console: Console, t0: float
) -> None:
    for event in events:
        if event.kind == "died":
            run_state.worker_deaths += 1
            if not event.said:  # a worker that failed said why already
                say(console, f"worker {event.worker} died ({event.detail}); the others go on")
        elif event.kind == "error":
            last_line = event.detail.strip().splitlines()[-1] if event.detail.strip() else "unknown error"
            say(console, f"worker {event.worker} failed: {last_line}", "red")
        elif event.kind == "stuck":  # a worker the end of the session had to kill: the report's counts fall short
            warn(console, f"worker {event.worker} {event.detail}")
        elif event.kind == "out_of_memory":
            say(console, f"worker {event.worker} ran out of memory: {event.detail} ({WORKER_MEMORY_HINT})", "red")
        elif event.kind == "restarted":  # Ray backend: the worker actor's process died and Ray restarted it
            run_state.worker_restarts += 1
            say(console, f"worker {event.worker} died ({event.detail}); restarted")
        elif event.kind == "shard_restored":  # Ray backend: ``worker`` is the shard's index (counted by
            say(console, event.detail)  # _count_restores, from the cluster)
            metrics.write("shard_restored", t=time.time() - t0, shard=event.worker, detail=event.detail)
            continue
        elif event.kind == "chaos":  # Ray backend: cluster.chaos injected a fault (``worker``: the target's index)
            metrics.write("chaos", t=time.time() - t0, target=event.worker, detail=event.detail)
            continue
        metrics.write(f"worker_{event.kind}", t=time.time() - t0, worker=event.worker, detail=event.detail)


_MIN_RATE_SECONDS = 1.0  # a shorter window of work is measured with the workers' start-up in it


class WorkWindow(NamedTuple):
    """When a session's workers worked: the watch began at ``start``; ``first_seen`` is the poll that first saw
    examples done (None: none were) and ``first_examples`` how many it saw; ``last_seen`` and ``last_examples``
    the same at the watch's last poll."""

    start: float
    first_seen: float | None
    first_examples: int
    last_seen: float | None = None
    last_examples: int = 0

    def rate(self, examples: int, stopped: float) -> float:
        """Examples per second between the first poll that saw work and the watch's last poll: neither the
        workers' start-up nor their shutdown (up to seconds of draining and joining) is throughput. A window
        under :data:`_MIN_RATE_SECONDS` (a budget of a fraction of a second) holds too few polls to measure: then
        all ``examples`` over the whole session to ``stopped``, start-up included (the first poll's window alone
        gave 8 million examples/s for 24 steps in 0.05 s)."""
        first, last = self.first_seen, self.last_seen
        if first is not None and last is not None and last - first >= _MIN_RATE_SECONDS:
            return max(0, self.last_examples - self.first_examples) / (last - first)
        return examples / (stopped - self.start) if stopped > self.start else 0.0


def _watch(
    cluster: LocalCluster,
    config: Config,
    out: Path,
    metrics: rundir.MetricsLog,
    run_state: RunState,
    seeds: list[int],
    signature: dict[str, Any],
    console: Console,
    show_progress: bool,
    t0: float,
    *,
    held_out_loss: HeldOutLoss,
) -> tuple[bool, WorkWindow, bool]:
    """Poll the cluster until the budget is spent, every worker has stopped, or Ctrl-C; return whether Ctrl-C
    ended it, when the workers' first examples were seen (:class:`WorkWindow`), and whether ``train.seconds`` ran
    out before any worker finished a step.

    Every ``train.eval_every`` seconds (when set) an ``eval`` row records the held-out loss of the shards' current
    values (the center, under easgd). Every ``train.checkpoint_every`` seconds a checkpoint is saved unless it
    diverged or nothing was pushed since the last one (:func:`_checkpoint_now`: its held-out loss is measured, one
    forward pass of the held-out batch). When both fall due in one poll, the ``eval`` row reports the checkpoint's
    snapshot: one snapshot, one forward pass.
    """
    train = config.train
    start = time.time()
    next_eval = start + train.eval_every if train.eval_every else float("inf")
    elapsed_before = run_state.elapsed_s
    next_checkpoint = start + train.checkpoint_every
    next_rate = start + _THROUGHPUT_SECONDS
    last_examples, last_rate_time, rate = 0, start, 0.0
    examples_before = run_state.examples
    first_work, first_examples = None, 0  # when the first examples were seen: worker start-up is not throughput
    last_seen: float | None = None  # and at the last poll: neither is the workers' shutdown
    last_examples_seen = 0
    interrupted = starved = False

    def collect() -> None:
        """Log the push records and worker events that arrived since the last poll."""
        records, events = cluster.poll()
        log_push_records(records, metrics, run_state)
        _log_events(events, metrics, run_state, console, t0)

    with LiveProgress(steps=train.steps, seconds=train.seconds, console=console, enabled=show_progress) as bar:
        try:
            while True:
                time.sleep(_POLL_SECONDS)
                now = time.time()
                collect()
                run_state.elapsed_s = elapsed_before + (now - start)
                examples = cluster.examples_done()
                last_seen, last_examples_seen = now, examples
                if first_work is None and examples > 0:
                    first_work, first_examples, last_rate_time, last_examples = now, examples, now, examples
                    next_rate = now + _THROUGHPUT_SECONDS
                run_state.examples = examples_before + examples
                if now >= next_rate:
                    rate = (examples - last_examples) / (now - last_rate_time)
                    last_examples, last_rate_time = examples, now
                    next_rate = now + _THROUGHPUT_SECONDS
                    metrics.write(
                        "throughput",
                        t=now - t0,
                        examples_per_s=rate,
                        examples=run_state.examples,
                        step=cluster.steps(),
                        loss=cluster.recent_loss(),
                    )
                    metrics.flush()
                bar.update(
                    steps=cluster.steps(),
                    elapsed=now - start,
                    rate=rate,
                    loss=cluster.recent_loss(),
                    stale=run_state.staleness.summary()["mean"],
                )
                # A checkpoint measures the held-out loss of its snapshot: an eval due in the same poll reports it.
                taken = None
                if now >= next_checkpoint:
                    taken = _checkpoint_now(out, cluster, config, run_state, seeds, signature, held_out_loss,
                                            final=False)  # fmt: skip
                if now >= next_eval:
                    if taken is not None:
                        step, loss = taken.step, taken.loss
                    else:
                        step = cluster.steps()
                        loss = held_out_loss(torch.cat([snap["values"] for snap in cluster.snapshots()]))
                    metrics.write("eval", t=now - t0, step=step, examples=run_state.examples, held_out_loss=loss)
                    next_eval = now + train.eval_every
                if taken is not None:
                    metrics.write("checkpoint", t=now - t0, step=taken.step, held_out_loss=taken.loss,
                                  saved=taken.saved, checkpoint_step=run_state.checkpoint_step)  # fmt: skip
                    if taken.diverged:
                        warn(console, f"held-out loss {taken.loss:.4g} at step {taken.step}: not saved over the "
                                      f"checkpoint of step {run_state.checkpoint_step}")  # fmt: skip
                    next_checkpoint = now + train.checkpoint_every
                if train.seconds and now - start >= train.seconds:
                    starved = first_work is None  # the clock counts the workers' start-up and first mini-batch
                    break
                if train.steps and cluster.steps() >= train.steps:
                    break
                if cluster.alive() == 0:
                    collect()  # workers that died since this loop's poll: said here, not taken for a stop's exits
                    if run_state.worker_deaths - run_state.deaths_before >= config.cluster.workers:
                        hint = _unguarded_hint(first_work is None)
                        console.print(f"[red]every worker has died; stopping the run[/]{hint}")
                    break
        except KeyboardInterrupt:
            interrupted = True
            say(console, "interrupted: stopping workers and writing a final checkpoint")
    return interrupted, WorkWindow(start, first_work, first_examples, last_seen, last_examples_seen), starved


def _unguarded_hint(no_work: bool) -> str:
    """A hint for the commonest cause of every local worker dying before any work (``no_work``): a script calling
    :func:`run_training` at module level, which each worker process runs again as it imports the script (Python's
    spawn rule; it raises "An attempt has been made to start a new process before ...")."""
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    names = vars(main).values() if main is not None else ()
    calls = any(value is run_training or value is sys.modules[__name__] for value in names)  # not `downpour` itself
    if not no_work or script is None or not calls:
        return ""
    return (f" (if {Path(script).name} calls run_training at module level, each worker ran it again as it imported "
            'the script: call it under `if __name__ == "__main__":`)')  # fmt: skip


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
