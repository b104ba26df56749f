"""The staleness study: flag parsing, a tiny grid's report (every file, valid PNGs, one record per run),
determinism, the closed-form RICA gradient, and the published effect (Zhang et al. 2016) on a small real grid."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from downpour.backends.sim import ModelGradient
from downpour.config import ModelConfig
from downpour.errors import ConfigError
from downpour.models import build_model
from downpour.study.staleness import (
    STUDY_DEFAULTS,
    Grid,
    RICAGradient,
    divergence_reasons,
    parse_grid,
    quantile,
    run_study,
    study_config,
    summarize,
    table_markdown,
)
from downpour.study.staleness_report import _band

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PICTURES = ("loss_vs_updates.png", "loss_vs_time.png", "staleness_histograms.png", "final_loss.png")
TINY = ["data.examples=1000", "data.held_out=128", "model.features=16", "train.batch_size=8"]


# ---- flags ----------------------------------------------------------------------------------------------------


def test_parse_grid_reads_the_three_flags() -> None:
    grid = parse_grid("downpour, ssp:4,staleness-lr,easgd:2", "1,8, 64", "3")
    assert grid == Grid(["downpour", "ssp:4", "staleness-lr", "easgd:2"], [1, 8, 64], 3)
    assert parse_grid("sync", "1000", 10).seeds == 10


@pytest.mark.parametrize(
    ("policies", "workers", "seeds", "expected"),
    [
        ("downpour,bogus", "1", 1, "invalid --policies: 'bogus'"),
        ("ssp:x", "1", 1, "invalid --policies: 'ssp:x'"),
        ("staleness-lr:3", "1", 1, "invalid --policies: 'staleness-lr:3'"),
        ("", "1", 1, "invalid --policies: ''"),
        ("downpour,,sync", "1", 1, "invalid --policies: 'downpour,,sync'"),
        ("sync,sync", "1", 1, "sync is listed twice"),
        ("ssp:4,ssp:04", "1", 1, "ssp:04 is listed twice"),
        ("downpour", "x", 1, "invalid --workers: 'x' (comma-separated positive integers)"),
        ("downpour", "1,0", 1, "invalid --workers: '0'"),
        ("downpour", "8,-1", 1, "invalid --workers: '-1'"),
        ("downpour", "", 1, "invalid --workers: ''"),
        ("downpour", "8,8", 1, "invalid --workers: '8,8' (8 is listed twice)"),
        ("downpour", "1", 0, "invalid --seeds: 0"),
        ("downpour", "1", "two", "invalid --seeds: 'two'"),
        ("downpour", "1", True, "invalid --seeds: True"),
    ],
)
def test_parse_errors_name_the_flag_and_value(policies: str, workers: str, seeds: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_grid(policies, workers, seeds)
    assert expected in str(caught.value)


def test_run_study_checks_the_grid_before_running(tmp_path: Path) -> None:
    config = study_config(overrides=TINY)
    with pytest.raises(ConfigError, match=r"invalid --steps: 0"):
        run_study(config, policies=["downpour"], workers=[1], seeds=1, out=tmp_path, steps=0)
    with pytest.raises(ConfigError, match=r"invalid --policies: 'sync:2' with 2 workers"):
        run_study(config, policies=["downpour", "sync:2"], workers=[2], seeds=1, out=tmp_path, steps=10)
    with pytest.raises(ConfigError, match=r"invalid --policies: 'sync:1' \(backup workers drop late pushes, which "):
        run_study(config, policies=["downpour", "sync:1"], workers=[4], seeds=1, out=tmp_path, steps=10)
    with pytest.raises(ConfigError, match=r"invalid --policies: 'sync' with ps.backup_workers = 1 \(backup workers"):
        run_study(study_config(overrides=[*TINY, "ps.backup_workers=1"]), policies=["sync"], workers=[4], seeds=1,
                  out=tmp_path, steps=10)  # fmt: skip
    for setting, key in (("ps.n_fetch=4", "ps.n_fetch"), ("ps.n_push=2", "ps.n_push"), ("ps.local_apply=true",
                                                                                      "ps.local_apply")):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"invalid {key}: .*(sim backend)"):
            run_study(study_config(overrides=[*TINY, setting]), policies=["staleness-lr"], workers=[2], seeds=1,
                      out=tmp_path, steps=10)  # fmt: skip
    with pytest.raises(ConfigError, match=r"invalid --workers: 5000 \(more than the 1000 training examples"):
        run_study(config, policies=["downpour"], workers=[5000], seeds=1, out=tmp_path, steps=10)
    assert not (tmp_path / "results.json").exists()


def test_study_config_starts_from_the_study_defaults(tmp_path: Path) -> None:
    config = study_config()
    assert (config.model.features, config.data.patch_size, config.ps.rule) == (64, 8, "sgd")
    assert config.ps.lr == STUDY_DEFAULTS["ps"]["lr"]
    path = tmp_path / "study.toml"
    path.write_text('[ps]\nlr = 0.01\n[data]\nsource = "digits"\n')
    config = study_config(path, ["ps.lr=0.02"])
    assert (config.ps.lr, config.data.source, config.model.features) == (0.02, "digits", 64)
    with pytest.raises(ConfigError, match=r"invalid ps\.lr: -1"):
        study_config(overrides=["ps.lr=-1"])


def test_quantile_and_summary_keep_diverged_runs() -> None:
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.25) == 1.75
    assert quantile([1.0, 2.0, math.inf], 0.5) == 2.0
    assert quantile([1.0, math.inf], 0.5) == math.inf
    runs = [
        {"policy": "p", "workers": 2, "final_loss": loss, "initial_loss": 5.0, "diverged": loss is None,
         "sim_time": 1.0, "staleness": {"values": [0, 1], "counts": [1, 3]}}
        for loss in (1.0, None, 2.0, None)
    ]  # fmt: skip
    (row,) = summarize(runs)
    assert row["diverged"] == 0.5 and row["final_loss_median"] is None  # median of (1, 2, inf, inf) is inf
    assert row["final_loss_q25"] == pytest.approx(1.75) and row["final_loss_q75"] is None
    assert row["staleness_mean"] == pytest.approx(0.75) and row["staleness_p99"] == 1


def _run(final: float | None, values: list[int], counts: list[int], seed_index: int = 0) -> dict[str, Any]:
    """One run's record with what the summary and the table read."""
    return {"policy": "downpour", "workers": 8, "seed_index": seed_index, "final_loss": final, "initial_loss": 5.0,
            "diverged": False, "sim_time": 3.0, "staleness": {"values": values, "counts": counts}}  # fmt: skip


