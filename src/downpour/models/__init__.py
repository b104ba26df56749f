"""Whole networks built from ``downpour.nn`` blocks; each has ``loss(batch)`` and ``filters()``."""

from __future__ import annotations

import torch
from torch import nn

from downpour.config import ModelConfig
from downpour.errors import ConfigError
from downpour.models.cat import CatNetwork, build_cat
from downpour.models.rica import RICA

__all__ = ["RICA", "CatNetwork", "build_model"]


def build_model(config: ModelConfig, input_dim: int, *, seed: int, shape: tuple[int, ...] | None = None) -> nn.Module:
    """The network named by ``model.name`` for examples of ``input_dim`` values (``shape`` ``(C, H, W)`` for image
    models), initialised from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    if config.name == "cat":
        if shape is None:
            raise ConfigError("model.name = 'cat' needs the examples' (C, H, W) shape")
        return build_cat(tuple(shape), config, seed=seed)  # type: ignore[arg-type]
    if config.name == "rica":
        return RICA(input_dim, config.features, sparsity=config.sparsity, epsilon=config.epsilon, generator=generator)
    raise ConfigError(f"invalid model.name: {config.name!r} (choose one of rica, cat)")
