"""The designs sparse-ae, rbm and conv, hand-made first layers and frozen first layers, under every backend."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import CliResult
from downpour import config as config_mod
from downpour.backends.sim import ModelGradient, SimSettings, simulate
from downpour.cli import main
from downpour.config import DataConfig, ModelConfig
from downpour.data import load_dataset
from downpour.errors import ConfigError
from downpour.models import build_model
from downpour.penalty_spec import PenaltySpec
from downpour.ps.flat import flat_copy
from downpour.ps.policies import POLICIES, make_policy
from downpour.ps.rules import SGD, Adagrad
from downpour.report.gabor_fit import gabor_fraction

DIGITS = ["--set", "data.source=digits", "--set", "model.features=32", "--set", "model.receptive_field=5",
          "--no-progress", "--json"]  # fmt: skip
DESIGNS = {  # name -> extra model keys for 8x8 digits
    "sparse-ae": {},
    "rbm": {"cd_k": 1},
    "conv": {"receptive_field": 5},
    "rica": {},
}


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return load_dataset(DataConfig(source="digits"), seed=0).train  # (N, 64), whitened


@pytest.mark.parametrize(("design", "extra"), [("rbm", ["--set", "model.pcd=true", "--set", "model.cd_k=2"]),
                                             ("conv", ["--set", "ps.policy=staleness-lr"])])  # fmt: skip
def test_each_design_trains_on_the_local_backend_with_falling_loss(
    design: str, extra: list[str], run_dir: Path, cli: Callable[..., CliResult]
) -> None:
    """(sparse-ae: in the frozen-first-layer test below.)"""
    result = cli("train", "--workers", "2", "--steps", "120", "--seconds", "120", "--set",
                      f"model.name={design}", *DIGITS, *extra, "--out", str(run_dir))  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["model"] == design and summary["updates_rejected"] == 0
    assert summary["final_loss"] < 0.7 * summary["initial_loss"]
    assert 0.0 <= summary["gabor_fit"]["fraction"] <= 1.0 and summary["gabor_fit"]["fitted"] == 32


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("design", list(DESIGNS))
def test_every_design_runs_on_the_simulator_under_every_policy(design: str, policy: str, digits: torch.Tensor) -> None:
    model = build_model(ModelConfig(name=design, features=16, **DESIGNS[design]), 64, seed=0, shape=(1, 8, 8))
    start = flat_copy(model)
    grad = ModelGradient(model, digits, batch_size=32, workers=4)
    settings = SimSettings(workers=4, steps=40, seed=0)
    lr = 0.001 if design == "conv" else 0.01  # easgd's local steps are plain SGD; tied conv sums over locations
    result = simulate(start, Adagrad(lr=lr), make_policy(policy, workers=4, lr=lr), grad, settings)
    assert result.rejected == 0 and torch.isfinite(result.params).all()
    assert not torch.equal(result.params, start)


def _first_layer_slice(model: torch.nn.Module) -> slice:
    """Where ``model.weight`` lies in the flat parameter vector."""
    offset = 0
    for p in model.parameters():
        if p is model.weight:
            return slice(offset, offset + p.numel())
        offset += p.numel()
    raise AssertionError("no first layer")


@pytest.mark.parametrize("policy", POLICIES)
def test_a_frozen_first_layer_stays_exactly_equal_on_the_simulator(policy: str, digits: torch.Tensor) -> None:
    config = ModelConfig(name="sparse-ae", features=16, init="gabor", freeze_first=True, weight_decay=0.01)
    model = build_model(config, 64, seed=0, shape=(1, 8, 8))
    start, first = flat_copy(model), _first_layer_slice(model)
    grad = ModelGradient(model, digits, batch_size=32, workers=4)
    result = simulate(start, SGD(lr=0.01), make_policy(policy, workers=4, lr=0.01), grad,
                      SimSettings(workers=4, steps=24, seed=0))  # fmt: skip
    assert torch.equal(result.params[first], start[first])  # not one bit moved
    assert not torch.equal(result.params[first.stop :], start[first.stop :])  # the rest trained


@pytest.mark.parametrize("design", ["sparse-ae", "rbm", "cat"])
def test_a_frozen_first_layer_stays_frozen_in_a_copy_and_out_of_an_optimizers_reach(design: str) -> None:
    """Outside the parameter server: a deep copy keeps the freeze (a gradient hook was lost with the copy: |grad|
    about 104), and ``trainable_parameters`` leaves the frozen layer out of an optimizer, whose decoupled weight
    decay moved it by 7e-4 in 10 steps though its gradient was zero."""
    import copy

    from downpour.models import trainable_parameters

    model = _frozen_model(design)
    (name,) = model.frozen
    x = torch.randn(8, 64 if design != "cat" else 144, generator=torch.Generator().manual_seed(0))
    twin = copy.deepcopy(model)
    twin.loss(x).backward()
    grads = dict(twin.named_parameters())
    assert torch.count_nonzero(grads[name].grad) == 0
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for n, p in grads.items() if n != name)
    frozen = model.get_parameter(name).detach().clone()
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-3, weight_decay=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        model.loss(x).backward()
        optimizer.step()
    assert torch.equal(model.get_parameter(name), frozen)
    assert len(trainable_parameters(model)) == len(list(model.parameters())) - 1
    model.requires_grad_(False)  # as load_run leaves a trained model: a hook could not be registered on a copy
    assert type(copy.deepcopy(model).get_parameter(name)).__name__ == "FrozenParameter"
    wrapper = torch.nn.Sequential(model)  # frozen found by type inside a model of the user's
    assert all(p is not model.get_parameter(name) for p in trainable_parameters(wrapper))


def _frozen_model(design: str) -> torch.nn.Module:
    shape = (1, 8, 8) if design != "cat" else (1, 12, 12)
    extra = {"receptive_field": 6, "maps": 2, "pool": 3, "lcn": 3} if design == "cat" else {"features": 16}
    return build_model(ModelConfig(name=design, init="gabor", freeze_first=True, **extra), 64 if design != "cat"
                       else 144, seed=0, shape=shape)  # fmt: skip


@pytest.mark.parametrize("design", ["sparse-ae", "rbm", "cat"])
def test_hand_made_templates_on_the_meta_device_are_one_clear_error(design: str) -> None:
    """Templates are values (scaled to the design's own init), which a meta tensor cannot hold: building one there
    raised torch's "Tensor.item() cannot be called on meta tensors". The learned init builds there."""
    with torch.device("meta"):
        with pytest.raises(ConfigError, match=r"invalid model\.init: 'gabor' on the meta device .* model\.init = "):
            _frozen_model(design)
        model = build_model(ModelConfig(name=design, features=16, receptive_field=6, maps=2, pool=3, lcn=3), 144,
                            seed=0, shape=(1, 12, 12))  # fmt: skip
    assert all(p.is_meta for p in model.parameters())


def _assign_loaded(model: torch.nn.Module) -> torch.nn.Module:
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    return model


def _emptied_from_meta(model: torch.nn.Module) -> torch.nn.Module:
    return model.to("meta").to_empty(device="cpu")


def _swapped_to_float64(model: torch.nn.Module) -> torch.nn.Module:
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        return model.to(torch.float64)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)


