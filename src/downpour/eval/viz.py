"""``downpour viz``: pictures of what a run learned — its first-layer filters and its units' optimal stimuli.

The optimal stimuli come from a gradient ascent (:func:`downpour.eval.stimulus.ascend`) that can fail: on a diverged
network the gradient overflows and the search never leaves its random start, on a broken one the responses are NaN.
Each unit's start and final responses are recorded in ``viz.json`` (``ascent_raised``: whether the search raised the
response, both finite), the units whose ascent failed are named on the console, and their tiles say so.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor

from downpour.console import warn
from downpour.errors import DownpourError
from downpour.eval.results import ASCENT_FAILURE_CAUSES, eval_dir, read_result, write_result
from downpour.eval.stimulus import Ascent, ascend
from downpour.report.filters import filter_grid, save_filter_grid
from downpour.runs import TrainedRun, load_run

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FILTERS_PNG = "filters.png"
STIMULI_PNG = "optimal_stimuli.png"
DEFAULT_UNITS = 8
MAX_STEPS = 100_000  # gradient-ascent steps: far past where the step size has shrunk to nothing useful (0.5 · r / 1e5)
TILE_INCHES = 1.5  # each stimulus tile with its two-line label, at 100 dpi: 150 pixels, the label 9 points


def default_units(trained: TrainedRun) -> list[int]:
    """The face-neuron test's most chosen unit (when the run has been evaluated) and the first units (at most
    :data:`DEFAULT_UNITS` in all, fewer when the model has fewer)."""
    width = trained.features(torch.zeros(1, *trained.input_shape)).shape[1]  # the model's units
    units = list(range(min(DEFAULT_UNITS, width)))
    face = read_result(trained.run_dir, "face_neuron")
    if face is not None and isinstance(face.get("most_chosen_unit"), int):
        units = [face["most_chosen_unit"], *[u for u in units if u != face["most_chosen_unit"]][: len(units) - 1]]
    return units


def check_steps(steps: Any) -> int:
    """``steps`` if it is a whole number in ``1..MAX_STEPS``, else a :class:`DownpourError` naming it."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise DownpourError(f"invalid --steps: {steps!r} (must be 1..{MAX_STEPS})")
    return steps


def stimuli_figure(stimuli: Tensor, shape: tuple[int, int, int], units: list[int], responses: list[float],
                   raised: list[bool]) -> Figure:  # fmt: skip
    """One tile per unit, row by row, each scaled to its own range and titled with its unit and its response (in red,
    marked "failed", where the search did not raise the response)."""
    from matplotlib.figure import Figure  # not pyplot: a caller's backend and open figures stay as they were

    count = len(units)
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(TILE_INCHES * cols, (TILE_INCHES + 0.3) * rows), layout="constrained")  # room for titles
    axes = fig.subplots(rows, cols, squeeze=False)
    flat = stimuli.detach().flatten(1)  # (U, C·H·W)
    for index, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if index >= count:
            continue
        tile = filter_grid(flat[index : index + 1], shape, pad=0)  # (H, W) or (H, W, 3), scaled into [0, 1]
        ax.imshow(tile, cmap="gray" if tile.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
        label = f"unit {units[index]}\n{responses[index]:.3g}" + ("" if raised[index] else " (failed)")
        ax.set_title(label, fontsize=9, color="black" if raised[index] else "tab:red")
    return fig


def _ascent(trained: TrainedRun, units: list[int], steps: int, seed: int, console: Console) -> Ascent:
    """The gradient ascent, with a progress bar on a terminal (none in a pipe or a log), gone once it ends."""
    bar = Progress(TextColumn("[bold]optimal stimuli"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                   TimeElapsedColumn(), console=console, disable=not console.is_terminal, transient=True)  # fmt: skip
    with bar:
        task = bar.add_task("ascent", total=steps)
        return ascend(trained, units, steps=steps, seed=seed, progress=lambda done: bar.update(task, completed=done))


def failed_ascents(units: list[int], found: Ascent) -> str:
    """The units whose ascent did not raise their response, with start → final, as words ("" when none)."""
    start, final = found.start_responses.tolist(), found.responses.tolist()
    failed = [f"{u} ({a:.3g} → {b:.3g})" for u, a, b, ok in zip(units, start, final, found.raised(), strict=True)
              if not ok]  # fmt: skip
    return ", ".join(failed)


def run(run_dir: Path, *, units: list[int] | None = None, steps: int = 100, seed: int = 0,
        console: Console | None = None) -> dict[str, Any]:  # fmt: skip
    """Write ``eval/filters.png``, ``eval/optimal_stimuli.png`` (one labelled tile per unit, in order) and
    ``eval/viz.json``. ``steps`` must be 1..:data:`MAX_STEPS` (checked before the run is loaded). Units whose ascent
    did not raise their response are named in a warning on ``console`` (default: standard error)."""
    check_steps(steps)
    console = Console(stderr=True) if console is None else console
    trained = load_run(run_dir)
    units = default_units(trained) if units is None else units
    found = _ascent(trained, units, steps, seed, console)
    stimuli, responses = found.stimuli, found.responses  # (U, C, H, W), (U,)
    raised = found.raised()
    out = eval_dir(run_dir)
    model = trained.model
    save_filter_grid(model.filters(), getattr(model, "filter_shape", trained.input_shape), out / FILTERS_PNG)
    shown = [float(r) for r in responses]
    stimuli_figure(stimuli, trained.input_shape, units, shown, raised).savefig(out / STIMULI_PNG, dpi=100)
    result = {
        "run_dir": str(trained.run_dir),
        "model": trained.config.model.name,
        "step": trained.step,
        "filters_png": str(out / FILTERS_PNG),
        "stimuli_png": str(out / STIMULI_PNG),
        "units": units,
        "responses": shown,
        "start_responses": [float(r) for r in found.start_responses],
        "ascent_raised": raised,
        "ascent_failed_units": [u for u, ok in zip(units, raised, strict=True) if not ok],
        "steps": steps,
        "norm_bound": float(stimuli.flatten(1).norm(dim=1).max()),
    }
    write_result(run_dir, "viz", result)
    if not all(raised):
        warn(console, f"the gradient ascent did not raise the response of unit(s) {failed_ascents(units, found)} "
                      f"(start → final): their pictures show no optimum ({ASCENT_FAILURE_CAUSES})")  # fmt: skip
    return result
