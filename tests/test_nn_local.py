"""LocallyConnected2d: equal to a per-location loop, gradient-checked, clear shape errors."""

from __future__ import annotations

import pytest
import torch

from downpour.nn import LocallyConnected2d
from downpour.nn import local as local_mod
from downpour.nn.local import locally_connected_reference
from downpour.nn.skip import active_fields

GEOMETRIES = [
    # (in_channels, out_channels, in_size, kernel, stride)
    (1, 3, 12, 4, 1),
    (2, 2, 11, 3, 2),  # stride < kernel, odd sizes: the last rows/columns are not covered
    (3, 4, 9, 9, 1),  # one location
    (1, 2, 10, 5, 5),  # non-overlapping fields
    (2, 3, (9, 13), (3, 5), (2, 3)),  # rectangular everything
]


def _layer_and_input(cin, cout, size, kernel, stride, *, batch: int, seed: int, bias: bool = False):
    """A float64 layer of one geometry and a random input batch for it."""
    torch.manual_seed(seed)
    layer = LocallyConnected2d(cin, cout, size, kernel, stride, bias=bias).double()
    h, w = (size, size) if isinstance(size, int) else size
    return layer, torch.randn(batch, cin, h, w, dtype=torch.float64)


@pytest.mark.parametrize(("cin", "cout", "size", "kernel", "stride"), GEOMETRIES)
def test_equals_a_per_location_loop_in_float64(cin, cout, size, kernel, stride) -> None:
    """Forward equals the plain per-location reference to 1e-6 relative (in practice ~1e-16)."""
    layer, x = _layer_and_input(cin, cout, size, kernel, stride, batch=5, seed=0)
    out = layer(x)
    ref = locally_connected_reference(x, layer.weight, layer.kernel_size, layer.stride)
    assert out.shape == (5, cout, *layer.out_size)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-6


@pytest.mark.parametrize(("cin", "cout", "size", "kernel", "stride"), GEOMETRIES)
def test_gradcheck(cin, cout, size, kernel, stride) -> None:
    """Input and weight gradients agree with finite differences (float64)."""
    layer, x = _layer_and_input(cin, cout, size, kernel, stride, batch=2, seed=1, bias=True)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda inp, *_: layer(inp), (x, layer.weight, layer.bias))


def test_weights_are_untied_across_locations() -> None:
    """Changing the weights of one location changes the output there and nowhere else."""
    layer = LocallyConnected2d(1, 2, 8, 3).double()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    before = layer(x).detach()
    with torch.no_grad():
        layer.weight[7] += 1.0  # location (1, 1) of the 6x6 output
    changed = (layer(x).detach() - before).abs().sum(dim=(0, 1)) > 0  # (6, 6)
    assert changed.nonzero().tolist() == [[1, 1]]


@pytest.mark.parametrize(("cin", "cout", "size", "kernel", "stride"), GEOMETRIES)
def test_many_bands_give_the_same_result(cin, cout, size, kernel, stride, monkeypatch: pytest.MonkeyPatch) -> None:
    """Working through the output one row at a time (tiny bands) changes nothing: forward, both gradients and the
    transpose, for every geometry (strides > 1 make band offsets matter)."""
    layer, x = _layer_and_input(cin, cout, size, kernel, stride, batch=4, seed=2)
    x.requires_grad_(True)
    r = torch.randn(4, cout, *layer.out_size, dtype=torch.float64)

    def run() -> tuple[torch.Tensor, ...]:
        x.grad, layer.weight.grad = None, None
        out = layer(x)
        out.pow(2).sum().backward()
        return out.detach(), x.grad.clone(), layer.weight.grad.clone(), layer.transpose(r).detach()

    whole = run()
    monkeypatch.setattr(local_mod, "_BAND_BYTES", 1)
    banded = run()
    assert all(torch.allclose(a, b) for a, b in zip(whole, banded, strict=True))


def test_empty_batch_and_mismatched_dtype() -> None:
    """A batch of 0 gives an empty output; a float64 input to a float32 layer is a clear error."""
    layer = LocallyConnected2d(1, 2, 8, 3)
    assert layer(torch.zeros(0, 1, 8, 8)).shape == (0, 2, 6, 6)
    reference = locally_connected_reference(torch.zeros(0, 1, 8, 8), layer.weight, layer.kernel_size, layer.stride)
    assert reference.shape == (0, 2, 6, 6)  # the reference too (its reshape(0, -1) raised)
    with pytest.raises(ValueError, match=r"torch\.float64 on cpu, its weights are torch\.float32"):
        layer(torch.zeros(1, 1, 8, 8, dtype=torch.float64))


