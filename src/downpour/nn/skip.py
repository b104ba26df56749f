"""Skipping flat receptive fields of a locally connected layer ("if the variance is tiny, don't compute, output 0").

A field whose input variance (over its channels and pixels) is below a threshold τ outputs zero. The arithmetic is
skipped per *tile* of 16×16 output locations and example: an example whose fields in a tile are all flat is left out
of that tile's products entirely; the other examples are gathered (their input region only, not their patches)
and run through the same band-wise kernels as the dense layer, and their flat fields are zeroed. With τ = 0 no
field is flat (variances are ≥ 0) and nothing changes.

Why tiles: the weights are untied, so each location's product is shared only across examples. Dropping single
(location, example) pairs would mean gathering patches pair by pair, which costs more than the arithmetic it
saves; flat regions of natural images are large blobs, so whole tiles of an example are flat together.
On CUDA (Triton kernels) the flat fields are zeroed but computed: no time is saved there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from downpour.nn.local import _lc_forward, _lc_weight_grad, fold_index

TILE = 16  # output locations per tile side (8 and 12 skipped more but cost more per-tile overhead)


def field_variance(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    """Variance of each field of ``x`` ``(B, C, H, W)`` over its channels and pixels: ``(B, H_out, W_out)``."""
    mean = F.avg_pool2d(x, kernel, stride).mean(1)  # (B, H_out, W_out)
    mean_sq = F.avg_pool2d(x * x, kernel, stride).mean(1)
    return (mean_sq - mean * mean).clamp_min_(0.0)


def active_fields(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], threshold: float) -> Tensor:
    """Fields whose variance is at least ``threshold`` (``(B, H_out, W_out)`` bool): the ones that are computed."""
    return field_variance(x.detach(), kernel, stride) >= threshold


@dataclass(frozen=True)
class _Tile:
    rows: slice  # output rows of the tile
    cols: slice
    in_rows: slice  # input rows its fields read
    in_cols: slice
    examples: Tensor | None  # (n,) examples with at least one active field in the tile; None: all of them
    mask: Tensor | None  # (tr, tc, 1, n): 1 where the field is active; None: all are
    weight: Tensor  # (tr·tc, M, P): the tile's weights

    def input_region(self, x_t: Tensor) -> Tensor:
        """The input its fields read, ``(C, rh, rw, n)``, from ``x_t`` ``(C, H, W, B)`` (a view when n = B)."""
        view = x_t[:, self.in_rows, self.in_cols]
        return view if self.examples is None else view.index_select(3, self.examples)

    def responses(self, h_t: Tensor) -> Tensor:
        """Its responses ``(tr, tc, M, n)`` from ``h_t`` ``(H_out, W_out, M, B)`` (a view when n = B)."""
        view = h_t[self.rows, self.cols]
        return view if self.examples is None else view.index_select(3, self.examples)

    def masked(self, t: Tensor) -> Tensor:
        """``t`` ``(tr, tc, M, n)`` with the flat fields zeroed (in place when it is a gathered copy)."""
        return t if self.mask is None else t.mul_(self.mask)

    def scatter(self, target: Tensor, value: Tensor, *, add: bool) -> None:
        """Write (or add) ``value`` into the tile's examples of ``target``, a view over the tile's rows and columns."""
        if self.examples is None:
            target.add_(value) if add else target.copy_(value)
        elif add:
            target.index_add_(3, self.examples, value)
        else:
            target.index_copy_(3, self.examples, value)

    @property
    def out_hw(self) -> tuple[int, int]:
        return self.rows.stop - self.rows.start, self.cols.stop - self.cols.start

    @property
    def in_hw(self) -> tuple[int, int]:
        return self.in_rows.stop - self.in_rows.start, self.in_cols.stop - self.in_cols.start


def _tiles(active_t: Tensor, weight: Tensor, kernel: tuple[int, int], stride: tuple[int, int],
           dtype: torch.dtype) -> list[_Tile]:  # fmt: skip
    """The tiles of ``active_t`` ``(H_out, W_out, B)`` that have work, with the examples that have it."""
    out_h, out_w, _ = active_t.shape
    (kh, kw), (sh, sw) = kernel, stride
    weight_hw = weight.view(out_h, out_w, *weight.shape[1:])  # (H_out, W_out, M, P)
    tiles = []
    for r0 in range(0, out_h, TILE):
        for c0 in range(0, out_w, TILE):
            rows, cols = slice(r0, min(out_h, r0 + TILE)), slice(c0, min(out_w, c0 + TILE))
            act = active_t[rows, cols]  # (tr, tc, B)
            examples = act.flatten(0, 1).any(0).nonzero().squeeze(1)
            if examples.numel() == 0:
                continue
            mask = act.index_select(2, examples).unsqueeze(2)  # (tr, tc, 1, n)
            tiles.append(_Tile(
                rows, cols,
                slice(rows.start * sh, (rows.stop - 1) * sh + kh), slice(cols.start * sw, (cols.stop - 1) * sw + kw),
                None if examples.numel() == act.shape[2] else examples, None if bool(mask.all()) else mask.to(dtype),
                weight_hw[rows, cols].reshape(-1, *weight.shape[1:]),
            ))  # fmt: skip
    return tiles


def skipped_fraction(active: Tensor) -> float:
    """Fraction of (location, example) products not computed for the mask ``active`` ``(B, H_out, W_out)``."""
    active_t = active.permute(1, 2, 0)  # (H_out, W_out, B)
    total = active_t.numel()
    if total == 0:
        return 0.0
    done = 0
    for r0 in range(0, active_t.shape[0], TILE):
        for c0 in range(0, active_t.shape[1], TILE):
            act = active_t[r0 : r0 + TILE, c0 : c0 + TILE]  # (tr, tc, B)
            done += act.shape[0] * act.shape[1] * int(act.flatten(0, 1).any(0).sum())
    return 1.0 - done / total


def skip_forward(x_t: Tensor, tiles: list[_Tile], out_t: Tensor, kernel: tuple[int, int],
                 stride: tuple[int, int]) -> Tensor:  # fmt: skip
    """Responses of the batch-last input ``(C, H, W, B)`` over ``tiles``, written into ``out_t``
    ``(H_out, W_out, M, B)`` (zeros elsewhere)."""
    for tile in tiles:
        region = tile.input_region(x_t)  # (C, rh, rw, n)
        sub = _lc_forward(region, tile.weight, tile.out_hw, kernel, stride)  # (tr, tc, M, n)
        tile.scatter(out_t[tile.rows, tile.cols], tile.masked(sub), add=False)
    return out_t


def skip_transpose(h_t: Tensor, tiles: list[_Tile], x_t: Tensor, kernel: tuple[int, int],
                   stride: tuple[int, int]) -> Tensor:  # fmt: skip
    """``Wᵀh`` from ``(H_out, W_out, M, B)`` over ``tiles``, added into ``x_t`` ``(C, H, W, B)``."""
    channels = x_t.shape[0]
    for tile in tiles:
        h = tile.responses(h_t)  # (tr, tc, M, n)
        h = tile.masked(h.clone() if tile.examples is None and tile.mask is not None else h)
        n = h.shape[3]
        cols = torch.bmm(tile.weight.transpose(1, 2), h.reshape(-1, h.shape[2], n))  # (tr·tc, P, n)
        region = x_t.new_zeros(channels * tile.in_hw[0] * tile.in_hw[1], n)  # (C·rh·rw, n)
        region.index_add_(0, fold_index(tile.out_hw, (channels, *tile.in_hw), kernel, stride), cols.view(-1, n))
        tile.scatter(x_t[:, tile.in_rows, tile.in_cols], region.view(channels, *tile.in_hw, n), add=True)
    return x_t


def skip_weight_grad(g_t: Tensor, x_t: Tensor, tiles: list[_Tile], grad_w: Tensor, kernel: tuple[int, int],
                     stride: tuple[int, int]) -> Tensor:  # fmt: skip
    """Weight gradient from ``(H_out, W_out, M, B)`` response gradients and ``(C, H, W, B)`` inputs over ``tiles``,
    written into ``grad_w`` ``(L, M, P)`` (zeros elsewhere)."""
    out_h, out_w = g_t.shape[:2]
    grad_w_hw = grad_w.view(out_h, out_w, *grad_w.shape[1:])  # (H_out, W_out, M, P)
    for tile in tiles:
        g = tile.responses(g_t)  # (tr, tc, M, n)
        g = tile.masked(g.clone() if tile.examples is None and tile.mask is not None else g)
        region = tile.input_region(x_t)  # (C, rh, rw, n)
        sub = _lc_weight_grad(g.contiguous(), region, tile.weight.shape, kernel, stride)  # (tr·tc, M, P)
        grad_w_hw[tile.rows, tile.cols] = sub.view(*tile.out_hw, *grad_w.shape[1:])
    return grad_w


class SkippedLocallyConnected(torch.autograd.Function):
    """:class:`~downpour.nn.local.LocallyConnected2d`'s product over active fields only (CPU kernels)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, active: Tensor, out_hw: tuple[int, int], kernel: tuple[int, int],
                stride: tuple[int, int]) -> Tensor:  # fmt: skip
        x_t = x.permute(1, 2, 3, 0).contiguous()  # (C, H, W, B)
        tiles = _tiles(active.permute(1, 2, 0), weight, kernel, stride, x.dtype)  # reused by the backward pass
        ctx.save_for_backward(x_t, weight)
        ctx.tiles, ctx.geometry = tiles, (kernel, stride)
        out_t = x_t.new_zeros(*out_hw, weight.shape[1], x_t.shape[3])  # (H_out, W_out, M, B)
        return skip_forward(x_t, tiles, out_t, kernel, stride).permute(3, 2, 0, 1)  # (B, M, H_out, W_out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x_t, weight = ctx.saved_tensors
        kernel, stride = ctx.geometry
        g_t = grad_out.permute(2, 3, 1, 0).contiguous()  # (H_out, W_out, M, B)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = skip_transpose(g_t, ctx.tiles, torch.zeros_like(x_t), kernel, stride).permute(3, 0, 1, 2)
        if ctx.needs_input_grad[1]:
            grad_w = skip_weight_grad(g_t, x_t, ctx.tiles, torch.zeros_like(weight), kernel, stride)
        return grad_x, grad_w, None, None, None, None


