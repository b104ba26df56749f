"""Locally connected 2-D layers: convolution-shaped, but with different (untied) weights at every location.

``LocallyConnected2d`` is the filtering stage of the 2012 "cat" network (Le et al., ICML 2012): 18×18 receptive
fields, 8 maps per location, no weight sharing. Per location ``l = (y, x)`` it computes
``out[b, m, y, x] = Σ_{c,i,j} W[l, m, (c,i,j)] · in[b, c, y·s + i, x·s + j]``.

The usual implementation (``F.unfold`` then ``torch.bmm`` with autograd) materialises every patch twice, runs its
per-location products in the slow orientation and folds gradients back with ``F.fold``. This one keeps the batch
as the innermost dimension (so each location's product is ``(M, P) @ (P, B)``), works through the output in bands
of rows (so patches never exist all at once), recomputes each band's patches in the backward pass instead of
saving them, and folds each band's input gradient back with one ``index_add_``.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from functools import lru_cache
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn

from downpour.nn import arguments as check
from downpour.nn.geometry_state import GeometryState

if TYPE_CHECKING:
    from downpour.nn.skip import SkipPlan
    from downpour.nn.triton_skip import TritonSkip

IMPLEMENTATIONS = ("auto", "triton", "bands")
_BAND_BYTES = 4 << 20  # patches of one band of output rows: about 4 MB


def _kernels() -> ModuleType:
    """:mod:`downpour.nn.local_triton`, imported on first use: importing Triton takes about half a second that
    CPU-only processes (every local-backend worker) never need."""
    from downpour.nn import local_triton

    return local_triton


def _band_patches(x_t: Tensor, rows: slice, width: int, kernel: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    """Patches of output rows ``rows`` from the batch-last input ``x_t`` ``(C, H, W, B)`` (any strides, e.g. a
    region of a larger input): ``(R·W_out, C·kh·kw, B)``."""
    channels, _, _, batch = x_t.shape
    kh, kw = kernel
    sh, sw = stride
    sc, sy, sx, sb = x_t.stride()
    r = rows.stop - rows.start
    view = x_t.as_strided(
        (r, width, channels, kh, kw, batch),  # (R, W_out, C, kh, kw, B)
        (sh * sy, sw * sx, sc, sy, sx, sb),
        x_t.storage_offset() + rows.start * sh * sy,
    )
    return view.reshape(r * width, channels * kh * kw, batch)  # (R·W_out, P, B), one copy


def _lc_forward(x_t: Tensor, weight: Tensor, out_hw: tuple[int, int], kernel: tuple[int, int],
                stride: tuple[int, int]) -> Tensor:  # fmt: skip
    """Locally connected responses of the batch-last input ``x_t`` ``(C, H, W, B)``: ``(H_out, W_out, M, B)``."""
    out_h, out_w = out_hw
    batch, maps = x_t.shape[3], weight.shape[1]
    out_t = x_t.new_empty(out_h, out_w, maps, batch)
    for rows in _bands(out_h, out_w, weight.shape[2], batch, x_t.element_size()):
        patches = _band_patches(x_t, rows, out_w, kernel, stride)  # (R·W_out, P, B)
        band = out_t[rows].view((rows.stop - rows.start) * out_w, maps, batch)  # (R·W_out, M, B)
        torch.bmm(weight[rows.start * out_w : rows.stop * out_w], patches, out=band)
    return out_t


def _lc_transpose(g_t: Tensor, weight: Tensor, in_chw: tuple[int, int, int], kernel: tuple[int, int],
                  stride: tuple[int, int]) -> Tensor:  # fmt: skip
    """The transpose of :func:`_lc_forward`: ``(H_out, W_out, M, B)`` back to the input space ``(C, H, W, B)``."""
    out_h, out_w, maps, batch = g_t.shape
    channels, kh, sh = in_chw[0], kernel[0], stride[0]
    x_t = g_t.new_zeros(*in_chw, batch)
    if batch == 0:
        return x_t
    for rows in _bands(out_h, out_w, weight.shape[2], batch, g_t.element_size()):
        r = rows.stop - rows.start
        g_band = g_t[rows].reshape(r * out_w, maps, batch)  # (R·W_out, M, B)
        cols = torch.bmm(weight[rows.start * out_w : rows.stop * out_w].transpose(1, 2), g_band)  # (R·W_out, P, B)
        in_rows = slice(rows.start * sh, (rows.stop - 1) * sh + kh)
        region_chw = (channels, in_rows.stop - in_rows.start, in_chw[2])
        region = g_t.new_zeros(math.prod(region_chw), batch)  # (C·rh·W, B)
        region.index_add_(0, fold_index((r, out_w), region_chw, kernel, stride, region.device), cols.view(-1, batch))
        x_t[:, in_rows] += region.view(*region_chw, batch)
    return x_t


@lru_cache(maxsize=64)
def fold_index(out_hw: tuple[int, int], in_chw: tuple[int, int, int], kernel: tuple[int, int],
               stride: tuple[int, int], device: torch.device | None = None) -> Tensor:  # fmt: skip
    """Where each (location, patch element) of ``out_hw`` locations lands in a ``(C, H, W)`` input, flattened:
    ``(H_out·W_out·C·kh·kw,)`` indices into ``C·H·W`` (the "fold" of unfolded patches, as one ``index_add_``), on
    ``device`` (where the ``index_add_`` runs; None: the CPU)."""
    (out_h, out_w), (channels, height, width), (kh, kw), (sh, sw) = out_hw, in_chw, kernel, stride
    ly = torch.arange(out_h).view(out_h, 1, 1, 1, 1) * sh  # broadcast over (H_out, W_out, C, kh, kw)
    lx = torch.arange(out_w).view(1, out_w, 1, 1, 1) * sw
    c = torch.arange(channels).view(1, 1, channels, 1, 1)
    i, j = torch.arange(kh).view(1, 1, 1, kh, 1), torch.arange(kw).view(1, 1, 1, 1, kw)
    return (c * height * width + (ly + i) * width + lx + j).reshape(-1).to(device)


def _lc_weight_grad(g_t: Tensor, x_t: Tensor, weight_shape: torch.Size, kernel: tuple[int, int],
                    stride: tuple[int, int]) -> Tensor:  # fmt: skip
    """Weight gradient ``(L, M, P)`` from output gradients ``(H_out, W_out, M, B)`` and input ``(C, H, W, B)``."""
    out_h, out_w, maps, batch = g_t.shape
    grad_w = g_t.new_empty(weight_shape)
    for rows in _bands(out_h, out_w, weight_shape[2], batch, g_t.element_size()):
        patches = _band_patches(x_t, rows, out_w, kernel, stride)  # recomputed, never saved
        g_band = g_t[rows].reshape((rows.stop - rows.start) * out_w, maps, batch)  # (R·W_out, M, B)
        torch.bmm(g_band, patches.transpose(1, 2), out=grad_w[rows.start * out_w : rows.stop * out_w])
    return grad_w


class _Kernels(Protocol):
    """The three products of one layer geometry, in the layer's ordinary layouts."""

    def forward(self, x: Tensor, weight: Tensor) -> Tensor: ...  # (B, C, H, W) -> (B, M, H_out, W_out)

    def transpose(self, g: Tensor, weight: Tensor) -> Tensor: ...  # (B, M, H_out, W_out) -> (B, C, H, W)

    def weight_grad(self, g: Tensor, x: Tensor, weight_shape: torch.Size) -> Tensor: ...  # -> (L, M, P)


