"""``downpour bench ps`` runs every configuration and reports positive, consistent numbers."""

from __future__ import annotations

import json

from conftest import downpour


def test_bench_ps_json_has_every_figure_and_consistent_ratios() -> None:
    """A short run of the benchmark: each rate is positive and the ratios are the rates' quotients."""
    result = downpour("bench", "ps", "--seconds", "0.3", "--rounds", "2", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    keys = (
        "plain_examples_per_s", "hogwild_2w_examples_per_s", "local_1w_examples_per_s", "local_2w_examples_per_s",
        "push_pull_gbps", "memcpy_gbps",
    )  # fmt: skip
    for key in keys:
        assert report[key] > 0, key
    ratios = report["ratios"]
    windows = report["windows"]
    assert all(len(windows[name]) == 2 and min(windows[name]) > 0 for name in ("plain", "hogwild", "local1", "local2"))
    paired = sorted(a / b for a, b in zip(windows["local2"], windows["hogwild"], strict=True))
    assert ratios["local_2w_vs_hogwild"] == sum(paired) / 2  # median of the per-round ratios
    assert report["workload"]["num_params"] == 256 * 256
