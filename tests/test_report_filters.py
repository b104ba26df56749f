"""The filter picture: tiles in order, each scaled to its own range, white padding; large grids enlarged less."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from downpour.report.filters import MAX_SIDE, filter_grid, save_filter_grid


def grid_by_loop(filters: torch.Tensor, shape: tuple[int, int, int], pad: int) -> np.ndarray:
    """The picture's definition, one tile at a time."""
    channels, height, width = shape
    count = filters.shape[0]
    cols = int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / cols))
    grid = np.ones((rows * (height + pad) + pad, cols * (width + pad) + pad, channels), dtype=np.float32)
    for index, flat in enumerate(filters.double().numpy()):
        tile = flat.reshape(channels, height, width).transpose(1, 2, 0)  # (H, W, C)
        tile = (tile - tile.min()) / max(tile.max() - tile.min(), 1e-12)
        r, c = divmod(index, cols)
        grid[pad + r * (height + pad) :][:height, pad + c * (width + pad) :][:, :width] = tile
    return grid[..., 0] if channels == 1 else grid


@pytest.mark.parametrize(("count", "shape", "pad"), [(7, (1, 5, 4), 1), (16, (3, 6, 6), 2), (1, (1, 3, 3), 1)])
def test_the_grid_equals_its_tile_by_tile_definition(count: int, shape: tuple[int, int, int], pad: int) -> None:
    filters = torch.randn(count, int(np.prod(shape)), generator=torch.Generator().manual_seed(count))
    ours = filter_grid(filters, shape, pad=pad)
    expected = grid_by_loop(filters, shape, pad)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=1e-6)


def test_a_picture_of_thousands_of_filters_is_enlarged_less(tmp_path: Path) -> None:
    """256 filters of 16x16 (a 273-pixel grid) are enlarged 4 times; 16384 filters (2177 pixels) once, not into a
    75-megapixel PNG; a constant filter (its range is zero) is drawn black, not as NaN."""
    small, large = tmp_path / "small.png", tmp_path / "large.png"
    save_filter_grid(torch.randn(256, 256), (1, 16, 16), small)
    filters = torch.randn(16384, 256)
    filters[5] = 0.0
    save_filter_grid(filters, (1, 16, 16), large)
    assert Image.open(small).size == (4 * 273, 4 * 273)
    assert Image.open(large).size == (2177, 2177) and max(Image.open(large).size) <= MAX_SIDE
    pixels = np.asarray(Image.open(large))
    assert pixels[1 + 17 * 0 : 17, 1 + 17 * 5 :][:16, :16].max() == 0  # the constant filter: its own range is 0
