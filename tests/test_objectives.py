"""Objective terms against hand-computed values and gradients; ``model.penalty`` parsing; rica and cat unchanged."""

from __future__ import annotations

import math

import pytest
import torch

from downpour import config as config_mod
from downpour.config import ModelConfig
from downpour.errors import ConfigError
from downpour.models import build_model
from downpour.objectives import (
    kl_sparsity,
    l1_activity,
    l2_activity,
    penalty,
    pooled_smooth_l1,
    smooth_l1,
    squared_reconstruction,
    weight_decay,
)
from downpour.penalty_spec import PenaltySpec, parse_penalty


def _value_and_grad(fn, values: list) -> tuple[float, torch.Tensor]:
    x = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    out = fn(x)
    out.backward()
    return float(out.detach()), x.grad


def test_squared_reconstruction_is_the_mean_over_examples_of_the_summed_squares() -> None:
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    value, grad = _value_and_grad(lambda r: squared_reconstruction(r, target), [[1.0, 2.0], [1.0, 3.0]])
    assert value == pytest.approx((1 + 4 + 0 + 4) / 2)
    assert torch.allclose(grad, torch.tensor([[1.0, 2.0], [0.0, 2.0]], dtype=torch.float64))  # 2(x̂ − x)/B


def test_smooth_l1_and_its_gradient() -> None:
    value, grad = _value_and_grad(lambda h: smooth_l1(h, epsilon=0.25), [[0.0, 1.0]])
    assert value == pytest.approx(0.5 + math.sqrt(1.25))
    assert torch.allclose(grad, torch.tensor([[0.0, 1 / math.sqrt(1.25)]], dtype=torch.float64))


def test_l1_and_l2_activity() -> None:
    value, grad = _value_and_grad(l1_activity, [[-2.0, 3.0], [1.0, 0.5]])
    assert value == pytest.approx((5 + 1.5) / 2)
    assert torch.equal(grad, torch.tensor([[-0.5, 0.5], [0.5, 0.5]], dtype=torch.float64))  # sign(h)/B
    value, grad = _value_and_grad(l2_activity, [[-2.0, 3.0], [1.0, 0.5]])
    assert value == pytest.approx((13 + 1.25) / 2)
    assert torch.allclose(grad, torch.tensor([[-2.0, 3.0], [1.0, 0.5]], dtype=torch.float64))  # 2h/B


def test_kl_sparsity_is_zero_at_the_target_and_matches_the_ufldl_formula() -> None:
    # unit 0 averages 0.2 (= ρ: no cost), unit 1 averages 0.5
    value, grad = _value_and_grad(lambda h: kl_sparsity(h, target=0.2), [[0.1, 0.4], [0.3, 0.6]])
    assert value == pytest.approx(0.2 * math.log(0.2 / 0.5) + 0.8 * math.log(0.8 / 0.5))
    d_mean = torch.tensor([-0.2 / 0.2 + 0.8 / 0.8, -0.2 / 0.5 + 0.8 / 0.5], dtype=torch.float64)  # −ρ/ρ̂ + (1−ρ)/(1−ρ̂)
    assert torch.allclose(grad, (d_mean / 2).expand(2, 2))
    with pytest.raises(ValueError, match="target"):
        kl_sparsity(torch.rand(4, 3), target=1.0)


def test_kl_sparsity_refuses_a_target_of_zero() -> None:
    """At ρ = 0 the first term is 0 · log(0/ρ̂) (NaN in floating point): the function refuses it as it does ρ = 1."""
    with pytest.raises(ValueError, match=r"Invalid target: 0\.0"):
        kl_sparsity(torch.rand(4, 3), target=0.0)


def test_weight_decay_of_no_weights_is_refused() -> None:
    """With no weight there is no tensor to return (no device or dtype for a 0): refused, not None into a cost."""
    with pytest.raises(ValueError, match="at least one weight"):
        weight_decay([])


def test_penalty_weights_the_kl_term() -> None:
    """``kl:ρ,β`` is β times the UFLDL sum over units: units averaging 0.2 (= ρ) and 0.5, β = 3."""
    h = torch.tensor([[0.1, 0.4], [0.3, 0.6]], dtype=torch.float64)
    by_hand = 3.0 * (0.2 * math.log(0.2 / 0.5) + 0.8 * math.log(0.8 / 0.5))
    assert float(penalty(PenaltySpec("kl", 3.0, 0.2), h, epsilon=0.01)) == pytest.approx(by_hand)