def test_autocast_runs_the_layer_in_its_weights_precision() -> None:
    """Inside ``torch.autocast`` (bfloat16 on the CPU) a model of conv → locally connected → L2 pooling → contrast
    normalization runs: the layer takes the conv's bfloat16 output in its float32 weights' precision (it raised a
    dtype error before), equals the same float32 layer on that input, and its gradients reach its float32 weights."""
    from downpour.nn import L2Pool2d, LocalContrastNorm2d

    torch.manual_seed(4)
    conv, layer = torch.nn.Conv2d(1, 2, 3), LocallyConnected2d(2, 4, 10, 3)
    model = torch.nn.Sequential(conv, layer, L2Pool2d(2), LocalContrastNorm2d(3))
    x = torch.randn(3, 1, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = conv(x)
        out = model(x)
        transposed = layer.transpose(torch.randn(3, 4, 8, 8, dtype=torch.bfloat16))
    assert hidden.dtype == torch.bfloat16 and out.dtype == torch.float32 and transposed.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = layer(hidden)
    torch.testing.assert_close(under, layer(hidden.float()), rtol=0, atol=0)  # float32 products, not bfloat16 ones
    out.square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32
    assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"torch\.bfloat16 on cpu, its weights are torch\.float32"):
        layer(hidden)  # outside autocast a mismatch is still the caller's to resolve


def test_transpose_checks_its_weight() -> None:
    """Decoding weights of another shape are refused, not silently truncated."""
    layer = LocallyConnected2d(1, 2, 8, 3)
    h = torch.zeros(1, 2, 6, 6)
    with pytest.raises(ValueError, match=r"expected weight of shape \(36, 2, 9\), got \(41, 2, 9\)"):
        layer.transpose(h, torch.zeros(41, 2, 9))


@pytest.mark.parametrize(("cin", "cout", "size", "kernel", "stride"), [(1, 2, 7, 3, 1), (2, 2, (7, 9), (3, 2), (2, 1))])
def test_double_backward_passes_gradgradcheck(cin, cout, size, kernel, stride) -> None:
    """Second derivatives (a gradient penalty, Hessian-vector products) of the layer and of its transpose, in the
    input and the weights, agree with finite differences of the first (float64)."""
    layer, x = _layer_and_input(cin, cout, size, kernel, stride, batch=2, seed=2)
    x.requires_grad_(True)
    weight = layer.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda xx, ww: torch.func.functional_call(layer, {"weight": ww}, (xx,)),
                                        (x, weight))  # fmt: skip
    h = torch.randn(2, cout, *layer.out_size, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda hh, ww: layer.transpose(hh, ww), (h, weight))
    # a gradient penalty trains: its gradient reaches the weights
    (grad,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    grad.pow(2).sum().backward()
    assert layer.weight.grad is not None and float(layer.weight.grad.abs().sum()) > 0


FUNC_GEOMETRIES = [(1, 2, 7, 3, 1), (2, 3, (6, 7), (3, 2), (1, 2))]


@pytest.mark.parametrize(("cin", "cout", "size", "kernel", "stride"), FUNC_GEOMETRIES)
def test_forward_mode_derivatives_pass_gradcheck(cin, cout, size, kernel, stride) -> None:
    """Forward-mode AD (``torch.autograd.forward_ad``, ``torch.func.jvp``) of the layer and of its transpose, in the
    input and the weights, agrees with finite differences, and forward-over-reverse second derivatives too."""
    layer, x = _layer_and_input(cin, cout, size, kernel, stride, batch=2, seed=4, bias=True)
    x.requires_grad_(True)
    weight = layer.weight.detach().clone().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True)

    def forward(xx, ww, bb):
        return torch.func.functional_call(layer, {"weight": ww, "bias": bb}, (xx,))

    assert torch.autograd.gradcheck(forward, (x, weight, bias), check_forward_ad=True, check_batched_grad=False)
    h = torch.randn(2, cout, *layer.out_size, dtype=torch.float64, requires_grad=True)
    transpose = layer.transpose
    assert torch.autograd.gradcheck(transpose, (h, weight), check_forward_ad=True, check_batched_grad=False)
    assert torch.autograd.gradgradcheck(forward, (x, weight, bias), check_fwd_over_rev=True)
    assert torch.autograd.gradgradcheck(transpose, (h, weight), check_fwd_over_rev=True)