@pytest.mark.parametrize("design", ["sparse-ae", "rbm", "cat"])
@pytest.mark.parametrize("replace", [_assign_loaded, _emptied_from_meta, _swapped_to_float64])
def test_a_frozen_first_layer_stays_frozen_when_its_parameters_are_replaced(
    design: str, replace: Callable[[torch.nn.Module], torch.nn.Module]
) -> None:
    """Each of these replaces the parameter objects with plain ``nn.Parameter``s, which dropped the freeze: the
    first layer's gradient was about 800 after an assign-load and a swap. The module puts it back, and
    ``trainable_parameters`` leaves it out of an optimizer's list."""
    from downpour.models import trainable_parameters

    model = _frozen_model(design)
    (name,) = model.frozen
    model = replace(model)
    wrapper = torch.nn.Sequential(model)  # a model of the user's: frozen found by type, before anything ran
    trainable = trainable_parameters(wrapper)
    assert len(trainable) == len(list(model.parameters())) - 1
    assert all(p is not model.get_parameter(name) for p in trainable)
    dtype = next(model.parameters()).dtype
    x = torch.randn(8, 64 if design != "cat" else 144, generator=torch.Generator().manual_seed(0)).to(dtype)
    model.loss(x).backward()
    frozen = model.get_parameter(name)
    assert type(frozen).__name__ == "FrozenParameter"
    assert frozen.grad is not None and torch.count_nonzero(frozen.grad) == 0
    others = [p for n, p in model.named_parameters() if n != name]
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in others)