@pytest.mark.parametrize("spec", [PenaltySpec("l1", 0.125), PenaltySpec("rica", 1e-5), PenaltySpec("kl", 0.001, 0.01)])
def test_a_small_weight_prints_as_the_string_that_parses_back_to_it(spec: PenaltySpec) -> None:
    """Weights with more digits, or smaller, than two decimals print in full (a run's config.toml records them)."""
    assert parse_penalty(str(spec)) == spec


def test_pooled_penalty_and_weight_decay() -> None:
    value, grad = _value_and_grad(pooled_smooth_l1, [[1.0, 2.0], [3.0, 4.0]])
    assert value == pytest.approx(5.0) and torch.allclose(grad, torch.full((2, 2), 0.5, dtype=torch.float64))
    w = torch.tensor([[1.0, -2.0]], requires_grad=True)
    v = torch.tensor([3.0], requires_grad=True)
    decay = weight_decay([w, v])
    decay.backward()
    assert float(decay.detach()) == pytest.approx(0.5 * (1 + 4 + 9))
    assert torch.equal(w.grad, w.detach()) and torch.equal(v.grad, v.detach())  # ∂(½W²)/∂W = W


def test_penalty_weights_each_term() -> None:
    h = torch.tensor([[0.5, -1.0]])
    assert float(penalty(PenaltySpec("l1", 0.1), h, epsilon=0.01)) == pytest.approx(0.15)
    assert float(penalty(PenaltySpec("l2", 2.0), h, epsilon=0.01)) == pytest.approx(2.5)
    assert float(penalty(PenaltySpec("rica", 1.0), h, epsilon=0.0)) == pytest.approx(1.5)
    assert penalty(PenaltySpec("none"), h, epsilon=0.01) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [("l1:0.1", PenaltySpec("l1", 0.1)), ("KL:0.05, 3", PenaltySpec("kl", 3.0, 0.05)),
     ("rica:0.2", PenaltySpec("rica", 0.2)), ("l2:0", PenaltySpec("l2", 0.0)), ("none", PenaltySpec("none")),
     ("default", None)],
)  # fmt: skip
def test_penalty_strings_parse(text: str, expected: PenaltySpec | None) -> None:
    assert parse_penalty(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [("l3:0.1", "unknown penalty 'l3'"), ("l1", "needs its weight"), ("l1:x", "'x' is not a number"),
     ("l1:-1", "must be a finite number >= 0"), ("kl:0.05", "kl takes a target and a weight"),
     ("kl:1.5,3", "between 0 and 1"), ("l2:0.1,2", "takes one weight"),
     # an empty weight after the colon, a third kl number, an infinite or NaN weight (a run of NaN losses)
     ("l1:", "l1 needs its weight after a colon"), ("rica: ", "rica needs its weight after a colon"),
     ("kl:0.05,3,1", "kl takes a target and a weight"), ("l1:inf", "must be a finite number >= 0"),
     ("l2:nan", "must be a finite number >= 0"), ("kl:0.05,inf", "the weight β must be a finite number")],
)  # fmt: skip
def test_bad_penalty_strings_name_the_key_and_the_problem(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"invalid model.penalty: '{text}'") as info:
        config_mod.from_dict({"model": {"penalty": text}})
    assert message in str(info.value)


@pytest.mark.parametrize("text", ["kl:0,3", "kl:1,3"])
def test_kl_targets_at_the_ends_of_the_interval_are_refused(text: str) -> None:
    """ρ must lie strictly between 0 and 1: at ρ = 0 or 1 one of KL's two terms is 0 · log 0 and the other pushes
    every unit to saturate. ``model.penalty`` names the key."""
    with pytest.raises(ConfigError, match=f"invalid model.penalty: '{text}'") as info:
        config_mod.from_dict({"model": {"penalty": text}})
    assert "between 0 and 1, exclusive" in str(info.value)