def test_summary_pools_the_seeds_staleness_and_reports_its_p99() -> None:
    """Two seeds: 90 pushes of staleness 1, then 8 of staleness 1 and 2 of staleness 7. Pooled: 100 pushes,
    mean (98 + 14)/100 = 1.12, median 1, and p99 7 (98 pushes are at or below 1, fewer than 99)."""
    (row,) = summarize([_run(1.0, [1], [90]), _run(2.0, [1, 7], [8, 2], seed_index=1)])
    assert row["staleness_mean"] == pytest.approx(1.12)
    assert row["staleness_p99"] == 7


def test_table_shows_each_cell_in_its_column() -> None:
    """The row of a cell holds, under their headers: the median of the final losses 1 and 2 (1.5), their
    quartiles by linear interpolation (1.25–1.75), the staleness mean (1.1) and p99 (7) pooled over seeds."""
    runs = [_run(1.0, [1], [90]), _run(2.0, [1, 7], [8, 2], seed_index=1)]
    grid = {"policies": ["downpour"], "workers": [8], "seeds": 2, "steps": 100}
    result = {"grid": grid, "config": study_config(overrides=TINY).to_dict(), "runs": runs, "cells": summarize(runs)}
    lines = table_markdown(result).splitlines()
    header = next(line for line in lines if line.startswith("| policy |"))
    (row,) = [line for line in lines if line.startswith("| downpour |")]
    cells = dict(zip(header.strip("|").split("|"), row.strip("|").split("|"), strict=True))
    cells = {name.strip(): value.strip() for name, value in cells.items()}
    assert cells["final loss median"] == "1.5"
    assert cells["IQR (q25–q75)"] == "1.25–1.75"
    assert cells["staleness mean"] == "1.1"
    assert cells["staleness p99"] == "7"
    assert cells["diverged"] == "0%"


def test_loss_bands_are_the_quartiles_and_median_over_runs() -> None:
    """Three runs with flat curves at losses 1, 2 and 4: on the log scale the band is the median ln 2 and the
    quartiles halfway between neighbours, so the plotted lower edge is √2, the line 2, the upper edge 2√2."""
    runs = [{"curve": {"grads": [0, 10], "loss": [v, v]}} for v in (1.0, 2.0, 4.0)]
    x, median, q25, q75 = _band(runs, "grads", cap=100.0, points=5)
    np.testing.assert_allclose(x, [0.0, 2.5, 5.0, 7.5, 10.0])
    np.testing.assert_allclose(median, 2.0)
    np.testing.assert_allclose(q25, math.sqrt(2.0))
    np.testing.assert_allclose(q75, 2.0 * math.sqrt(2.0))


