"""``downpour study``: the staleness grid, the local-optima test and the designs comparison (each writes a report
into ``--out``)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from downpour import config as config_mod
from downpour import rundir
from downpour.cli_paths import path_argument
from downpour.console import show
from downpour.errors import DownpourError
from downpour.study.earlier import complete_results, read_results


def add_study(sub: argparse._SubParsersAction) -> None:
    """The ``study`` command and its two studies."""
    p = sub.add_parser("study", help="studies (on the simulator by default) that write a report", description=__doc__)
    which = p.add_subparsers(dest="study", required=True)
    st = which.add_parser("staleness", help="policies x workers x seeds: loss, staleness, final-loss spread")
    st.add_argument("--config", type=path_argument, help="TOML over the study's defaults (model, data, rule, sim_*)")
    st.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a key")
    st.add_argument("--policies", default="downpour,sync,ssp:4,staleness-lr,dc-asgd,easgd", help="comma-separated")
    st.add_argument("--workers", default="1,8,64,1000", help="comma-separated worker counts")
    st.add_argument("--seeds", default="10", help="seeds per (policy, workers)")
    st.add_argument("--steps", type=int, help="gradients per run (default: the study's, 1500)")
    st.add_argument(
        "--backend",
        choices=("sim", "local"),
        default="sim",
        help="sim: the discrete-event simulator; local: real worker processes (time axis: wall seconds)",
    )
    st.add_argument("--out", type=path_argument, required=True, help="report directory")
    st.add_argument("--no-progress", action="store_true", help="no progress bar")
    op = which.add_parser("optima", help="sync vs async on a task with known minima: which minimum, significance")
    op.add_argument("--workers", type=int, default=64, help="simulated workers")
    op.add_argument("--seeds", type=int, default=100, help="paired runs (the same start for both policies)")
    op.add_argument("--steps", type=int, default=4000,
                    help="pushes per run, cut to whole rounds of sync (4000 at 64 workers: 3968)")  # fmt: skip
    op.add_argument("--first-seed", type=int, default=0, help="first seed (for a replication on new seeds)")
    op.add_argument("--out", type=path_argument, required=True, help="report directory")
    op.add_argument("--json", action="store_true", help="also print the result as JSON")
    de = which.add_parser("designs", help="designs x first layers x penalties, same data and budget: probe, faces")
    de.add_argument("--steps", type=int, default=1000, help="pushes per run (the same budget for every run)")
    de.add_argument("--seconds", type=float, default=60.0, help="wall-clock cap per run")
    de.add_argument("--workers", type=int, default=2, help="workers per run (local backend)")
    de.add_argument("--seed", type=int, default=0, help="seed of every run (data split, weights, batches)")
    de.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a key of every run (not model.*, data.source or the backend)")  # fmt: skip
    de.add_argument("--out", type=path_argument, required=True, help="report directory")
    de.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_design_workers(base: Any) -> None:
    """``--workers`` that every cell of the designs study would refuse: more worker processes than this machine's
    memory holds, or more workers than training examples."""
    from downpour.backends.local import check_local_workers
    from downpour.data import load_dataset

    try:
        check_local_workers(base.cluster.workers)
    except DownpourError as exc:
        raise DownpourError(str(exc).replace("invalid cluster.workers:", "invalid --workers:", 1)) from None
    examples = len(load_dataset(base.data, seed=base.train.seed).train)
    if base.cluster.workers > examples:
        raise DownpourError(f"invalid --workers: {base.cluster.workers} (more than the {examples} training examples "
                            f"of data.source {base.data.source!r}; each worker reads its own slice)")  # fmt: skip


@contextlib.contextmanager
def _says_what_was_kept(console: Console, out: Path, rerun: str, *, name: str = "results.json", what: str = "runs",
                        needed: str = "any run") -> Iterator[None]:  # fmt: skip
    """On Ctrl-C, say what ``out/<name>`` holds now (how many ``what`` finished; nothing before ``needed`` had),
    then stop as the command does (exit 130)."""
    try:
        yield
    except KeyboardInterrupt:
        path = out / name
        results = read_results(path)
        if results is None:
            show(console, f"interrupted before {needed} finished: nothing was written into {out}")
        elif complete_results(path):
            show(console, f"interrupted: {path} keeps the earlier complete study")
        else:
            rows = results.get("runs", results.get("rows", results.get("arms", [])))
            show(console, f"interrupted: {path} holds the {len(rows)} {what} that finished, marked incomplete; {rerun}")
        raise


def _bar(console: Console, enabled: bool) -> Progress:
    label = TextColumn("{task.fields[run]}", markup=False)  # a run's label as it is
    return Progress(TextColumn("[bold]study"), BarColumn(), MofNCompleteColumn(), label, TimeElapsedColumn(),
                    console=console, disable=not enabled)  # fmt: skip


# The file each study keeps its results in: one of another kind in --out is refused (staleness and designs, which
# share results.json, each refuse the other's settings).
RESULTS_FILES = {"staleness": "results.json", "designs": "results.json", "optima": "optima.json"}


def _check_out(out: Path, study: str) -> None:
    """A study's report directory must be a directory or one that can be made, and hold no other kind of study's
    results: refused before hours of runs, not after. Making it is tried (and undone): as root, ``os.access``
    said yes to ``/proc/nope``, which was refused only once every run had finished."""
    if out.exists() and not out.is_dir():
        raise DownpourError(f"invalid --out: {out} is a file, not a directory (the report directory to write)")
    existing = next(parent for parent in (out.absolute(), *out.absolute().parents) if parent.exists())
    if not existing.is_dir():
        raise DownpourError(f"invalid --out: {out} cannot be made: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DownpourError(f"invalid --out: {out} cannot be written: {existing} is not writable")
    made = [folder for folder in (out, *out.parents) if not folder.exists()]  # the deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownpourError(f"invalid --out: {out} cannot be made ({exc.strerror})") from None
    for folder in made:
        folder.rmdir()
    for name in set(RESULTS_FILES.values()) - {RESULTS_FILES[study]}:
        if (out / name).exists():
            raise DownpourError(f"invalid --out: {out} holds the results of another kind of study ({name}): use "
                                "another --out")  # fmt: skip


GRID_KEYS = {"ps.policy": "--policies", "cluster.workers": "--workers"}  # what the staleness grid sets per run
BUDGET_KEYS = ("train.seconds",)  # a training budget the study has none of: each run computes --steps gradients


def cmd_study(args: argparse.Namespace, console: Console) -> int:
    """Run the study named on the command line."""
    _check_out(args.out, args.study)
    if args.study == "staleness":
        from downpour.study import staleness

        config = staleness.study_config(args.config, args.set)
        named = config_mod.named_keys(args.config, args.set)  # checked by study_config already
        if "cluster.backend" in named and config.cluster.backend != args.backend:
            raise DownpourError(f"cluster.backend = {config.cluster.backend!r} is not how this study chooses its "
                                f"backend: pass --backend (sim or local; now {args.backend})")  # fmt: skip
        if clashes := sorted(named & GRID_KEYS.keys()):
            raise DownpourError(
                f"{clashes[0]} is set per run by the study's grid: pass {GRID_KEYS[clashes[0]]} instead"
            )
        if clashes := sorted(named & set(BUDGET_KEYS)):
            raise DownpourError(f"{clashes[0]} is not this study's budget: every run computes --steps gradients")
        grid = staleness.parse_grid(args.policies, args.workers, args.seeds)
        staleness.check_study(config, policies=grid.policies, workers=grid.workers, seeds=grid.seeds,
                              steps=args.steps, backend=args.backend)  # bad settings: before the bar  # fmt: skip
        with _bar(console, not args.no_progress) as bar:
            task = bar.add_task("study", total=len(grid.policies) * len(grid.workers) * grid.seeds, run="")

            def progress(done: int, total: int, run: dict) -> None:
                label = f"{run.get('policy')} x{run.get('workers')} seed {run.get('seed')}"
                bar.update(task, completed=done, run=label)

            with _says_what_was_kept(console, args.out, "rerun the command for a whole study"):
                staleness.run_study(config, policies=grid.policies, workers=grid.workers, seeds=grid.seeds,
                                    out=args.out, steps=args.steps, progress=progress,
                                    backend=args.backend)  # fmt: skip
        print(f"report in {args.out}: table.md, results.json and the figures")
        print((args.out / "table.md").read_text())
        return 0
    if args.study == "optima":
        for flag, value in (("--workers", args.workers), ("--seeds", args.seeds), ("--steps", args.steps)):
            if value < 1:
                raise DownpourError(f"invalid {flag}: {value} (must be at least 1)")
        if args.first_seed < 0:
            raise DownpourError(f"invalid --first-seed: {args.first_seed} (must be >= 0)")
        from downpour.study import optima  # after the flags: importing torch takes seconds

        if args.steps < (unit := optima.round_pushes(optima.DEFAULT_POLICIES, args.workers)):
            raise DownpourError(f"invalid --steps: {args.steps} (fewer than {unit} pushes, one round of sync at "
                                f"--workers {args.workers}: every arm runs whole rounds of it; raise --steps or "
                                "lower --workers)")  # fmt: skip

        rerun = "rerun the command for a whole study (two arms are needed to compare)"
        with _says_what_was_kept(console, args.out, rerun, name="optima.json", what="arms", needed="two arms"):
            result = optima.run_optima(workers=args.workers, seeds=args.seeds, steps=args.steps,
                                       first_seed=args.first_seed, out=args.out,
                                       progress=lambda line: show(console, line))  # fmt: skip
        if args.json:
            print(rundir.json_text(result))
        print(result["answer"], file=sys.stderr if args.json else sys.stdout)
        return 0
    if args.study == "designs":
        from downpour.study import designs

        base = designs.base_config(args.seconds, steps=args.steps, workers=args.workers, seed=args.seed,
                                   overrides=args.set)  # bad flags: before the bar  # fmt: skip
        _check_design_workers(base)
        rerun = "the same command trains the rest"
        with _bar(console, not args.no_progress) as bar, _says_what_was_kept(console, args.out, rerun):
            task = bar.add_task("study", total=len(designs.default_grid()), run="")

            def cell_started(done: int, total: int, name: str) -> None:
                bar.update(task, completed=done, run=name)

            result = designs.run_designs_study(seconds=args.seconds, steps=args.steps, out=args.out,
                                               workers=args.workers, seed=args.seed, overrides=args.set,
                                               progress=cell_started)  # fmt: skip
        print(f"report in {args.out}: report.md, table.md, results.json, runs/")
        print(result["table"])
        print("\n".join(f"- {line}" for line in result["answers"]))
        failed = [row for row in result["rows"] if "error" in row]
        if result["rows"] and len(failed) == len(result["rows"]):
            print(f"downpour: error: all {len(failed)} runs of the study failed; the first: {failed[0]['error']}",
                  file=sys.stderr)  # fmt: skip
            return 1
        return 0
    raise AssertionError(args.study)  # pragma: no cover - argparse restricts the choices