@pytest.mark.parametrize(
    "spec",
    [PenaltySpec("none"), PenaltySpec("l1", 0.25), PenaltySpec("l2", 3.0), PenaltySpec("rica", 0.1),
     PenaltySpec("kl", 3.0, 0.05), PenaltySpec("kl", 0.5, 0.2)],
)  # fmt: skip
def test_a_penalty_prints_as_the_string_that_parses_back_to_it(spec: PenaltySpec) -> None:
    """``str(spec)`` is the ``model.penalty`` form (``kl:ρ,β``: target first, then weight) that parses back to the same
    penalty, as a run's written config and summaries rely on."""
    assert parse_penalty(str(spec)) == spec
    assert str(PenaltySpec("kl", 3.0, 0.05)) == "kl:0.05,3"


def test_kl_on_maps_averages_each_map_over_examples_and_positions() -> None:
    """For a convolutional map every position is one more example of that map (a unit per map, not per position):
    the KL of ``(B, K, H, W)`` activations is that of the ``(B·H·W, K)`` matrix of their values."""
    h = torch.rand(3, 4, 5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.8 + 0.1
    as_examples = h.permute(0, 2, 3, 1).reshape(-1, 4)  # (90, 4)
    rho_hat = as_examples.mean(0)
    by_hand = (0.1 * torch.log(0.1 / rho_hat) + 0.9 * torch.log(0.9 / (1 - rho_hat))).sum()
    assert float(kl_sparsity(h, target=0.1)) == pytest.approx(float(by_hand), rel=1e-12)
    assert float(kl_sparsity(as_examples, target=0.1)) == pytest.approx(float(by_hand), rel=1e-12)


def test_kl_still_pushes_a_saturated_unit_back() -> None:
    """A unit whose mean activation is below the clamp that keeps the logs finite (1e-6): its value is the clamped
    one, but its gradient is not 0 (the clamp's), so a dead sigmoid unit is pushed back towards ρ. Through the
    sigmoid that push stays bounded: about −ρ per pre-activation, as UFLDL's formula gives."""
    pre = torch.full((4, 1), -16.0, requires_grad=True)  # sigmoid(-16) ≈ 1.1e-7
    loss = kl_sparsity(torch.sigmoid(pre), target=0.05)
    loss.backward()
    assert pre.grad is not None and float(pre.grad.sum()) < -1e-3  # it was exactly 0
    expected = 0.05 * math.log(0.05 / 1e-6) + 0.95 * math.log(0.95 / (1 - 1e-6))  # the clamped value
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_kl_on_a_linear_design_is_refused() -> None:
    with pytest.raises(ConfigError, match="kl needs sigmoid hidden units"):
        build_model(ModelConfig(name="rica", penalty="kl:0.05,3"), 64, seed=0)


def test_rica_default_cost_is_unchanged_bit_for_bit() -> None:
    model = build_model(ModelConfig(), 64, seed=3)
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    h = x @ model.weight.t()
    old = squared_reconstruction(h @ model.weight, x) + 0.1 * smooth_l1(h, epsilon=0.01)  # the cost before issue 7
    assert torch.equal(model.loss(x), old)


def test_cat_default_cost_is_unchanged_bit_for_bit() -> None:
    config = ModelConfig(name="cat", receptive_field=5, maps=4, pool=2, lcn=3)
    model = build_model(config, 144, seed=0, shape=(1, 12, 12))
    stage = model.stages[0]
    x = torch.randn(8, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    h = stage.encode(x)
    pooled = stage.pool(h)
    old = squared_reconstruction(stage.decode(h), x) + 0.1 * pooled.flatten(1).sum(1).mean()  # before issue 7
    assert torch.equal(stage.cost(x)[0], old)


def test_weight_decay_key_adds_half_lambda_w_squared() -> None:
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    plain = build_model(ModelConfig(name="sparse-ae", features=8), 64, seed=0)
    decayed = build_model(ModelConfig(name="sparse-ae", features=8, weight_decay=0.01), 64, seed=0)
    with torch.no_grad():
        expected = 0.005 * (plain.weight.pow(2).sum() + plain.decoder_weight.pow(2).sum())
        assert float(decayed.loss(x) - plain.loss(x)) == pytest.approx(float(expected), rel=1e-5)
