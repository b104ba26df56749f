"""Image-shaped input for the convolutional designs: flat ``(B, C·H·W)`` or image ``(B, C, H, W)`` batches."""

from __future__ import annotations

import math

from torch import Tensor


def as_images(x: Tensor, shape: tuple[int, int, int], owner: str) -> Tensor:
    """``x`` as ``(B, *shape)`` images (a view of flat input); a ``ValueError`` naming ``owner`` and both shapes."""
    if tuple(x.shape[1:]) == tuple(shape):
        return x
    if x.dim() == 2 and x.shape[1] == math.prod(shape):
        return x.view(-1, *shape)  # (B, C, H, W)
    raise ValueError(f"{owner} expected (B, {', '.join(map(str, shape))}) or (B, {math.prod(shape)}), "
                     f"got {tuple(x.shape)}")  # fmt: skip
