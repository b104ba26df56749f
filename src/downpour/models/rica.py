"""Reconstruction ICA (Le, Karpenko, Ngiam & Ng, NIPS 2011).

``loss(x) = mean ‖WᵀWx − x‖² + λ · mean Σⱼ sqrt(ε + (Wx)ⱼ²)``: a soft reconstruction cost in place of ICA's hard
orthonormality constraint, so overcomplete bases train with plain (unconstrained) gradient steps.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from downpour.objectives import decay_term, penalty, regularised, squared_reconstruction
from downpour.penalty_spec import PenaltySpec


class RICA(nn.Module):
    """A single layer of ``features`` linear filters over ``input_dim``-dimensional examples."""

    def __init__(
        self,
        input_dim: int,
        features: int = 256,
        *,
        sparsity: float = 0.1,
        epsilon: float = 0.01,
        generator: torch.Generator | None = None,
        penalty: PenaltySpec | None = None,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.input_dim, self.features, self.sparsity, self.epsilon = input_dim, features, sparsity, epsilon
        self.penalty = penalty if penalty is not None else PenaltySpec("rica", sparsity)  # λ Σ sqrt(ε + h²)
        self.weight_decay = weight_decay
        weight = torch.randn(features, input_dim, generator=generator) / math.sqrt(input_dim)
        self.weight = nn.Parameter(weight)  # (K, D): one filter per row

    def forward(self, x: Tensor) -> Tensor:
        """Feature responses ``Wx``: ``(B, D) -> (B, K)``."""
        return x.flatten(1) @ self.weight.t()

    def loss(self, x: Tensor) -> Tensor:
        """The RICA objective on a batch ``(B, D)`` (with ``model.penalty`` in place of the smooth L1 if set, plus
        ``model.weight_decay``)."""
        x = x.flatten(1)  # (B, D)
        h = x @ self.weight.t()  # (B, K)
        reconstruction = h @ self.weight  # (B, D)
        cost = squared_reconstruction(reconstruction, x)
        return regularised(cost, penalty(self.penalty, h, epsilon=self.epsilon),
                           decay_term(self.weight_decay, [self.weight]))  # fmt: skip

    def filters(self) -> Tensor:
        """First-layer filters, one per row: ``(K, D)``."""
        return self.weight.detach()
