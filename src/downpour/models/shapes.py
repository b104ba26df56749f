"""Input batches: flat ``(B, D)`` for the flat designs; flat ``(B, C·H·W)`` or image ``(B, C, H, W)`` for the
convolutional ones."""

from __future__ import annotations

import math

from torch import Tensor

from downpour.nn import arguments as check
from downpour.nn.local import autocasting


def _check_like(x: Tensor, like: Tensor, owner: str) -> None:
    """A ``TypeError`` for input that is not a floating-point tensor, a ``ValueError`` for one of another dtype (outside
    ``torch.autocast``) or device than the model's weights ``like``: both named, instead of a matmul's message."""
    check.floating_tensor(owner, x)
    if x.device != like.device or (x.dtype != like.dtype and not autocasting(x.device.type)):
        raise ValueError(f"{owner} input is {x.dtype} on {x.device}, its weights are {like.dtype} on {like.device}: "
                         f"convert one of them (e.g. model.to(x))")  # fmt: skip


def as_images(x: Tensor, shape: tuple[int, int, int], owner: str, *, like: Tensor) -> Tensor:
    """``x`` as ``(B, *shape)`` images (a view of flat input); a ``ValueError`` naming ``owner`` and both shapes, or
    the dtypes and devices of ``x`` and of the weights ``like``."""
    _check_like(x, like, owner)
    if tuple(x.shape[1:]) == tuple(shape):
        return x
    if x.dim() == 2 and x.shape[1] == math.prod(shape):
        return x.view(-1, *shape)  # (B, C, H, W)
    raise ValueError(f"{owner} expected (B, {', '.join(map(str, shape))}) or (B, {math.prod(shape)}), "
                     f"got {tuple(x.shape)}")  # fmt: skip


def as_flat(x: Tensor, dim: int, owner: str, *, like: Tensor) -> Tensor:
    """``x`` as flat ``(B, dim)`` examples (images ``(B, ...)`` of ``dim`` values flattened); a ``ValueError`` naming
    ``owner``, the expected and the actual shape (not a matmul's "shapes cannot be multiplied"), or the dtypes and
    devices of ``x`` and of the weights ``like``."""
    _check_like(x, like, owner)
    if x.dim() < 2 or math.prod(x.shape[1:]) != dim:
        raise ValueError(f"{owner} expected (B, {dim}) examples, got {tuple(x.shape)}")
    return x.flatten(1)  # (B, D)


def require_examples(x: Tensor, owner: str) -> None:
    """A ``ValueError`` naming ``owner`` and the shape for a batch of no examples ``(0, ...)``: every design's loss
    is a mean over the batch, and the mean of none is NaN. (``forward`` takes one: no examples, no responses.) A
    look at the shape only: nothing waits for a GPU. Anything else (not a tensor, no batch dimension) is left to
    :func:`as_flat` and :func:`as_images` to name."""
    if isinstance(x, Tensor) and x.dim() >= 1 and x.shape[0] == 0:
        raise ValueError(f"{owner}.loss got an empty batch {tuple(x.shape)}: a loss is a mean over the examples "
                         "and needs at least one")  # fmt: skip
