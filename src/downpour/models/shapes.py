"""Input batches: flat ``(B, D)`` for the flat designs; flat ``(B, C·H·W)`` or image ``(B, C, H, W)`` for the
convolutional ones."""

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


def as_flat(x: Tensor, dim: int, owner: str) -> Tensor:
    """``x`` as flat ``(B, dim)`` examples (images ``(B, ...)`` of ``dim`` values flattened); a ``ValueError`` naming
    ``owner``, the expected and the actual shape (not a matmul's "shapes cannot be multiplied")."""
    if x.dim() < 2 or math.prod(x.shape[1:]) != dim:
        raise ValueError(f"{owner} expected (B, {dim}) examples, got {tuple(x.shape)}")
    return x.flatten(1)  # (B, D)
