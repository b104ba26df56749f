"""``downpour study designs``: its grid, its table and answers, and its argument errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from downpour.cli import main
from downpour.errors import DownpourError
from downpour.study.designs import Cell, answers, base_config, default_grid, table_markdown


def test_the_default_grid_covers_every_design_first_layer_and_penalty_once() -> None:
    grid = default_grid()
    assert len({cell.name for cell in grid}) == len(grid) == 21
    assert {c.design for c in grid if c.question == "design"} == {"rica", "sparse-ae", "rbm", "conv", "cat"}
    templates = {(c.init, c.freeze) for c in grid if c.question == "templates"}
    assert templates == {("gabor", True), ("dog", True), ("random", True)}
    assert {c.penalty for c in grid if c.design == "sparse-ae"} == {"default", "none", "l1:0.1", "l2:0.1", "rica:0.1"}
    keys = Cell("templates", "cat", "dog", True).model_keys()
    assert keys["receptive_field"] == 5 and keys["init"] == "dog" and keys["freeze_first"] is True


def _row(question: str, design: str, probe: float, face: float, **extra: object) -> dict:
    cell = Cell(question, design, **extra)  # type: ignore[arg-type]
    return {"question": question, "design": design, "init": cell.init, "freeze": cell.freeze,
            "penalty": cell.penalty_label, "steps": 1000, "initial_loss": 50.0, "final_loss": 5.0,
            "gabor_fraction": 0.5, "probe": probe, "probe_raw": 0.96, "face": face, "face_jitter": face - 0.1,
            "face_raw": 0.85}  # fmt: skip


def test_answers_order_each_question_by_the_measurements() -> None:
    rows = [
        _row("design", "sparse-ae", 0.95, 0.9),
        _row("design", "rbm", 0.97, 0.8),
        _row("templates", "sparse-ae", 0.96, 0.7, init="gabor", freeze=True),
        _row("penalty", "sparse-ae", 0.90, 0.7, penalty="l1:0.1"),
        {**_row("penalty", "sparse-ae", 0.0, 0.0, penalty="l2:0.1"), "error": "diverged"},
    ]
    text = answers(rows)
    assert "templates, sparse-ae: probe accuracy learned 0.950 (face, jittered 0.800), gabor 0.960" in text[0]
    assert text[1] == "penalty, sparse-ae: kl:0.05,3 0.950, l1:0.1 0.900."
    assert text[2] == "design, by probe accuracy: rbm 0.970, sparse-ae 0.950."
    assert text[3] == "design, by jittered face test: sparse-ae 0.800, rbm 0.700."
    assert text[-1] == "failed: sparse-ae / learned / l2:0.1: diverged."
    table = table_markdown(rows)
    assert table.count("\n") == 2 + len(rows)
    assert "| templates | sparse-ae | gabor, frozen | kl:0.05,3 | 1,000 | 50 → 5 | 0.50 | 0.960 |" in table
    assert "failed: diverged" in table


def test_table_columns_and_the_best_probe_line_read_the_right_numbers() -> None:
    """Each number sits under its header (face held-out 0.700 and jittered 0.600 are different columns), and the
    best probe overall is the highest probe accuracy of every evaluated row (rbm at 0.970, not sparse-ae's 0.900)."""
    rows = [_row("design", "sparse-ae", 0.90, 0.7), _row("design", "rbm", 0.97, 0.8)]
    lines = table_markdown(rows).splitlines()
    header = [name.strip() for name in lines[0].strip("|").split("|")]
    row = dict(zip(header, (value.strip() for value in lines[2].strip("|").split("|")), strict=True))
    assert (row["design"], row["probe (digits)"], row["face, held-out"], row["face, jittered"]) == (
        "sparse-ae", "0.900", "0.700", "0.600",
    )  # fmt: skip
    best = next(line for line in answers(rows) if line.startswith("best probe overall"))
    assert best.startswith("best probe overall: rbm / learned / none at 0.970;")


def test_bad_budgets_are_refused() -> None:
    with pytest.raises(DownpourError, match=r"invalid --seconds: 0"):
        base_config(0)
    with pytest.raises(DownpourError, match=r"invalid --steps: 0"):
        base_config(10, steps=0)


def test_seed_and_settings_reach_every_run_except_what_the_grid_fixes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--seed`` and ``--set`` apply to every cell's config (a replication on other seeds, or with centred
    whitening); the keys the grid or the evaluation fixes are refused, naming why, before anything is written."""
    base = base_config(10, seed=5, overrides=["data.whiten_centre=true", "ps.lr=0.01"])
    assert (base.train.seed, base.data.whiten_centre, base.ps.lr, base.data.source) == (5, True, 0.01, "digits")
    for setting, why in [("model.features=3", "each cell sets its own model keys"),
                         ("data.source=natural-patches", "the probe scores the features on digits"),
                         ("train.seed=3", "use --seed"), ("cluster.backend=sim", "local backend")]:  # fmt: skip
        with pytest.raises(DownpourError, match=rf"--set {setting.split('=')[0]}: the designs study fixes it .*{why}"):
            base_config(10, overrides=[setting])
    with pytest.raises(DownpourError, match=r"invalid --seed: -1"):
        base_config(10, seed=-1)
    with pytest.raises(DownpourError, match=r"invalid --seed: 5000000000 \(must be 0 \.\. 4294967295\)"):
        base_config(10, seed=5_000_000_000)
    assert main(["study", "designs", "--set", "model.name=rbm", "--out", str(tmp_path / "s")]) == 2
    assert "--set model.name: the designs study fixes it" in capsys.readouterr().err
    assert main(["study", "designs", "--set", "ps.lr=fast", "--out", str(tmp_path / "s")]) == 2
    assert "ps.lr" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_the_command_refuses_a_bad_budget_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["study", "designs", "--steps", "0", "--out", str(tmp_path / "study")]) == 2
    assert capsys.readouterr().err.strip() == "downpour: error: invalid --steps: 0 (must be at least 1)"
    assert not (tmp_path / "study").exists()


def test_a_rerun_keeps_the_cells_that_trained_their_whole_budget(tmp_path: Path) -> None:
    from downpour.rundir import fresh_path, write_json
    from downpour.study.designs import _finished_rows

    setup = {"data": "digits", "steps": 1000}
    full = _row("design", "rbm", 0.9, 0.8)
    short = {**_row("design", "rica", 0.9, 0.8), "steps": 0}
    failed = {**_row("design", "conv", 0.9, 0.8), "error": "boom"}
    write_json(tmp_path / "results.json", {"setup": setup, "rows": [full, short, failed], "complete": False})
    kept = _finished_rows(tmp_path, setup)
    assert list(kept.values()) == [full]
    with pytest.raises(DownpourError, match="holds a study with other settings"):
        _finished_rows(tmp_path, {**setup, "steps": 10})
    (tmp_path / "run").mkdir()
    (tmp_path / "run-2").mkdir()
    assert fresh_path(tmp_path / "run") == tmp_path / "run-3"  # a rerun never overwrites a run
    assert fresh_path(tmp_path / "other") == tmp_path / "other"


def test_a_diverged_cell_is_a_failed_row_not_a_result(tmp_path: Path) -> None:
    """ps.lr = 1e30: the run diverges; its row says so (and names the rejected updates) instead of showing a probe
    and a face score of features trained into NaN, and the table reads "failed"."""
    from downpour import config as config_mod
    from downpour.study.designs import run_cell

    base = config_mod.from_dict({"ps": {"lr": 1e30}}, base_config(60, steps=40, workers=1))
    row = run_cell(Cell("design", "rica"), base, tmp_path / "cell")
    assert row["error"].startswith("training diverged (held-out loss ") and "lower ps.lr" in row["error"]
    assert "probe" not in row and "face" not in row
    assert "| failed: training diverged" in table_markdown([row])


def test_ctrl_c_in_a_rerun_keeps_every_finished_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rerun into a study's --out cut short by Ctrl-C at its first cell to train: the earlier finished rows it
    had not reached yet stay in results.json (it shrank from 21 rows to those reached, and the next rerun trained
    the others again)."""
    from downpour.rundir import write_json
    from downpour.study import designs

    cells = [designs.Cell("design", name) for name in ("rica", "sparse-ae", "rbm")]
    setup = designs.run_designs_study(seconds=10, out=tmp_path / "empty", steps=1000, cells=[])["setup"]
    finished = [_row("design", "sparse-ae", 0.9, 0.8), _row("design", "rbm", 0.9, 0.8)]  # whole budgets
    write_json(tmp_path / "results.json", {"setup": setup, "rows": finished, "complete": False})

    def ctrl_c(*args: object, **kwargs: object) -> dict:
        raise KeyboardInterrupt

    monkeypatch.setattr(designs, "run_cell", ctrl_c)  # rica, the first cell, has no finished row: it trains
    with pytest.raises(KeyboardInterrupt):
        designs.run_designs_study(seconds=10, out=tmp_path, steps=1000, cells=cells)
    kept = json.loads((tmp_path / "results.json").read_text())
    assert kept["complete"] is False and [row["design"] for row in kept["rows"]] == ["sparse-ae", "rbm"]
