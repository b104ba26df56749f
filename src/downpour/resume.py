"""Resuming a run: what state its directory is in (a run, one stopped before its first checkpoint, one
whose checkpoint is gone), the checks a checkpoint must pass before anything is written, and the counters
(:class:`RunState`) read back from it."""

from __future__ import annotations

import contextlib
import math
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from downpour import checkpoint as ckpt
from downpour import config as config_mod
from downpour import rundir
from downpour.config import Config, trained_differently
from downpour.console import warn
from downpour.data import Dataset, counts_before_exact_examples
from downpour.data.own import READER_CHANGES, READER_VERSION
from downpour.errors import CheckpointError, DownpourError
from downpour.late_pushes import missed_staleness
from downpour.ps.policies import policy_rule
from downpour.ps.sharding import contiguous_bounds
from downpour.ps.staleness import StalenessHistogram
from downpour.report.html import REPORT
from downpour.report.tensorboard import TENSORBOARD_DIR
from downpour.signals import as_interrupt, routed


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
    push_rows: int = 0  # push rows this session has logged (saved: the rows its checkpoint's histogram counts)
    missed_pushes: int = 0  # applied pushes the loaded checkpoint held but had not counted (not saved)
    data_counts: dict[str, Any] = field(default_factory=dict)  # training and held-out examples (its split's check),
    # and for users' folders and videos the digest of the pictures read


FAULT_COUNTERS = ("worker_restarts", "shard_restores", "lost_updates")


def model_signature(model: torch.nn.Module) -> dict[str, Any]:
    """The parameter count and shapes that a checkpoint must match to be resumed."""
    return {
        "num_params": sum(p.numel() for p in model.parameters()),
        "param_shapes": {name: list(p.shape) for name, p in model.named_parameters()},
    }


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
    # model keys, the network and its cost.
    problems += trained_differently(saved_config, config)
    before = saved_config.get("ps", {}).get("policy", "downpour")
    if (before == "sync") != (config.ps.policy == "sync"):  # a sync shard's version counts rounds, others' pushes
        problems.append(f"ps.policy {before!r} vs {config.ps.policy!r} (a sync shard's version counts rounds and "
                        "another's counts pushes: a run cannot switch to or from sync)")  # fmt: skip
    if problems:
        raise CheckpointError(f"checkpoint {where} does not match this config: " + "; ".join(problems))


# each session's own budget (they change on every resume); and data.held_out, which a resume cannot change (the same
# split is checked): an older checkpoint says the default 1024 where config.toml now records the count held out
UNRECORDED_CHANGES = ("train.steps", "train.seconds", "data.held_out")


def changes_from(saved: Any, config: Config) -> dict[str, list[Any]]:
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
        if isinstance(reader, int) and reader < READER_VERSION:
            changes = " and ".join(READER_CHANGES[v] for v in range(max(1, reader), READER_VERSION))
            raise DownpourError(
                f"run {out} was saved by an earlier downpour that {changes}, or files in {config.data.source!r} "
                "changed since; either way it cannot be resumed on the same examples: start a new run"
            )
        raise DownpourError(
            f"data.source {config.data.source!r} holds other pictures than when run {out} was saved (files added, "
            "removed or changed), so it cannot be resumed on the same examples: start a new run, or restore the files"
        )


def _check_config_whole(out: Path, saved_config: Any, where: Path) -> None:
    """Refuse a run whose ``config.toml`` lacks keys its checkpoint recorded: downpour writes every key, so a missing
    one was cut off or deleted, and the resumed session would train with its default in place of the run's setting
    (a config.toml cut after ``batch_size = 1`` of 128 resumed with batches of 1, and recorded that)."""
    if not isinstance(saved_config, dict):
        return
    written = config_mod.named_keys(out / rundir.CONFIG, None)
    known = Config().to_dict()
    missing = [f"{section}.{key}" for section, values in saved_config.items()
               if isinstance(values, dict) and section in known
               for key in values if key in known[section] and f"{section}.{key}" not in written]  # fmt: skip
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise CheckpointError(
            f"{out / rundir.CONFIG} lacks {shown}, which the run's checkpoint recorded: the file was cut short or "
            f"edited, and resuming would train with defaults in their place; restore those lines (the run's values are "
            f'under "config" in {where})'
        )


