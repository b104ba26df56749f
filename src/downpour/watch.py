"""The driver's watch over a running cluster: polls, push rows and worker events, throughput, progress, and the
periodic evals and checkpoints (:func:`checkpoint_now`), until the budget is spent, the workers stop or Ctrl-C."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from rich.console import Console

from downpour import checkpoint as ckpt
from downpour import rundir
from downpour.backends.local import LocalCluster, WorkerEvent
from downpour.config import Config
from downpour.console import say, warn
from downpour.held_out import HeldOutLoss
from downpour.ps.shard import ShardBusy
from downpour.report.live import LiveProgress
from downpour.resume import FAULT_COUNTERS, RunState
from downpour.signals import interrupts_held

_POLL_SECONDS = 0.05
_THROUGHPUT_SECONDS = 1.0
# How long a periodic checkpoint or eval waits for a shard's lock (a push holds it for milliseconds) before it is
# skipped: a worker stopped (Ctrl-Z'd) or hung while it held the lock hung the driver and its time budget with it
SNAPSHOT_WAIT_S = 5.0
WORKER_MEMORY_HINT = "reduce train.batch_size or the model (model.features), or run fewer cluster.workers"


@dataclass
class Taken:
    """What :func:`checkpoint_now` measured and did."""

    snapshots: list[dict[str, Any]]
    step: int
    loss: float  # held-out loss of the snapshots' values
    values_finite: bool  # no parameter is NaN or Inf
    diverged: bool  # a tensor (parameters or rule state) is NaN or Inf, or the held-out loss is not finite
    saved: bool  # written into the run directory (not when it diverged, or nothing was pushed since the last one)


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
        "push_rows": run_state.push_rows,  # the rows after these that hold pushes of this checkpoint: not counted
        "worker_deaths": run_state.worker_deaths,
        **{key: getattr(run_state, key) for key in FAULT_COUNTERS},
        "config": config.to_dict(),
        "rng": {"seed": config.train.seed, "session": run_state.session, "worker_seeds": seeds},
        "saved_at": time.time(),
        "diverged": diverged,
        "data_counts": run_state.data_counts,
    }
    ckpt.save(out / rundir.CHECKPOINT, snapshots, state)


def checkpoint_now(out: Path, cluster: LocalCluster, config: Config, run_state: RunState, seeds: list[int],
                    signature: dict[str, Any], held_out_loss: HeldOutLoss, *, final: bool) -> Taken:  # fmt: skip
    """Snapshot the shards and save them, unless they diverged (a tensor NaN or Inf, or the held-out loss not
    finite) and the run directory holds a checkpoint already: a diverged one never replaces it. ``final``: the
    session's last checkpoint, saved even when diverged if there is no earlier one (nothing to lose, and the run
    keeps a checkpoint). Snapshots that did not diverge become the shards' restore points (what a Ray shard actor
    that dies comes back at); diverged ones never do, even when saved."""
    snapshots = cluster.snapshots() if final else cluster.snapshots(wait=SNAPSHOT_WAIT_S)
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


def _count_restores(cluster: Any, run_state: RunState) -> None:
    """Bring ``run_state.shard_restores`` and ``lost_updates`` up to date from the cluster (Ray backend only):
    earlier sessions' plus this session's, including a restore the polls have not reported yet that the snapshots
    just taken came after."""
    faults = getattr(cluster, "faults", None)
    if faults is not None:
        counts = faults()
        run_state.shard_restores = run_state.restores_before + counts["shard_restores"]
        run_state.lost_updates = run_state.lost_before + counts["lost_updates"]


def log_push_records(records: list[tuple], metrics: rundir.MetricsLog, run_state: RunState) -> None:
    """Write a push row per record and count the applied pushes' staleness (and the session's push rows)."""
    if not records:
        return
    run_state.push_rows += len(records)
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


def log_events(
    events: list[WorkerEvent],
    metrics: rundir.MetricsLog,
    run_state: RunState,
    console: Console,
    t0: float,
    workers: int,
) -> None:
    """Say and log the worker events of a poll; ``workers`` (the session's) tells whether its deaths left others."""
    deaths = sum(event.kind == "died" for event in events)
    others = run_state.worker_deaths - run_state.deaths_before + deaths < workers
    for event in events:
        if event.kind == "died":
            run_state.worker_deaths += 1
            if not event.said:  # a worker that failed said why already
                say(console, f"worker {event.worker} died ({event.detail})" + ("; the others go on" if others else ""))
        elif event.kind == "error":
            last_line = event.detail.strip().splitlines()[-1] if event.detail.strip() else "unknown error"
            say(console, f"worker {event.worker} failed: {last_line}", "red")
        elif event.kind == "stuck":  # a worker the end of the session had to kill (its unsent rows: its push log)
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
        elif event.kind == "push_rows":  # a dead worker's rows that no batch brought, from its push log
            if not event.said:  # some were lost
                warn(console, f"worker {event.worker}: {event.detail}")
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


def watch(
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
    diverged or nothing was pushed since the last one (:func:`checkpoint_now`: its held-out loss is measured, one
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
    held: list[int] = []  # the shards' versions in the checkpoint saved last

    def collect() -> None:
        """Log the push records and worker events that arrived since the last poll. A Ctrl-C meanwhile waits until
        they are logged: raised inside, it lost the records already received (458 rows of a sync run, once)."""
        with interrupts_held():
            records, events = cluster.poll()
            log_push_records(records, metrics, run_state)
            if held and any(ok and version <= held[shard] for _, _, shard, version, _, _, ok in records):
                metrics.flush()  # rows of pushes the saved checkpoint holds: on disk for a resume after a kill
            log_events(events, metrics, run_state, console, t0, config.cluster.workers)

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
                try:
                    if now >= next_checkpoint:
                        metrics.flush()  # the rows so far reach the file before the checkpoint that counts their work
                        taken = checkpoint_now(out, cluster, config, run_state, seeds, signature, held_out_loss,
                                                final=False)  # fmt: skip
                    if now >= next_eval:
                        if taken is not None:
                            step, loss = taken.step, taken.loss
                        else:  # the step read after the snapshot, as a checkpoint's: it counts the pushes there
                            values = [snap["values"] for snap in cluster.snapshots(wait=SNAPSHOT_WAIT_S)]
                            step = cluster.steps()
                            loss = held_out_loss(torch.cat(values))
                        metrics.write("eval", t=now - t0, step=step, examples=run_state.examples, held_out_loss=loss)
                        next_eval = now + train.eval_every
                except ShardBusy as exc:  # skipped, said; the budget still counts, and stop() kills the holder
                    warn(console, f"checkpoint or eval skipped: {exc}")
                    metrics.write("snapshot_skipped", t=time.time() - t0, detail=str(exc))
                    waited = time.time()  # the next tries count from the end of this one's wait
                    next_checkpoint = max(next_checkpoint, waited + train.checkpoint_every)
                    next_eval = max(next_eval, waited + train.eval_every) if train.eval_every else next_eval
                if taken is not None:
                    if taken.saved:
                        held = [snapshot["version"] for snapshot in taken.snapshots]
                    metrics.write("checkpoint", t=now - t0, step=taken.step, held_out_loss=taken.loss,
                                  saved=taken.saved, checkpoint_step=run_state.checkpoint_step)  # fmt: skip
                    metrics.flush()  # a driver killed now keeps the row of the checkpoint it saved
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
                        say(console, f"every worker has died; stopping the run{hint}", "red")
                    break
        except KeyboardInterrupt:
            interrupted = True
            say(console, "interrupted: stopping workers and writing a final checkpoint")
    return interrupted, WorkWindow(start, first_work, first_examples, last_seen, last_examples_seen), starved


def _unguarded_hint(no_work: bool) -> str:
    """A hint for the commonest cause of every local worker dying before any work (``no_work``): a script calling
    :func:`run_training` at module level, which each worker process runs again as it imports the script (Python's
    spawn rule; it raises "An attempt has been made to start a new process before ...")."""
    from downpour import train  # loaded already: it runs this watch

    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    names = vars(main).values() if main is not None else ()
    calls = any(value is train.run_training or value is train for value in names)  # not `downpour` itself
    if not no_work or script is None or not calls:
        return ""
    return (f" (if {Path(script).name} calls run_training at module level, each worker ran it again as it imported "
            'the script: call it under `if __name__ == "__main__":`)')  # fmt: skip
