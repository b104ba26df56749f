"""Locally connected 2-D layers: convolution-shaped, but with different (untied) weights at every location.

``LocallyConnected2d`` is the filtering stage of the 2012 "cat" network (Le et al., ICML 2012): 18×18 receptive
fields, 8 maps per location, no weight sharing. Per location ``l = (y, x)`` it computes
``out[b, m, y, x] = Σ_{c,i,j} W[l, m, (c,i,j)] · in[b, c, y·s + i, x·s + j]``.

The usual implementation (``F.unfold`` then ``torch.bmm`` with autograd) materialises every patch twice, runs its
per-location products in the slow orientation and folds gradients back with ``F.fold``. This one keeps the batch
as the innermost dimension (so each location's product is ``(M, P) @ (P, B)``), works through the output in bands
of rows (so patches never exist all at once), recomputes each band's patches in the backward pass instead of
saving them, and folds the input gradient back with one strided add per kernel offset.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

_BAND_BYTES = 4 << 20  # patches of one band of output rows: about 4 MB


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
        raise ValueError(f"Invalid {name}: {value!r} (a positive integer or a pair of them)")
    return pair  # type: ignore[return-value]


def _band_patches(x_t: Tensor, rows: slice, width: int, kernel: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    """Patches of output rows ``rows`` from the batch-last input ``x_t`` ``(C, H, W, B)``: ``(R·W_out, C·kh·kw, B)``."""
    channels, _, in_w, batch = x_t.shape
    kh, kw = kernel
    sh, sw = stride
    r = rows.stop - rows.start
    view = x_t.as_strided(
        (r, width, channels, kh, kw, batch),  # (R, W_out, C, kh, kw, B)
        (sh * in_w * batch, sw * batch, x_t.stride(0), in_w * batch, batch, 1),
        x_t.storage_offset() + rows.start * sh * in_w * batch,
    )
    return view.reshape(r * width, channels * kh * kw, batch)  # (R·W_out, P, B), one copy


class _LocallyConnected(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, out_hw: tuple[int, int], kernel: tuple[int, int],
                stride: tuple[int, int]) -> Tensor:  # fmt: skip
        out_h, out_w = out_hw
        batch = x.shape[0]
        x_t = x.permute(1, 2, 3, 0).contiguous()  # (C, H, W, B): the batch innermost
        out_t = x.new_empty(out_h, out_w, weight.shape[1], batch)  # (H_out, W_out, M, B)
        for rows in _bands(out_h, out_w, weight.shape[2], batch, x.element_size()):
            patches = _band_patches(x_t, rows, out_w, kernel, stride)  # (R·W_out, P, B)
            band = out_t[rows].view(-1, weight.shape[1], batch)  # (R·W_out, M, B)
            torch.bmm(weight[rows.start * out_w : rows.stop * out_w], patches, out=band)
        ctx.save_for_backward(x_t, weight)
        ctx.geometry = (out_hw, kernel, stride, x.shape)
        return out_t.permute(3, 2, 0, 1)  # (B, M, H_out, W_out), a view

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x_t, weight = ctx.saved_tensors
        (out_h, out_w), kernel, stride, x_shape = ctx.geometry
        batch, channels = x_shape[0], x_shape[1]
        kh, kw = kernel
        sh, sw = stride
        g_t = grad_out.permute(2, 3, 1, 0).contiguous()  # (H_out, W_out, M, B)
        grad_w = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        grad_x_t = torch.zeros_like(x_t) if ctx.needs_input_grad[0] else None
        for rows in _bands(out_h, out_w, weight.shape[2], batch, x_t.element_size()):
            locations = slice(rows.start * out_w, rows.stop * out_w)
            g_band = g_t[rows].view(-1, weight.shape[1], batch)  # (R·W_out, M, B)
            if grad_w is not None:
                patches = _band_patches(x_t, rows, out_w, kernel, stride)  # recomputed, never saved
                torch.bmm(g_band, patches.transpose(1, 2), out=grad_w[locations])  # (R·W_out, M, P)
            if grad_x_t is not None:
                grad_patches = torch.bmm(weight[locations].transpose(1, 2), g_band)  # (R·W_out, P, B)
                grad_patches = grad_patches.view(rows.stop - rows.start, out_w, channels, kh, kw, batch)
                r = rows.stop - rows.start
                for i in range(kh):
                    for j in range(kw):
                        y0 = rows.start * sh + i
                        target = grad_x_t[:, y0 : y0 + (r - 1) * sh + 1 : sh, j : j + (out_w - 1) * sw + 1 : sw]
                        target += grad_patches[:, :, :, i, j].permute(2, 0, 1, 3)  # (C, R, W_out, B)
        grad_x = grad_x_t.permute(3, 0, 1, 2) if grad_x_t is not None else None  # (B, C, H, W)
        return grad_x, grad_w, None, None, None


def _bands(out_h: int, out_w: int, patch: int, batch: int, itemsize: int) -> list[slice]:
    """Bands of output rows whose patches take about ``_BAND_BYTES``."""
    per_row = max(1, out_w * patch * batch * itemsize)
    rows = max(1, min(out_h, _BAND_BYTES // per_row))
    return [slice(start, min(out_h, start + rows)) for start in range(0, out_h, rows)]


class LocallyConnected2d(nn.Module):
    """``out_channels`` maps at every location of a ``(in_channels, H, W)`` input, weights untied across locations.

    ``out[b, m, y, x] = Σ_{c,i,j} W[y, x, m, c, i, j] · in[b, c, y·stride + i, x·stride + j] (+ bias[m, y, x])``
    (Le et al., ICML 2012; LeCun 1989 called them "locally connected" layers). Input ``(B, C, H, W)``, output
    ``(B, out_channels, H_out, W_out)`` with ``H_out = (H − kernel) // stride + 1``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        in_size: int | tuple[int, int],
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if not (isinstance(in_channels, int) and in_channels >= 1):
            raise ValueError(f"Invalid in_channels: {in_channels!r} (a positive integer)")
        if not (isinstance(out_channels, int) and out_channels >= 1):
            raise ValueError(f"Invalid out_channels: {out_channels!r} (a positive integer)")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.in_size = _pair(in_size, "in_size")
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        if any(k > n for k, n in zip(self.kernel_size, self.in_size, strict=True)):
            raise ValueError(f"Invalid kernel_size: {kernel_size!r} (larger than in_size {self.in_size})")
        self.out_size = tuple(
            (n - k) // s + 1 for n, k, s in zip(self.in_size, self.kernel_size, self.stride, strict=True)
        )
        locations = self.out_size[0] * self.out_size[1]
        patch = in_channels * self.kernel_size[0] * self.kernel_size[1]
        bound = 1.0 / math.sqrt(patch)
        self.weight = nn.Parameter(torch.empty(locations, out_channels, patch).uniform_(-bound, bound))  # (L, M, P)
        self.bias = nn.Parameter(torch.zeros(out_channels, *self.out_size)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, out_channels, H_out, W_out)``."""
        expected = (self.in_channels, *self.in_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"LocallyConnected2d expected input of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}"
            )
        out = _LocallyConnected.apply(x, self.weight, self.out_size, self.kernel_size, self.stride)
        return out + self.bias if self.bias is not None else out

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
            patch = x[:, :, y * sh : y * sh + kh, xx * sw : xx * sw + kw].reshape(batch, -1)  # (B, P)
            out[:, :, y, xx] = patch @ weight[y * out_w + xx].t()
    return out