@pytest.mark.parametrize(("cin", "cout", "size", "kernel", "stride"), FUNC_GEOMETRIES)
def test_torch_func_transforms_equal_plain_autograd(cin, cout, size, kernel, stride) -> None:
    """``torch.func``: per-example gradients (``vmap(grad)``), an ensemble of weights (``vmap`` over stacked weights),
    a mapped transpose, Jacobians both ways and a Hessian, each against plain autograd one example or one weight
    at a time (float64)."""
    from torch.func import functional_call, grad, hessian, jacfwd, jacrev, vmap

    layer, x = _layer_and_input(cin, cout, size, kernel, stride, batch=3, seed=5)
    weight = layer.weight.detach().clone()

    def loss(params, example):
        return functional_call(layer, params, (example.unsqueeze(0),)).tanh().pow(2).sum()

    per_example = vmap(grad(loss), in_dims=(None, 0))({"weight": weight}, x)["weight"]
    expected = []
    for example in x:
        leaf = weight.clone().requires_grad_(True)
        expected.append(torch.autograd.grad(loss({"weight": leaf}, example), leaf)[0])
    torch.testing.assert_close(per_example, torch.stack(expected), rtol=1e-12, atol=1e-12)

    weights = torch.randn(4, *weight.shape, dtype=torch.float64)
    ensemble = vmap(lambda w: functional_call(layer, {"weight": w}, (x,)))(weights)
    torch.testing.assert_close(ensemble, torch.stack([functional_call(layer, {"weight": w}, (x,)) for w in weights]))
    h = torch.randn(5, 3, cout, *layer.out_size, dtype=torch.float64)
    mapped = vmap(lambda hh: layer.transpose(hh, weight))(h)
    torch.testing.assert_close(mapped, torch.stack([layer.transpose(hh, weight) for hh in h]))

    def outputs(w):
        return layer.transpose(functional_call(layer, {"weight": w}, (x[:1],)), w)

    torch.testing.assert_close(jacfwd(outputs)(weight), jacrev(outputs)(weight))

    def scalar(example):
        return functional_call(layer, {"weight": weight}, (example,)).tanh().pow(2).sum()

    torch.testing.assert_close(hessian(scalar)(x[:1]), torch.autograd.functional.hessian(scalar, x[:1]))


def test_vmap_with_a_skip_plan_equals_the_plain_call() -> None:
    """Under ``vmap`` a skip plan (made for one batch) runs on each mapped batch in turn, so that the plan's examples
    stay its own; flat fields still output zero."""
    layer, x = _layer_and_input(1, 2, 9, 3, 1, batch=3, seed=6)
    x[0, :, :5, :5] = 0.0  # a flat corner in one example
    plan = layer.skip_plan(active_fields(x, layer.kernel_size, layer.stride, 1e-3), 3)
    assert plan is not None and not bool(plan.active.all())
    scaled = torch.stack([x, 2 * x])
    mapped = torch.func.vmap(lambda xx: layer(xx, plan))(scaled)
    torch.testing.assert_close(mapped, torch.stack([layer(x, plan), layer(2 * x, plan)]))
    assert (mapped[:, 0, :, 0, 0] == 0).all()


def test_a_mask_mapped_by_vmap_zeroes_its_flat_fields_as_a_planned_skip_does() -> None:
    """Per-example gradients with each example's own mask (``vmap(grad(...))`` over masks): no plan can read a
    mapped mask, so its flat fields are computed and zeroed, with the values and gradients of a skip planned for
    each example on its own (the pair kernels); the cat network's skip under ``vmap`` too."""
    from torch.func import functional_call, grad, vmap

    layer, x = _layer_and_input(2, 3, (7, 6), 3, (2, 1), batch=4, seed=7)
    x[1] = 0.3  # a flat example: every field zeroed
    active = active_fields(x, layer.kernel_size, layer.stride, 0.8)
    assert 0 < float(active.float().mean()) < 1
    params = {"weight": layer.weight.detach()}

    def loss(p: dict, example: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = functional_call(layer, p, (example[None], mask[None]))
        return h.tanh().square().sum() + layer.transpose(h, p["weight"], mask[None]).square().sum()

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, active)["weight"]
    planned = torch.stack([grad(loss)(params, x[i], active[i])["weight"] for i in range(4)])
    torch.testing.assert_close(per_example, planned, rtol=1e-12, atol=1e-12)
    outputs = vmap(lambda example, mask: layer(example[None], mask[None]))(x, active)
    assert (outputs[1] == 0).all()

    from downpour.models.cat import CatNetwork

    torch.manual_seed(8)
    net = CatNetwork((1, 12, 12), receptive_field=4, maps=2, pool=2, lcn=3, skip_variance=0.05).double()
    images = torch.rand(3, 1, 12, 12, dtype=torch.float64)
    images[0] = 0.5
    mapped = vmap(lambda image: net.loss(image[None]))(images)
    torch.testing.assert_close(mapped, torch.stack([net.loss(image[None]) for image in images]))


