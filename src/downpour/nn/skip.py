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
    mask: Tensor | None  # (tr, tc, 1, n) bool: True where the field is active; None: all are

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

    def masked_copy(self, t: Tensor) -> Tensor:
        """:meth:`masked` on a copy when ``t`` is a view of the caller's tensor."""
        return self.masked(t.clone() if self.examples is None and self.mask is not None else t)

    def weight(self, weight: Tensor, out_hw: tuple[int, int]) -> Tensor:
        """The tile's weights ``(tr·tc, M, P)`` out of the layer's ``(L, M, P)``."""
        return weight.view(*out_hw, *weight.shape[1:])[self.rows, self.cols].reshape(-1, *weight.shape[1:])

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


def _tiles(active: Tensor, kernel: tuple[int, int], stride: tuple[int, int]) -> tuple[list[_Tile], int]:
    """The tiles of ``active`` ``(B, H_out, W_out)`` that have work, with the examples that have it, and how many
    (location, example) products they compute."""
    active_t = active.permute(1, 2, 0)  # (H_out, W_out, B)
    out_h, out_w, batch = active_t.shape
    (kh, kw), (sh, sw) = kernel, stride
    tiles, products = [], 0
    for r0 in range(0, out_h, TILE):
        for c0 in range(0, out_w, TILE):
            rows, cols = slice(r0, min(out_h, r0 + TILE)), slice(c0, min(out_w, c0 + TILE))
            act = active_t[rows, cols]  # (tr, tc, B)
            examples = act.flatten(0, 1).any(0).nonzero().squeeze(1)
            if examples.numel() == 0:
                continue
            products += act.shape[0] * act.shape[1] * examples.numel()
            mask = act.index_select(2, examples).unsqueeze(2)  # (tr, tc, 1, n)
            tiles.append(_Tile(
                rows, cols,
                slice(rows.start * sh, (rows.stop - 1) * sh + kh), slice(cols.start * sw, (cols.stop - 1) * sw + kw),
                None if examples.numel() == batch else examples, None if bool(mask.all()) else mask,
            ))  # fmt: skip
    return tiles, products


def skipped_fraction(active: Tensor) -> float:
    """Fraction of (location, example) products not computed for the mask ``active`` ``(B, H_out, W_out)``."""
    total = active.numel()
    return 0.0 if total == 0 else 1.0 - _tiles(active, (1, 1), (1, 1))[1] / total


class SkipPlan:
    """Which fields of one batch a :class:`~downpour.nn.local.LocallyConnected2d` computes: the tiles of a
    ``(B, H_out, W_out)`` bool mask, built once and shared by the layer, its transpose and their backward passes
    (``LocallyConnected2d.skip_plan`` makes one).

    ``zeroed_fraction``: fields that output zero; ``skipped_fraction``: (location, example) products not computed.
    """

    def __init__(self, active: Tensor, kernel: tuple[int, int], stride: tuple[int, int]) -> None:
        self.active, self.kernel, self.stride = active, kernel, stride
        self.tiles, products = _tiles(active, kernel, stride)
        total = max(1, active.numel())
        self.zeroed_fraction = 1.0 - int(active.sum()) / total
        self.skipped_fraction = 1.0 - products / total

    def kernels(self, in_chw: tuple[int, int, int], out_hw: tuple[int, int]) -> SkipKernels:
        """The layer's three products over this plan's tiles."""
        return SkipKernels(self.tiles, in_chw, out_hw, self.kernel, self.stride)