class SkippedTranspose(torch.autograd.Function):
    """``Wᵀh`` of a locally connected layer over active fields only (CPU kernels)."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, active: Tensor, in_chw: tuple[int, int, int],
                kernel: tuple[int, int], stride: tuple[int, int]) -> Tensor:  # fmt: skip
        h_t = h.permute(2, 3, 1, 0).contiguous()  # (H_out, W_out, M, B)
        tiles = _tiles(active.permute(1, 2, 0), weight, kernel, stride, h.dtype)
        ctx.save_for_backward(h_t, weight)
        ctx.tiles, ctx.geometry = tiles, (kernel, stride)
        x_t = h_t.new_zeros(*in_chw, h_t.shape[3])  # (C, H, W, B)
        return skip_transpose(h_t, tiles, x_t, kernel, stride).permute(3, 0, 1, 2)  # (B, C, H, W)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        h_t, weight = ctx.saved_tensors
        kernel, stride = ctx.geometry
        g_t = grad_out.permute(1, 2, 3, 0).contiguous()  # (C, H, W, B)
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = skip_forward(g_t, ctx.tiles, torch.zeros_like(h_t), kernel, stride).permute(3, 2, 0, 1)
        if ctx.needs_input_grad[1]:
            grad_w = skip_weight_grad(h_t, g_t, ctx.tiles, torch.zeros_like(weight), kernel, stride)
        return grad_h, grad_w, None, None, None, None
