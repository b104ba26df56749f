"""L2Pool2d and LocalContrastNorm2d against loop-based references written here from the formulas, plus gradients."""

from __future__ import annotations

import math

import pytest
import torch

from downpour.nn.norm import LocalContrastNorm2d
from downpour.nn.pooling import L2Pool2d


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------------
# L2Pool2d


def _both(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else value


def l2pool_reference(x: torch.Tensor, k: int | tuple[int, int], stride: int | tuple[int, int],
                     padding: int | tuple[int, int], epsilon: float) -> torch.Tensor:  # fmt: skip
    """``sqrt(ε + Σ x²)`` over each window, by explicit loops; positions in the zero padding contribute nothing."""
    (kh, kw), (sh, sw), (ph, pw) = _both(k), _both(stride), _both(padding)
    b, c, h, w = x.shape
    h_out = (h + 2 * ph - kh) // sh + 1
    w_out = (w + 2 * pw - kw) // sw + 1
    xs = x.tolist()
    out = torch.empty(b, c, h_out, w_out, dtype=torch.float64)
    for n in range(b):
        for ch in range(c):
            for i in range(h_out):
                for j in range(w_out):
                    total = 0.0
                    for p in range(kh):
                        for q in range(kw):
                            r, s = i * sh + p - ph, j * sw + q - pw
                            if 0 <= r < h and 0 <= s < w:
                                total += xs[n][ch][r][s] ** 2
                    out[n, ch, i, j] = math.sqrt(epsilon + total)
    return out


@pytest.mark.parametrize(
    ("k", "stride", "padding", "epsilon"),
    [
        (2, None, 0, 0.0),  # non-overlapping, the default stride
        (3, 1, 0, 0.0),  # overlapping, stride < kernel
        (3, 2, 1, 0.0),  # overlapping with padding
        (4, 3, 2, 1e-3),  # even kernel, padding = kernel / 2, epsilon
        (3, 2, 2, 0.0),  # padding > kernel // 2: some windows lie wholly in the padding
        (1, 1, 0, 0.5),  # degenerate window: sqrt(ε + x²)
        (5, 2, 0, 0.0),  # stride that does not divide the input
        ((2, 3), (1, 2), (1, 0), 0.0),  # rectangular windows, strides and padding, as nn.AvgPool2d takes them
        ((3, 1), None, (2, 0), 0.1),  # padding above half the kernel in one direction only
    ],
)
def test_l2pool_matches_loop_reference(k: int | tuple[int, int], stride: int | tuple[int, int] | None,
                                       padding: int | tuple[int, int], epsilon: float) -> None:  # fmt: skip
    x = _randn(2, 3, 9, 8)
    out = L2Pool2d(k, stride, padding=padding, epsilon=epsilon)(x)
    expected = l2pool_reference(x, k, k if stride is None else stride, padding, epsilon)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    ("shape", "k", "stride", "padding", "expected"),
    [
        ((2, 3, 8, 8), 2, None, 0, (2, 3, 4, 4)),
        ((2, 3, 9, 7), 2, None, 0, (2, 3, 4, 3)),  # floor: the last row / column is dropped
        ((1, 4, 10, 10), 3, 1, 0, (1, 4, 8, 8)),
        ((1, 4, 10, 10), 3, 1, 1, (1, 4, 10, 10)),  # "same" size
        ((1, 1, 11, 6), 5, 3, 2, (1, 1, 4, 2)),
        ((3, 2, 5, 5), 5, 1, 0, (3, 2, 1, 1)),
    ],
)
def test_l2pool_output_shape(
    shape: tuple[int, ...], k: int, stride: int | None, padding: int, expected: tuple[int, ...]
) -> None:
    assert L2Pool2d(k, stride, padding=padding)(torch.ones(shape)).shape == expected


def test_l2pool_gradcheck() -> None:
    x = _randn(2, 2, 6, 5, seed=1).requires_grad_()
    assert torch.autograd.gradcheck(L2Pool2d(3, 2, padding=1), (x,))
    assert torch.autograd.gradcheck(L2Pool2d(2, 1, epsilon=1e-2), (x,))