class SkipKernels:
    """The CPU kernels of :mod:`downpour.nn.local` tile by tile over active fields only, in the layer's ordinary
    layouts (the same three products as ``_BandKernels``; flat fields are zero in every one of them)."""

    def __init__(self, tiles: list[_Tile], in_chw: tuple[int, int, int], out_hw: tuple[int, int],
                 kernel: tuple[int, int], stride: tuple[int, int]) -> None:  # fmt: skip
        self.tiles, self.in_chw, self.out_hw, self.kernel, self.stride = tiles, in_chw, out_hw, kernel, stride
        self._weights: tuple[Tensor, int, list[Tensor]] | None = None  # (weight, its version, each tile's slice)

    def _tile_weights(self, weight: Tensor) -> list[Tensor]:
        """Each tile's ``(tr·tc, M, P)`` slice of ``weight``, copied once for a forward pass and its backward."""
        if self._weights is None or self._weights[0] is not weight or self._weights[1] != weight._version:
            self._weights = (weight, weight._version, [tile.weight(weight, self.out_hw) for tile in self.tiles])
        return self._weights[2]

    def forward(self, x: Tensor, weight: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, M, H_out, W_out)``, zero at flat fields."""
        x_t = x.permute(1, 2, 3, 0).contiguous()  # (C, H, W, B)
        out_t = x_t.new_zeros(*self.out_hw, weight.shape[1], x_t.shape[3])  # (H_out, W_out, M, B)
        for tile, tile_weight in zip(self.tiles, self._tile_weights(weight), strict=True):
            region = tile.input_region(x_t)  # (C, rh, rw, n)
            sub = _lc_forward(region, tile_weight, tile.out_hw, self.kernel, self.stride)  # (tr, tc, M, n)
            tile.scatter(out_t[tile.rows, tile.cols], tile.masked(sub), add=False)
        return out_t.permute(3, 2, 0, 1)  # (B, M, H_out, W_out)

    def transpose(self, h: Tensor, weight: Tensor) -> Tensor:
        """``Wᵀh`` with ``h`` taken as zero at flat fields: ``(B, M, H_out, W_out) -> (B, C, H, W)``."""
        h_t = h.permute(2, 3, 1, 0).contiguous()  # (H_out, W_out, M, B)
        channels = self.in_chw[0]
        x_t = h_t.new_zeros(*self.in_chw, h_t.shape[3])  # (C, H, W, B)
        for tile, tile_weight in zip(self.tiles, self._tile_weights(weight), strict=True):
            sub = tile.masked_copy(tile.responses(h_t))  # (tr, tc, M, n)
            n = sub.shape[3]
            cols = torch.bmm(tile_weight.transpose(1, 2), sub.reshape(-1, sub.shape[2], n))  # (tr·tc, P, n)
            region = x_t.new_zeros(channels * tile.in_hw[0] * tile.in_hw[1], n)  # (C·rh·rw, n)
            index = fold_index(tile.out_hw, (channels, *tile.in_hw), self.kernel, self.stride, region.device)
            region.index_add_(0, index, cols.view(-1, n))
            tile.scatter(x_t[:, tile.in_rows, tile.in_cols], region.view(channels, *tile.in_hw, n), add=True)
        return x_t.permute(3, 0, 1, 2)  # (B, C, H, W)

    def weight_grad(self, g: Tensor, x: Tensor, weight_shape: torch.Size) -> Tensor:
        """``(L, M, P)`` from response gradients ``(B, M, H_out, W_out)`` (zero at flat fields) and inputs."""
        g_t, x_t = g.permute(2, 3, 1, 0).contiguous(), x.permute(1, 2, 3, 0).contiguous()  # batch-last
        grad_w = g_t.new_zeros(weight_shape)
        grad_w_hw = grad_w.view(*self.out_hw, *weight_shape[1:])  # (H_out, W_out, M, P)
        for tile in self.tiles:
            sub = tile.masked_copy(tile.responses(g_t))  # (tr, tc, M, n)
            tile_shape = torch.Size((tile.out_hw[0] * tile.out_hw[1], *weight_shape[1:]))
            grad = _lc_weight_grad(sub.contiguous(), tile.input_region(x_t), tile_shape, self.kernel, self.stride)
            grad_w_hw[tile.rows, tile.cols] = grad.view(*tile.out_hw, *weight_shape[1:])
        return grad_w
