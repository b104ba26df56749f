"""Skipping flat receptive fields: equal to the dense layer with flat fields zeroed (computed by the pair kernels,
one field at a time, on one thread or several), and τ = 0 changes nothing."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from downpour import config as config_mod
from downpour.data.sources import natural_patches
from downpour.errors import ConfigError
from downpour.models.cat import CatNetwork
from downpour.nn import LocallyConnected2d, local_pairs
from downpour.nn.skip import active_fields, field_variance
from downpour.threads import torch_threads

GEOMETRIES = [
    # (in_channels, out_channels, in_size, kernel, stride)
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


@pytest.mark.parametrize(("cin", "cout", "size", "kernel", "stride"), GEOMETRIES)
def test_skipping_equals_the_dense_layer_with_flat_fields_zeroed(cin, cout, size, kernel, stride) -> None:
    layer = LocallyConnected2d(cin, cout, size, kernel, stride).double()
    x = _flat_in_places(cin, layer.in_size)
    variance = field_variance(x, layer.kernel_size, layer.stride)
    active = active_fields(x, layer.kernel_size, layer.stride, float(variance.median()))
    assert 0.3 < 1 - active.double().mean() < 0.7  # both kinds present
    plan = layer.skip_plan(active, x.shape[0])
    assert plan is not None and plan.skips and plan.pairs is not None
    assert plan.pairs.count == int(active.sum())  # every flat field left out, field by field
    assert plan.skipped_fraction == plan.zeroed_fraction == pytest.approx(1 - float(active.double().mean()))

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
    # second derivatives through the pair kernels too (the weight gradient as a product of its own)
    assert torch.autograd.gradgradcheck(lambda xx, ww: torch.func.functional_call(layer, {"weight": ww}, (xx, plan)),
                                        (x, weight))  # fmt: skip
    assert torch.autograd.gradgradcheck(lambda hh, ww: layer.transpose(hh, ww, plan), (h, weight))


def test_tau_zero_is_identical_to_no_skip() -> None:
    layer = LocallyConnected2d(1, 3, 24, 4)
    x = _flat_in_places(1, (24, 24)).float()
    x[0, 0, :8, :8] = 0.0  # exactly flat fields have variance 0 and stay active at τ = 0
    active = active_fields(x, layer.kernel_size, layer.stride, 0.0)
    assert bool(active.all())
    assert layer.skip_plan(active, x.shape[0]) is None  # nothing to skip: the dense kernels
    assert torch.equal(layer(x, active), layer(x))


def _check_against_dense(layer: LocallyConnected2d, x: torch.Tensor, active: torch.Tensor, tol: float) -> None:
    """Forward, transpose and all their gradients with ``active`` equal the dense layer's with flat fields zeroed."""
    mask = active.unsqueeze(1)
    g = torch.randn(x.shape[0], layer.out_channels, *layer.out_size, dtype=x.dtype)

    def everything(skip: bool) -> tuple[torch.Tensor, ...]:
        xx, h = x.clone().requires_grad_(), g.clone().requires_grad_()
        out = layer(xx, active) if skip else layer(xx) * mask
        back = layer.transpose(h, None, active) if skip else layer.transpose(h * mask)
        grads = torch.autograd.grad((out * g).sum(), (xx, layer.weight))
        back_grads = torch.autograd.grad((back * x).sum(), (h, layer.weight))
        return out, back, *grads, *back_grads

    for got, expected in zip(everything(True), everything(False), strict=True):
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("threads", [1, 2])
def test_float32_batches_split_over_threads_equal_the_dense_layer(threads: int) -> None:
    """float32, with enough fields that the kernels split their work over torch's threads (locations for the forward
    and the weight gradient, examples for the transpose)."""
    torch.manual_seed(1)
    layer = LocallyConnected2d(2, 3, 26, 5, 1)
    x = torch.randn(24, 2, 26, 26)
    x[:12, :, :13] *= 1e-3
    active = active_fields(x, layer.kernel_size, layer.stride, 0.05)
    assert 0.2 < 1 - active.float().mean() < 0.6 and int(active.sum()) > 4096  # several parts per call
    with torch_threads(threads):
        _check_against_dense(layer, x, active, 2e-5)


