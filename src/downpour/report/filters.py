"""A grid picture of first-layer filters, each scaled to its own range, as in the RICA and cat papers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor


def filter_grid(filters: Tensor, shape: tuple[int, int, int], *, pad: int = 1) -> np.ndarray:
    """Tile ``filters`` ``(K, C*H*W)`` into one image ``(rows*(H+pad), cols*(W+pad)[, 3])`` in [0, 1]."""
    channels, height, width = shape
    k = filters.shape[0]
    tiles = filters.detach().float().cpu().numpy().reshape(k, channels, height, width)  # (K, C, H, W)
    lo = tiles.reshape(k, -1).min(1)[:, None, None, None]
    hi = tiles.reshape(k, -1).max(1)[:, None, None, None]
    tiles = (tiles - lo) / np.maximum(hi - lo, 1e-12)
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    grid = np.ones((rows * (height + pad) + pad, cols * (width + pad) + pad, channels), dtype=np.float32)
    for index in range(k):
        r, c = divmod(index, cols)
        y, x = pad + r * (height + pad), pad + c * (width + pad)
        grid[y : y + height, x : x + width] = tiles[index].transpose(1, 2, 0)  # (H, W, C)
    return grid[..., 0] if channels == 1 else grid


def save_filter_grid(filters: Tensor, shape: tuple[int, int, int], path: Path, *, scale: int = 4) -> None:
    """Write the filter grid as a PNG, each pixel enlarged ``scale`` times."""
    grid = filter_grid(filters, shape)
    grid = grid.repeat(scale, 0).repeat(scale, 1)  # (rows·scale, cols·scale[, 3])
    Image.fromarray(np.round(np.clip(grid, 0.0, 1.0) * 255).astype(np.uint8)).save(path, format="PNG")
