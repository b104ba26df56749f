"""Reconstruction and penalty terms as small composable functions on batches (first dimension = examples)."""

from __future__ import annotations

import torch
from torch import Tensor


def squared_reconstruction(reconstruction: Tensor, target: Tensor) -> Tensor:
    """Mean over examples of ``‖x̂ − x‖²`` (summed over the example's dimensions)."""
    return (reconstruction - target).pow(2).flatten(1).sum(1).mean()


def smooth_l1(activations: Tensor, *, epsilon: float) -> Tensor:
    """Mean over examples of ``Σⱼ sqrt(ε + hⱼ²)``, the smoothed L1 sparsity penalty of RICA (Le et al. 2011)."""
    return torch.sqrt(epsilon + activations.pow(2)).flatten(1).sum(1).mean()