@pytest.mark.parametrize("design", ["sparse-ae", "cat"])
@pytest.mark.parametrize("transform", ["grad", "vmap", "jvp"])
def test_a_replaced_frozen_layer_first_run_inside_a_torch_func_transform(design: str, transform: str) -> None:
    """The re-freezing pre-hook ran inside the transform, where making a FrozenParameter (requires_grad_) is
    refused: the first grad / vmap / jvp after a swap raised. The transform runs; the next call outside freezes."""
    model = _swapped_to_float64(_frozen_model(design))
    (name,) = model.frozen
    x = torch.randn(4, 64 if design != "cat" else 144, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    if transform == "grad":
        torch.func.grad(lambda z: model.loss(z))(x)
    elif transform == "vmap":
        torch.func.vmap(lambda z: model(z.unsqueeze(0)))(x)
    else:
        torch.func.jvp(model, (x,), (torch.ones_like(x),))
    model.loss(x).backward()
    frozen = model.get_parameter(name)
    assert type(frozen).__name__ == "FrozenParameter"
    assert frozen.grad is not None and torch.count_nonzero(frozen.grad) == 0


def test_a_frozen_first_layer_stays_exactly_equal_through_the_parameter_server(
    run_dir: Path, cli: Callable[..., CliResult]
) -> None:
    """sparse-ae with frozen Gabor templates, 2 workers, 3 shards, Adagrad and local apply: the loss falls (the
    decoder and biases train) and the first layer's slice of the server's values is bit-identical to its start."""
    result = cli("train", "--workers", "2", "--shards", "3", "--steps", "120", "--seconds", "600",
                      "--set", "model.name=sparse-ae", "--set", "model.init=gabor", "--set", "model.freeze_first=true",
                      "--set", "ps.local_apply=true",
                      *DIGITS, "--out", str(run_dir))  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["model"] == "sparse-ae" and summary["final_loss"] < 0.7 * summary["initial_loss"]
    assert summary["gabor_fit"]["fraction"] == 1.0  # the frozen Gabor templates are still Gabors
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    tensors = load_file(str(run_dir / "checkpoint" / state["params_file"]))
    final = torch.cat([tensors[f"shard{i}.values"] for i in range(3)])
    config = ModelConfig(name="sparse-ae", features=32, receptive_field=5, init="gabor", freeze_first=True)
    model = build_model(config, 64, seed=0, shape=(1, 8, 8))
    initial, first = flat_copy(model), _first_layer_slice(model)
    assert torch.equal(final[first], initial[first])
    assert not torch.equal(final[first.stop :], initial[first.stop :])


def test_each_worker_seeds_its_own_sampling_noise() -> None:
    """Workers build their model from train.seed (the same initial values everywhere); seed_sampling then gives
    each its own Gibbs noise from its worker seed (all drew the same noise, replayed on every resume). Models that
    draw nothing are left as they are."""
    from downpour.models import seed_sampling

    v = torch.randn(16, 10, generator=torch.Generator().manual_seed(1))
    models = [build_model(ModelConfig(name="rbm", features=6, cd_k=1), 10, seed=0) for _ in range(3)]
    for model, worker_seed in zip(models, (11, 12, 11), strict=True):
        seed_sampling(model, worker_seed)
    assert all(torch.equal(model.weight, models[0].weight) for model in models)
    for model in models:
        model.loss(v).backward()  # the gradient is CD-1's: from sampled hidden units
    assert not torch.equal(models[0].weight.grad, models[1].weight.grad)
    assert torch.equal(models[0].weight.grad, models[2].weight.grad)
    rica, again = (build_model(ModelConfig(name="rica", features=6), 10, seed=0) for _ in range(2))
    seed_sampling(rica, 11)
    assert torch.equal(rica.weight, again.weight)


def test_rbm_gradient_is_the_negative_cd1_update() -> None:
    """∂loss/∂θ = −(⟨v hᵀ⟩_data − ⟨v hᵀ⟩_recon) with hidden probabilities (Hinton 2002), and the value is the
    mean-field reconstruction error."""
    model = build_model(ModelConfig(name="rbm", features=6), 10, seed=0)
    with torch.no_grad():
        model.hidden_bias.normal_(0, 0.5)
        model.visible_bias.normal_(0, 0.5)
        model.weight.mul_(50)
    v = torch.randn(7, 10, generator=torch.Generator().manual_seed(1))
    sampler = torch.Generator().set_state(model.sampler.get_state())
    loss = model.loss(v)
    loss.backward()
    w, b, c = model.weight.detach(), model.hidden_bias.detach(), model.visible_bias.detach()
    p0 = torch.sigmoid(v @ w.t() + b)  # (B, K)
    h = (torch.rand(p0.shape, generator=sampler) < p0).float()
    v1 = h @ w + c  # the mean of p(v | h)
    p1 = torch.sigmoid(v1 @ w.t() + b)
    update_w = (p0.t() @ v - p1.t() @ v1) / 7
    assert torch.allclose(model.weight.grad, -update_w, atol=1e-5)
    assert torch.allclose(model.hidden_bias.grad, -(p0 - p1).mean(0), atol=1e-5)
    assert torch.allclose(model.visible_bias.grad, -(v - v1).mean(0), atol=1e-5)
    expected = ((p0 @ w + c - v) ** 2).sum(1).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    with torch.no_grad():
        assert float(model.loss(v)) == pytest.approx(float(expected), rel=1e-5)  # evaluation: no chain, same value


def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, params)


