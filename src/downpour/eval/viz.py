"""``downpour viz``: pictures of what a run learned — its first-layer filters and its units' optimal stimuli."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from downpour.eval.results import eval_dir, read_result, write_result
from downpour.eval.stimulus import optimal_stimuli
from downpour.report.filters import save_filter_grid
from downpour.runs import TrainedRun, load_run

FILTERS_PNG = "filters.png"
STIMULI_PNG = "optimal_stimuli.png"
DEFAULT_UNITS = 8


def default_units(trained: TrainedRun) -> list[int]:
    """The face-neuron test's most chosen unit (when the run has been evaluated) and the first units (at most
    :data:`DEFAULT_UNITS` in all, fewer when the model has fewer)."""
    width = trained.features(torch.zeros(1, *trained.input_shape)).shape[1]  # the model's units
    units = list(range(min(DEFAULT_UNITS, width)))
    face = read_result(trained.run_dir, "face_neuron")
    if face is not None and isinstance(face.get("most_chosen_unit"), int):
        units = [face["most_chosen_unit"], *[u for u in units if u != face["most_chosen_unit"]][: len(units) - 1]]
    return units


def run(run_dir: Path, *, units: list[int] | None = None, steps: int = 100, seed: int = 0) -> dict[str, Any]:
    """Write ``eval/filters.png``, ``eval/optimal_stimuli.png`` (one tile per unit, in order) and ``eval/viz.json``."""
    trained = load_run(run_dir)
    units = default_units(trained) if units is None else units
    stimuli, responses = optimal_stimuli(trained, units, steps=steps, seed=seed)  # (U, C, H, W), (U,)
    out = eval_dir(run_dir)
    model = trained.model
    save_filter_grid(model.filters(), getattr(model, "filter_shape", trained.input_shape), out / FILTERS_PNG)
    save_filter_grid(stimuli.flatten(1), trained.input_shape, out / STIMULI_PNG, scale=8)
    result = {
        "run_dir": str(trained.run_dir),
        "model": trained.config.model.name,
        "step": trained.step,
        "filters_png": str(out / FILTERS_PNG),
        "stimuli_png": str(out / STIMULI_PNG),
        "units": units,
        "responses": [float(r) for r in responses],
        "steps": steps,
        "norm_bound": float(stimuli.flatten(1).norm(dim=1).max()),
    }
    write_result(run_dir, "viz", result)
    return result