def test_weight_gradient_of_trailing_flat_locations_is_zero_on_two_threads() -> None:
    """The weight gradient's rows are filled in by the kernels (the output starts uninitialised), one range of
    locations per thread, the ranges split at equal numbers of active pairs. When the last locations are flat in
    every example, the split's last edge falls before the end: the last part must still reach the last location,
    or those rows keep whatever the memory held. Enough active pairs (> 4096) to split over two threads."""
    generator = torch.Generator().manual_seed(4)
    layer = LocallyConnected2d(1, 2, 26, 5)  # 22x22 locations, fields of rows y..y+4
    x = torch.randn(24, 1, 26, 26, generator=generator)
    x[:, :, 18:] = 0.5  # input rows 18..25 flat everywhere: location rows 18..21 are flat in every example
    active = active_fields(x, layer.kernel_size, layer.stride, 1e-6)
    flat_rows = ~active.any(0).flatten()  # (L,): locations flat in every example
    assert int(active.sum()) > 4096 and flat_rows.nonzero().min() == 18 * 22 and bool(flat_rows[18 * 22 :].all())
    g = torch.randn(24, 2, 22, 22, generator=generator)
    (expected,) = torch.autograd.grad((layer(x) * active.unsqueeze(1) * g).sum(), layer.weight)
    for _ in range(3):  # fresh outputs, not always on zeroed memory
        garbage = torch.full_like(layer.weight, float("nan"))
        del garbage
        with torch_threads(2):
            (got,) = torch.autograd.grad((layer(x, active) * g).sum(), layer.weight)
        assert torch.equal(got[flat_rows], torch.zeros_like(got[flat_rows]))
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)


def test_no_active_field_and_a_single_one() -> None:
    layer = LocallyConnected2d(1, 2, 9, 3).double()
    x = torch.randn(3, 1, 9, 9, dtype=torch.float64)
    none = torch.zeros(3, 7, 7, dtype=torch.bool)
    assert layer.skip_plan(none, 3).skipped_fraction == 1.0
    _check_against_dense(layer, x, none, 1e-12)
    one = none.clone()
    one[2, 6, 0] = True  # the last example, bottom-left location
    _check_against_dense(layer, x, one, 1e-12)


