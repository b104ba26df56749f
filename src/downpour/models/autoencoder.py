"""The sparse autoencoder of the UFLDL tutorial (Ng, *Sparse autoencoder*, CS294A lecture notes, 2011).

Sigmoid encoder, linear decoder (the "linear decoder" variant for real-valued, whitened inputs)::

    h = σ(W₁x + b₁),   x̂ = W₂h + b₂
    J = mean ½‖x̂ − x‖² + β Σⱼ KL(ρ ‖ ρ̂ⱼ) + (λ/2) (‖W₁‖² + ‖W₂‖²)

with ρ̂ⱼ the mean activation of hidden unit j over the batch; ``model.penalty`` (default ``kl:0.05,3``) and
``model.weight_decay`` (λ) set the last two terms.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from downpour.models.shapes import as_flat, require_examples
from downpour.nn import arguments as check
from downpour.objectives import decay_term, penalty, regularised, squared_reconstruction
from downpour.penalty_spec import PenaltySpec

DEFAULT_PENALTY = PenaltySpec("kl", 3.0, 0.05)  # β = 3, ρ = 0.05 as in the UFLDL exercise


class SparseAutoencoder(nn.Module):
    """``features`` sigmoid units over ``input_dim`` values; ``loss`` is the UFLDL cost above."""

    def __init__(self, input_dim: int, features: int = 256, *, penalty: PenaltySpec = DEFAULT_PENALTY,
                 epsilon: float = 0.01, weight_decay: float = 0.0,
                 generator: torch.Generator | None = None) -> None:  # fmt: skip
        super().__init__()
        owner = type(self).__name__
        self.input_dim = input_dim = check.integer(owner, "input_dim", input_dim)
        self.features = features = check.integer(owner, "features", features)
        check.penalty(owner, penalty, sigmoid=True)
        self.penalty = penalty
        self.epsilon = check.number(owner, "epsilon", epsilon, positive=True)
        self.weight_decay = check.number(owner, "weight_decay", weight_decay)
        check.instance(owner, "generator", generator, torch.Generator, "torch.Generator", optional=True)
        bound = math.sqrt(6 / (input_dim + features + 1))  # UFLDL's uniform init
        self.weight = nn.Parameter((torch.rand(features, input_dim, generator=generator) * 2 - 1) * bound)  # W₁ (K, D)
        self.bias = nn.Parameter(torch.zeros(features))  # b₁
        decoder = (torch.rand(input_dim, features, generator=generator) * 2 - 1) * bound
        self.decoder_weight = nn.Parameter(decoder)  # W₂ (D, K)
        self.decoder_bias = nn.Parameter(torch.zeros(input_dim))  # b₂

    def forward(self, x: Tensor) -> Tensor:
        """Hidden activations ``σ(W₁x + b₁)``: ``(B, D) -> (B, K)``."""
        x = as_flat(x, self.input_dim, type(self).__name__, like=self.weight)  # (B, D)
        return torch.sigmoid(x @ self.weight.t() + self.bias)

    def loss(self, x: Tensor) -> Tensor:
        """The sparse-autoencoder cost on a batch ``(B, D)``."""
        require_examples(x, type(self).__name__)
        x = as_flat(x, self.input_dim, type(self).__name__, like=self.weight)  # (B, D)
        h = self(x)  # (B, K)
        reconstruction = h @ self.decoder_weight.t() + self.decoder_bias  # (B, D)
        cost = 0.5 * squared_reconstruction(reconstruction, x)
        return regularised(cost, penalty(self.penalty, h, epsilon=self.epsilon),
                           decay_term(self.weight_decay, [self.weight, self.decoder_weight]))  # fmt: skip

    def filters(self) -> Tensor:
        """First-layer filters, one per row: ``(K, D)``."""
        return self.weight.detach()