def test_a_run_that_ends_above_its_initial_loss_diverged() -> None:
    """The documented definition: a non-finite final loss, a rejected push, or a final loss above the initial one,
    however little above."""
    assert divergence_reasons(10.0, 10.01, 0) == ["final loss above the initial loss"]
    assert divergence_reasons(10.0, 10.0, 0) == [] and divergence_reasons(10.0, 9.0, 0) == []
    assert divergence_reasons(10.0, math.nan, 0) == ["non-finite held-out loss"]
    assert divergence_reasons(10.0, 9.0, 2) == ["2 pushes rejected (NaN/Inf)"]


# ---- the closed-form RICA gradient --------------------------------------------------------------------------


def test_rica_gradient_matches_autograd() -> None:
    g = torch.Generator().manual_seed(0)
    examples = torch.randn(300, 36, generator=g)
    model = build_model(ModelConfig(name="rica", features=20, sparsity=0.3), 36, seed=1)
    auto = ModelGradient(model, examples, batch_size=16, workers=3)
    fast = RICAGradient(model, examples, batch_size=16, workers=3)
    params = auto.flat.values.clone() + 0.1 * torch.randn(auto.flat.numel, generator=g)
    for worker in range(3):
        loss_a, grad_a = auto(params, worker, np.random.default_rng(worker))
        loss_f, grad_f = fast(params, worker, np.random.default_rng(worker))
        assert loss_f == pytest.approx(loss_a, rel=1e-5)
        torch.testing.assert_close(grad_f, grad_a, rtol=1e-4, atol=1e-5)


# ---- a tiny grid: every file, one record per run, determinism --------------------------------------------------


def _tiny(out: Path) -> dict[str, Any]:
    config = study_config(overrides=TINY)
    return run_study(config, policies=["downpour", "easgd"], workers=[1, 4], seeds=2, out=out, steps=40)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("tiny")
    calls: list[tuple[int, int]] = []
    config = study_config(overrides=TINY)
    result = run_study(
        config, policies=["downpour", "easgd"], workers=[1, 4], seeds=2, out=out, steps=40,
        progress=lambda done, total, run: calls.append((done, total)),
    )  # fmt: skip
    assert calls == [(i, 8) for i in range(1, 9)]
    return out, result


def test_tiny_grid_writes_every_file(tiny: tuple[Path, dict[str, Any]]) -> None:
    out, result = tiny
    names = {"results.json", "table.md", *PICTURES}
    assert {p.name for p in out.iterdir()} == names
    assert sorted(Path(p).name for p in result["files"]) == sorted(names)
    for name in PICTURES:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, name
        import matplotlib.image

        image = matplotlib.image.imread(out / name)
        assert image.shape[0] >= 300 and image.shape[1] >= 600, (name, image.shape)
        assert float(image[..., :3].std()) > 0.01, name  # not a blank canvas

    saved = json.loads((out / "results.json").read_text())
    runs = saved["runs"]
    assert len(runs) == 8
    assert sorted((r["policy"], r["workers"], r["seed_index"]) for r in runs) == sorted(
        (p, n, s) for p in ("downpour", "easgd") for n in (1, 4) for s in (0, 1)
    )
    for run in runs:
        assert run["seed"] == run["seed_index"]  # train.seed 0 + index
        assert run["grad_evals"] == 40
        assert run["pushes"] == (10 if run["policy"] == "easgd" else 40)  # easgd: τ = 4 gradients per push
        curve = run["curve"]
        assert curve["pushes"][0] == 0 and curve["pushes"][-1] == run["pushes"]
        assert curve["grads"][-1] == 40 and len(curve["loss"]) >= 6
        assert curve["loss"][0] == run["initial_loss"] and curve["loss"][-1] == run["final_loss"]
        assert curve["time"] == sorted(curve["time"]) and curve["time"][-1] == run["sim_time"] > 0
        assert sum(run["staleness"]["counts"]) == run["applied"]
        assert run["final_loss"] < run["initial_loss"] and not run["diverged"]
        if run["workers"] == 1:
            assert run["staleness"]["max"] == 0
    assert [(c["policy"], c["workers"]) for c in saved["cells"]] == [
        ("downpour", 1), ("downpour", 4), ("easgd", 1), ("easgd", 4)
    ]  # fmt: skip
    assert saved["grid"] == {"policies": ["downpour", "easgd"], "workers": [1, 4], "seeds": 2, "steps": 40}
    assert saved["backend"] == saved["config"]["cluster"]["backend"] == "sim"  # it recorded "local", the default

    table = (out / "table.md").read_text()
    assert "| policy | workers | final loss median | IQR (q25–q75) | diverged | staleness mean |" in table
    for cell in saved["cells"]:
        assert f"| {cell['policy']} | {cell['workers']} | {cell['final_loss_median']:.4g} |" in table


