"""The local-optima test: the task's closed forms (gradient, minima, basins), the paired study's determinism and
pairing, its statistics, and the report it writes."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from downpour.errors import ConfigError
from downpour.study.optima import (
    DIVERGED,
    TiltedWells,
    answer_sentence,
    compare_arms,
    mcnemar_exact,
    run_optima,
    start_point,
    stuart_maxwell,
    tilted_well_roots,
    wilcoxon_paired,
    write_report,
)
from downpour.study.optima_report import final_loss_figure, minima_figure

TASKS = [TiltedWells(), TiltedWells(tilts=(0.5, -0.2, 0.05), noise=3.0, batch_size=4), TiltedWells(tilts=(1.2,))]
SMALL = {"workers": 8, "seeds": 12, "steps": 300, "lr": 0.01}


@pytest.fixture(scope="module")
def small_run() -> dict:
    """A small paired run: 8 workers, 12 seeds, sync vs downpour."""
    return run_optima(**SMALL)


# ---- the task -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS, ids=lambda t: f"d{t.dim}")
def test_minibatch_gradient_matches_autograd_of_the_example_loss(task: TiltedWells) -> None:
    points = torch.from_numpy(np.random.default_rng(1).uniform(-2, 2, size=(20, task.dim)))  # (20, d)
    for k, x in enumerate(points):
        loss, grad = task(x, 0, np.random.default_rng(k))
        # the same draw, by hand: the batch's mean tilt ā = c + noise/√B · z
        z = torch.from_numpy(np.random.default_rng(k).standard_normal(task.dim))
        tilt = torch.tensor(task.tilts, dtype=torch.float64) + task.gradient_noise * z
        x_req = x.clone().requires_grad_(True)
        expected = task.example_loss(x_req, tilt)
        expected.backward()
        assert loss == pytest.approx(float(expected.detach()), rel=1e-12, abs=1e-12)
        torch.testing.assert_close(grad, x_req.grad, rtol=1e-12, atol=1e-12)
        assert grad.dtype == x.dtype and grad.shape == x.shape


@pytest.mark.parametrize("task", TASKS, ids=lambda t: f"d{t.dim}")
def test_expected_gradient_matches_finite_differences(task: TiltedWells) -> None:
    x = np.random.default_rng(2).uniform(-1.8, 1.8, size=(50, task.dim))  # (50, d)
    h = 1e-6
    numeric = np.stack(
        [(task.loss(x + h * e) - task.loss(x - h * e)) / (2 * h) for e in np.eye(task.dim)], axis=-1
    )  # (50, d)
    np.testing.assert_allclose(task.gradient(x), numeric, rtol=1e-6, atol=1e-6)


def test_minibatch_noise_is_unbiased_with_the_stated_spread() -> None:
    task = TiltedWells(noise=6.0, batch_size=9)
    x = torch.tensor([0.3, -1.4], dtype=torch.float64)
    rng = np.random.default_rng(0)
    grads = np.stack([task(x, 0, rng)[1].numpy() for _ in range(20000)])  # (20000, 2)
    np.testing.assert_allclose(grads.mean(0), task.gradient(x.numpy()), atol=0.05)
    np.testing.assert_allclose(grads.std(0), [2.0, 2.0], rtol=0.03)  # 6 / √9


@pytest.mark.parametrize("tilt", [0.0, 0.1, 0.3, -0.7, 1.5])
def test_cubic_roots_are_the_stationary_points_of_one_well(tilt: float) -> None:
    left, middle, right = tilted_well_roots(tilt)
    assert left < middle < right
    for root in (left, middle, right):
        assert 4 * root**3 - 4 * root + tilt == pytest.approx(0.0, abs=1e-12)
    assert 12 * left**2 - 4 > 0 and 12 * right**2 - 4 > 0 and 12 * middle**2 - 4 < 0  # min, max, min


def test_a_tilt_with_one_well_is_refused() -> None:
    with pytest.raises(ConfigError, match="tilt"):
        TiltedWells(tilts=(0.3, 1.6))
    with pytest.raises(ConfigError, match="noise"):
        TiltedWells(noise=-1.0)


@pytest.mark.parametrize("task", TASKS, ids=lambda t: f"d{t.dim}")
def test_every_listed_minimum_is_a_stationary_point_with_the_stated_loss(task: TiltedWells) -> None:
    minima = task.minima()
    assert len(minima) == 2**task.dim
    assert len({m.location for m in minima}) == len(minima)
    assert [m.loss for m in minima] == sorted(m.loss for m in minima)
    for m in minima:
        x = np.asarray(m.location)
        np.testing.assert_allclose(task.gradient(x), 0.0, atol=1e-12)
        assert np.all(12 * x**2 - 4 > 0)  # the Hessian (diagonal) is positive definite
        # the stated loss, from the formula written out by hand
        by_hand = sum((xi * xi - 1) ** 2 + c * xi for xi, c in zip(x, task.tilts, strict=True))
        assert m.loss == pytest.approx(by_hand, abs=1e-12)
        assert float(task.loss(x)) == pytest.approx(m.loss, abs=1e-12)
        # a strict local minimum: every small step goes up
        for direction in np.random.default_rng(3).standard_normal((20, task.dim)):
            assert task.loss(x + 1e-3 * direction / np.linalg.norm(direction)) > m.loss


def test_default_minima_as_documented() -> None:
    minima = TiltedWells().minima()
    assert [m.name for m in minima] == ["m0", "m1", "m2", "m3"]
    assert [m.wells for m in minima] == [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    np.testing.assert_allclose([m.loss for m in minima], [-0.406, -0.206, 0.194, 0.394], atol=5e-4)
    np.testing.assert_allclose(minima[0].location, [-1.0356, -1.0123], atol=1e-4)
    np.testing.assert_allclose(minima[3].location, [0.9601, 0.9873], atol=1e-4)
    # m0 is the global minimum: nothing on a fine grid is lower
    grid = np.stack(np.meshgrid(*[np.linspace(-2, 2, 401)] * 2), axis=-1)  # (401, 401, 2)
    assert TiltedWells().loss(grid).min() >= minima[0].loss - 1e-9
    np.testing.assert_allclose(TiltedWells().barriers(), [(1.3167, 0.7171), (1.1019, 0.9019)], atol=1e-4)


@pytest.mark.parametrize("task", TASKS, ids=lambda t: f"d{t.dim}")
def test_points_near_each_minimum_are_classified_to_it(task: TiltedWells) -> None:
    rng = np.random.default_rng(4)
    for k, m in enumerate(task.minima()):
        near = np.asarray(m.location) + rng.uniform(-0.3, 0.3, size=(100, task.dim))  # (100, d)
        assert (task.classify(near) == k).all()
        np.testing.assert_array_less(task.distance_to_minimum(near), 0.3 * math.sqrt(task.dim) + 1e-12)
    assert task.classify(np.full(task.dim, np.nan)) == DIVERGED
    assert task.classify(np.full(task.dim, np.inf)) == DIVERGED
    assert math.isinf(float(task.distance_to_minimum(np.full(task.dim, np.nan))))


def test_basins_are_exact_for_the_gradient_flow() -> None:
    """Integrating the noise-free gradient flow from random points (even ones close to a basin boundary) ends at
    the minimum that :meth:`classify` names for the start."""
    task = TiltedWells()
    rng = np.random.default_rng(5)
    boundary = np.asarray([r[1] for r in task.roots()])
    starts = np.concatenate([rng.uniform(-2, 2, (200, 2)), boundary + rng.uniform(-0.02, 0.02, (50, 2))])
    x = starts.copy()
    for _ in range(4000):
        x -= 0.005 * task.gradient(x)
    locations = np.asarray([m.location for m in task.minima()])
    np.testing.assert_allclose(x, locations[task.classify(starts)], atol=1e-6)


def test_a_point_exactly_on_a_basin_boundary_goes_to_the_right_well() -> None:
    """The documented tie rule of :meth:`classify`: ``x = M`` goes to the right well, the next float below to the
    left one (default tilts: the corner ``M`` itself is m3's, the right well in both coordinates)."""
    task = TiltedWells()
    corner = np.asarray([r[1] for r in task.roots()])
    assert task.classify(corner) == 3
    assert task.classify(np.nextafter(corner, -np.inf)) == 0
    assert task.classify([corner[0], -1.0]) == 2 and task.classify([-1.0, corner[1]]) == 1


# ---- the paired study ---------------------------------------------------------------------------------------


def test_small_run_is_deterministic_and_paired(small_run: dict) -> None:
    again = run_optima(**SMALL)
    for a, b in zip(small_run["arms"], again["arms"], strict=True):
        for key in ("start", "end", "minimum", "final_loss", "traces", "counts"):
            assert a[key] == b[key], key
    assert small_run["comparisons"] == again["comparisons"]
    assert small_run["answer"] == again["answer"]
    sync, downpour = small_run["arms"]
    assert sync["start"] == downpour["start"]
    assert sync["seeds"] == downpour["seeds"] == list(range(12))
    expected = [start_point(s, 2, 1.6).tolist() for s in range(12)]
    assert sync["start"] == expected
    assert all(np.all(np.abs(start) <= 1.6) for start in expected)
    assert len({tuple(s) for s in expected}) == 12  # a different start per seed
    assert sync["traces"][0][0] == sync["start"][0]  # the trajectory begins at the seed's start
    assert sync["end"] != downpour["end"]


def test_small_run_classifies_and_counts_its_end_points(small_run: dict) -> None:
    task = TiltedWells()
    for arm in small_run["arms"]:
        end = np.asarray(arm["end"])
        assert arm["minimum"] == task.classify(end).tolist()
        np.testing.assert_allclose(arm["final_loss"], task.loss(end))
        assert sum(arm["counts"].values()) == 12
        for k, m in enumerate(task.minima()):
            assert arm["counts"][m.name] == arm["minimum"].count(k)
        assert arm["start_minimum"] == task.classify(np.asarray(arm["start"])).tolist()


def test_learning_rates_are_matched_per_gradient_or_per_update(small_run: dict) -> None:
    sync, downpour = small_run["arms"]
    # 300 pushes asked of 8 workers: 296 for every arm, 37 whole rounds (a round of the 4 left over would take
    # sync's full step on half a round's gradients; the simulator once took the whole round past the budget: 304)
    assert (sync["lr"], sync["steps"], sync["pushes"], sync["updates"]) == (8 * 0.01, 296, 296, 37)
    assert (downpour["lr"], downpour["steps"], downpour["pushes"], downpour["updates"]) == (0.01, 296, 296, 296)
    per_update = run_optima(workers=4, seeds=2, steps=50, lr=0.01, lr_match="update")
    sync, downpour = per_update["arms"]
    assert (sync["lr"], sync["steps"], sync["updates"]) == (0.01, 200, 50)
    assert (downpour["lr"], downpour["steps"], downpour["updates"]) == (0.01, 50, 50)


def test_an_arm_with_one_worker_is_plain_sequential_sgd() -> None:
    result = run_optima(workers=8, seeds=3, steps=150, lr=0.01, policies=("sync", "downpour@1"), trace_seeds=0)
    arm = result["arms"][1]
    assert (arm["name"], arm["workers"], arm["updates"]) == ("downpour@1", 1, 144)  # 18 whole rounds of sync's 8
    task = TiltedWells()
    for seed, end in zip(arm["seeds"], arm["end"], strict=True):
        x = torch.from_numpy(start_point(seed, 2, 1.6))
        rng = np.random.default_rng(seed)  # the simulator's mini-batch stream
        for _ in range(144):
            x = x - 0.01 * task(x, 0, rng)[1]
        torch.testing.assert_close(torch.tensor(end, dtype=torch.float64), x, rtol=1e-12, atol=1e-12)
    with pytest.raises(ConfigError, match="@"):
        run_optima(workers=2, seeds=1, steps=10, policies=("sync", "downpour@0"))
    with pytest.raises(ConfigError, match=r"invalid steps: 5 \(fewer than 8 pushes: a whole number of rounds"):
        run_optima(workers=8, seeds=1, steps=5)
    with pytest.raises(ConfigError, match=r"'sync:2' with lr_match='gradient' \(a sync arm with backup workers"):
        run_optima(workers=8, seeds=1, steps=300, policies=("sync:2", "downpour"))
    whole = run_optima(workers=8, seeds=1, steps=300, policies=("sync:2", "downpour"), lr_match="update")
    assert whole["arms"][1]["updates"] == 300  # per update, sync:2 runs its rounds: nothing to cut


def test_the_same_policy_in_both_arms_shows_no_difference() -> None:
    result = run_optima(workers=8, seeds=12, steps=200, lr=0.01, policies=("downpour", "downpour"))
    assert [arm["name"] for arm in result["arms"]] == ["downpour", "downpour#2"]
    comparison = result["comparisons"][0]
    assert comparison["global_minimum"]["p"] == 1.0
    assert comparison["minima"]["p"] == 1.0
    assert comparison["final_loss"]["p"] == 1.0
    assert comparison["final_loss"]["ties"] == 12
    assert result["answer"].startswith("No significant difference")


def test_statistics_return_p_in_the_unit_interval(small_run: dict) -> None:
    for comparison in small_run["comparisons"]:
        for test in ("global_minimum", "minima", "final_loss"):
            assert 0.0 <= comparison[test]["p"] <= 1.0
        assert -1.0 <= comparison["final_loss"]["rank_biserial"] <= 1.0
    assert "McNemar p=" in small_run["answer"] and "Wilcoxon p=" in small_run["answer"]


def test_mcnemar_exact_by_hand() -> None:
    base = np.array([True] * 10 + [False] * 6 + [False] * 4)
    other = np.array([True] * 10 + [True] * 6 + [False] * 4)
    result = mcnemar_exact(base, other)
    assert (result["base_only"], result["other_only"]) == (0, 6)
    assert result["p"] == pytest.approx(2 * 0.5**6)  # two-sided binomial, 6 of 6 discordant pairs one way
    assert result["odds_ratio"] == math.inf
    assert mcnemar_exact(base, base)["p"] == 1.0


def test_stuart_maxwell_with_two_classes_is_mcnemars_chi_square() -> None:
    base = np.array([0] * 20 + [0] * 3 + [1] * 9 + [1] * 8)
    other = np.array([0] * 20 + [1] * 3 + [0] * 9 + [1] * 8)
    result = stuart_maxwell(base, other, 2)
    assert result["statistic"] == pytest.approx((9 - 3) ** 2 / (9 + 3))
    assert result["df"] == 1
    assert result["table"] == [[20, 3], [9, 8]]
    three = stuart_maxwell(np.array([0, 1, 2, 2, 1, 0, 2]), np.array([1, 2, 0, 2, 1, 0, 0]), 4)
    assert 0.0 <= three["p"] <= 1.0 and three["df"] == 2  # class 3 unused
    assert stuart_maxwell(base, base, 2)["p"] == 1.0


def test_wilcoxon_paired_signs_and_ties() -> None:
    base = np.linspace(0.0, 1.0, 30)
    lower = wilcoxon_paired(base, base - 0.1 - 0.01 * np.arange(30))
    assert lower["other_lower"] == 30 and lower["rank_biserial"] == -1.0 and lower["p"] < 1e-5
    rounding = wilcoxon_paired(base, base + 1e-15)  # rounding-level differences are ties, not an effect
    assert rounding["ties"] == 30 and rounding["p"] == 1.0
    diverged = wilcoxon_paired(base, np.where(np.arange(30) < 20, np.inf, base))
    assert diverged["other_higher"] == 20 and diverged["ties"] == 10 and 0.0 <= diverged["p"] <= 1.0


def test_mcnemar_with_discordant_pairs_both_ways() -> None:
    """2 pairs where only the base hit, 6 where only the other did: the odds ratio is other_only / base_only = 3,
    and the exact two-sided p is P(X ≤ 2 or X ≥ 6), X ~ Bin(8, ½) = 2·(1 + 8 + 28)/256."""
    base = np.array([True] * 5 + [True] * 2 + [False] * 6 + [False] * 3)
    other = np.array([True] * 5 + [False] * 2 + [True] * 6 + [False] * 3)
    result = mcnemar_exact(base, other)
    assert (result["base_only"], result["other_only"], result["base_hits"], result["other_hits"]) == (2, 6, 7, 11)
    assert result["odds_ratio"] == 3.0
    assert result["p"] == pytest.approx(74 / 256, rel=1e-12)
    assert mcnemar_exact(other, base)["odds_ratio"] == pytest.approx(1 / 3)


def test_wilcoxon_paired_exact_two_sided_p_median_and_effect_by_hand() -> None:
    """Differences (other − base) 0.3, −0.1, 0.5, 0.7, −0.2, 0.9, 1.1, 6.0: ranks of |d| are 1..8 with the two
    negative ones at ranks 1 and 2, so W₋ = 3, W₊ = 33, r = (33 − 3)/36. Exact two-sided p: the sign patterns with
    W₋ ≤ 3 are the rank sets {}, {1}, {2}, {3}, {1, 2}, so p = 2·5/256. Median difference (0.5 + 0.7)/2 = 0.6
    (the mean, 1.15, is pulled up by the 6.0)."""
    diffs = np.array([0.3, -0.1, 0.5, 0.7, -0.2, 0.9, 1.1, 6.0])
    base = np.linspace(1.0, 2.0, 8)
    result = wilcoxon_paired(base, base + diffs)
    assert (result["pairs"], result["other_lower"], result["other_higher"], result["ties"]) == (8, 2, 6, 0)
    assert result["p"] == pytest.approx(10 / 256, rel=1e-9)
    assert result["rank_biserial"] == pytest.approx(30 / 36)
    assert result["median_difference"] == pytest.approx(0.6)
    assert result["mean_difference"] == pytest.approx(1.15)
    mirrored = wilcoxon_paired(base + diffs, base)  # the same pairs seen from the other arm: same p, sign flipped
    assert mirrored["p"] == pytest.approx(result["p"]) and mirrored["rank_biserial"] == pytest.approx(-30 / 36)


def test_wilcoxon_tie_tolerance_is_relative_to_the_base_value() -> None:
    """A difference within ``tie·(1 + |base|)`` counts as zero: around 1e8 that is 0.1, so +0.05 on every pair is
    rounding (all ties, p = 1) while +0.5 is a difference."""
    base = 1e8 + 1e3 * np.arange(10)
    within = wilcoxon_paired(base, base + 0.05)
    assert within["ties"] == 10 and within["p"] == 1.0 and within["rank_biserial"] == 0.0
    beyond = wilcoxon_paired(base, base + 0.5)
    assert beyond["other_higher"] == 10 and beyond["p"] < 0.01


def test_stuart_maxwell_p_value_and_a_class_that_only_agrees() -> None:
    """Two classes with 3 and 9 discordant pairs: χ² = 36/12 = 3 on 1 degree of freedom, p = erfc(√(3/2))
    (computed without scipy). Adding a class that both arms always agree on changes nothing: its row and column of
    S are zero, so df = rank(S) stays 1 (2 degrees of freedom would give p = e^{−3/2})."""
    base = np.array([0] * 20 + [0] * 3 + [1] * 9 + [1] * 8)
    other = np.array([0] * 20 + [1] * 3 + [0] * 9 + [1] * 8)
    expected_p = math.erfc(math.sqrt(1.5))
    two = stuart_maxwell(base, other, 2)
    assert two["p"] == pytest.approx(expected_p, rel=1e-9)
    agree = np.full(5, 2)
    three = stuart_maxwell(np.concatenate([base, agree]), np.concatenate([other, agree]), 3)
    assert three["table"][2] == [0, 0, 5]
    assert three["statistic"] == pytest.approx(3.0) and three["df"] == 1
    assert three["p"] == pytest.approx(expected_p, rel=1e-9)


def _arm(name: str, minimum: list[int], final_loss: list[float]) -> dict:
    """An arm as :func:`run_optima` records it, with just what the comparison and the answer read."""
    counts = {f"m{k}": minimum.count(k) for k in range(4)}
    return {"name": name, "minimum": minimum, "final_loss": final_loss, "counts": {**counts, "diverged": 0},
            "escaped_to_better": 0, "fell_to_worse": 0}  # fmt: skip


@pytest.mark.parametrize("downpour_first", [False, True])
def test_the_answer_names_the_arm_that_did_better(downpour_first: bool) -> None:
    """12 paired seeds: downpour reaches the global minimum in 11, sync in 2 (9 discordant pairs, all one way:
    McNemar p = 2/2⁹), and downpour ends lower in every pair (Wilcoxon p = 2/2¹²). Whichever arm is the base, the
    sentence must say downpour reached it more often and ended lower."""
    sync = _arm("sync", [0, 0] + [2] * 10, [-0.4 + 0.001 * k for k in range(2)] + [0.2 + 0.01 * k for k in range(10)])
    downpour = _arm("downpour", [0] * 11 + [2], [-0.41 + 0.002 * k for k in range(11)] + [0.1])
    base, other = (downpour, sync) if downpour_first else (sync, downpour)
    comparison = compare_arms(base, other, categories=4)
    assert comparison["global_minimum"]["p"] == pytest.approx(2 / 2**9)
    assert comparison["final_loss"]["p"] == pytest.approx(2 / 2**12)
    answer = answer_sentence({"arms": [base, other], "settings": {"seeds": 12}, "comparisons": [comparison]})
    assert "Downpour reached the global minimum significantly more often than sync" in answer
    assert "final losses are significantly lower for downpour" in answer
    lower, higher = (0, 12) if downpour_first else (12, 0)
    assert f"({other['name']} lower in {lower} pairs, {base['name']} in {higher}, 0 ties" in answer
    assert answer.endswith("(3 tests, each at 0.05 without correction for multiplicity: rerun with other seeds "
                           "(--first-seed) before believing a difference.)")  # fmt: skip


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="lr_match"):
        run_optima(workers=2, seeds=1, steps=10, lr_match="time")
    with pytest.raises(ConfigError, match="policies"):
        run_optima(workers=2, seeds=1, steps=10, policies=("sync",))
    with pytest.raises(ConfigError, match="lr"):
        run_optima(workers=2, seeds=1, steps=10, lr=-1.0)
    with pytest.raises(ConfigError, match="seeds"):
        run_optima(workers=2, seeds=0, steps=10)