def test_l2pool_zero_windows_have_finite_zero_gradient() -> None:
    # sqrt has infinite slope at 0: unguarded, an all-zero window gives 0 · ∞ = NaN gradients.
    x = _randn(1, 2, 6, 6, seed=2)
    x[:, :, :2, :2] = 0.0  # exactly one all-zero window for the 2×2 non-overlapping pooling below
    x.requires_grad_()
    out = L2Pool2d(2)(x)
    assert out[0, :, 0, 0].eq(0).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad[:, :, :2, :2].eq(0).all()  # the subgradient chosen at 0
    # Elsewhere the gradient is the plain formula's x / ‖window‖.
    expected = x.detach()[0, 0, 2:4, 2:4] / x.detach()[0, 0, 2:4, 2:4].norm()
    torch.testing.assert_close(x.grad[0, 0, 2:4, 2:4], expected)

    zeros = torch.zeros(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    out = L2Pool2d(3, 1, padding=1)(zeros)
    assert out.eq(0).all()
    out.sum().backward()
    assert torch.isfinite(zeros.grad).all()


def test_l2pool_epsilon_on_zero_input() -> None:
    zeros = torch.zeros(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    out = L2Pool2d(2, epsilon=0.25)(zeros)
    torch.testing.assert_close(out, torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64))
    out.sum().backward()
    assert zeros.grad.eq(0).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kernel_size": 0}, r"kernel_size .*>= 1.*got 0"),
        ({"kernel_size": 2.0}, r"kernel_size .*got 2\.0"),
        ({"kernel_size": 2, "stride": 0}, r"stride .*>= 1.*got 0"),
        ({"kernel_size": 2, "padding": -1}, r"padding .*>= 0.*got -1"),
        ({"kernel_size": 2, "epsilon": -1e-3}, r"epsilon .*>= 0.*got -0\.001"),
        ({"kernel_size": 2, "epsilon": math.nan}, r"epsilon .*got nan"),
        ({"kernel_size": (2, 0)}, r"kernel_size .*pair of them, got \(2, 0\)"),
        ({"kernel_size": (2, 2, 2)}, r"kernel_size .*got \(2, 2, 2\)"),
        ({"kernel_size": 2, "padding": (0, -1)}, r"padding .*>= 0 or a pair of them, got \(0, -1\)"),
    ],
)
def test_l2pool_argument_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        L2Pool2d(**kwargs)


def test_l2pool_input_errors() -> None:
    with pytest.raises(ValueError, match=r"\(B, C, H, W\).*got shape \(3, 8, 8\)"):
        L2Pool2d(2)(torch.ones(3, 8, 8))
    with pytest.raises(ValueError, match=r"smaller than kernel_size=5"):
        L2Pool2d(5)(torch.ones(1, 1, 4, 8))


def test_l2pool_repr() -> None:
    assert "kernel_size=3, stride=1, padding=1, epsilon=0.0" in repr(L2Pool2d(3, 1, padding=1))
    assert "kernel_size=(2, 3), stride=(2, 3), padding=(0, 1)" in repr(L2Pool2d((2, 3), padding=(0, 1)))


# ---------------------------------------------------------------------------------------------------------------------
# LocalContrastNorm2d


def lcn_reference(x: torch.Tensor, k: int, sigma: float, epsilon: float) -> torch.Tensor:
    """Jarrett et al. (2009) by explicit loops over examples, channels, positions and window, with reflect borders."""
    b, c, h, w = x.shape
    r = k // 2
    g = [[math.exp(-(p * p + q * q) / (2 * sigma * sigma)) for q in range(-r, r + 1)] for p in range(-r, r + 1)]
    total = sum(sum(row) for row in g)
    wts = [[g[p][q] / (total * c) for q in range(k)] for p in range(k)]  # Σ over channels and positions = 1

    def reflect(i: int, n: int) -> int:  # ... 2 1 | 0 1 2 ... n-1 | n-2 n-3 ...
        return -i if i < 0 else 2 * (n - 1) - i if i >= n else i

    def window_sum(a: list, i: int, j: int) -> float:  # Σ_{c,p,q} w_pq a[c][i+p][j+q]
        return sum(
            wts[p][q] * a[ch][reflect(i + p - r, h)][reflect(j + q - r, w)]
            for ch in range(c)
            for p in range(k)
            for q in range(k)
        )

    out = torch.empty_like(x)
    for n in range(b):
        xs = x[n].tolist()
        mean = [[window_sum(xs, i, j) for j in range(w)] for i in range(h)]
        v = [[[xs[ch][i][j] - mean[i][j] for j in range(w)] for i in range(h)] for ch in range(c)]
        v2 = [[[val * val for val in row] for row in plane] for plane in v]
        sd = [[math.sqrt(window_sum(v2, i, j)) for j in range(w)] for i in range(h)]
        mean_sd = sum(sum(row) for row in sd) / (h * w)
        for ch in range(c):
            for i in range(h):
                for j in range(w):
                    out[n, ch, i, j] = v[ch][i][j] / max(mean_sd, sd[i][j], epsilon)
    return out