def test_rica_cost_and_gradient_are_its_formula_with_its_own_epsilon_and_weight_decay() -> None:
    """RICA's cost, ``mean ‖WᵀWx − x‖² + λ mean Σⱼ sqrt(ε + (Wx)ⱼ²) + ½ λ_wd Σ W²``, written out here with an ε that
    is not the default (0.5) and weight decay on: value and gradient (the reconstruction's gradient reaches W
    through both its encoding and its decoding use)."""
    from downpour.models import RICA

    model = RICA(12, 5, sparsity=0.3, epsilon=0.5, weight_decay=0.2,
                 generator=torch.Generator().manual_seed(0)).double()  # fmt: skip
    x = torch.randn(6, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    loss = model.loss(x)
    w = model.weight.detach().clone().requires_grad_()
    h = x @ w.t()  # (B, K)
    expected = ((h @ w - x) ** 2).sum(1).mean() + 0.3 * torch.sqrt(0.5 + h**2).sum(1).mean() + 0.1 * (w**2).sum()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-12)
    torch.testing.assert_close(_grads(loss, [model.weight])[0], _grads(expected, [w])[0], rtol=1e-10, atol=1e-12)
    no_decay = RICA(12, 5, sparsity=0.3, epsilon=0.5, generator=torch.Generator().manual_seed(0)).double()
    with torch.no_grad():  # the decay term alone: ½ · 0.2 · Σ W²
        assert float(model.loss(x) - no_decay.loss(x)) == pytest.approx(0.1 * float((w**2).sum()), rel=1e-10)