class _BandKernels:
    """The CPU kernels above, in the layer's ordinary layouts (they permute to batch-last and back)."""

    def __init__(self, in_chw: tuple[int, int, int], out_hw: tuple[int, int], kernel: tuple[int, int],
                 stride: tuple[int, int]) -> None:  # fmt: skip
        self.in_chw, self.out_hw, self.kernel, self.stride = in_chw, out_hw, kernel, stride

    def forward(self, x: Tensor, weight: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, M, H_out, W_out)``."""
        x_t = x.permute(1, 2, 3, 0).contiguous()  # (C, H, W, B): the batch innermost
        out_t = _lc_forward(x_t, weight, self.out_hw, self.kernel, self.stride)  # (H_out, W_out, M, B)
        return out_t.permute(3, 2, 0, 1).contiguous()  # as convolutions give it: `.view` works on it

    def transpose(self, g: Tensor, weight: Tensor) -> Tensor:
        """``(B, M, H_out, W_out) -> (B, C, H, W)``."""
        g_t = g.permute(2, 3, 1, 0).contiguous()  # (H_out, W_out, M, B)
        return _lc_transpose(g_t, weight, self.in_chw, self.kernel, self.stride).permute(3, 0, 1, 2).contiguous()

    def weight_grad(self, g: Tensor, x: Tensor, weight_shape: torch.Size) -> Tensor:
        """``(L, M, P)`` from response gradients ``(B, M, H_out, W_out)`` and inputs ``(B, C, H, W)``."""
        g_t, x_t = g.permute(2, 3, 1, 0).contiguous(), x.permute(1, 2, 3, 0).contiguous()  # batch-last
        return _lc_weight_grad(g_t, x_t, weight_shape, self.kernel, self.stride)


class _TritonKernels(_BandKernels):
    """The Triton kernels (:mod:`downpour.nn.local_triton`), which take the ordinary layouts directly; with ``skip``
    (a :class:`~downpour.nn.triton_skip.TritonSkip` of one batch) they leave out flat fields."""

    def __init__(self, in_chw: tuple[int, int, int], out_hw: tuple[int, int], kernel: tuple[int, int],
                 stride: tuple[int, int], skip: TritonSkip | None = None) -> None:  # fmt: skip
        super().__init__(in_chw, out_hw, kernel, stride)
        self.skip = skip

    def forward(self, x: Tensor, weight: Tensor) -> Tensor:
        return _kernels().lc_forward(x, weight, self.out_hw, self.kernel, self.stride, skip=self.skip)

    def transpose(self, g: Tensor, weight: Tensor) -> Tensor:
        return _kernels().lc_transpose(g, weight, self.in_chw, self.kernel, self.stride, skip=self.skip)

    def weight_grad(self, g: Tensor, x: Tensor, weight_shape: torch.Size) -> Tensor:
        return _kernels().lc_weight_grad(g, x, weight_shape, self.out_hw, self.kernel, self.stride, skip=self.skip)


def _without_autocast(x: Tensor) -> contextlib.AbstractContextManager[None]:
    """Autocast off for the kernels (their products stay in the dtype they were given), when it is on for ``x``."""
    device = x.device.type
    return torch.autocast(device, enabled=False) if autocasting(device) else contextlib.nullcontext()


def autocasting(device: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device`` (a device type autocast does not know, such as "meta", never
    is: PyTorch raises for it)."""
    try:
        return torch.is_autocast_enabled(device)
    except RuntimeError:
        return False


