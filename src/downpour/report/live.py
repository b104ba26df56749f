"""The live progress bar of ``downpour train``: examples/s, loss, mean staleness and pushes (the global step;
every shard applies an update per push, so the closing line's "updates applied" is pushes × shards)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


class LiveProgress:
    """A rich progress bar over the global step (when ``train.steps`` is set) or over wall-clock seconds."""

    def __init__(self, *, steps: int, seconds: float, console: Console, enabled: bool = True) -> None:
        self.by_steps = steps > 0
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            TextColumn("{task.fields[rate]:>8,.0f} ex/s"),
            TextColumn("loss {task.fields[loss]:.4g}"),
            TextColumn("stale {task.fields[stale]:.2f}"),
            TextColumn("{task.fields[pushes]:,} pushes"),
            TimeElapsedColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )
        total = steps if self.by_steps else seconds
        self.task = self.progress.add_task("train", total=total, rate=0.0, loss=float("nan"), stale=0.0, pushes=0)

    def __enter__(self) -> LiveProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, *, steps: int, elapsed: float, rate: float, loss: float, stale: float) -> None:
        """Redraw with the latest numbers (``steps``: the global step, shown as pushes)."""
        completed = steps if self.by_steps else elapsed
        self.progress.update(self.task, completed=completed, rate=rate, loss=loss, stale=stale, pushes=steps)


class SimulatedProgress:
    """A progress bar over the pushes of a simulated run (``cluster.backend = "sim"``), with simulated time."""

    def __init__(self, *, steps: int, console: Console, enabled: bool = True) -> None:
        self.progress = Progress(
            TextColumn("[bold]simulate"),
            BarColumn(),
            TextColumn("{task.completed:,.0f} pushes"),
            TextColumn("t_sim {task.fields[t]:.4g}"),
            TextColumn("loss {task.fields[loss]:.4g}"),
            TimeElapsedColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self.task = self.progress.add_task("simulate", total=steps or None, t=0.0, loss=float("nan"))

    def __enter__(self) -> SimulatedProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, pushes: int, t: float, loss: float) -> None:
        """Redraw with the pushes done, the simulated time and the held-out loss."""
        self.progress.update(self.task, completed=pushes, t=t, loss=loss)