def test_same_call_gives_the_same_results_json(tiny: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    out, _ = tiny
    _tiny(tmp_path)
    assert (tmp_path / "results.json").read_bytes() == (out / "results.json").read_bytes()


# ---- the published effect (Zhang, Gupta, Lian, Liu, IJCAI 2016) -------------------------------------------------


def test_fixed_lr_degrades_with_staleness_while_staleness_lr_keeps_converging(tmp_path: Path) -> None:
    """The study's default problem (RICA, 64 filters, whitened 8x8 patches, sgd at lr 0.03), 1,500 gradients per
    run: a fixed rate converges with 1 worker and diverges with 64 (staleness ≈ 63); the staleness-divided rate
    converges with 64 too, ending within 20% of the 1-worker run's drop from the initial loss."""
    config = study_config(overrides=["data.examples=4000"])
    result = run_study(config, policies=["downpour", "staleness-lr"], workers=[1, 64], seeds=1, out=tmp_path)
    runs = {(r["policy"], r["workers"]): r for r in result["runs"]}
    initial = runs["downpour", 1]["initial_loss"]
    fixed_1, fixed_64 = runs["downpour", 1], runs["downpour", 64]
    aware_1, aware_64 = runs["staleness-lr", 1], runs["staleness-lr", 64]

    assert not fixed_1["diverged"] and fixed_1["final_loss"] < 0.2 * initial
    assert fixed_64["diverged"]  # a fixed rate with 63 stale pushes in flight
    assert fixed_64["final_loss"] is None or fixed_64["final_loss"] > 3 * fixed_1["final_loss"]
    assert aware_1["final_loss"] == fixed_1["final_loss"]  # one worker: no staleness, the very same run
    assert not aware_64["diverged"] and aware_64["staleness"]["mean"] > 50
    gap = (aware_64["final_loss"] - aware_1["final_loss"]) / (initial - aware_1["final_loss"])
    assert 0 <= gap < 0.2, gap
    losses = aware_64["curve"]["loss"]
    assert all(b < a for a, b in itertools.pairwise(losses[1:]))  # keeps decreasing after the start


def test_sync_budget_is_whole_rounds(tmp_path: Path) -> None:
    """sync stops at the end of a round: the budget is rounded down to whole rounds of N pushes (at least one)."""
    config = study_config(overrides=TINY)
    result = run_study(config, policies=["sync"], workers=[3, 16], seeds=1, out=tmp_path, steps=10)
    runs = {r["workers"]: r for r in result["runs"]}
    assert (runs[3]["pushes"], runs[3]["grad_evals"], runs[3]["applied"]) == (9, 9, 9)
    assert (runs[16]["pushes"], runs[16]["grad_evals"]) == (16, 16)
    assert runs[3]["staleness"]["max"] == runs[16]["staleness"]["max"] == 0


def _visible_ticks(axis: Any) -> list[float]:
    """The major tick values of ``axis`` inside its view."""
    low, high = sorted(axis.get_view_interval())
    return [float(t) for t in axis.get_majorticklocs() if low <= t <= high]


def test_loss_vs_updates_says_it_counts_gradients_and_counts_are_ticked_whole(tmp_path: Path) -> None:
    """``loss_vs_updates.png`` plots against gradients computed (the budget every run is given), and now says so:
    its title read "against updates", though sync with 2 workers makes one server update of 2 gradients and its
    curve ends at 2, as every run's does. Gradients and staleness are counts: no ticks at half of one."""
    from downpour.study.staleness_report import loss_vs_gradients_figure, staleness_histograms_figure

    result = run_study(study_config(overrides=TINY), policies=["downpour", "sync"], workers=[1, 2], seeds=1,
                       out=tmp_path, steps=2)  # fmt: skip
    assert sorted(run["grad_evals"] for run in result["runs"]) == [2, 2, 2, 2]  # sync, 2 workers: 1 round of 2
    fig = loss_vs_gradients_figure(result)
    assert fig.get_suptitle() == "Held-out loss against gradients computed (2 per run)"
    for ax in fig.axes:
        assert ax.get_xlabel() == "gradients computed (all workers)"
        assert [line.get_xdata()[-1] for line in ax.get_lines()] == [2.0] * len(ax.get_lines()) != []
        ticks = _visible_ticks(ax.xaxis)
        assert len(ticks) >= 2 and all(t == round(t) for t in ticks), ticks
    for ax in staleness_histograms_figure(result).axes:
        ticks = _visible_ticks(ax.xaxis)
        assert len(ticks) >= 2 and all(t == round(t) for t in ticks), (ax.get_title(), ticks)
