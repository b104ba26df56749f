"""Whole networks built from ``downpour.nn`` blocks; each has ``loss(batch)``, ``filters()`` and ``forward(x)``."""

from __future__ import annotations

import torch
from torch import nn

from downpour.config import ModelConfig
from downpour.errors import ConfigError
from downpour.models.autoencoder import DEFAULT_PENALTY as SPARSE_AE_PENALTY
from downpour.models.autoencoder import SparseAutoencoder
from downpour.models.cat import CatNetwork, build_cat
from downpour.models.conv import ConvAutoencoder
from downpour.models.first_layer import apply_first_layer, trainable_parameters
from downpour.models.rbm import GaussianBernoulliRBM
from downpour.models.rica import RICA
from downpour.objectives import resolve_penalty
from downpour.penalty_spec import PenaltySpec

__all__ = [
    "RICA",
    "CatNetwork",
    "ConvAutoencoder",
    "GaussianBernoulliRBM",
    "SparseAutoencoder",
    "build_model",
    "seed_sampling",
    "size_settings",
    "trainable_parameters",
]

DESIGNS = ("rica", "cat", "sparse-ae", "rbm", "conv")


def _flat_shape(input_dim: int, shape: tuple[int, ...] | None) -> tuple[int, int, int]:
    """The ``(C, H, W)`` of one example: ``shape`` when given, else a square single-channel field."""
    if shape is not None:
        return tuple(shape)  # type: ignore[return-value]
    side = round(input_dim**0.5)
    if side * side != input_dim:
        raise ConfigError(f"model.init needs the examples' (C, H, W) shape for {input_dim}-value examples")
    return (1, side, side)


def build_model(config: ModelConfig, input_dim: int, *, seed: int, shape: tuple[int, ...] | None = None) -> nn.Module:
    """The network named by ``model.name`` for examples of ``input_dim`` values (``shape`` ``(C, H, W)`` for image
    models), initialised from ``seed``, with ``model.init`` / ``model.freeze_first`` applied to its first layer."""
    generator = torch.Generator().manual_seed(seed)
    name = config.name
    if name == "cat":
        if shape is None:
            raise ConfigError("model.name = 'cat' needs the examples' (C, H, W) shape")
        return build_cat(tuple(shape), config, seed=seed)  # type: ignore[arg-type]
    model: nn.Module
    if name == "rica":
        spec = resolve_penalty(config.penalty, PenaltySpec("rica", config.sparsity), design=name, sigmoid=False)
        model = RICA(input_dim, config.features, sparsity=config.sparsity, epsilon=config.epsilon, generator=generator,
                     penalty=spec, weight_decay=config.weight_decay)  # fmt: skip
    elif name == "sparse-ae":
        spec = resolve_penalty(config.penalty, SPARSE_AE_PENALTY, design=name, sigmoid=True)
        model = SparseAutoencoder(input_dim, config.features, penalty=spec, epsilon=config.epsilon,
                                  weight_decay=config.weight_decay, generator=generator)  # fmt: skip
    elif name == "rbm":
        spec = resolve_penalty(config.penalty, PenaltySpec("none"), design=name, sigmoid=True)
        model = GaussianBernoulliRBM(input_dim, config.features, cd_k=config.cd_k, pcd=config.pcd, penalty=spec,
                                     epsilon=config.epsilon, weight_decay=config.weight_decay, seed=seed)  # fmt: skip
    elif name == "conv":
        if shape is None:
            raise ConfigError("model.name = 'conv' needs the examples' (C, H, W) shape")
        spec = resolve_penalty(config.penalty, PenaltySpec("rica", config.sparsity), design=name, sigmoid=False)
        model = ConvAutoencoder(tuple(shape), features=config.features, receptive_field=config.receptive_field,  # type: ignore[arg-type]
                                penalty=spec, epsilon=config.epsilon, weight_decay=config.weight_decay,
                                generator=generator)  # fmt: skip
    else:
        raise ConfigError(f"invalid model.name: {name!r} (choose one of {', '.join(DESIGNS)})")
    field = None
    if config.init != "learned":  # the templates' field: the design's filter shape, else the example's
        field = getattr(model, "filter_shape", None) or _flat_shape(input_dim, shape)
    apply_first_layer(model, model.weight, config, field, seed=seed, design=name)  # type: ignore[arg-type]
    return model


def size_settings(name: str) -> str:
    """The settings that set the size of the ``name`` design's network, as an error names them for a model too large
    for memory: the cat network's maps, stages and input size; every other design's features."""
    return "model.maps, model.stages or data.image_size" if name == "cat" else "model.features"


def seed_sampling(model: nn.Module, seed: int) -> None:
    """Seed what ``model`` draws while it trains (the RBM's Gibbs sampling; the other models draw nothing) from a
    worker's own ``seed``: built from ``train.seed`` alone, every worker would draw the same noise, and a resumed
    session would replay the first one's."""
    sampler = getattr(model, "sampler", None)
    if isinstance(sampler, torch.Generator):
        sampler.manual_seed(seed)
