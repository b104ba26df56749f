"""A tied convolutional autoencoder: one bank of templates applied at every location, decoded by its transpose.

``h = W ∗ x`` (a valid convolution, ``features`` maps of ``receptive_field²`` templates), ``x̂ = Wᵀ ∗ h`` (the
transposed convolution with the *same* weights), and the cost::

    mean ‖x̂ − x‖² + penalty(h)          (default: λ Σ sqrt(ε + h²), λ = model.sparsity)

This is reconstruction ICA made convolutional (the tiled/convolutional RICA of Le et al., NIPS 2010 and 2011, with
a tiling of one): the CNN counterpart of the untied cat network. ``forward`` returns the rectified-smooth feature
maps ``sqrt(ε + h²)``, flattened.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from downpour.errors import ConfigError
from downpour.models.shapes import as_images, require_examples
from downpour.nn import arguments as check
from downpour.objectives import decay_term, penalty, regularised, squared_reconstruction
from downpour.penalty_spec import PenaltySpec


class ConvAutoencoder(nn.Module):
    """``features`` tied templates of ``receptive_field²`` over ``(C, S, S)`` images (flat or image input)."""

    def __init__(self, shape: tuple[int, int, int], *, features: int = 64, receptive_field: int = 8,
                 penalty: PenaltySpec | None = None, sparsity: float = 0.1, epsilon: float = 0.01,
                 weight_decay: float = 0.0, generator: torch.Generator | None = None) -> None:  # fmt: skip
        super().__init__()
        owner = type(self).__name__
        self.shape = check.sizes(owner, "shape", shape, 3)
        channels, height, width = self.shape
        receptive_field = check.integer(owner, "receptive_field", receptive_field)
        if receptive_field > min(height, width):
            raise ConfigError(f"invalid model.receptive_field: {receptive_field} (conv sees {height}x{width} "
                              "examples; use a field no larger than the examples)")  # fmt: skip
        self.features = features = check.integer(owner, "features", features)
        sparsity = check.number(owner, "sparsity", sparsity)
        self.epsilon = check.number(owner, "epsilon", epsilon, positive=True)
        self.weight_decay = check.number(owner, "weight_decay", weight_decay)
        check.instance(owner, "generator", generator, torch.Generator, "torch.Generator", optional=True)
        self.penalty = penalty if penalty is not None else PenaltySpec("rica", sparsity)
        check.penalty(owner, self.penalty, sigmoid=False)
        self.filter_shape = (channels, receptive_field, receptive_field)
        fan_in = channels * receptive_field * receptive_field
        weight = torch.randn(features, channels, receptive_field, receptive_field, generator=generator)
        # (K, C, f, f): rows of norm 1/sqrt(K), so the K overlapping decodings start at about the input's size
        self.weight = nn.Parameter(weight / math.sqrt(fan_in * features))

    def _images(self, x: Tensor) -> Tensor:
        return as_images(x, self.shape, "ConvAutoencoder", like=self.weight)  # (B, C, S, S)

    def encode(self, x: Tensor) -> Tensor:
        """Template responses ``W ∗ x``: ``(B, C, S, S) -> (B, K, S − f + 1, S − f + 1)``."""
        return F.conv2d(self._images(x), self.weight)

    def forward(self, x: Tensor) -> Tensor:
        """Features ``sqrt(ε + h²)`` flattened: ``(B, K·R·R)``."""
        return torch.sqrt(self.epsilon + self.encode(x).pow(2)).flatten(1)

    def loss(self, x: Tensor) -> Tensor:
        """Reconstruction through the tied transpose plus the penalty on the maps (and weight decay)."""
        require_examples(x, "ConvAutoencoder")
        x = self._images(x)
        h = self.encode(x)  # (B, K, R, R)
        reconstruction = F.conv_transpose2d(h, self.weight)  # (B, C, S, S)
        return regularised(squared_reconstruction(reconstruction, x), penalty(self.penalty, h, epsilon=self.epsilon),
                           decay_term(self.weight_decay, [self.weight]))  # fmt: skip

    def filters(self) -> Tensor:
        """The templates, one per row: ``(K, C·f·f)``."""
        return self.weight.detach().flatten(1)