@pytest.mark.parametrize(
    ("shape", "k", "sigma"),
    [
        ((2, 3, 8, 7), 5, None),
        ((1, 2, 9, 9), 9, 1.5),  # default window size, reflect border as wide as it may be (pad 4 < 9)
        ((2, 1, 6, 5), 3, 0.7),  # one channel
        ((1, 4, 4, 4), 1, None),  # 1×1 window: only the across-channel normalization is left
    ],
)
def test_lcn_matches_loop_reference(shape: tuple[int, ...], k: int, sigma: float | None) -> None:
    x = 3.0 * _randn(*shape, seed=3) + 1.0
    module = LocalContrastNorm2d(k, sigma=sigma)
    out = module(x)
    expected = lcn_reference(x, k, k / 4 if sigma is None else sigma, module.epsilon)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-8)


def test_lcn_window_sums_to_one_and_is_a_non_persistent_buffer() -> None:
    module = LocalContrastNorm2d(7, sigma=2.0)
    assert module.window.shape == (1, 1, 7, 7)
    torch.testing.assert_close(module.window.sum().item(), 1.0, rtol=0, atol=1e-12)
    assert module.window[0, 0, 3, 3] == module.window.max()  # centred
    assert "window" not in module.state_dict()
    assert "window" in dict(module.named_buffers())


@pytest.mark.parametrize("cast", ["half", "bfloat16", "float", "meta"])
def test_lcn_window_stays_the_float64_gaussian_through_casts_and_meta_initialisation(cast: str) -> None:
    """The window is a constant: ``.half()`` must not round it (in bfloat16 it summed to 1.0003 and moved outputs
    by 0.008), and a module built on the meta device and materialised with ``to_empty`` must not read uninitialised
    memory."""
    reference = LocalContrastNorm2d(9)
    if cast == "meta":
        with torch.device("meta"):
            module = LocalContrastNorm2d(9)
        assert module.window.is_meta
        module.to_empty(device="cpu")
    else:
        module = getattr(LocalContrastNorm2d(9), cast)()
    assert module.window.dtype == torch.float64
    assert torch.equal(module.window, reference.window)
    x = _randn(2, 3, 12, 12, seed=9)
    assert torch.equal(module(x), reference(x))
    assert torch.equal(module(x.bfloat16()), reference(x.bfloat16()))
    assert module.share_memory().window.is_shared()  # as every other buffer


def test_lcn_gradcheck() -> None:
    x = _randn(2, 2, 6, 5, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(LocalContrastNorm2d(3, sigma=1.0), (x,))
    assert torch.autograd.gradcheck(LocalContrastNorm2d(5), (x,))


def test_lcn_invariant_to_adding_a_constant() -> None:
    # The Gaussian weights sum to 1 over channels and positions, so the local mean of x + a is (local mean of x) + a and
    # the subtractive step removes a exactly; v, σ and y are unchanged (up to float64 rounding of |a|-sized numbers).
    x = _randn(2, 3, 10, 9, seed=5)
    module = LocalContrastNorm2d(5)
    torch.testing.assert_close(module(x + 7.5), module(x), rtol=0, atol=1e-10)
    torch.testing.assert_close(module(x - 100.0), module(x), rtol=0, atol=1e-10)
    # A per-channel offset is not a constant: the shared mean cannot remove it.
    shifted = x + torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64).view(1, 3, 1, 1)
    assert (module(shifted) - module(x)).abs().max() > 0.1


