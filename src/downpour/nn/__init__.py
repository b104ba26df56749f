"""Building blocks of the cat network, plain ``torch.nn.Module``s with no distribution code."""

from downpour.nn.local import LocallyConnected2d
from downpour.nn.norm import LocalContrastNorm2d
from downpour.nn.pooling import L2Pool2d

__all__ = ["L2Pool2d", "LocalContrastNorm2d", "LocallyConnected2d"]
