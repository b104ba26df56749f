"""Which examples each program of the Triton kernels computes when flat fields are skipped (CUDA).

A Triton program of :mod:`downpour.nn.local_triton` works on a *group* of locations (a band of neighbouring
locations of one output row, one location, or, for the transpose, the locations whose fields touch a tile of input
pixels) for a block of examples. With a skip mask, each group computes only the examples that have an active field
in it: its examples are *compacted*, active ones first (``order``, per group), and a program whose block starts at
or past the group's ``count`` returns at once. Inside a computed group, a field that is not active is still masked
out (its response stays 0; its response gradient counts as 0), so the results equal the dense kernels' with flat
fields zeroed. A program computes a block of :data:`BLOCK` examples at once (``tl.dot`` needs 16 rows at least), so
what is left out is whole blocks: a group's examples past ``count`` rounded up to a block.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 16  # examples a skipping program computes at once: the unit of what is left out


def compact(group_active: Tensor) -> tuple[Tensor, Tensor]:
    """``(order, count)`` of a ``(B, G)`` bool mask: per group the examples active in it, first and in order,
    ``(G, B)`` int32, and how many they are, ``(G,)`` int32."""
    count = group_active.sum(0, dtype=torch.int32)  # (G,)
    inactive = (~group_active).t().to(torch.uint8)  # (G, B): 0 first in a stable sort
    order = torch.argsort(inactive, dim=1, stable=True).to(torch.int32).contiguous()  # (G, B)
    return order, count


def band_groups(active: Tensor, locs: int) -> Tensor:
    """``(B, H_out·⌈W_out/locs⌉)``: whether each example has an active field in each band of ``locs`` neighbouring
    locations of a row (the banded kernels' programs, numbered row by row)."""
    batch, out_h, out_w = active.shape
    bands = -(-out_w // locs)
    padded = active.new_zeros(batch, out_h, bands * locs)
    padded[:, :, :out_w] = active
    return padded.view(batch, out_h, bands, locs).any(-1).reshape(batch, out_h * bands)  # (B, H_out·bands)


def tile_groups(active: Tensor, in_hw: tuple[int, int], tile: tuple[int, int], kernel: tuple[int, int],
                stride: tuple[int, int]) -> Tensor:  # fmt: skip
    """``(B, tiles)``: whether each example has an active field touching each ``tile`` of input pixels (the
    transpose's programs, numbered row by row), the locations ``l`` with ``y_l ∈ (y0 − kh, y0 + tile_h)`` (and
    likewise in x), as the transpose kernel finds them."""
    batch, out_h, out_w = active.shape
    sums = torch.zeros(batch, out_h + 1, out_w + 1, dtype=torch.int32, device=active.device)
    sums[:, 1:, 1:] = active.to(torch.int32).cumsum(1).cumsum(2)  # sums[b, y, x]: active fields above-left of (y, x)
    lo_y, hi_y = _touching(in_hw[0], tile[0], kernel[0], stride[0], out_h, active.device)  # (tiles_h,) each
    lo_x, hi_x = _touching(in_hw[1], tile[1], kernel[1], stride[1], out_w, active.device)
    inside = (sums[:, hi_y][:, :, hi_x] - sums[:, lo_y][:, :, hi_x] - sums[:, hi_y][:, :, lo_x]
              + sums[:, lo_y][:, :, lo_x])  # (B, tiles_h, tiles_w)  # fmt: skip
    return (inside > 0).reshape(batch, -1)


def _touching(size: int, tile: int, kernel: int, stride: int, out: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per tile along one axis, the range ``[lo, hi)`` of locations whose field touches it (empty when lo ≥ hi)."""
    start = torch.arange(0, size, tile, device=device)  # each tile's first pixel
    lo = ((start - kernel + stride).div(stride, rounding_mode="floor")).clamp_min(0)
    hi = ((start + tile - 1).div(stride, rounding_mode="floor") + 1).clamp_max(out)
    return lo, torch.maximum(hi, lo)


class TritonSkip:
    """A skip mask as the Triton kernels take it: ``fields`` ``(L, B)`` int8 (1 where a field is computed), and per
    grouping (bands of a width, locations, tiles of a size) the compacted ``(order, count)``, made once and kept, so
    that a layer's forward, transpose and backward passes of one batch share them."""

    def __init__(self, active: Tensor) -> None:
        batch, out_h, out_w = active.shape
        self.active = active
        self.batch = batch
        self.fields = active.reshape(batch, out_h * out_w).t().to(torch.int8).contiguous()  # (L, B)
        self._groups: dict[tuple[object, ...], tuple[Tensor, Tensor]] = {}

    def bands(self, locs: int) -> tuple[Tensor, Tensor, Tensor]:
        """The kernels' skip arguments ``(order, count, fields)`` for bands of ``locs`` locations (1: one location
        per program)."""
        key = ("bands", locs)
        if key not in self._groups:
            grouped = self.active.reshape(self.batch, -1) if locs == 1 else band_groups(self.active, locs)
            self._groups[key] = compact(grouped)
        return (*self._groups[key], self.fields)

    def tiles(self, in_hw: tuple[int, int], tile: tuple[int, int], kernel: tuple[int, int],
              stride: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """The transpose's skip arguments ``(order, count, fields)`` for input tiles of ``tile`` pixels."""
        key = ("tiles", in_hw, tile, kernel, stride)
        if key not in self._groups:
            self._groups[key] = compact(tile_groups(self.active, in_hw, tile, kernel, stride))
        return (*self._groups[key], self.fields)

    def computed_fraction(self, locs: int, block: int = BLOCK) -> float:
        """The fraction of its products a skipping forward with bands of ``locs`` locations computes: per band, its
        active examples rounded up to whole blocks of ``block``, out of the blocks the whole batch fills."""
        _, count, _ = self.bands(locs)
        out_h, out_w = self.active.shape[1:]
        widths = torch.full((-(-out_w // locs),), locs, dtype=torch.int64)  # locations in each band of a row
        widths[-1] = out_w - locs * (len(widths) - 1)
        per_band = widths.repeat(out_h).to(count.device)  # (H_out·bands,)
        blocks = (count.to(torch.int64) + block - 1) // block  # (H_out·bands,) blocks computed
        return float((blocks * per_band).sum()) / max(1, -(-self.batch // block) * out_h * out_w)