# ---- the report ---------------------------------------------------------------------------------------------


def _strict(constant: str) -> None:
    raise ValueError(f"non-standard JSON constant {constant}")


def test_report_files_are_written_and_valid(small_run: dict, tmp_path: Path) -> None:
    paths = write_report(small_run, tmp_path / "report")
    names = sorted(p.name for p in paths)
    assert names == ["optima.json", "optima.md", "optima_final_loss.png", "optima_landscape.png", "optima_minima.png"]
    for path in paths:
        assert path.is_file() and path.stat().st_size > 0
    data = json.loads((tmp_path / "report" / "optima.json").read_text(), parse_constant=_strict)
    assert data["answer"] == small_run["answer"]
    assert [m["name"] for m in data["task"]["minima"]] == ["m0", "m1", "m2", "m3"]
    assert data["arms"][0]["counts"] == small_run["arms"][0]["counts"]
    markdown = (tmp_path / "report" / "optima.md").read_text()
    assert small_run["answer"] in markdown
    assert "| sync |" in markdown and "| downpour |" in markdown and "Stuart–Maxwell" in markdown
    for path in paths:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_with_out_writes_the_report_and_a_reproducing_call(tmp_path: Path) -> None:
    result = run_optima(workers=4, seeds=3, steps=60, lr=0.01, out=tmp_path)
    assert sorted(Path(p).name for p in result["files"])[0] == "optima.json"
    assert all(Path(p).is_file() for p in result["files"])
    assert result["command"] is None  # lr has no flag
    assert "lr=0.01" in result["call"] and result["seconds"] > 0
    plain = run_optima(workers=4, seeds=3, steps=60)
    assert plain["command"] == "downpour study optima --workers 4 --seeds 3 --steps 60"