def load_previous(out: Path, config: Config, signature: dict[str, Any],
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
    _check_config_whole(out, saved.get("config"), where)
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
    if "push_rows" in saved:  # absent before checkpoints recorded it: nothing to recover
        pushed = ckpt.count(saved["push_rows"], "push_rows", where)
        versions = [info["version"] for info in saved["shards"]]
        missed = missed_staleness(out / rundir.METRICS, run_state.session - 1, pushed, versions)
        run_state.staleness.add(missed)
        run_state.missed_pushes = int(missed.size)
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


def prepare_run_dir(out: Path, *, resume: bool, locked: bool = False) -> None:
    """Make sure ``out`` can hold a new run (or holds one to resume); never overwrite an existing run. ``locked``:
    this process holds ``out``'s lock (so a missing config is not another run still starting)."""
    if out.exists() and not out.is_dir():
        raise DownpourError(f"run directory {out} exists and is not a directory")
    if resume:
        if not (out / rundir.CONFIG).exists():
            raise CheckpointError(rundir.not_resumable(out, ours=locked))
        written = (rundir.METRICS, rundir.SUMMARY, rundir.FILTERS, rundir.WHITENING, REPORT)  # what a session writes
        if odd := [name for name in written if (out / name).exists() and not (out / name).is_file()]:
            raise DownpourError(f"run {out} holds {', '.join(odd)} as other than a file, which the resumed session "
                                "would have to replace after training: move it away first")  # fmt: skip
        return
    if has_checkpoint(out):
        raise DownpourError(f"run directory {out} already holds a run; use --resume {out} or another --out")
    if (problem := ckpt.state_file_problem(out / rundir.CHECKPOINT)) is not None:
        raise DownpourError(f"run directory {out} already holds a run, whose checkpoint cannot be read ({problem}): "
                            "use another --out")  # fmt: skip
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
    if (problem := ckpt.state_file_problem(out / rundir.CHECKPOINT)) is not None:  # there, not lost
        raise CheckpointError(f"cannot read the checkpoint of run {out}: {problem}")
    if (step := _checkpoint_recorded(out)) is not None:
        advice = (
            "restore it to resume, or start a new run"
            if resumable
            else "a simulated run is not resumed: simulate into a new --out"
        )
        missing = out / rundir.CHECKPOINT  # or its state.json alone, the file that commits a checkpoint
        missing = missing / ckpt.STATE_FILE if missing.is_dir() else missing
        raise DownpourError(f"run {out} saved a checkpoint at step {step:,}, but {missing} is missing "
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


def sessions_logged(out: Path) -> int:
    """How many sessions ``out``'s metrics.jsonl has start rows of."""
    with contextlib.suppress(OSError), open(out / rundir.METRICS, "rb") as lines:
        start = rundir.row_start("start")
        return sum(line.startswith(start) for line in lines)
    return 0


def _checkpoint_recorded(out: Path) -> int | None:
    """The step of a checkpoint that ``out``'s summary or metrics say was saved (None when they say of none): a run
    without its checkpoint then lost it, rather than stopping before its first."""
    step = (rundir.read_json_object(out / rundir.SUMMARY) or {}).get("checkpoint_step")
    if isinstance(step, int) and not isinstance(step, bool) and step > 0:
        return step
    steps = []  # periodic checkpoints saved (their rows' step), and the one each session ended with
    ends = (rundir.row_start("checkpoint"), rundir.row_start("end"))
    with contextlib.suppress(OSError), open(out / rundir.METRICS, "rb") as lines:
        for line in lines:
            if line.startswith(ends) and (row := rundir.json_object(line)) is not None:
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
