"""The cat network: its stages, its layout at full size, greedy vs joint learning, and a real training run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import CliResult
from downpour.config import DataConfig, ModelConfig
from downpour.data import Dataset, load_dataset
from downpour.errors import ConfigError
from downpour.models import build_model
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


def _responses(x: torch.Tensor, weight: torch.Tensor, field: int) -> torch.Tensor:
    """``W₁x`` written out: location ``l``'s maps are ``W[l] · patch_l(x)`` (``weight`` ``(L, M, P)``, or one
    ``(M, C, f, f)`` template bank for every location): ``(B, M, R, R)``."""
    patches = F.unfold(x, field)  # (B, C·f·f, L), patches in row-major order of their places
    side = x.shape[-1] - field + 1
    per_place = weight.flatten(1).expand(patches.shape[-1], -1, -1) if weight.dim() == 4 else weight  # (L, M, P)
    return torch.einsum("lmp,bpl->bml", per_place, patches).unflatten(2, (side, side))


def _reconstruction(h: torch.Tensor, weight: torch.Tensor, field: int, size: int) -> torch.Tensor:
    """``W₂ᵀh`` written out: each place's maps sent back through its weights and summed where fields overlap."""
    per_place = weight.flatten(1).expand(h.shape[2] * h.shape[3], -1, -1) if weight.dim() == 4 else weight
    return F.fold(torch.einsum("lmp,bml->bpl", per_place, h.flatten(2)), (size, size), field)


def _paper_cost(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, *, field: int, pool: int, sparsity: float,
                epsilon: float) -> torch.Tensor:  # fmt: skip
    """Le et al. 2012's stage cost, mean over examples: ``‖W₂ᵀW₁x − x‖² + λ Σⱼ sqrt(ε + Hⱼ(W₁x)²)``, Hⱼ(h)² the
    sum of h² over pooling window j (``pool × pool``, stride 1)."""
    h = _responses(x, w1, field)
    error = (_reconstruction(h, w2, field, x.shape[-1]) - x).pow(2).sum(dim=(1, 2, 3))
    window_sums = F.avg_pool2d(h.pow(2), pool, 1, divisor_override=1)
    return (error + sparsity * torch.sqrt(epsilon + window_sums).sum(dim=(1, 2, 3))).mean()


@pytest.mark.parametrize("tied", [False, True])
def test_a_stage_cost_and_its_gradients_are_the_papers_formula(tied: bool) -> None:
    """The stage cost (value and gradients for W₁ and W₂) is the reconstruction-ICA cost written out above, with
    distinct W₁ and W₂ and an ε large enough to count (ε = 0.5): the ε inside the pooled penalty, the decoder's
    own weights (not flipped templates) and the gradient through both weights."""
    torch.manual_seed(0)
    net = CatNetwork((2, 11, 11), receptive_field=4, maps=3, pool=3, lcn=3, tied=tied, sparsity=0.3,
                     epsilon=0.5).double()  # fmt: skip
    stage = net.stages[0]
    with torch.no_grad():
        stage.decoder_weight.normal_(0, 0.2)  # W₂ ≠ W₁
    x = torch.randn(3, 2, 11, 11, dtype=torch.float64)
    cost, _ = stage.cost(x)
    got = torch.autograd.grad(cost, (stage.encoder.weight, stage.decoder_weight))
    w1 = stage.encoder.weight.detach().clone().requires_grad_()
    w2 = stage.decoder_weight.detach().clone().requires_grad_()
    expected_cost = _paper_cost(x, w1, w2, field=4, pool=3, sparsity=0.3, epsilon=0.5)
    expected = torch.autograd.grad(expected_cost, (w1, w2))
    torch.testing.assert_close(cost.detach(), expected_cost.detach(), rtol=1e-12, atol=1e-12)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tied", [False, True])
def test_a_stage_decodes_with_the_adjoint_of_its_encoder(tied: bool) -> None:
    """With W₂ = W₁ the decoder is the encoder's transpose: ``⟨W₁x, h⟩ = ⟨x, W₂ᵀh⟩`` for any x and h (tied: the
    transposed convolution of the same templates, not of the templates flipped)."""
    torch.manual_seed(1)
    stage = CatNetwork((2, 10, 10), receptive_field=4, maps=3, pool=2, lcn=3, tied=tied).double().stages[0]
    with torch.no_grad():
        stage.decoder_weight.copy_(stage.encoder.weight)
    x = torch.randn(2, 2, 10, 10, dtype=torch.float64)
    h = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        left, right = (stage.encode(x) * h).sum(), (x * stage.decode(h)).sum()
    assert float(left) == pytest.approx(float(right), rel=1e-12)
    assert abs(float(left)) > 1e-3  # not a trivial 0 = 0