class _Linear(torch.autograd.Function):
    """Base of the layer's three products, written in ``setup_context`` form so that ``torch.func``'s transforms
    can use them (applied through :func:`_apply`)."""

    @staticmethod
    def setup_context(ctx, inputs: tuple[object, ...], output: Tensor) -> None:
        first, second, ctx.kernels, *weight_shape = inputs  # two tensors, the kernel set (_WeightGrad: the shape)
        ctx.weight_shape = weight_shape[0] if weight_shape else None
        ctx.save_for_backward(first, second)
        ctx.save_for_forward(first, second)


def _apply(function: type[_Linear], *args: object) -> Tensor:
    """``function.apply(*args)``. For a Function in ``setup_context`` form, ``Function.apply`` binds the arguments
    to its signature with :mod:`inspect` on every call (15 µs here, tripling the products' own host cost); the
    products are always called with every argument in place, so they skip that when neither ``torch.compile`` nor
    a ``torch.func`` transform is at work (both need ``Function.apply`` itself)."""
    if torch.compiler.is_compiling() or _transforms_active is None or _transforms_active():
        return function.apply(*args)
    return _FUNCTION_BASE_APPLY.__get__(None, function)(*_unwrap_dead(args))  # PyTorch's own apply, unbound


try:  # what Function.apply itself calls (PyTorch 2.4-2.13); a PyTorch without them gets Function.apply throughout
    from torch._C import _are_functorch_transforms_active as _transforms_active  # a torch.func transform running?
    from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead  # tensors of a finished transform

    _FUNCTION_BASE_APPLY = torch._C._FunctionBase.__dict__["apply"]  # the classmethod Function.apply ends in
