"""Reconstruction ICA (Le, Karpenko, Ngiam & Ng, NIPS 2011).

``loss(x) = mean ‖WᵀWx − x‖² + λ · mean Σⱼ sqrt(ε + (Wx)ⱼ²)``: a soft reconstruction cost in place of ICA's hard
orthonormality constraint, so overcomplete bases train with plain (unconstrained) gradient steps.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from downpour.objectives import smooth_l1, squared_reconstruction


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
    ) -> None:
        super().__init__()
        self.input_dim, self.features, self.sparsity, self.epsilon = input_dim, features, sparsity, epsilon
        weight = torch.randn(features, input_dim, generator=generator) / math.sqrt(input_dim)
        self.weight = nn.Parameter(weight)  # (K, D): one filter per row

    def forward(self, x: Tensor) -> Tensor:
        """Feature responses ``Wx``: ``(B, D) -> (B, K)``."""
        return x.flatten(1) @ self.weight.t()

    def loss(self, x: Tensor) -> Tensor:
        """The RICA objective on a batch ``(B, D)``."""
        x = x.flatten(1)  # (B, D)
        h = x @ self.weight.t()  # (B, K)
        reconstruction = h @ self.weight  # (B, D)
        return squared_reconstruction(reconstruction, x) + self.sparsity * smooth_l1(h, epsilon=self.epsilon)

    def filters(self) -> Tensor:
        """First-layer filters, one per row: ``(K, D)``."""
        return self.weight.detach()