def test_torch_compile_gives_the_same_results_without_warnings() -> None:
    """A model holding the layer compiles with ``torch.compile`` (the kernels run as a graph break) and computes what
    the layer computes, forward and backward, without any warning from the compiler."""
    import warnings

    torch.manual_seed(3)
    model = torch.nn.Sequential(LocallyConnected2d(1, 4, 12, 3), torch.nn.Tanh())
    x = torch.randn(2, 1, 12, 12, requires_grad=True)
    expected = model(x)
    expected_grads = torch.autograd.grad(expected.pow(2).sum(), (x, model[0].weight))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.compile(model, backend="aot_eager")(x)  # no C++ compiler needed: what is traced is the same
        got_grads = torch.autograd.grad(got.pow(2).sum(), (x, model[0].weight))
    assert [str(w.message) for w in caught] == []
    torch.testing.assert_close(got, expected)
    for a, b in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_outputs_are_laid_out_as_convolutions_give_them() -> None:
    """The layer's and its transpose's outputs are contiguous (``.view`` works on them, as after ``nn.Conv2d``),
    with skipping too; a batch of 0 goes through forward, backward and the transpose; on the meta device the layer
    gives shapes (autocast has no meta device to ask about)."""
    layer = LocallyConnected2d(1, 8, 12, 5, bias=True)
    x = torch.randn(4, 1, 12, 12)
    active = torch.rand(4, 8, 8) < 0.5
    for out in (layer(x), layer(x, active), layer.transpose(torch.randn(4, 8, 8, 8)),
                layer.transpose(torch.randn(4, 8, 8, 8), None, active)):  # fmt: skip
        assert out.is_contiguous()
        assert out.view(4, -1).shape[1] == out[0].numel()
    empty = torch.randn(0, 1, 12, 12, requires_grad=True)
    layer(empty).sum().backward()
    assert empty.grad.shape == empty.shape and float(layer.weight.grad.abs().sum()) == 0.0
    assert layer.transpose(torch.randn(0, 8, 8, 8)).shape == (0, 1, 12, 12)
    meta = LocallyConnected2d(1, 2, 6, 3).to("meta")
    assert meta(torch.empty(2, 1, 6, 6, device="meta")).shape == (2, 2, 4, 4)


def test_torch_compile_compiles_once_and_composes_with_vmap() -> None:
    """Calls after the first reuse what ``torch.compile`` made (an ``apply`` bound anew on every call once made it
    recompile each time until its limit), and ``torch.compile`` of ``vmap`` of the layer works on the plain
    "eager" backend too."""
    from torch._dynamo.utils import counters

    torch.manual_seed(4)
    model = torch.nn.Sequential(LocallyConnected2d(1, 4, 12, 3), torch.nn.Tanh())
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(2, 1, 12, 12, requires_grad=True)
    compiled(x).sum().backward()
    compiled(x).sum().backward()
    frames = counters["frames"]["total"]  # Python frames Dynamo has compiled so far
    for _ in range(4):
        compiled(x).sum().backward()
    assert counters["frames"]["total"] == frames
    layer = LocallyConnected2d(1, 4, 12, 3)
    batches = torch.randn(3, 2, 1, 12, 12)
    mapped = torch.compile(torch.func.vmap(layer), backend="eager")(batches)
    torch.testing.assert_close(mapped, torch.stack([layer(b) for b in batches]))


def test_float32_matches_float64() -> None:
    """The fp32 path agrees with fp64 to fp32 precision."""
    torch.manual_seed(3)
    layer = LocallyConnected2d(1, 8, 20, 6)
    x = torch.randn(4, 1, 20, 20)
    out32 = layer(x)
    out64 = locally_connected_reference(x.double(), layer.weight.double(), layer.kernel_size, layer.stride)
    assert torch.allclose(out32.double(), out64, rtol=1e-4, atol=1e-5)


def test_wrong_input_shape_names_expected_and_actual() -> None:
    """A wrong input shape is a ValueError that shows what was expected and what came."""
    layer = LocallyConnected2d(1, 8, 48, 8)
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 1, 48, 48\), got \(2, 1, 32, 32\)"):
        layer(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"got \(1, 48, 48\)"):
        layer(torch.zeros(1, 48, 48))


