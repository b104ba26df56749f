"""Skipping flat receptive fields: equal to the dense layer with flat fields zeroed, and τ = 0 changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from downpour import config as config_mod
from downpour.data.sources import natural_patches
from downpour.errors import ConfigError
from downpour.models.cat import CatNetwork
from downpour.nn import LocallyConnected2d
from downpour.nn import skip as skip_mod
from downpour.nn.skip import active_fields, field_variance, skipped_fraction

GEOMETRIES = [
    # (in_channels, out_channels, in_size, kernel, stride): sizes over one tile so that tiles differ
    (1, 3, 24, 4, 1),
    (2, 2, (21, 40), (3, 5), (1, 2)),
]


def _flat_in_places(cin: int, size: tuple[int, int], batch: int = 5) -> torch.Tensor:
    """Random images whose top half is nearly flat, one example flat everywhere: fields of every kind."""
    torch.manual_seed(0)
    x = torch.randn(batch, cin, *size, dtype=torch.float64)
    x[:, :, : size[0] // 2] *= 1e-3
    x[1] *= 1e-3
    return x


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(skip_mod, "TILE", 8)  # several tiles, some partly active, on small images


@pytest.mark.parametrize(("cin", "cout", "size", "kernel", "stride"), GEOMETRIES)
def test_skipping_equals_the_dense_layer_with_flat_fields_zeroed(cin, cout, size, kernel, stride) -> None:
    layer = LocallyConnected2d(cin, cout, size, kernel, stride).double()
    x = _flat_in_places(cin, layer.in_size)
    variance = field_variance(x, layer.kernel_size, layer.stride)
    active = active_fields(x, layer.kernel_size, layer.stride, float(variance.median()))
    assert 0.3 < 1 - active.double().mean() < 0.7  # both kinds present
    assert 0 < skipped_fraction(active) < 1 - float(active.double().mean()) + 1e-9  # tiles skip less than zeroed

    x_dense, x_skip = x.clone().requires_grad_(), x.clone().requires_grad_()
    dense = layer(x_dense) * active.unsqueeze(1)
    skipped = layer(x_skip, active)
    torch.testing.assert_close(skipped, dense, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(dense)
    expected = torch.autograd.grad((dense * g).sum(), (x_dense, layer.weight))
    got = torch.autograd.grad((skipped * g).sum(), (x_skip, layer.weight))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    h = torch.randn_like(dense).requires_grad_()
    decoder = torch.randn_like(layer.weight).requires_grad_()
    dense_t = layer.transpose(h * active.unsqueeze(1), decoder)
    skipped_t = layer.transpose(h, decoder, active)
    torch.testing.assert_close(skipped_t, dense_t, rtol=1e-12, atol=1e-12)
    gx = torch.randn_like(dense_t)
    expected = torch.autograd.grad((dense_t * gx).sum(), (h, decoder))
    got = torch.autograd.grad((skipped_t * gx).sum(), (h, decoder))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_skipping_passes_gradcheck() -> None:
    layer = LocallyConnected2d(1, 2, 12, 3).double()
    x = _flat_in_places(1, (12, 12), batch=3)
    active = active_fields(x, layer.kernel_size, layer.stride, float(field_variance(x, (3, 3), (1, 1)).median()))
    plan = layer.skip_plan(active, 3)
    assert plan is not None and plan.skipped_fraction > 0
    weight = layer.weight.detach().clone().requires_grad_()
    x = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda xx, ww: torch.func.functional_call(layer, {"weight": ww}, (xx, plan)),
                                    (x, weight))  # fmt: skip
    h = torch.randn(3, 2, 10, 10, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda hh, ww: layer.transpose(hh, ww, plan), (h, weight))


def test_tau_zero_is_identical_to_no_skip() -> None:
    layer = LocallyConnected2d(1, 3, 24, 4)
    x = _flat_in_places(1, (24, 24)).float()
    x[0, 0, :8, :8] = 0.0  # exactly flat fields have variance 0 and stay active at τ = 0
    active = active_fields(x, layer.kernel_size, layer.stride, 0.0)
    assert bool(active.all())
    assert skipped_fraction(active) == 0.0
    assert torch.equal(layer(x, active), layer(x))


def test_skipped_fraction_counts_whole_tiles() -> None:
    active = torch.ones(2, 16, 16, dtype=torch.bool)
    active[0, :8, :8] = False  # one whole tile of example 0: skipped
    active[1, :4, :4] = False  # part of a tile: zeroed but computed
    assert skipped_fraction(active) == pytest.approx(64 / (2 * 256))


def test_a_mask_of_the_wrong_shape_or_a_plan_of_another_layer_is_refused() -> None:
    layer = LocallyConnected2d(1, 2, 10, 3)
    with pytest.raises(ValueError, match=r"active mask must be bool of shape \(4, 8, 8\)"):
        layer(torch.zeros(4, 1, 10, 10), torch.ones(4, 8, 7, dtype=torch.bool))
    other = LocallyConnected2d(1, 2, 12, 5)  # the same 8×8 output from other fields
    mask = torch.ones(4, 8, 8, dtype=torch.bool)
    mask[0, :4] = False
    plan = other.skip_plan(mask, 4)
    with pytest.raises(ValueError, match=r"SkipPlan for kernel \(5, 5\), stride \(1, 1\); this layer has \(3, 3\)"):
        layer(torch.zeros(4, 1, 10, 10), plan)


def test_skip_with_tied_layers_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model\.skip_variance: 0\.1 \(skipping needs untied"):
        config_mod.load(None, ["model.name=cat", "model.tied=true", "model.skip_variance=0.1"])
    with pytest.raises(ConfigError, match=r"model\.skip_variance: -1\.0 \(must be a finite number >= 0"):
        config_mod.load(None, ["model.skip_variance=-1"])


def test_cat_network_trains_with_skipping_and_counts_what_it_skipped() -> None:
    """A one-stage cat network on real photo crops: the loss falls with flat fields skipped, and the counts add up."""
    x = torch.from_numpy(natural_patches(96, 24, np.random.default_rng(0)))  # (B, 1, 24, 24)
    x = x - x.mean(dim=(1, 2, 3), keepdim=True)
    tau = float(field_variance(x, (8, 8), (1, 1)).quantile(0.5))
    torch.manual_seed(0)
    net = CatNetwork((1, 24, 24), receptive_field=8, maps=4, pool=3, lcn=3, skip_variance=tau)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        batch = x[(step % 3) * 32 : (step % 3 + 1) * 32]
        optimizer.zero_grad()
        loss = net.loss(batch)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    summary = net.skip_summary()
    assert summary is not None and summary["fields"] == 40 * 32 * 17 * 17
    assert 0.4 < summary["zeroed_fraction"] < 0.6
    assert 0 < summary["skipped_fraction"] < summary["zeroed_fraction"]
    assert net.skip_summary() is None  # counted afresh after each summary
