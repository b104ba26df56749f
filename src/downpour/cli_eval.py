"""``downpour eval`` (face-neuron test, linear probe), ``downpour viz`` and ``downpour detect`` on a run directory.

Each writes its results under ``RUN_DIR/eval/`` and prints a table, or JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from downpour import rundir
from downpour.cli_paths import path_argument
from downpour.console import warn
from downpour.errors import DownpourError

# Seconds a command computes before its progress bar is drawn: a short evaluation (the default 10 face-neuron
# splits take a second or two) prints nothing but its result.
PROGRESS_AFTER_S = 2.0


def _units(text: str) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]``; anything else is an argparse error naming the value."""
    try:
        units = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated unit numbers, got {text!r}") from None
    if not units:
        raise argparse.ArgumentTypeError(f"expected at least one unit, got {text!r}")
    return units


def add_eval(sub: argparse._SubParsersAction) -> None:
    """The ``eval``, ``viz`` and ``detect`` commands."""
    p = sub.add_parser("eval", help="evaluate a trained run (writes RUN_DIR/eval/)", description=__doc__)
    which = p.add_subparsers(dest="eval", required=True)
    face = which.add_parser("face-neuron", help="best single unit at faces vs non-faces: held-out, jittered, baselines")
    face.add_argument("run_dir", type=path_argument, metavar="RUN_DIR")
    face.add_argument("--splits", type=int, default=10, help="random stratified halves to average over")
    face.add_argument("--seed", type=int, default=0, help="seed of the halves, the jitter and the random filters")
    face.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    face.add_argument("--no-progress", action="store_true", help="no progress bar (drawn once it takes over 2 s)")
    probe = which.add_parser("probe", help="logistic regression on frozen features vs raw pixels")
    probe.add_argument("run_dir", type=path_argument, metavar="RUN_DIR")
    probe.add_argument("--data", default="digits", help="labelled data set (digits: scikit-learn's 8x8 digits)")
    probe.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")

    viz = sub.add_parser("viz", help="first-layer filters and optimal stimuli of units (PNG in RUN_DIR/eval/)")
    viz.add_argument("run_dir", type=path_argument, metavar="RUN_DIR")
    viz.add_argument("--units", type=_units, help="comma-separated units (default: the face unit and the first 7)")
    viz.add_argument("--steps", type=int, default=100, help="gradient-ascent steps of the optimal stimulus (1..100000)")
    viz.add_argument("--json", action="store_true", help="print the result as JSON")

    detect = sub.add_parser("detect", help="one unit's response over a larger image, as a heat map")
    detect.add_argument("run_dir", type=path_argument, metavar="RUN_DIR")
    detect.add_argument("image", type=path_argument, metavar="IMAGE")
    detect.add_argument("--unit", type=int, help="unit to map (default: the face unit if evaluated, else 0)")
    detect.add_argument("--stride", type=int, help="pixels between windows (default: a quarter of the input side)")
    detect.add_argument("--scale", type=float, default=1.0, help="resize the image by this factor first")
    detect.add_argument(
        "--out",
        type=path_argument,
        help="picture to write, by its suffix: .png, .pdf, .svg, .jpg, ... "
        "(default: RUN_DIR/eval/detect_<name>-<ext>.png)",
    )
    detect.add_argument("--json", action="store_true", help="print the result as JSON")


class _LateBar:
    """A progress bar on a terminal that is drawn only once the work has taken :data:`PROGRESS_AFTER_S` seconds and
    erased when it ends (never when ``enabled`` is false, nor in a pipe or a log, where Rich would leave the last
    bar behind); called with ``(done, total, what)`` as the work goes on."""

    def __init__(self, console: Console, title: str, *, enabled: bool) -> None:
        self.enabled, self.started = enabled and console.is_terminal, time.monotonic()
        self.bar = Progress(TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[what]}", markup=False), TimeElapsedColumn(),
                            TimeRemainingColumn(), console=console, transient=True)  # fmt: skip
        self.task = None

    def __enter__(self) -> _LateBar:
        return self

    def __call__(self, done: int, total: int, what: str) -> None:
        if not self.enabled:
            return
        if self.task is None:
            if time.monotonic() - self.started < PROGRESS_AFTER_S:
                return
            self.task = self.bar.add_task("", total=total, what=what.replace("_", " "))
            self.bar.start()
        self.bar.update(self.task, completed=done, what=what.replace("_", " "))

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.task is not None:
            self.bar.stop()


def _table_console() -> Console:
    return Console(width=None if sys.stdout.isatty() else 120)


def _warn_if_diverged(run_dir: Path, console: Console) -> None:
    """Results of a checkpoint that diverged describe a broken network: say so before they are shown."""
    from downpour.runs import diverged_checkpoint

    if (divergence := diverged_checkpoint(run_dir)) is not None:
        warn(console, f"the checkpoint of {run_dir} is the one its training diverged with ({divergence}): these "
                      "results describe that network")  # fmt: skip


def cmd_eval(args: argparse.Namespace, console: Console) -> int:
    """Run ``eval face-neuron`` or ``eval probe``."""
    if args.eval == "face-neuron":
        from downpour.eval import face_neuron

        face_neuron.check_splits(args.splits)  # before the run is read
        _warn_if_diverged(args.run_dir, console)
        with _LateBar(console, "face-neuron", enabled=not args.no_progress) as bar:
            result = face_neuron.run(args.run_dir, splits=args.splits, seed=args.seed, progress=bar)
        if args.json:
            print(rundir.json_text(result))
        else:
            face_neuron.print_table(result, _table_console())
        return 0
    if args.eval == "probe":
        from downpour.eval import probe

        _warn_if_diverged(args.run_dir, console)
        result = probe.run(args.run_dir, data=args.data)
        if args.json:
            print(rundir.json_text(result))
        else:
            probe.print_table(result, _table_console())
        return 0
    raise AssertionError(args.eval)  # pragma: no cover - argparse restricts the choices


def cmd_viz(args: argparse.Namespace, console: Console) -> int:
    """Run ``viz``: filter grid and optimal stimuli."""
    from downpour.eval import viz

    viz.check_steps(args.steps)  # before the run is read
    _warn_if_diverged(args.run_dir, console)
    result = viz.run(args.run_dir, units=args.units, steps=args.steps, console=console)
    if args.json:
        print(rundir.json_text(result))
    else:
        print(f"filters: {result['filters_png']}")
        print(f"optimal stimuli of units {', '.join(map(str, result['units']))}: {result['stimuli_png']}")
    return 0


def cmd_detect(args: argparse.Namespace, console: Console) -> int:
    """Run ``detect``: a unit's heat map over an image, with its time per megapixel."""
    from downpour.eval import detect

    if args.stride is not None and not 1 <= args.stride <= detect.MAX_STRIDE:
        raise DownpourError(f"invalid --stride: {args.stride} (must be 1..{detect.MAX_STRIDE})")
    _warn_if_diverged(args.run_dir, console)
    result = detect.run(args.run_dir, args.image, unit=args.unit, stride=args.stride, scale=args.scale, out=args.out)
    if args.json:
        print(rundir.json_text(result))
    else:
        rows, cols = result["map_shape"]
        windows = f"{result['windows']:,} window{'s' if result['windows'] != 1 else ''}"
        print(f"unit {result['unit']}: {windows} ({rows}x{cols}, stride {result['stride']}) in "
              f"{result['seconds']:.2f} s, {result['seconds_per_megapixel']:.2f} s per megapixel; "
              f"heat map: {result['heat_map']}")  # fmt: skip
    return 0