def test_lcn_scale_invariance_where_the_divisive_term_dominates() -> None:
    # y(s·x) = s·v / max(s·mean σ, s·σ, ε): equal to y(x) as soon as max(mean σ, σ) >= ε / s everywhere, i.e. where the
    # data's own contrast, not the ε floor, divides. Here σ is O(1) (unit-variance noise) and ε = 1e-4, so scales down
    # to 1e-2 leave the output unchanged up to rounding (1e-10 in float64).
    x = _randn(2, 3, 10, 9, seed=6)
    module = LocalContrastNorm2d(5)
    for scale in (1e-2, 0.5, 3.0, 1e3):
        torch.testing.assert_close(module(scale * x), module(x), rtol=0, atol=1e-10)
    # Far below the floor the ε term dominates instead and the output shrinks with the input: y ≈ s·v / ε.
    tiny = 1e-9
    ratio = module(tiny * x).abs().max() / module(x).abs().max()
    assert ratio < 1e-3


def test_lcn_flat_input_gives_finite_zero_output_and_gradients() -> None:
    for value in (0.0, 5.0, -1e4):
        x = torch.full((2, 3, 7, 8), value, dtype=torch.float64, requires_grad=True)
        out = LocalContrastNorm2d(5)(x)
        assert torch.isfinite(out).all()
        # what is left of a constant after subtracting its local mean is rounding, |x|·ε, divided by the floor 1e-4
        assert out.abs().max() < 1e-8 * max(1.0, abs(value) * 1e-2)
        out.square().sum().backward()
        assert torch.isfinite(x.grad).all()