def test_a_diverging_arm_is_counted_as_diverged(tmp_path: Path) -> None:
    result = run_optima(workers=4, seeds=3, steps=200, lr=1.0, task=TiltedWells(noise=0.0))
    for arm in result["arms"]:
        assert arm["counts"]["diverged"] == 3
        assert arm["minimum"] == [DIVERGED] * 3
        assert sum(arm["rejected"]) > 0
    assert result["comparisons"][0]["global_minimum"]["p"] == 1.0
    write_report(result, tmp_path)  # non-finite values become null: strict JSON still
    json.loads((tmp_path / "optima.json").read_text(), parse_constant=_strict)


def test_a_run_that_blew_up_to_finite_values_is_diverged_not_in_a_basin() -> None:
    """Sync at 1,024 workers takes steps of lr·1024 ≈ 2: its end points were finite but astronomical ((-6e41,
    -1e23), final losses up to 1.5e167) with no push rejected, and each was counted as reaching the minimum of the
    orthant it ended in. A run that ends above every start's loss has left the wells."""
    result = run_optima(workers=1024, seeds=3, steps=2048, policies=("sync", "downpour@1"), trace_seeds=0)
    sync, sequential = result["arms"]
    assert sum(sync["rejected"]) == 0 and sync["counts"]["diverged"] == 3 and sync["minimum"] == [DIVERGED] * 3
    assert sequential["counts"]["diverged"] == 0  # plain SGD at lr 0.002 reaches a basin from the same starts