def test_inputs_that_are_not_floating_point_tensors_are_named() -> None:
    """A NumPy array or an integer tensor is a TypeError naming what came, in forward and transpose."""
    import numpy as np

    layer = LocallyConnected2d(1, 2, 9, 3)
    with pytest.raises(TypeError, match=r"LocallyConnected2d expects a floating-point torch.Tensor, got numpy"):
        layer(np.zeros((1, 1, 9, 9), dtype=np.float32))
    with pytest.raises(TypeError, match=r"LocallyConnected2d.transpose expects .* got a torch.int64 one"):
        layer.transpose(torch.ones(1, 2, 7, 7, dtype=torch.long))


def test_factory_arguments_and_reset_parameters() -> None:
    """``device=``/``dtype=`` as ``nn.Conv2d`` takes them; a layer built on ``meta`` (as the full layout is) and
    materialised with ``to_empty`` gets its initial weights from ``reset_parameters``, the same as a fresh layer's
    for the same seed."""
    layer = LocallyConnected2d(1, 2, 9, 3, bias=True, device="cpu", dtype=torch.float64)
    assert layer.weight.dtype == layer.bias.dtype == torch.float64
    torch.manual_seed(7)
    fresh = LocallyConnected2d(1, 4, 12, 5, bias=True)
    with torch.device("meta"):
        meta = LocallyConnected2d(1, 4, 12, 5, bias=True)
    assert meta.weight.is_meta
    meta = meta.to_empty(device="cpu")
    torch.manual_seed(7)
    meta.reset_parameters()
    assert torch.equal(meta.weight, fresh.weight) and torch.equal(meta.bias, torch.zeros(4, 8, 8))
    assert fresh.weight.abs().max() <= 1 / 5  # ±1/sqrt(25)


def test_initial_weights_fill_plus_minus_one_over_root_fan_in() -> None:
    """Weights start uniform in ±1/sqrt(C·kh·kw), as ``nn.Linear`` over one field: with 3 channels of 4x4 fields
    (bound 1/sqrt(48)) and 40,000 weights, the largest reaches within 1% of the bound and the mean |w| is about
    half of it."""
    torch.manual_seed(0)
    layer = LocallyConnected2d(3, 5, 23, 4)  # 400 locations, 5 maps, 48 values per field
    bound = 1 / 48**0.5
    weight = layer.weight.detach()
    assert weight.numel() == 400 * 5 * 48
    assert bound * 0.99 < float(weight.abs().max()) <= bound
    assert float(weight.abs().mean()) == pytest.approx(bound / 2, rel=0.02)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"in_channels": 0}, "in_channels"),
        ({"out_channels": -1}, "out_channels"),
        ({"kernel_size": 0}, "kernel_size"),
        ({"kernel_size": 50}, "kernel_size"),
        ({"stride": 0}, "stride"),
        ({"in_size": (4, 4, 4)}, "in_size"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs: dict, name: str) -> None:
    """Each bad constructor argument raises a ValueError naming it and echoing its value."""
    args = {"in_channels": 1, "out_channels": 2, "in_size": 16, "kernel_size": 4, "stride": 1} | kwargs
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        LocallyConnected2d(**args)


def test_parameter_count_is_untied() -> None:
    """One weight per location, map and input value: L * M * C * k * k (the 2012 layer's memory cost)."""
    layer = LocallyConnected2d(3, 8, 32, 5, 1, bias=True)
    assert layer.weight.shape == (28 * 28, 8, 3 * 5 * 5)
    assert sum(p.numel() for p in layer.parameters()) == 28 * 28 * 8 * 75 + 8 * 28 * 28


@pytest.mark.parametrize(("cin", "cout", "size", "kernel", "stride"), GEOMETRIES)
def test_transpose_is_the_adjoint(cin, cout, size, kernel, stride) -> None:
    """<W x, h> = <x, Wᵀ h> for random x and h, and the transpose is gradient-checked in both its arguments."""
    layer, x = _layer_and_input(cin, cout, size, kernel, stride, batch=3, seed=4)
    h = torch.randn(3, cout, *layer.out_size, dtype=torch.float64, requires_grad=True)
    left = (layer(x) * h).sum()
    right = (x * layer.transpose(h)).sum()
    assert torch.allclose(left, right, rtol=1e-10)
    decoder = torch.randn_like(layer.weight, requires_grad=True)
    assert torch.autograd.gradcheck(lambda hh, ww: layer.transpose(hh, ww), (h, decoder))