except (ImportError, AttributeError, KeyError):  # pragma: no cover - depends on the PyTorch version
    _transforms_active = _unwrap_dead = _FUNCTION_BASE_APPLY = None


class _Product(_Linear):
    """``h = W x`` through one kernel set (band-wise, Triton or skipping); backward ``x̄ = Wᵀh̄``, ``W̄ = h̄ ⊗ x``.

    The three products are each other's gradients, so the backward passes are differentiable too (double backward,
    e.g. a gradient penalty): under ``create_graph`` they run through these Functions, else straight through the
    kernels. Each is linear in each input, so its forward-mode derivative is the same product of the tangents
    (``jvp``), and ``torch.func.vmap`` runs it on the mapped examples as one larger batch where it can (``vmap``).
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor, kernels: _Kernels) -> Tensor:
        return kernels.forward(x, weight)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        with _without_autocast(grad_out):
            grad_x = _transposed(grad_out, weight, ctx.kernels) if ctx.needs_input_grad[0] else None
            grad_w = _weight_grad(grad_out, x, weight.shape, ctx.kernels) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None

    @staticmethod
    def jvp(ctx, x_tangent: Tensor | None, weight_tangent: Tensor | None, _: None) -> Tensor:
        return _tangent(_Product, ctx, x_tangent, weight_tangent)

    @staticmethod
    def vmap(info, in_dims: tuple[int | None, ...], x: Tensor, weight: Tensor, kernels: _Kernels) -> tuple[Tensor, int]:
        return _mapped(info.batch_size, in_dims[:2], (x, weight), lambda xx, ww: _Product.apply(xx, ww, kernels),
                       batch_like=(True, False), foldable=_any_batch(kernels)), 0  # fmt: skip


class _TransposedProduct(_Linear):
    """``x = Wᵀh`` through one kernel set; backward ``h̄ = W x̄``, ``W̄ = h ⊗ x̄``."""

    @staticmethod
    def forward(h: Tensor, weight: Tensor, kernels: _Kernels) -> Tensor:
        return kernels.transpose(h, weight)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        h, weight = ctx.saved_tensors
        with _without_autocast(grad_out):
            grad_h = _product(grad_out, weight, ctx.kernels) if ctx.needs_input_grad[0] else None
            grad_w = _weight_grad(h, grad_out, weight.shape, ctx.kernels) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None

    @staticmethod
    def jvp(ctx, h_tangent: Tensor | None, weight_tangent: Tensor | None, _: None) -> Tensor:
        return _tangent(_TransposedProduct, ctx, h_tangent, weight_tangent)

    @staticmethod
    def vmap(info, in_dims: tuple[int | None, ...], h: Tensor, weight: Tensor, kernels: _Kernels) -> tuple[Tensor, int]:
        return _mapped(info.batch_size, in_dims[:2], (h, weight),
                       lambda hh, ww: _TransposedProduct.apply(hh, ww, kernels), batch_like=(True, False),
                       foldable=_any_batch(kernels)), 0  # fmt: skip


class _WeightGrad(_Linear):
    """``W̄ = g ⊗ x`` (summed over the batch) as a function of the response gradients ``g`` and inputs ``x``, for
    double backward; backward with ``V`` shaped like the weights: ``ḡ = V x``, ``x̄ = Vᵀg``."""

    @staticmethod
    def forward(g: Tensor, x: Tensor, kernels: _Kernels, weight_shape: torch.Size) -> Tensor:
        return kernels.weight_grad(g, x, weight_shape)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        g, x = ctx.saved_tensors
        with _without_autocast(grad_out):
            grad_g = _product(x, grad_out, ctx.kernels) if ctx.needs_input_grad[0] else None
            grad_x = _transposed(g, grad_out, ctx.kernels) if ctx.needs_input_grad[1] else None
        return grad_g, grad_x, None, None

    @staticmethod
    def jvp(ctx, g_tangent: Tensor | None, x_tangent: Tensor | None, _: None, __: None) -> Tensor:
        return _tangent(_WeightGrad, ctx, g_tangent, x_tangent)

    @staticmethod
    def vmap(info, in_dims: tuple[int | None, ...], g: Tensor, x: Tensor, kernels: _Kernels,
             weight_shape: torch.Size) -> tuple[Tensor, int]:  # fmt: skip
        # the batch is summed over: mapped examples cannot join it, so each runs on its own
        return _mapped(info.batch_size, in_dims[:2], (g, x), lambda gg, xx: _WeightGrad.apply(gg, xx, kernels,
                       weight_shape), batch_like=(False, False), foldable=False), 0  # fmt: skip


def _tangent(product: type[_Linear], ctx, first_tangent: Tensor | None, second_tangent: Tensor | None) -> Tensor:
    """The forward-mode derivative of ``product``, linear in each of its two tensors ``(a, b)`` (saved in ``ctx``):
    ``product(ȧ, b) + product(a, ḃ)``, leaving out a term whose tangent is None (zeros if both are)."""
    first, second = ctx.saved_tensors
    rest = (ctx.kernels,) if ctx.weight_shape is None else (ctx.kernels, ctx.weight_shape)
    terms = []
    if first_tangent is not None:
        terms.append(product.apply(first_tangent, second, *rest))
    if second_tangent is not None:
        terms.append(product.apply(first, second_tangent, *rest))
    if not terms:
        return torch.zeros_like(product.forward(first, second, *rest))
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


def _any_batch(kernels: _Kernels) -> bool:
    """Whether ``kernels`` take a batch of any size (the dense ones; a skip plan is made for one batch)."""
    return isinstance(kernels, _BandKernels) and getattr(kernels, "skip", None) is None


def _mapped(size: int, dims: tuple[int | None, ...], tensors: tuple[Tensor, ...], product: Callable[..., Tensor], *,
            batch_like: tuple[bool, ...], foldable: bool) -> Tensor:  # fmt: skip
    """``product`` under ``torch.func.vmap``: ``size`` mapped copies, each tensor mapped along ``dims[i]`` (None: the
    same for all), the result ``(size, ...)``. When only inputs marked ``batch_like`` (batch-first, each example on
    its own) are mapped and ``foldable``, the mapped copies run as one batch ``size`` times as large; otherwise one
    after another."""
    mapped = [dim is not None for dim in dims]
    if foldable and all(like or not m for like, m in zip(batch_like, mapped, strict=True)):
        flat = [t.movedim(d, 0).flatten(0, 1) if d is not None else t for t, d in zip(tensors, dims, strict=True)]
        out = product(*flat)  # (size·B, ...)
        return out.unflatten(0, (size, -1))  # (size, B, ...)
    pieces = [
        product(*(t.select(d, i) if d is not None else t for t, d in zip(tensors, dims, strict=True)))
        for i in range(size)
    ]
    return torch.stack(pieces)


def _product(x: Tensor, weight: Tensor, kernels: _Kernels) -> Tensor:
    """``W x``, differentiable when grad mode is on (inside a backward pass: only under ``create_graph``)."""
    return _apply(_Product, x, weight, kernels) if torch.is_grad_enabled() else kernels.forward(x, weight)


def _transposed(h: Tensor, weight: Tensor, kernels: _Kernels) -> Tensor:
    """``Wᵀh``, differentiable when grad mode is on."""
    if torch.is_grad_enabled():
        return _apply(_TransposedProduct, h, weight, kernels)
    return kernels.transpose(h, weight)


def _weight_grad(g: Tensor, x: Tensor, weight_shape: torch.Size, kernels: _Kernels) -> Tensor:
    """``g ⊗ x``, differentiable when grad mode is on."""
    if torch.is_grad_enabled():
        return _apply(_WeightGrad, g, x, kernels, weight_shape)
    return kernels.weight_grad(g, x, weight_shape)


def _bands(out_h: int, out_w: int, patch: int, batch: int, itemsize: int) -> list[slice]:
    """Bands of output rows whose patches take about ``_BAND_BYTES``."""
    per_row = max(1, out_w * patch * batch * itemsize)
    rows = max(1, min(out_h, _BAND_BYTES // per_row))
    return [slice(start, min(out_h, start + rows)) for start in range(0, out_h, rows)]


class LocallyConnected2d(GeometryState):
    """``out_channels`` maps at every location of a ``(in_channels, H, W)`` input, weights untied across locations.

    ``out[b, m, y, x] = Σ_{c,i,j} W[y, x, m, c, i, j] · in[b, c, y·stride + i, x·stride + j] (+ bias[m, y, x])``
    (Le et al., ICML 2012; LeCun 1989 called them "locally connected" layers). Input ``(B, C, H, W)``, output
    ``(B, out_channels, H_out, W_out)`` with ``H_out = (H − kernel) // stride + 1``.

    ``implementation``: ``"auto"`` runs the Triton kernels (:mod:`downpour.nn.local_triton`) on float32 CUDA
    tensors when Triton is installed and the band-wise ``bmm`` kernels otherwise; ``"triton"`` or ``"bands"`` forces
    one (for benchmarks and tests).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        in_size: int | tuple[int, int],
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        bias: bool = False,
        implementation: str = "auto",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"Invalid implementation: {implementation!r} (one of {', '.join(IMPLEMENTATIONS)})")
        self.implementation = implementation
        owner = type(self).__name__
        self.in_channels = check.integer(owner, "in_channels", in_channels)
        self.out_channels = check.integer(owner, "out_channels", out_channels)
        self.in_size = check.pair(owner, "in_size", in_size)
        self.kernel_size = check.pair(owner, "kernel_size", kernel_size)
        self.stride = check.pair(owner, "stride", stride)
        fits = all(k <= n for k, n in zip(self.kernel_size, self.in_size, strict=True))
        check.require(fits, owner, "kernel_size", kernel_size, f"at most in_size {self.in_size}")
        check.flag(owner, "bias", bias)
        self.out_size = tuple(
            (n - k) // s + 1 for n, k, s in zip(self.in_size, self.kernel_size, self.stride, strict=True)
        )
        locations = self.out_size[0] * self.out_size[1]
        patch = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        where = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(locations, self.out_channels, patch, **where))  # (L, M, P)
        self.bias = nn.Parameter(torch.empty(self.out_channels, *self.out_size, **where)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights uniform in ``±1/sqrt(C·kh·kw)`` (as ``nn.Linear`` over one field), bias 0; also for a layer built
        on the ``meta`` device and materialised with ``to_empty``."""
        bound = 1.0 / math.sqrt(self.weight.shape[-1])
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: Tensor, active: Tensor | SkipPlan | None = None) -> Tensor:
        """``(B, C, H, W) -> (B, out_channels, H_out, W_out)``.

        ``active`` ``(B, H_out, W_out)`` bool: fields marked False output zero and, on the CPU (float32 or
        float64), are not computed (see :mod:`downpour.nn.skip`; :func:`~downpour.nn.skip.active_fields` makes the
        mask). A :class:`~downpour.nn.skip.SkipPlan` from :meth:`skip_plan` does the same without planning again.
        """
        check.floating_tensor(type(self).__name__, x)
        expected = (self.in_channels, *self.in_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"LocallyConnected2d expected input of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}"
            )
        x = self._autocast_input(x)
        self._check_like_weight(x, "input")
        plan = self.skip_plan(active, x.shape[0])
        kernels, skipping = self._kernel_set(x, plan)
        with _without_autocast(x):
            out = _apply(_Product, x, self.weight, kernels)
        if self.bias is not None:
            out = out + self.bias
        if plan is not None and (self.bias is not None or not skipping):  # flat fields output exactly 0 (the pair
            out = out.masked_fill(~plan.active.unsqueeze(1), 0.0)  # kernels give it; elsewhere they are computed)
        return out

    def skip_plan(self, active: Tensor | SkipPlan | None, batch: int) -> SkipPlan | None:
        """The :class:`~downpour.nn.skip.SkipPlan` of a ``(batch, H_out, W_out)`` bool mask (None when every field
        is active: the dense kernels, bit for bit). Build it once to share it between :meth:`forward` and
        :meth:`transpose` of one batch."""
        if active is None:  # the common case, first: this runs on every call
            return None
        from downpour.nn.skip import SkipPlan

        if isinstance(active, SkipPlan):
            self._check_active(active.active, batch)
            if (active.kernel, active.stride) != (self.kernel_size, self.stride):
                raise ValueError(f"LocallyConnected2d got a SkipPlan for kernel {active.kernel}, stride "
                                 f"{active.stride}; this layer has {self.kernel_size}, {self.stride}")  # fmt: skip
            return active
        self._check_active(active, batch)
        try:
            every_field = bool(active.all())
        except RuntimeError as error:  # a mask mapped by torch.func.vmap: its values cannot decide anything here
            if "vmap" not in str(error):
                raise
            return SkipPlan.zeroing(active, self.kernel_size, self.stride)
        if every_field:
            return None
        band = _kernels().forward_band(self.out_channels, self.kernel_size, self.stride) if (
            self._triton(self.weight)) else None  # fmt: skip
        return SkipPlan(active, self.kernel_size, self.stride, self.weight.dtype, triton_band=band)

    def _kernel_set(self, x: Tensor, plan: SkipPlan | None) -> tuple[_Kernels, bool]:
        """The kernels of one call on ``x`` and whether they skip inactive fields: the pair kernels of ``plan``
        where they run, else Triton (see :meth:`_triton`) or band-wise."""
        in_chw = (self.in_channels, *self.in_size)
        skipping = None
        if plan is not None and self.implementation != "triton":
            skipping = plan.kernels(in_chw, self.out_size, x.dtype)
        if skipping is not None:
            return skipping, True
        if self._triton(x):
            skip = plan.triton if plan is not None else None
            return _TritonKernels(in_chw, self.out_size, self.kernel_size, self.stride, skip), skip is not None
        return _BandKernels(in_chw, self.out_size, self.kernel_size, self.stride), False

    def _check_active(self, active: Tensor, batch: int) -> None:
        expected = (batch, *self.out_size)
        if active.dtype != torch.bool or tuple(active.shape) != expected or active.device != self.weight.device:
            raise ValueError(
                f"LocallyConnected2d active mask must be bool of shape {expected} on {self.weight.device}, got "
                f"{active.dtype} {tuple(active.shape)} on {active.device}"
            )

    def _autocast_input(self, x: Tensor) -> Tensor:
        """``x`` in the weights' dtype inside a ``torch.autocast`` region of its device, else as it is: under autocast
        the layer computes in its weights' precision, as autocast's float32 operations do (its CUDA kernels are
        float32 Triton ones, with TF32 when PyTorch allows; a float16 input would fall back to slow batched matmuls)."""
        if x.dtype != self.weight.dtype and x.is_floating_point() and autocasting(x.device.type):
            return x.to(self.weight.dtype)
        return x

    def _check_like_weight(self, x: Tensor, what: str) -> None:
        if x.dtype != self.weight.dtype or x.device != self.weight.device:
            raise ValueError(
                f"LocallyConnected2d {what} is {x.dtype} on {x.device}, its weights are {self.weight.dtype} on "
                f"{self.weight.device}: convert one of them (e.g. layer.to(x))"
            )

    def transpose(self, h: Tensor, weight: Tensor | None = None, active: Tensor | SkipPlan | None = None) -> Tensor:
        """``Wᵀh``: responses ``(B, out_channels, H_out, W_out)`` back to the input space ``(B, C, H, W)``.

        With ``weight`` (same shape as :attr:`weight`), use it instead: RICA's separate decoding weights ``W₂``.
        With ``active`` (as in :meth:`forward`), fields marked False are treated as zero and skipped.
        """
        check.floating_tensor(f"{type(self).__name__}.transpose", h)
        expected = (self.out_channels, *self.out_size)
        if h.dim() != 4 or tuple(h.shape[1:]) != expected:
            raise ValueError(
                f"LocallyConnected2d.transpose expected input of shape (B, {', '.join(map(str, expected))}), "
                f"got {tuple(h.shape)}"
            )
        w = self.weight if weight is None else weight
        if w.shape != self.weight.shape:
            raise ValueError(f"LocallyConnected2d.transpose expected weight of shape {tuple(self.weight.shape)}, "
                             f"got {tuple(w.shape)}")  # fmt: skip
        h, w = self._autocast_input(h), self._autocast_input(w)
        self._check_like_weight(h, "transpose input")
        self._check_like_weight(w, "transpose weight")
        plan = self.skip_plan(active, h.shape[0])
        kernels, skipping = self._kernel_set(h, plan)
        if plan is not None and not skipping:
            h = h.masked_fill(~plan.active.unsqueeze(1), 0.0)
        with _without_autocast(h):
            return _apply(_TransposedProduct, h, w, kernels)

    def _triton(self, x: Tensor) -> bool:
        """Whether this call runs the Triton kernels (see :attr:`implementation`)."""
        if self.implementation == "bands":
            return False
        could = x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"  # decided without importing Triton
        usable = could and _kernels().usable(x, self.out_channels)
        if self.implementation == "triton" and not usable:
            raise ValueError(
                f"LocallyConnected2d implementation='triton' needs Triton and float32 CUDA input with at most "
                f"{_kernels().MAX_MAPS} maps; got {x.dtype} on {x.device}, {self.out_channels} maps"
            )
        return usable

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, in_size={self.in_size}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, bias={self.bias is not None}"
        )


def locally_connected_reference(x: Tensor, weight: Tensor, kernel: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    """A plain per-location loop (slow; for tests): ``weight`` ``(L, M, P)`` as in :class:`LocallyConnected2d`."""
    batch, _, height, width = x.shape
    kh, kw = kernel
    sh, sw = stride
    out_h, out_w = (height - kh) // sh + 1, (width - kw) // sw + 1
    out = x.new_zeros(batch, weight.shape[1], out_h, out_w)
    for y in range(out_h):
        for xx in range(out_w):
            patch = x[:, :, y * sh : y * sh + kh, xx * sw : xx * sw + kw].reshape(batch, weight.shape[2])  # (B, P)
            out[:, :, y, xx] = patch @ weight[y * out_w + xx].t()
    return out
