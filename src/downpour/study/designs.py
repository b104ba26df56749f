"""``downpour study designs``: designs × first layers × penalties on the same data and budget, then evaluated.

Three questions, one grid of real training runs (local backend; the same data, workers, rule and budget for
every run: ``--steps`` pushes, so every design sees as many examples, with ``--seconds`` of wall clock as a cap),
each run evaluated by the digits linear probe (:mod:`downpour.eval.probe`) and the held-out, jittered face-neuron
test (:mod:`downpour.eval.face_neuron`), plus the run summary's Gabor-fit figure:

- *design*: rica, sparse-ae, rbm, conv and cat, each with its own penalty and a learned first layer;
- *templates*: hand-made Gabor and difference-of-Gaussians first layers, and fresh random ones, kept fixed
  (``model.freeze_first``) while the rest trains, against the learned layer of the same design;
- *penalty*: the sparse autoencoder and RICA with each penalty of :mod:`downpour.objectives`.

Everything trains on scikit-learn's digits (8×8, whitened), the data the probe scores, so that the probe's
reference points apply (fixed 80/20 split: raw pixels ≈ 0.96, BernoulliRBM(100) ≈ 0.93, k-means(256) ≈ 0.98).
Writes ``results.json``, ``table.md`` and ``report.md`` into ``--out``, one run directory per cell under
``runs/``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from downpour import config as config_mod
from downpour import rundir
from downpour.config import Config
from downpour.errors import DownpourError

FEATURES = 128  # first-layer filters of every design (conv: maps; cat: 16 maps at every location)
DESIGN_KEYS: dict[str, dict[str, Any]] = {  # what each design needs to fit 8x8 examples
    "conv": {"receptive_field": 5, "features": 32},
    "cat": {"receptive_field": 5, "maps": 16, "pool": 2, "lcn": 3},
}
DEFAULT_PENALTIES = {"rica": "rica:0.1", "cat": "rica:0.1 (pooled)", "conv": "rica:0.1", "sparse-ae": "kl:0.05,3",
                     "rbm": "none"}  # fmt: skip
QUESTIONS = ("design", "templates", "penalty")
FIXED_KEYS = {  # what --set may not change, and why
    "data.source": "the probe scores the features on digits",
    "cluster.backend": "every cell trains on the local backend",
    "cluster.workers": "use --workers",
    "train.steps": "use --steps",
    "train.seconds": "use --seconds",
    "train.seed": "use --seed",
}


@dataclass(frozen=True)
class Cell:
    """One training run of the grid: the question it answers, its design, first layer and penalty."""

    question: str
    design: str
    init: str = "learned"
    freeze: bool = False
    penalty: str = "default"

    @property
    def name(self) -> str:
        """A directory-safe name, unique in the grid."""
        parts = [self.design, self.init + ("-frozen" if self.freeze else ""), self.penalty]
        return "_".join(parts).replace(":", "-").replace(",", "-")

    @property
    def penalty_label(self) -> str:
        """The penalty as trained (the design's own for ``default``)."""
        return DEFAULT_PENALTIES[self.design] if self.penalty == "default" else self.penalty

    def model_keys(self) -> dict[str, Any]:
        """The ``[model]`` keys of this cell."""
        keys = {"name": self.design, "features": FEATURES, **DESIGN_KEYS.get(self.design, {})}
        return {**keys, "init": self.init, "freeze_first": self.freeze, "penalty": self.penalty}


def default_grid() -> list[Cell]:
    """21 runs: 5 designs; Gabor / DoG / random first layers frozen in 3 designs; 4 + 3 other penalties."""
    cells = [Cell("design", design) for design in ("rica", "sparse-ae", "rbm", "conv", "cat")]
    cells += [Cell("templates", design, init, True) for design in ("sparse-ae", "rbm", "cat")
              for init in ("gabor", "dog", "random")]  # fmt: skip
    cells += [Cell("penalty", "sparse-ae", penalty=p) for p in ("none", "l1:0.1", "l2:0.1", "rica:0.1")]
    cells += [Cell("penalty", "rica", penalty=p) for p in ("none", "l1:0.1", "l2:0.1")]
    return cells


def base_config(seconds: float, *, steps: int = 1000, workers: int = 2, seed: int = 0,
                overrides: list[str] | None = None) -> Config:  # fmt: skip
    """What every cell shares: digits, whitened; ``workers`` workers, 2 shards, Adagrad at 0.02; ``steps`` pushes,
    at most ``seconds`` of wall clock; ``seed`` for the data's split and shuffle, the weights and the batches;
    ``overrides`` (``--set section.key=value``) over that, except what the grid and the evaluation fix: ``model.*``
    (each cell's), the data source (the probe scores digits) and the backend."""
    if not seconds > 0:
        raise DownpourError(f"invalid --seconds: {seconds} (must be > 0)")
    if steps < 1:
        raise DownpourError(f"invalid --steps: {steps} (must be at least 1)")
    if workers < 1:
        raise DownpourError(f"invalid --workers: {workers} (must be at least 1)")
    if not 0 <= seed <= config_mod.MAX_SEED:
        raise DownpourError(f"invalid --seed: {seed} (must be 0 .. {config_mod.MAX_SEED})")
    base = config_mod.from_dict({
        "data": {"source": "digits"},
        "train": {"seconds": float(seconds), "steps": steps, "seed": seed, "checkpoint_every": 3600.0},
        "cluster": {"workers": workers},
    })  # fmt: skip
    nested = config_mod.overrides_to_dict(overrides or [])
    for name in (f"{section}.{key}" for section, keys in nested.items() for key in keys):
        why = "each cell sets its own model keys" if name.startswith("model.") else FIXED_KEYS.get(name)
        if why is not None:
            raise DownpourError(f"--set {name}: the designs study fixes it ({why})")
    return config_mod.from_dict(nested, base) if nested else base


def run_cell(cell: Cell, base: Config, run_dir: Path) -> dict[str, Any]:
    """Train ``cell`` into ``run_dir`` and evaluate it: one row of the table (``error`` set if a step failed)."""
    from downpour.eval import face_neuron, probe
    from downpour.train import run_training

    row: dict[str, Any] = {**asdict(cell), "penalty": cell.penalty_label, "run_dir": str(run_dir)}
    start = time.time()
    try:
        config = config_mod.from_dict({"model": cell.model_keys()}, base)
        summary = run_training(config, run_dir, console=Console(stderr=True, quiet=True), show_progress=False)
        if summary["interrupted"]:  # Ctrl-C: the run is saved, cut short; not a result (a rerun trains it again)
            raise KeyboardInterrupt
        row.update(steps=summary["steps"], initial_loss=summary["initial_loss"], final_loss=summary["final_loss"],
                   gabor_fraction=summary["gabor_fit"]["fraction"], gabor_median_r2=summary["gabor_fit"]["median_r2"],
                   rejected=summary["updates_rejected"])  # fmt: skip
        if summary["diverged"]:  # its features are NaN or meaningless: no probe, no face test, the row says why
            raise DownpourError(f"training diverged (held-out loss {summary['final_loss']}, "
                                f"{summary['updates_rejected']:,} updates rejected): lower ps.lr")  # fmt: skip
        probed = probe.run(run_dir, data="digits")
        row.update(features=probed["features"], probe=probed["accuracy"], probe_raw=probed["raw_pixels_accuracy"])
        faces = face_neuron.run(run_dir)
        row.update(face=faces["heldout_accuracy"], face_jitter=faces["jitter_heldout_accuracy"],
                   face_raw=faces["baselines"]["raw_pixel"]["jitter_heldout_accuracy"])  # fmt: skip
    except DownpourError as exc:
        row["error"] = str(exc)
    row["seconds"] = time.time() - start
    return row


def _fmt(value: Any, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def table_markdown(rows: list[dict[str, Any]]) -> str:
    """One markdown table, grouped by question."""
    lines = ["| question | design | first layer | penalty | steps | held-out loss | Gabor-like | probe (digits) "
             "| face, held-out | face, jittered |", "|---|---|---|---|---:|---|---:|---:|---:|---:|"]  # fmt: skip
    for row in rows:
        first = row["init"] + (", frozen" if row["freeze"] else "")
        if "error" in row:
            lines.append(f"| {row['question']} | {row['design']} | {first} | {row['penalty']} | failed: "
                         f"{row['error']} | | | | | |")  # fmt: skip
            continue
        loss = f"{row['initial_loss']:.3g} → {row['final_loss']:.3g}"
        lines.append(
            f"| {row['question']} | {row['design']} | {first} | {row['penalty']} | {row['steps']:,} | {loss} "
            f"| {_fmt(row['gabor_fraction'], 2)} | {_fmt(row['probe'])} | {_fmt(row['face'])} "
            f"| {_fmt(row['face_jitter'])} |"
        )
    return "\n".join(lines) + "\n"


def _ok(rows: list[dict[str, Any]], question: str) -> list[dict[str, Any]]:
    return [row for row in rows if row["question"] == question and "error" not in row]


def _who(row: dict[str, Any]) -> str:
    first = row["init"] + (" (frozen)" if row["freeze"] else "")
    return f"{row['design']} / {first} / {row['penalty']}"


def answers(rows: list[dict[str, Any]]) -> list[str]:
    """What the measurements say about each question, as plain sentences computed from ``rows`` (no judgement
    beyond ordering: the README interprets them)."""
    out = []
    learned = {row["design"]: row for row in _ok(rows, "design")}
    for design in sorted({row["design"] for row in _ok(rows, "templates")}):
        base = learned.get(design)
        hand = sorted((r for r in _ok(rows, "templates") if r["design"] == design), key=lambda r: -r["probe"])
        parts = [f"{r['init']} {r['probe']:.3f} (face, jittered {r['face_jitter']:.3f})" for r in hand]
        if base is not None:
            parts.insert(0, f"learned {base['probe']:.3f} (face, jittered {base['face_jitter']:.3f})")
        out.append(f"templates, {design}: probe accuracy " + ", ".join(parts) + ".")
    for design in sorted({row["design"] for row in _ok(rows, "penalty")}):
        group = [r for r in _ok(rows, "penalty") if r["design"] == design]
        if design in learned:
            group.append(learned[design])
        group.sort(key=lambda r: -r["probe"])
        out.append(f"penalty, {design}: " + ", ".join(f"{r['penalty']} {r['probe']:.3f}" for r in group) + ".")
    designs = sorted(_ok(rows, "design"), key=lambda r: -r["probe"])
    if designs:
        out.append("design, by probe accuracy: " + ", ".join(f"{r['design']} {r['probe']:.3f}" for r in designs) + ".")
        by_face = sorted(designs, key=lambda r: -r["face_jitter"])
        out.append("design, by jittered face test: " +
                   ", ".join(f"{r['design']} {r['face_jitter']:.3f}" for r in by_face) + ".")  # fmt: skip
    evaluated = [r for r in rows if "error" not in r]
    if evaluated:
        best = max(evaluated, key=lambda r: r["probe"])
        out.append(f"best probe overall: {_who(best)} at {best['probe']:.3f}; raw pixels {best['probe_raw']:.3f} "
                   f"on the same split; best raw pixel on the jittered face test {best['face_raw']:.3f}.")  # fmt: skip
    failed = [r for r in rows if "error" in r]
    if failed:
        out.append("failed: " + "; ".join(f"{_who(r)}: {r['error']}" for r in failed) + ".")
    return out


def report_markdown(result: dict[str, Any]) -> str:
    """``report.md``: the setup, the table and the computed answers."""
    setup = result["setup"]
    lines = [
        "# downpour study designs",
        "",
        f"Every run: `{setup['data']}`, {setup['workers']} workers, Adagrad lr {setup['lr']}, batch "
        f"{setup['batch_size']}, {setup['steps']:,} pushes (at most {setup['seconds']:g} s of wall clock) on the "
        f"local backend, seed {setup.get('seed', 0)}, "
        + (f"with {', '.join(f'`{item}`' for item in setup['set'])}, " if setup.get("set") else "")
        + f"{FEATURES} first-layer filters (conv: 32 maps, cat: 16 maps per location); held-out loss is each "
        "design's own cost (not comparable across designs). Gabor-like: fraction of first-layer filters whose "
        "Gabor fit has R² > 0.8. Probe: logistic regression on the features, digits, fixed stratified 80/20 split. "
        "Face: the best single unit chosen on one half of lfw_subset and scored on the other (10 splits), clean "
        "and with every image jittered.",
        "",
        result["table"],
        "## What the numbers say",
        "",
        *[f"- {line}" for line in result["answers"]],
        "",
        "One run per cell, with no interval: on 360 test digits one standard error of a probe accuracy is about one "
        "point, so rankings within a point or two are not differences.",
        "",
        f"Time of this invocation: {result['seconds']:.0f} s (cells kept from an earlier one not counted).",
    ]
    return "\n".join(lines) + "\n"


def _key(cell: Cell | dict[str, Any]) -> tuple:
    if isinstance(cell, Cell):
        return (cell.question, cell.design, cell.init, cell.freeze, cell.penalty_label)
    return (cell["question"], cell["design"], cell["init"], cell["freeze"], cell["penalty"])


def _finished_rows(out: Path, setup: dict[str, Any]) -> dict[tuple, dict[str, Any]]:
    """Rows of an earlier study in ``out`` with the same setup that trained their whole budget (kept on a rerun);
    a study with other settings there is refused."""
    path = out / "results.json"
    if not path.exists():
        return {}
    try:
        previous = json.loads(path.read_text())
        rows = previous["rows"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise DownpourError(f"{path} is not a study's results ({exc}); use another --out") from None
    if previous.get("setup") != setup:
        raise DownpourError(f"{out} holds a study with other settings ({previous.get('setup')}); use another --out")
    return {_key(row): row for row in rows if "error" not in row and row.get("steps", 0) >= setup["steps"]}


def run_designs_study(*, seconds: float, out: Path, steps: int = 1000, workers: int = 2, seed: int = 0,
                      overrides: list[str] | None = None, cells: list[Cell] | None = None,
                      progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Train and evaluate every cell (default :func:`default_grid`) into ``out``; write the report; return it.
    ``seed`` and ``overrides`` as :func:`base_config` takes them.

    Run again with the same ``out`` and settings, it keeps the cells that trained their whole budget and trains
    the others again (a run cut short by the wall-clock cap on a busy machine, a failed or unfinished one).
    """
    base = base_config(seconds, steps=steps, workers=workers, seed=seed, overrides=overrides)
    cells = cells if cells is not None else default_grid()
    setup = {"data": base.data.source, "workers": workers, "lr": base.ps.lr, "batch_size": base.train.batch_size,
             "seconds": seconds, "steps": steps, "features": FEATURES}  # fmt: skip
    if seed:  # recorded only when given, so that a study written before they existed reruns into its --out
        setup["seed"] = seed
    if overrides:
        setup["set"] = list(overrides)
    done = _finished_rows(out, setup)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    rows: list[dict[str, Any]] = []

    def save_so_far() -> None:  # with the earlier study's finished rows not reached yet: a rerun cut short keeps them
        rundir.write_json(out / "results.json", {"setup": setup, "rows": [*rows, *done.values()], "complete": False})

    for index, cell in enumerate(cells):
        if progress is not None:
            progress(index, len(cells), cell.name)
        row = done.pop(_key(cell), None)
        if row is None:  # not run yet, failed, or cut short (by the wall-clock cap): train it (again)
            try:
                row = run_cell(cell, base, rundir.fresh_path(out / "runs" / cell.name))
            except KeyboardInterrupt:  # Ctrl-C: what finished, this rerun's and earlier ones', stays in results.json
                save_so_far()
                raise
        rows.append(row)
        save_so_far()
    if progress is not None:
        progress(len(cells), len(cells), "done")
    result = {"setup": setup, "rows": rows, "complete": True, "seconds": time.time() - start}
    result["table"] = table_markdown(rows)
    result["answers"] = answers(rows)
    rundir.write_json(out / "results.json", result)
    rundir.atomic_write_text(out / "table.md", result["table"])
    rundir.atomic_write_text(out / "report.md", report_markdown(result))
    return result