def test_sparse_autoencoder_cost_and_gradients_are_the_ufldl_formula() -> None:
    """``J = mean ½‖W₂σ(W₁x + b₁) + b₂ − x‖² + β Σⱼ KL(ρ ‖ ρ̂ⱼ) + ½λ(‖W₁‖² + ‖W₂‖²)`` written out here (UFLDL, with
    the linear decoder's own weights W₂): value and the gradients of all four parameters, W₂'s not zero."""
    from downpour.models import SparseAutoencoder

    model = SparseAutoencoder(10, 4, penalty=PenaltySpec("kl", 3.0, 0.1), weight_decay=0.05,
                              generator=torch.Generator().manual_seed(0)).double()  # fmt: skip
    with torch.no_grad():
        model.bias.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
        model.decoder_bias.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    x = torch.randn(7, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    params = [model.weight, model.bias, model.decoder_weight, model.decoder_bias]
    loss = model.loss(x)
    mine = [p.detach().clone().requires_grad_() for p in params]
    w1, b1, w2, b2 = mine
    h = torch.sigmoid(x @ w1.t() + b1)  # (B, K)
    rho, rho_hat = 0.1, h.mean(0)
    kl = (rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()
    expected = 0.5 * ((h @ w2.t() + b2 - x) ** 2).sum(1).mean() + 3.0 * kl + 0.025 * ((w1**2).sum() + (w2**2).sum())
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-12)
    got = _grads(loss, params)
    for a, b in zip(got, _grads(expected, mine), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert float(got[2].abs().sum()) > 1e-3  # the decoder's weights learn


def _conv_responses(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``W ∗ x`` written out: every template dotted with every patch, ``(B, K, R, R)``."""
    side = x.shape[-1] - w.shape[-1] + 1
    return torch.einsum("kp,bpl->bkl", w.flatten(1), F.unfold(x, w.shape[-1])).unflatten(2, (side, side))


def test_conv_autoencoder_features_loss_and_gradient_are_its_formula() -> None:
    """The tied convolutional autoencoder written out: features ``sqrt(ε + h²)`` (ε = 0.5, large enough to tell from
    |h|), and ``mean ‖Wᵀh − x‖² + λ Σ sqrt(ε + h²) + ½λ_wd Σ W²`` with Wᵀh each place's responses sent back
    through the same templates (unflipped) and summed where fields overlap; value and gradient."""
    from downpour.models import ConvAutoencoder

    model = ConvAutoencoder((2, 9, 9), features=3, receptive_field=4, sparsity=0.2, epsilon=0.5, weight_decay=0.1,
                            generator=torch.Generator().manual_seed(0)).double()  # fmt: skip
    x = torch.randn(3, 2, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = model.weight.detach().clone().requires_grad_()
    h = _conv_responses(x, w)  # (B, K, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.sqrt(0.5 + h**2).flatten(1), rtol=1e-12, atol=1e-12)
    back = F.fold(torch.einsum("kp,bkl->bpl", w.flatten(1), h.flatten(2)), (9, 9), 4)  # (B, C, 9, 9)
    expected = ((back - x) ** 2).sum(dim=(1, 2, 3)).mean() + 0.2 * torch.sqrt(0.5 + h**2).sum(dim=(1, 2, 3)).mean()
    expected = expected + 0.05 * (w**2).sum()
    loss = model.loss(x)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-12)
    torch.testing.assert_close(_grads(loss, [model.weight])[0], _grads(expected, [w])[0], rtol=1e-10, atol=1e-12)


def _cd_update(model: torch.nn.Module, v: torch.Tensor, negative: torch.Tensor) -> dict[str, torch.Tensor]:
    """The negative CD update −(⟨·⟩_data − ⟨·⟩_negative) of W, b, c (Hinton 2002), hidden probabilities."""
    w, b = model.weight.detach(), model.hidden_bias.detach()
    p0, pk = torch.sigmoid(v @ w.t() + b), torch.sigmoid(negative @ w.t() + b)
    return {"weight": -(p0.t() @ v - pk.t() @ negative) / len(v), "hidden_bias": -(p0 - pk).mean(0),
            "visible_bias": -(v - negative).mean(0)}  # fmt: skip


def _gibbs_by_hand(model: torch.nn.Module, v: torch.Tensor, steps: int, sampler: torch.Generator, *,
                   sample_visible: bool) -> torch.Tensor:  # fmt: skip
    """``steps`` rounds of h ~ p(h | v) then v = Wᵀh + c (+ unit Gaussian noise when the visible units are
    sampled), drawing from ``sampler`` in the model's order (hidden uniforms, then visible normals)."""
    w, b, c = model.weight.detach(), model.hidden_bias.detach(), model.visible_bias.detach()
    for _ in range(steps):
        p = torch.sigmoid(v @ w.t() + b)
        v = (torch.rand(p.shape, generator=sampler) < p).to(v.dtype) @ w + c
        if sample_visible:
            v = v + torch.randn(v.shape, generator=sampler)
    return v


def _rbm_with_strong_weights(**kwargs: object) -> torch.nn.Module:
    from downpour.models import GaussianBernoulliRBM

    model = GaussianBernoulliRBM(10, 6, seed=0, **kwargs)
    with torch.no_grad():
        model.hidden_bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
        model.visible_bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(4))
        model.weight.mul_(50)  # hidden probabilities far from ½: the chains move
    return model


def test_rbm_cd2_gradient_runs_two_mean_field_gibbs_steps() -> None:
    """``cd_k = 2``: the negative phase is two Gibbs steps from the data, visible units at their mean (CD), replayed
    here from a copy of the model's sampler; one step gives another update."""
    model = _rbm_with_strong_weights(cd_k=2)
    v = torch.randn(7, 10, generator=torch.Generator().manual_seed(1))
    sampler = torch.Generator().set_state(model.sampler.get_state())
    model.loss(v).backward()
    negative = _gibbs_by_hand(model, v, 2, sampler, sample_visible=False)
    for name, expected in _cd_update(model, v, negative).items():
        torch.testing.assert_close(getattr(model, name).grad, expected, rtol=1e-5, atol=1e-5)
    one_step = _gibbs_by_hand(model, v, 1, torch.Generator().set_state(model.sampler.get_state()), sample_visible=False)
    assert not torch.allclose(_cd_update(model, v, one_step)["weight"], model.weight.grad, atol=1e-3)


def test_pcd_chains_persist_across_updates_and_sample_their_visible_units() -> None:
    """PCD (Tieleman 2008): the first update starts the chains at the data, each later one continues them from where
    the last ended, and the chains sample their visible units (a real Markov chain); the gradient is the CD update
    against the chain's state, replayed here from a copy of the sampler."""
    model = _rbm_with_strong_weights(pcd=True, cd_k=1)
    sampler = torch.Generator().set_state(model.sampler.get_state())
    chain = None
    for seed in (1, 2, 3):
        v = torch.randn(5, 10, generator=torch.Generator().manual_seed(seed))
        model.zero_grad()
        model.loss(v).backward()
        start = v if chain is None else chain
        chain = _gibbs_by_hand(model, start, 1, sampler, sample_visible=True)
        torch.testing.assert_close(model.chain, chain, rtol=1e-5, atol=1e-5)
        for name, expected in _cd_update(model, v, chain).items():
            torch.testing.assert_close(getattr(model, name).grad, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(chain, start, atol=0.1)  # the chain moved


def test_rbm_weights_start_at_hintons_small_gaussian() -> None:
    """Hinton's guide (§8): weights drawn from N(0, 0.01²); biases 0."""
    from downpour.models import GaussianBernoulliRBM

    model = GaussianBernoulliRBM(200, 100, seed=0)
    weight = model.weight.detach()
    assert float(weight.mean()) == pytest.approx(0.0, abs=5e-4)
    assert float(weight.std()) == pytest.approx(0.01, rel=0.03)
    assert not model.hidden_bias.any() and not model.visible_bias.any()


@pytest.mark.parametrize("design", ["rica", "sparse-ae", "rbm", "conv", "cat"])
def test_gabor_init_puts_gabor_templates_in_every_designs_first_layer(design: str) -> None:
    config = ModelConfig(name=design, features=16, init="gabor", receptive_field=6, maps=4, pool=2, lcn=3)
    model = build_model(config, 144, seed=0, shape=(1, 12, 12))
    filters = model.filters()
    shape = getattr(model, "filter_shape", (1, 12, 12))
    assert gabor_fraction(filters, shape)["fraction"] == 1.0
    default = build_model(ModelConfig(name=design, features=16, receptive_field=6, maps=4, pool=2, lcn=3), 144,
                          seed=0, shape=(1, 12, 12)).filters()  # fmt: skip
    # the same mean norm as the default init (cat: filters() shows a sample of its locations)
    assert float(filters.norm(dim=1).mean()) == pytest.approx(float(default.norm(dim=1).mean()), rel=0.01)


@pytest.mark.parametrize(
    ("keys", "message"),
    [({"name": "rica", "freeze_first": True}, "rica has nothing but its first layer to train"),
     ({"name": "conv", "freeze_first": True, "receptive_field": 5}, "conv has nothing but its first layer"),
     ({"name": "sparse-ae", "init": "dog"}, "invalid model.init: 'dog'"),
     ({"name": "conv", "receptive_field": 9}, "invalid model.receptive_field: 9 (conv sees 8x8")],
)  # fmt: skip
def test_first_layer_choices_that_make_no_sense_are_clear_errors(keys: dict, message: str) -> None:
    shape = (1, 2, 2) if keys.get("init") == "dog" else (1, 8, 8)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_model(ModelConfig(**keys), shape[1] * shape[2], seed=0, shape=shape)


def test_bad_design_keys_are_one_line_errors(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Through the CLI's own entry point (in this process: a fresh interpreter would cost seconds)."""
    with pytest.raises(
        ConfigError, match=r"invalid model.init: 'wavelet' \(choose one of learned, gabor, dog, random\)"
    ):
        config_mod.from_dict({"model": {"init": "wavelet"}})
    status = main(["train", "--set", "model.penalty=kl:0.05,3", "--set", "data.source=digits", "--out", str(run_dir)])
    stderr = capsys.readouterr().err
    assert status == 2 and "kl needs sigmoid hidden units" in stderr
    assert len(stderr.strip().splitlines()) == 1 and not run_dir.exists()


def test_flat_designs_name_a_wrong_input_shape() -> None:
    """RICA, the sparse autoencoder and the RBM said "mat1 and mat2 shapes cannot be multiplied" (or gave an
    IndexError) for examples of the wrong size; now they name what they expected, as the image designs do."""
    from downpour.models import RICA, GaussianBernoulliRBM, SparseAutoencoder

    for model in (RICA(64, 8), SparseAutoencoder(64, 8), GaussianBernoulliRBM(64, 8)):
        name = type(model).__name__
        for bad in (torch.randn(2, 65), torch.randn(64)):
            for call in (model.loss, model):
                with pytest.raises(
                    ValueError, match=re.escape(f"{name} expected (B, 64) examples, got {tuple(bad.shape)}")
                ):
                    call(bad)
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 8)  # images of 64 values are examples too


def test_every_design_names_an_input_of_another_dtype_than_its_weights() -> None:
    """A float64 batch into a float32 model gave matmul's "expected m1 and m2 to have the same dtype" (an integer
    batch into the conv autoencoder "expected scalar type Long but found Float"); every design now names both
    dtypes, as the layers do, or the tensor that is not floating-point. Under ``torch.autocast`` a mixed input is
    autocast's to handle and is let through."""
    from downpour.models import RICA, CatNetwork, ConvAutoencoder, GaussianBernoulliRBM, SparseAutoencoder

    shape = (1, 8, 8)
    models = (RICA(64, 8), SparseAutoencoder(64, 8), GaussianBernoulliRBM(64, 8),
              ConvAutoencoder(shape, features=4, receptive_field=3), CatNetwork(shape, receptive_field=3, maps=2,
                                                                                pool=2, lcn=3))  # fmt: skip
    for model in models:
        name = type(model).__name__
        with pytest.raises(ValueError, match=re.escape(f"{name} input is torch.float64 on cpu, its weights are "
                                                       "torch.float32 on cpu: convert one of them")):  # fmt: skip
            model.loss(torch.rand(2, 64, dtype=torch.float64))
        with pytest.raises(TypeError, match=f"{name} expects a floating-point torch.Tensor, got a torch.int64 one"):
            model(torch.ones(2, 64, dtype=torch.int64))
        assert torch.isfinite(model.loss(torch.rand(2, 64)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(model.loss(torch.rand(2, 64, dtype=torch.bfloat16)).float())


def test_the_rbm_samples_in_the_models_dtype_and_keeps_its_chain_across_a_conversion() -> None:
    """Its Gibbs noise came from a CPU generator in float32 whatever the model's device and dtype, and its PCD
    chain, a plain attribute, stayed behind when the model was converted: bfloat16 and double() failed."""
    from downpour.models import GaussianBernoulliRBM

    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    rbm = GaussianBernoulliRBM(6, 3, pcd=True)
    rbm.loss(x).backward()
    rbm.double()
    rbm.loss(x.double()).backward()  # the chain follows the model
    assert rbm.chain is not None and rbm.chain.dtype == torch.float64
    half = GaussianBernoulliRBM(6, 3, pcd=True).to(torch.bfloat16)
    assert torch.isfinite(half.loss(x.to(torch.bfloat16)).float())
    same = [GaussianBernoulliRBM(6, 3, cd_k=2, seed=5) for _ in range(2)]
    same[1].double()
    losses = [float(m.loss(x.to(m.weight.dtype)).detach()) for m in same]  # one noise stream, whatever the dtype
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_every_designs_loss_names_an_empty_batch() -> None:
    """A batch of no examples gave every design's loss NaN (a mean over none), to be found pushes later as a
    diverged run; now it is a ValueError naming the design and the batch's shape, flat or image, with and without
    gradients. Its features stay defined: no examples, no responses."""
    from downpour.models import RICA, CatNetwork, ConvAutoencoder, GaussianBernoulliRBM, SparseAutoencoder

    shape = (1, 8, 8)
    models = (RICA(64, 8), SparseAutoencoder(64, 8), GaussianBernoulliRBM(64, 8), GaussianBernoulliRBM(64, 8, pcd=True),
              ConvAutoencoder(shape, features=4, receptive_field=3), CatNetwork(shape, receptive_field=3, maps=2,
                                                                                pool=2, lcn=3))  # fmt: skip
    for model in models:
        name = type(model).__name__
        for empty in (torch.rand(0, 64), torch.rand(0, *shape)):
            message = re.escape(f"{name}.loss got an empty batch {tuple(empty.shape)}: a loss is a mean over the")
            with pytest.raises(ValueError, match=message):
                model.loss(empty)
            with torch.no_grad(), pytest.raises(ValueError, match=message):
                model.loss(empty)
            assert model(empty).shape[0] == 0
        assert torch.isfinite(model.loss(torch.rand(1, 64)))  # one example is a batch