def test_the_reproduce_line_names_the_first_seed() -> None:
    """A study from seed 100 printed a Python call to reproduce it, though ``--first-seed`` exists."""
    result = run_optima(workers=4, seeds=2, steps=40, first_seed=100)
    assert result["command"] == "downpour study optima --workers 4 --seeds 2 --steps 40 --first-seed 100"


def test_ctrl_c_keeps_the_arms_that_finished_when_two_can_be_compared(tmp_path: Path) -> None:
    """Ctrl-C after two of three arms: their comparison is written, marked incomplete; after one arm there is
    nothing to compare and nothing is written. (Every finished arm was thrown away.)"""
    said: list[str] = []

    def interrupt_after(arms: int) -> Callable[[str], None]:
        def progress(line: str) -> None:
            said.append(line)
            if len(said) == arms:
                raise KeyboardInterrupt

        return progress

    three = ("sync", "downpour", "downpour@1")
    with pytest.raises(KeyboardInterrupt):
        run_optima(workers=4, seeds=2, steps=40, policies=three, out=tmp_path / "two", progress=interrupt_after(2))
    saved = json.loads((tmp_path / "two" / "optima.json").read_text())
    assert saved["complete"] is False and len(saved["arms"]) == 2 and len(saved["comparisons"]) == 1
    assert "**Incomplete: interrupted after 2 of 3 arms**" in (tmp_path / "two" / "optima.md").read_text()
    said.clear()
    with pytest.raises(KeyboardInterrupt):
        run_optima(workers=4, seeds=2, steps=40, policies=three, out=tmp_path / "one", progress=interrupt_after(1))
    assert not (tmp_path / "one").exists() or not (tmp_path / "one" / "optima.json").exists()
    finished = run_optima(workers=4, seeds=2, steps=40, policies=three, out=tmp_path / "two")  # the same settings
    assert finished["complete"] is True and len(finished["arms"]) == 3


def _visible_ticks(axis: Any) -> list[float]:
    """The major tick values of ``axis`` inside its view."""
    low, high = sorted(axis.get_view_interval())
    return [float(t) for t in axis.get_majorticklocs() if low <= t <= high]


def test_count_axes_are_ticked_at_whole_runs_and_seeds() -> None:
    """With 3 seeds the runs per minimum and the seeds per paired difference are 0 to 3: ticks at 0.5 of a run said
    nothing a count can be."""
    result = run_optima(workers=4, seeds=3, steps=60, lr=0.01)
    runs = minima_figure(result).axes[0]
    seeds = final_loss_figure(result).axes[1]
    assert runs.get_ylabel() == "runs" and seeds.get_ylabel() == "seeds"
    for axis in (runs.yaxis, seeds.yaxis):
        ticks = _visible_ticks(axis)
        assert len(ticks) >= 2 and all(t == round(t) for t in ticks), ticks