@pytest.mark.parametrize("greedy", [True, False])
def test_the_network_loss_is_the_sum_of_its_stage_costs_on_normalised_outputs(greedy: bool) -> None:
    """Each stage learns on the previous stage's output, which is the contrast-normalised pooled responses (the
    stage's forward), not its pooled responses before normalisation: loss = cost₁(x) + cost₂(stage₁(x))."""
    torch.manual_seed(2)
    net = CatNetwork((1, 20, 20), stages=2, receptive_field=4, maps=3, pool=2, lcn=3, greedy=greedy).double()
    x = torch.randn(3, 1, 20, 20, dtype=torch.float64)
    first, second = net.stages
    with torch.no_grad():
        expected = first.cost(x)[0] + second.cost(first(x))[0]
        unnormalised = first.cost(x)[0] + second.cost(first.pool(first.encode(x)))[0]
        got = net.loss(x)
    assert float(got) == pytest.approx(float(expected), rel=1e-12)
    assert abs(float(unnormalised) - float(expected)) > 1e-3 * abs(float(expected))  # the test can tell them apart


def test_a_stage_zeroes_the_responses_of_flat_fields_in_its_forward() -> None:
    """With ``skip_variance = τ > 0``, fields whose input variance is below τ output zero in the stage's output as in
    its cost: forward = norm(pool(W₁x with flat fields' responses zeroed)), which differs from the dense stage."""
    torch.manual_seed(3)
    net = CatNetwork((1, 16, 16), receptive_field=4, maps=2, pool=2, lcn=3, skip_variance=1e-4).double()
    stage = net.stages[0]
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    x[:, :, :8] = 0.3  # the top half flat: fields lying in rows 0..7 have variance 0
    h = _responses(x, stage.encoder.weight.detach(), 4)  # (B, 2, 13, 13)
    variance = F.unfold(x, 4).var(dim=1, unbiased=False).view(2, 13, 13)  # each field's input variance
    kept = h * (variance >= 1e-4).unsqueeze(1)
    assert 0 < int((variance < 1e-4).sum()) < variance.numel()
    with torch.no_grad():
        got = stage(x)
        expected = stage.norm(stage.pool(kept))
        dense = stage.norm(stage.pool(h))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(got, dense, atol=1e-3)


def test_gabor_templates_start_both_the_encoder_and_the_decoder() -> None:
    """``model.init = gabor`` puts templates in W₁, and W₂ starts equal to W₁ as in the default init (a decoder
    left at the random weights it was built with reconstructs through other filters than it encodes with)."""
    config = ModelConfig(name="cat", init="gabor", receptive_field=6, maps=4, pool=2, lcn=3)
    stage = build_model(config, 144, seed=0, shape=(1, 12, 12)).stages[0]
    default = build_model(ModelConfig(name="cat", receptive_field=6, maps=4, pool=2, lcn=3), 144, seed=0,
                          shape=(1, 12, 12)).stages[0]  # fmt: skip
    assert not torch.equal(stage.encoder.weight, default.encoder.weight)  # the templates replaced the default
    assert torch.equal(stage.decoder_weight, stage.encoder.weight)


@pytest.mark.parametrize("tied", [False, True])
def test_a_network_built_on_the_meta_device_initialises_like_a_real_one(tied: bool) -> None:
    """The usual recipe for big models: build on ``meta``, ``to_empty``, ``reset_parameters``. W₁ gets the layer's
    initialisation, W₂ a copy of it (as at construction), and the contrast normalization its window: the loss is
    that of a network built directly with the same weights."""
    kwargs = dict(stages=2, receptive_field=4, maps=3, pool=3, lcn=3, tied=tied)
    with torch.device("meta"):
        net = CatNetwork((1, 16, 16), **kwargs)
    net.to_empty(device="cpu")
    direct = CatNetwork((1, 16, 16), **kwargs)
    torch.manual_seed(11)
    net.reset_parameters()
    torch.manual_seed(11)
    direct.reset_parameters()
    for stage, twin in zip(net.stages, direct.stages, strict=True):
        assert torch.equal(stage.decoder_weight, stage.encoder.weight)
        assert torch.equal(stage.encoder.weight, twin.encoder.weight)
        bound = 1 / stage.encoder.weight[0].numel() ** 0.5 if tied else 1 / stage.encoder.weight.shape[-1] ** 0.5
        assert 0 < float(stage.encoder.weight.detach().abs().max()) <= bound
    x = torch.rand(4, 1, 16, 16)
    assert torch.isfinite(net.loss(x))
    torch.testing.assert_close(net.loss(x), direct.loss(x))


def test_a_pooled_map_as_small_as_the_lcn_radius_is_refused() -> None:
    """Reflect padding by lcn // 2 needs maps larger than lcn // 2: pooled to exactly lcn // 2 (2x2 for lcn = 5) is
    refused at build, naming model.lcn; one more pixel (3x3) builds and runs."""
    with pytest.raises(ConfigError, match=r"invalid model\.lcn: 5 \(stage 1 pools to 2x2"):
        CatNetwork((1, 8, 8), receptive_field=5, pool=3, lcn=5)  # 8 - 5 + 1 = 4 responses, pooled to 2
    net = CatNetwork((1, 9, 9), receptive_field=5, pool=3, lcn=5)
    assert net(torch.randn(2, 81)).shape == (2, 8, 3, 3)


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