def test_lcn_flat_region_inside_a_textured_image_has_finite_gradients() -> None:
    # Deep inside a flat region (wider than two window radii) the local sum of squares is exactly 0; an unguarded
    # sqrt there back-propagates 0 · ∞ = NaN even though the mean σ, not the local σ, is the divisor. The texture is
    # ±1 in equal numbers, so the image's mean is exactly 0 and the flat region stays exactly 0 once it is removed.
    signs = torch.ones(1, 2, 8, 9, dtype=torch.float64)
    signs.view(-1)[torch.randperm(signs.numel(), generator=torch.Generator().manual_seed(7))[: signs.numel() // 2]] = -1
    x = torch.cat([torch.zeros(1, 2, 8, 11, dtype=torch.float64), signs], dim=-1)  # (1, 2, 8, 20)
    assert float(x.mean()) == 0.0
    x.requires_grad_()
    out = LocalContrastNorm2d(5)(x)
    assert out[..., :3].eq(0).all()
    (out * _randn(*out.shape, seed=8)).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad[..., 10:].abs().sum() > 0


def test_lcn_float32_close_to_float64() -> None:
    x = _randn(2, 3, 9, 9, seed=9)
    module = LocalContrastNorm2d()
    out32 = module(x.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), module(x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("level", [0.0, 10.0, 255.0, -3000.0])
def test_lcn_float32_on_a_bright_level_keeps_its_precision(level: float) -> None:
    """Pixel values in 0..255 (or any level far from 0) in float32: a flat picture gives exactly 0 (it gave up to 0.76
    at 255, the floor ε being below float32's rounding there), and a texture on the level matches float64 as well as
    the float32 input itself allows."""
    module = LocalContrastNorm2d(9)
    assert module(torch.full((2, 3, 32, 32), level)).abs().max() == 0
    x = (level + _randn(2, 3, 32, 32, seed=10)).float()  # the float32 picture; float64 of the same values as truth
    torch.testing.assert_close(module(x).double(), module(x.double()), rtol=0, atol=2e-3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kernel_size": 4}, r"kernel_size .*odd.*got 4"),
        ({"kernel_size": 0}, r"kernel_size .*got 0"),
        ({"kernel_size": -3}, r"kernel_size .*got -3"),
        ({"kernel_size": 5.0}, r"kernel_size .*got 5\.0"),
        ({"sigma": 0.0}, r"sigma .*> 0.*got 0\.0"),
        ({"sigma": -1.0}, r"sigma .*got -1\.0"),
        ({"sigma": math.inf}, r"sigma .*got inf"),
        ({"epsilon": 0.0}, r"epsilon .*> 0.*got 0\.0"),
        ({"epsilon": math.nan}, r"epsilon .*got nan"),
    ],
)
def test_lcn_argument_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LocalContrastNorm2d(**kwargs)


def test_lcn_input_errors() -> None:
    with pytest.raises(ValueError, match=r"\(B, C, H, W\).*got shape \(2, 9\)"):
        LocalContrastNorm2d()(torch.ones(2, 9))
    with pytest.raises(ValueError, match=r"needs H and W > 4.*got input shape \(1, 1, 4, 12\)"):
        LocalContrastNorm2d(9)(torch.ones(1, 1, 4, 12))


def test_lcn_repr() -> None:
    assert repr(LocalContrastNorm2d(5)) == "LocalContrastNorm2d(kernel_size=5, sigma=1.25, epsilon=0.0001)"


def test_l2_pool_propagates_nan() -> None:
    """A NaN in a window makes that window's output NaN (divergence is not hidden as 0)."""
    from downpour.nn.pooling import L2Pool2d as Pool

    x = torch.zeros(1, 1, 2, 4)
    x[0, 0, 0, 0] = float("nan")
    out = Pool(2, stride=2, epsilon=1e-6)(x)
    assert torch.isnan(out[0, 0, 0, 0]) and torch.isfinite(out[0, 0, 0, 1])


@pytest.mark.parametrize("layer", [L2Pool2d(2), LocalContrastNorm2d(3)], ids=["l2pool", "lcn"])
def test_inputs_that_are_not_floating_point_tensors_are_named(layer: torch.nn.Module) -> None:
    """A NumPy array or an integer tensor is a TypeError naming what came (not an AttributeError or torch's
    'could not infer output dtype' from inside)."""
    import numpy as np

    with pytest.raises(TypeError, match=r"expects a floating-point torch.Tensor, got numpy.ndarray"):
        layer(np.zeros((1, 1, 6, 6), dtype=np.float32))
    with pytest.raises(TypeError, match=r"got a torch.int64 one"):
        layer(torch.ones(1, 1, 6, 6, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_inputs_are_pooled_in_float32(dtype: torch.dtype) -> None:
    """A 5×5 window of 60s has norm 300, yet its sum of squares (90,000) overflows float16; 1e-4 squared underflows.
    Both are computed in float32 and returned in the input's dtype, with the float32 gradient."""
    out = L2Pool2d(5)(torch.full((1, 1, 5, 5), 60.0, dtype=dtype))
    assert out.dtype == dtype and out.item() == pytest.approx(300.0, rel=1e-2)
    small = torch.full((1, 1, 2, 2), 1e-4, dtype=dtype, requires_grad=True)
    pooled = L2Pool2d(2)(small)
    pooled.sum().backward()
    assert pooled.item() == pytest.approx(2e-4, rel=1e-2)
    assert small.grad is not None and torch.allclose(small.grad.float(), torch.full((1, 1, 2, 2), 0.5), rtol=1e-2)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float16, 0.01), (torch.bfloat16, 0.05)])
def test_16_bit_inputs_are_normalized_in_float32(dtype: torch.dtype, tolerance: float) -> None:
    """Stripes of 0 and 1000 in float16 gave σ = inf and an all-zero output; now the output is float32's rounded to
    the input's dtype, and the input gradients are within ``tolerance`` of float64's (relative to their largest;
    computed in 16 bits they were off by 0.11 in float16 and 0.19 in bfloat16)."""
    torch.manual_seed(0)
    stripes = torch.tensor([[[[0.0, 1000.0, 0.0, 1000.0]] * 4]])
    assert LocalContrastNorm2d(3)(stripes.to(dtype)).abs().max().item() == pytest.approx(1.0, rel=1e-2)
    x = (torch.rand(2, 3, 12, 12) * 4 + 2).to(dtype)  # positive maps, like L2 pooling's
    x16, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    g = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    y16, y64 = LocalContrastNorm2d(5)(x16), LocalContrastNorm2d(5)(x64)
    (y16 * g.to(dtype)).sum().backward()
    (y64 * g.to(dtype).double()).sum().backward()
    assert y16.dtype == dtype and torch.equal(y16, LocalContrastNorm2d(5)(x.float()).to(dtype))
    assert x16.grad is not None and x64.grad is not None
    error = (x16.grad.double() - x64.grad).abs().max() / x64.grad.abs().max()
    assert error < tolerance
