"""The cat network: its stages, its layout at full size, greedy vs joint learning, and a real training run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import CliResult
from downpour.config import DataConfig
from downpour.data import Dataset, load_dataset
from downpour.errors import ConfigError
from downpour.models.cat import CatNetwork, layout_report


def test_full_200x200_colour_layout_reports_about_a_billion_connections() -> None:
    """Built on the meta device (no memory): 3 stages of 18x18 fields, 8 maps, 5x5 pooling, as in Le et al. 2012."""
    report = layout_report((3, 200, 200), stages=3, receptive_field=18, maps=8, pool=5, lcn=5)
    sizes = [(s["in_size"], s["response_size"], s["pooled_size"]) for s in report["stages"]]
    assert sizes == [(200, 183, 179), (179, 162, 158), (158, 141, 137)]
    expected = 183**2 * 8 * 3 * 18 * 18 + 162**2 * 8 * 8 * 18 * 18 + 141**2 * 8 * 8 * 18 * 18
    assert report["connections"] == expected
    assert 1e9 < report["connections"] < 1.3e9
    assert report["parameters"] == 2 * expected  # encoding and decoding weights
    assert report["bytes_fp32"] == 4 * report["parameters"]


def test_an_image_too_small_for_the_stages_names_the_key() -> None:
    """Images too small for the fields, the pooling or the normalization window: the error names the key."""
    with pytest.raises(ConfigError, match=r"model\.receptive_field"):
        CatNetwork((1, 32, 32), stages=2, receptive_field=18)
    with pytest.raises(ConfigError, match=r"model\.lcn"):
        CatNetwork((1, 22, 22), receptive_field=18, pool=5, lcn=5)  # pools to 1x1


def test_wrong_image_shape_is_refused() -> None:
    """A batch of other images is an error, not silently reinterpreted."""
    net = CatNetwork((1, 32, 32))
    with pytest.raises(ValueError, match=r"expected \(B, 1, 32, 32\) or \(B, 1024\)"):
        net.loss(torch.zeros(2, 1, 16, 64))


def test_tied_layout_counts_a_template_at_every_place() -> None:
    """A tied network's connections are its weights times the places they are applied; FLOPs are twice that."""
    report = layout_report((1, 40, 40), stages=1, receptive_field=8, maps=4, pool=3, lcn=3, tied=True)
    assert report["connections"] == 4 * 8 * 8 * 33 * 33
    assert report["parameters"] == 2 * 4 * 8 * 8
    assert report["flops_per_example"] == 2 * report["connections"]


@pytest.mark.parametrize("tied", [False, True])
def test_shapes_through_the_stages(tied: bool) -> None:
    """Flat or image input; output of the last stage; first-stage filters shaped (C, f, f)."""
    net = CatNetwork((1, 40, 40), stages=2, receptive_field=6, maps=4, pool=3, lcn=3, tied=tied)
    x = torch.randn(3, 1600)
    assert net(x).shape == (3, 4, 40 - 5 - 2 - 5 - 2, 40 - 5 - 2 - 5 - 2)
    assert net.filters().shape[1] == 1 * 6 * 6
    assert net.filter_shape == (1, 6, 6)


def _first_stage_grad(net: CatNetwork, x: torch.Tensor, only_first: bool) -> torch.Tensor:
    net.zero_grad()
    if only_first:
        cost, _ = net.stages[0].cost(x.view(-1, *net.shape))
        cost.backward()
    else:
        net.loss(x).backward()
    return net.stages[0].encoder.weight.grad.clone()


def test_greedy_stages_get_no_gradient_from_later_stages_and_joint_ones_do() -> None:
    """Greedy: the first stage's gradient is that of its own cost alone. Joint: later costs reach it too."""
    torch.manual_seed(0)
    x = torch.randn(4, 1 * 30 * 30)
    greedy = CatNetwork((1, 30, 30), stages=2, receptive_field=5, maps=3, pool=3, lcn=3, greedy=True).double()
    assert torch.allclose(_first_stage_grad(greedy, x.double(), False), _first_stage_grad(greedy, x.double(), True))
    joint = CatNetwork((1, 30, 30), stages=2, receptive_field=5, maps=3, pool=3, lcn=3, greedy=False).double()
    joint.load_state_dict(greedy.state_dict())
    assert not torch.allclose(_first_stage_grad(joint, x.double(), False), _first_stage_grad(joint, x.double(), True))


@pytest.fixture(scope="module")
def crops() -> Dataset:
    """1,500 whitened 24x24 natural image crops (and 200 held out), loaded once for the module."""
    return load_dataset(DataConfig(source="natural-images", image_size=24, examples=1500, held_out=200), seed=0)


@pytest.mark.parametrize("tied", [False, True])
def test_the_rica_cost_falls_with_plain_adagrad(tied: bool, crops: Dataset) -> None:
    """A few hundred Adagrad steps on natural image crops lower the cost (untied and tied alike)."""
    data = crops
    torch.manual_seed(0)
    net = CatNetwork(data.shape, receptive_field=8, maps=4, pool=3, lcn=3, tied=tied)
    optimizer = torch.optim.Adagrad(net.parameters(), lr=0.02)
    with torch.no_grad():
        before = float(net.loss(data.held_out))
    for step in range(150):
        optimizer.zero_grad()
        net.loss(data.train[(step * 32) % 1200 :][:32]).backward()
        optimizer.step()
    with torch.no_grad():
        after = float(net.loss(data.held_out))
    assert after < 0.6 * before


def test_cat_network_trains_through_the_parameter_server(tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    """``model.name = "cat"`` on the local backend, 2 workers, 2 shards: the held-out loss falls."""
    run_dir = tmp_path / "cat"
    result = cli(
        "train", "--set", "model.name=cat", "--set", "data.source=natural-images", "--set", "data.examples=3000",
        "--set", "data.held_out=256", "--set", "model.receptive_field=10", "--steps", "120", "--seconds", "0",
        "--out", str(run_dir), "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["model"] == "cat"
    assert summary["final_loss"] < 0.5 * summary["initial_loss"]
    assert summary["updates_applied"] == 240
    assert (run_dir / "filters.png").read_bytes()[:4] == b"\x89PNG"


def test_cat_network_skips_flat_fields_in_worker_processes(tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    """``model.skip_variance`` on the local backend: the workers (one thread each) and the driver's held-out
    evaluation run the pair kernels, the summary counts the fields skipped, and the loss still falls."""
    run_dir = tmp_path / "cat-skip"
    result = cli(
        "train", "--set", "model.name=cat", "--set", "data.source=natural-images", "--set", "data.examples=2000",
        "--set", "data.held_out=128", "--set", "model.receptive_field=10", "--set", "model.skip_variance=0.02",
        "--steps", "80", "--seconds", "0", "--out", str(run_dir), "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    skip = summary["skip_variance"]
    assert 0.05 < skip["zeroed_fraction"] < 0.95
    assert skip["skipped_fraction"] == pytest.approx(skip["zeroed_fraction"])  # not computed, field by field
    assert summary["final_loss"] < 0.7 * summary["initial_loss"]
    assert "not computed" in result.stdout
