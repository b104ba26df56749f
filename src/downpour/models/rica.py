"""Reconstruction ICA (Le, Karpenko, Ngiam & Ng, NIPS 2011).

``loss(x) = mean ‖WᵀWx − x‖² + λ · mean Σⱼ sqrt(ε + (Wx)ⱼ²)``: a soft reconstruction cost in place of ICA's hard
orthonormality constraint, so overcomplete bases train with plain (unconstrained) gradient steps. λ weights the
penalty, as in the 2012 paper's stage cost; the 2011 paper writes λ on the reconstruction term instead
(``λ‖WᵀWx − x‖² + Σ g(Wx)``), the same objective rescaled: its λ is 1/λ here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from downpour.models.shapes import as_flat, require_examples
from downpour.nn import arguments as check
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
        owner = type(self).__name__
        self.input_dim = input_dim = check.integer(owner, "input_dim", input_dim)
        self.features = features = check.integer(owner, "features", features)
        self.sparsity = check.number(owner, "sparsity", sparsity)
        self.epsilon = check.number(owner, "epsilon", epsilon, positive=True)  # ε = 0: NaN gradients where h = 0
        self.weight_decay = check.number(owner, "weight_decay", weight_decay)
        check.instance(owner, "generator", generator, torch.Generator, "torch.Generator", optional=True)
        self.penalty = penalty if penalty is not None else PenaltySpec("rica", self.sparsity)  # λ Σ sqrt(ε + h²)
        check.penalty(owner, self.penalty, sigmoid=False)
        weight = torch.randn(features, input_dim, generator=generator) / math.sqrt(input_dim)
        self.weight = nn.Parameter(weight)  # (K, D): one filter per row

    def forward(self, x: Tensor) -> Tensor:
        """Feature responses ``Wx``: ``(B, D) -> (B, K)``."""
        return as_flat(x, self.input_dim, type(self).__name__, like=self.weight) @ self.weight.t()

    def loss(self, x: Tensor) -> Tensor:
        """The RICA objective on a batch ``(B, D)`` (with ``model.penalty`` in place of the smooth L1 if set, plus
        ``model.weight_decay``)."""
        require_examples(x, type(self).__name__)
        x = as_flat(x, self.input_dim, type(self).__name__, like=self.weight)  # (B, D)
        h = x @ self.weight.t()  # (B, K)
        reconstruction = h @ self.weight  # (B, D)
        cost = squared_reconstruction(reconstruction, x)
        return regularised(cost, penalty(self.penalty, h, epsilon=self.epsilon),
                           decay_term(self.weight_decay, [self.weight]))  # fmt: skip

    def filters(self) -> Tensor:
        """First-layer filters, one per row: ``(K, D)``."""
        return self.weight.detach()
