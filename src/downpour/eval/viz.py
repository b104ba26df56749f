"""``downpour viz``: pictures of what a run learned — its first-layer filters and its units' optimal stimuli.

The optimal stimuli come from a gradient ascent (:func:`downpour.eval.stimulus.ascend`) that can fail: on a diverged
network the gradient overflows and the search never leaves its random start, on a broken one the responses are NaN.
Each unit's start and final responses are recorded in ``viz.json`` (``ascent_raised``: whether the search raised the
response, both finite), and the units whose ascent failed are named on the console.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from downpour.console import warn
from downpour.errors import DownpourError
from downpour.eval.results import eval_dir, read_result, write_result
from downpour.eval.stimulus import Ascent, ascend
from downpour.report.filters import save_filter_grid
from downpour.runs import TrainedRun, load_run

FILTERS_PNG = "filters.png"
STIMULI_PNG = "optimal_stimuli.png"
DEFAULT_UNITS = 8
MAX_STEPS = 100_000  # gradient-ascent steps: far past where the step size has shrunk to nothing useful (0.5 · r / 1e5)


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
    """Write ``eval/filters.png``, ``eval/optimal_stimuli.png`` (one tile per unit, in order) and
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
    save_filter_grid(stimuli.flatten(1), trained.input_shape, out / STIMULI_PNG, scale=8)
    shown = [float(r) for r in responses]
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
                      "(start → final): their pictures show no optimum (a diverged or broken network, or a unit "
                      "without a gradient)")  # fmt: skip
    return result
