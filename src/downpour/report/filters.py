"""A grid picture of first-layer filters, each scaled to its own range, as in the RICA and cat papers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

MAX_SIDE = 4096  # pixels: a grid larger than this at ``scale`` is enlarged less (16384 filters of 16x16: 2177 px)


def filter_grid(filters: Tensor, shape: tuple[int, int, int], *, pad: int = 1) -> np.ndarray:
    """Tile ``filters`` ``(K, C*H*W)`` into one image ``(rows*(H+pad), cols*(W+pad)[, 3])`` in [0, 1], row by row,
    with ``pad`` white pixels around and between the tiles (and white tiles after the last filter)."""
    channels, height, width = shape
    k = filters.shape[0]
    tiles = filters.detach().float().cpu().numpy().reshape(k, channels, height, width)  # (K, C, H, W)
    lo = tiles.reshape(k, -1).min(1)[:, None, None, None]
    hi = tiles.reshape(k, -1).max(1)[:, None, None, None]
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    cells = np.ones((rows * cols, height + pad, width + pad, channels), dtype=np.float32)  # each tile, its pad after
    cells[:k, :height, :width] = ((tiles - lo) / np.maximum(hi - lo, 1e-12)).transpose(0, 2, 3, 1)  # (K, H, W, C)
    grid = cells.reshape(rows, cols, height + pad, width + pad, channels).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(rows * (height + pad), cols * (width + pad), channels)  # (rows·(H+pad), cols·(W+pad), C)
    grid = np.pad(grid, ((pad, 0), (pad, 0), (0, 0)), constant_values=1.0)  # the pad before the first row/column
    return grid[..., 0] if channels == 1 else grid


def save_filter_grid(filters: Tensor, shape: tuple[int, int, int], path: Path, *, scale: int = 4) -> None:
    """Write the filter grid as a PNG, each pixel enlarged ``scale`` times, or fewer (at least once) where that would
    make a side longer than :data:`MAX_SIDE` pixels: a picture of thousands of filters stays one a browser shows."""
    grid = filter_grid(filters, shape)
    scale = max(1, min(scale, MAX_SIDE // max(grid.shape[:2])))
    grid = grid.repeat(scale, 0).repeat(scale, 1)  # (rows·scale, cols·scale[, 3])
    Image.fromarray(np.round(np.clip(grid, 0.0, 1.0) * 255).astype(np.uint8)).save(path, format="PNG")