def test_without_numba_flat_fields_are_zeroed_but_computed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the pair kernels cannot run the layer computes every field and zeroes: same results, nothing skipped."""
    monkeypatch.setattr(local_pairs, "available", lambda: False)
    layer = LocallyConnected2d(1, 3, 24, 4).double()
    x = _flat_in_places(1, (24, 24))
    active = active_fields(x, layer.kernel_size, layer.stride, float(field_variance(x, (4, 4), (1, 1)).median()))
    plan = layer.skip_plan(active, x.shape[0])
    assert plan is not None and not plan.skips and plan.skipped_fraction == 0.0 and plan.zeroed_fraction > 0.3
    _check_against_dense(layer, x, active, 1e-12)
    half = LocallyConnected2d(1, 3, 24, 4).to(torch.bfloat16)  # no pair kernels for half precision either
    monkeypatch.undo()
    assert half.skip_plan(active, x.shape[0]).skipped_fraction == 0.0


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
    assert summary["skipped_fraction"] == pytest.approx(summary["zeroed_fraction"])  # field by field
    assert net.skip_summary() is None  # counted afresh after each summary


def test_pair_kernels_refuse_what_does_not_fit_their_pairs() -> None:
    """The compiled loops do not check bounds: the pair kernels refuse tensors of another batch, size or dtype, and
    a plan from a float layer on a bfloat16 one computes and zeroes instead of reaching them."""
    layer = LocallyConnected2d(1, 2, 6, 3)
    active = torch.ones(4, 4, 4, dtype=torch.bool)
    active[3, 3, 3] = False
    plan = layer.skip_plan(active, 4)
    kernels = plan.kernels((1, 6, 6), (4, 4), torch.float32)
    with pytest.raises(ValueError, match=r"expected a CPU float32/float64 tensor \(4, 1, 6, 6\)"):
        kernels.forward(torch.zeros(1, 1, 6, 6), layer.weight)  # a batch of 1 for a plan of 4
    with pytest.raises(ValueError, match=r"weights \(16, 2, 9\)"):
        kernels.transpose(torch.zeros(4, 2, 4, 4), torch.zeros(16, 2, 4))
    with pytest.raises(ValueError, match="float64"):
        kernels.weight_grad(torch.zeros(4, 2, 4, 4, dtype=torch.float64), torch.zeros(4, 1, 6, 6), layer.weight.shape)
    with pytest.raises(ValueError, match=r"do not fit an input \(1, 5, 5\)"):
        plan.kernels((1, 5, 5), (4, 4), torch.float32)
    half = LocallyConnected2d(1, 2, 6, 3).to(torch.bfloat16)
    x = torch.randn(4, 1, 6, 6).to(torch.bfloat16)
    assert torch.equal(half(x, plan), half(x).masked_fill(~active.unsqueeze(1), 0))
    with pytest.raises(ValueError, match=r"transpose weight is torch\.float32"):
        layer.double().transpose(torch.zeros(4, 2, 4, 4, dtype=torch.float64), torch.zeros(16, 2, 9), plan)


def test_flat_fields_output_zero_with_a_bias_too() -> None:
    """ "Fields marked False output zero": with ``bias=True`` as well (the bias is added, then flat fields zeroed), on
    the pair kernels (float64) and where fields are computed and zeroed (float16 is not skipped)."""
    for dtype in (torch.float64, torch.float16):
        layer = LocallyConnected2d(1, 2, 6, 3, bias=True).to(dtype)
        torch.nn.init.ones_(layer.bias)
        active = torch.zeros(2, 4, 4, dtype=torch.bool)
        active[0, 1, 2] = True
        out = layer(torch.randn(2, 1, 6, 6, dtype=dtype), active)
        assert (out.permute(1, 0, 2, 3)[:, ~active] == 0).all()  # (maps, flat fields)
        assert (out[0, :, 1, 2] != 0).all()


def test_field_variance_keeps_its_precision_far_from_zero() -> None:
    """Raw 0-255 pixels: E[x²] − E[x]² in float32 lost the variance of fields around 200 (5x off); in float64 the
    float32 result matches the float64 one. A field holding NaN counts as active (its NaN shows in the output)."""
    x = 200 + 0.05 * torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    got = field_variance(x, (4, 4), (4, 4))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), field_variance(x.double(), (4, 4), (4, 4)), rtol=1e-5, atol=0)
    x[0, 0, 0, 0] = float("nan")
    active = active_fields(x, (4, 4), (4, 4), 1.0)  # every finite field is flat at τ = 1
    assert active.tolist() == [[[True, False], [False, False]]]
    layer = LocallyConnected2d(3, 2, 8, 4, 4)
    assert torch.isnan(layer(x, active)[0, :, 0, 0]).all()


def test_field_variance_is_taken_over_channels_and_pixels_together() -> None:
    """Each field's variance "over its channels and pixels": one variance of all the field's values together. A
    field constant within each channel at a different level per channel (0, 1, 2) is not flat: its variance is that
    of its 48 values, 2/3 (a mean of per-channel variances would call it 0). On random fields it is the population
    variance of each unfolded patch."""
    levels = torch.arange(3, dtype=torch.float64).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    got = field_variance(levels, (4, 4), (4, 4))
    assert got.shape == (1, 1, 1) and float(got) == pytest.approx(2 / 3) == float(levels.var(unbiased=False))
    assert bool(active_fields(levels, (4, 4), (4, 4), 0.5).all())  # computed, not skipped as flat
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.unfold(x, (3, 2), stride=(2, 1)).var(dim=1, unbiased=False).view(2, 4, 7)
    torch.testing.assert_close(field_variance(x, (3, 2), (2, 1)), expected, rtol=1e-10, atol=1e-12)


def test_torch_func_transforms_with_a_skip_plan_equal_autograd() -> None:
    """``grad``, ``jvp`` and ``jacrev`` through a layer given a skip plan or a mask (planning reads the mask as a
    NumPy array, which a tensor made inside a transform has none of) agree with plain autograd and with each other
    (float64)."""
    from torch.func import functional_call, grad, jacrev, jvp

    layer = LocallyConnected2d(1, 2, 9, 3).double()
    x = _flat_in_places(1, (9, 9), batch=3)
    active = active_fields(x, layer.kernel_size, layer.stride, 1e-4)
    assert 0 < int(active.sum()) < active.numel()
    weight = layer.weight.detach().clone()
    direction = torch.randn_like(weight)
    for mask in (active, layer.skip_plan(active, 3)):

        def outputs(w, mask=mask):
            return functional_call(layer, {"weight": w}, (x, mask))

        def loss(w, outputs=outputs):
            return outputs(w).pow(2).sum()

        leaf = weight.clone().requires_grad_(True)
        expected = torch.autograd.grad(loss(leaf), leaf)[0]
        torch.testing.assert_close(grad(loss)(weight), expected)
        torch.testing.assert_close(jvp(loss, (weight,), (direction,))[1], (expected * direction).sum())
        along = torch.tensordot(jacrev(outputs)(weight), direction, dims=3)  # J·v, from the rows of J
        torch.testing.assert_close(along, jvp(outputs, (weight,), (direction,))[1])
        assert (along.permute(1, 0, 2, 3)[:, ~active] == 0).all()


def test_torch_compile_of_a_layer_given_a_mask_in_a_fresh_process() -> None:
    """``torch.compile`` of a call with a skip mask, in a process where Numba has compiled nothing yet (planning's
    first compile of its loops used to run inside Dynamo's tracing and fail there): the same values and gradients
    as the call itself."""
    script = (
        "import torch\n"
        "from downpour.nn import LocallyConnected2d\n"
        "torch.manual_seed(0)\n"
        "layer = LocallyConnected2d(1, 2, 6, 3)\n"
        "x, active = torch.randn(4, 1, 6, 6, requires_grad=True), torch.rand(4, 4, 4) < 0.5\n"
        "got = torch.compile(lambda x, a: layer(x, a).sum(), backend='aot_eager')(x, active)\n"
        "(grad,) = torch.autograd.grad(got, x)\n"
        "expected = layer(x, active).sum()\n"
        "assert torch.allclose(got, expected) and torch.allclose(grad, torch.autograd.grad(expected, x)[0])\n"
        "print('same')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "same", done.stderr[-3000:]
