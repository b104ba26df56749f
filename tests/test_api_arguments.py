"""The Python API's public constructors refuse bad arguments up front, in one line naming the class, the argument,
what is allowed and the value given (``Invalid input_dim for RICA: must be an integer >= 1, got 0``), instead of
building silently or failing later deep inside torch."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from downpour.config import ModelConfig
from downpour.errors import ConfigError
from downpour.models import (
    RICA,
    CatNetwork,
    ConvAutoencoder,
    GaussianBernoulliRBM,
    SparseAutoencoder,
    build_model,
)
from downpour.nn import L2Pool2d, LocalContrastNorm2d, LocallyConnected2d
from downpour.nn.skip import SkipPlan, active_fields
from downpour.nn.templates import difference_of_gaussians, dog_bank, gabor, gabor_bank, templates
from downpour.penalty_spec import PenaltySpec

# The smallest valid arguments of each constructor; every case below changes one of them.
VALID: dict[Callable[..., Any], dict[str, Any]] = {
    RICA: {"input_dim": 16, "features": 8},
    SparseAutoencoder: {"input_dim": 16, "features": 8},
    GaussianBernoulliRBM: {"input_dim": 16, "features": 8},
    ConvAutoencoder: {"shape": (1, 8, 8), "features": 4, "receptive_field": 3},
    CatNetwork: {"shape": (1, 16, 16), "receptive_field": 6, "maps": 2, "pool": 3, "lcn": 3},
    LocallyConnected2d: {"in_channels": 1, "out_channels": 2, "in_size": 8, "kernel_size": 3},
    L2Pool2d: {"kernel_size": 2},
    LocalContrastNorm2d: {},
}

BAD_VALUES = [  # (class, argument, bad value): a ValueError "Invalid <argument> for <class>: must be …, got <value>"
    (RICA, "input_dim", 0),
    (RICA, "input_dim", -3),
    (RICA, "input_dim", 2.5),
    (RICA, "input_dim", True),
    (RICA, "input_dim", "16"),
    (RICA, "features", 0),
    (RICA, "sparsity", -0.1),
    (RICA, "sparsity", math.nan),
    (RICA, "epsilon", 0.0),
    (RICA, "epsilon", math.inf),
    (RICA, "weight_decay", -1.0),
    (SparseAutoencoder, "input_dim", 16.0),
    (SparseAutoencoder, "features", -1),
    (SparseAutoencoder, "epsilon", math.nan),
    (SparseAutoencoder, "weight_decay", math.inf),
    (GaussianBernoulliRBM, "input_dim", None),
    (GaussianBernoulliRBM, "features", 0),
    (GaussianBernoulliRBM, "cd_k", 0),
    (GaussianBernoulliRBM, "cd_k", 1.5),
    (GaussianBernoulliRBM, "pcd", "yes"),
    (GaussianBernoulliRBM, "epsilon", -0.01),
    (GaussianBernoulliRBM, "seed", -1),
    (GaussianBernoulliRBM, "seed", 2**64),
    (ConvAutoencoder, "shape", (8, 8)),
    (ConvAutoencoder, "shape", (1, 0, 8)),
    (ConvAutoencoder, "shape", "1x8x8"),
    (ConvAutoencoder, "features", 0),
    (ConvAutoencoder, "receptive_field", 0),
    (ConvAutoencoder, "sparsity", -1.0),
    (ConvAutoencoder, "epsilon", 0.0),
    (CatNetwork, "shape", (1, 16)),
    (CatNetwork, "shape", (1, 16, 16.0)),
    (CatNetwork, "stages", 0),
    (CatNetwork, "receptive_field", 0),
    (CatNetwork, "maps", 0),
    (CatNetwork, "pool", 2.5),
    (CatNetwork, "lcn", 4),
    (CatNetwork, "lcn", 0),
    (CatNetwork, "greedy", 1),
    (CatNetwork, "tied", "no"),
    (CatNetwork, "sparsity", math.nan),
    (CatNetwork, "epsilon", -1.0),
    (CatNetwork, "skip_variance", math.nan),
    (CatNetwork, "weight_decay", -1.0),
    (LocallyConnected2d, "in_channels", True),
    (LocallyConnected2d, "in_channels", 1.0),
    (LocallyConnected2d, "out_channels", 0),
    (LocallyConnected2d, "in_size", (8,)),
    (LocallyConnected2d, "in_size", 2.5),
    (LocallyConnected2d, "in_size", None),
    (LocallyConnected2d, "kernel_size", 9),
    (LocallyConnected2d, "kernel_size", (3, 9)),
    (LocallyConnected2d, "stride", 0),
    (LocallyConnected2d, "stride", (1, -1)),
    (LocallyConnected2d, "bias", "no"),
    (L2Pool2d, "kernel_size", True),
    (L2Pool2d, "kernel_size", "2"),
    (L2Pool2d, "stride", 2.5),
    (L2Pool2d, "padding", -1),
    (L2Pool2d, "epsilon", math.inf),
    (LocalContrastNorm2d, "kernel_size", 4),
    (LocalContrastNorm2d, "kernel_size", 0),
    (LocalContrastNorm2d, "kernel_size", -3),
    (LocalContrastNorm2d, "kernel_size", True),
    (LocalContrastNorm2d, "sigma", math.nan),
    (LocalContrastNorm2d, "epsilon", -1.0),
]


@pytest.mark.parametrize(
    ("cls", "name", "value"), BAD_VALUES, ids=[f"{c.__name__}-{n}={v!r}" for c, n, v in BAD_VALUES]
)
def test_a_bad_argument_is_one_value_error_naming_it(cls: Callable[..., Any], name: str, value: object) -> None:
    expected = rf"^Invalid {name} for {cls.__name__}: must be .+, got {re.escape(repr(value))}$"
    with pytest.raises(ValueError, match=expected):
        cls(**VALID[cls] | {name: value})


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (RICA, {"penalty": PenaltySpec("kl", 3.0, 0.05)}, r"Invalid penalty for RICA: .*kl needs sigmoid hidden units"),
        (ConvAutoencoder, {"penalty": PenaltySpec("kl", 3.0, 0.05)}, r"penalty for ConvAutoencoder: .*kl needs"),
        (CatNetwork, {"penalty": PenaltySpec("kl", 3.0, 0.05)}, r"penalty for CatNetwork: .*kl needs"),
        (RICA, {"penalty": PenaltySpec("l1", -1.0)}, r"Invalid penalty weight for RICA: .*>= 0, got -1\.0$"),
        (RICA, {"penalty": PenaltySpec("huber", 1.0)}, r"Invalid penalty kind for RICA: must be one of .*got 'huber'"),
        (SparseAutoencoder, {"penalty": PenaltySpec("kl", 3.0, 1.5)}, r"penalty target for SparseAutoencoder: .*1\.5"),
        (GaussianBernoulliRBM, {"penalty": PenaltySpec("l2", math.nan)}, r"penalty weight for GaussianBernoulliRBM"),
        (CatNetwork, {"sparsity": -1.0}, r"Invalid sparsity for CatNetwork: .*>= 0, got -1\.0"),
    ],
)  # fmt: skip
def test_a_bad_penalty_names_what_is_wrong(cls: Callable[..., Any], kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**VALID[cls] | kwargs)


@pytest.mark.parametrize("target", [0.0, 1.0])
@pytest.mark.parametrize("cls", [SparseAutoencoder, GaussianBernoulliRBM])
def test_a_kl_target_at_either_end_is_refused(cls: Callable[..., Any], target: float) -> None:
    """The kl target ρ is a mean activation strictly inside (0, 1): 0 and 1 themselves are refused up front (the
    penalty would take the log of 0 at its target), naming the class and the value."""
    expected = (
        rf"^Invalid penalty target for {cls.__name__}: must be a kl target ρ in \(0, 1\), exclusive, got {target}$"
    )
    with pytest.raises(ValueError, match=expected):
        cls(**VALID[cls] | {"penalty": PenaltySpec("kl", 3.0, target)})


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (RICA, {"generator": 0}, r"Invalid generator for RICA: must be a torch\.Generator or None, got 0"),
        (SparseAutoencoder, {"generator": "seed"}, r"Invalid generator for SparseAutoencoder: .*got 'seed'"),
        (ConvAutoencoder, {"generator": 1}, r"Invalid generator for ConvAutoencoder"),
        (RICA, {"penalty": "l1:0.1"}, r"Invalid penalty for RICA: must be a PenaltySpec .*got 'l1:0\.1'"),
        (CatNetwork, {"penalty": "rica:0.1"}, r"Invalid penalty for CatNetwork: must be a PenaltySpec"),
    ],
)  # fmt: skip
def test_an_object_of_the_wrong_class_is_a_type_error(cls: Callable[..., Any], kwargs: dict, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        cls(**VALID[cls] | kwargs)


def test_refusals_that_existed_keep_their_words() -> None:
    """Messages other code and tests already rely on: the config key of a field larger than the examples, and the
    unknown implementation."""
    with pytest.raises(ConfigError, match=r"invalid model\.receptive_field: 9 \(conv sees 8x8"):
        ConvAutoencoder((1, 8, 8), receptive_field=9)
    with pytest.raises(ConfigError, match=r"square images, got 16x12"):
        CatNetwork((1, 16, 12))
    with pytest.raises(ValueError, match=r"Invalid implementation: 'cuda' \(one of auto, triton, bands\)"):
        LocallyConnected2d(1, 2, 8, 3, implementation="cuda")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: templates("wavelet", 4, (1, 8, 8)), r"Invalid kind for templates: must be one of gabor, dog, random"),
        (lambda: templates("gabor", 0, (1, 8, 8)), r"Invalid count for templates: .*got 0$"),
        (lambda: templates("gabor", 2.5, (1, 8, 8)), r"Invalid count for templates: .*got 2\.5$"),
        (lambda: templates("dog", 4, (8, 8)), r"Invalid shape for templates: must be 3 integers >= 1, got \(8, 8\)"),
        (lambda: gabor_bank(1), r"Invalid size for gabor_bank: must be an integer >= 2, got 1"),
        (lambda: gabor_bank(8, orientations=0), r"Invalid orientations for gabor_bank: .*got 0"),
        (lambda: gabor_bank(8, frequencies=[]), r"Invalid frequencies for gabor_bank: .*got \[\]"),
        (lambda: dog_bank(2), r"Invalid size for dog_bank: must be an integer >= 3, got 2"),
        (lambda: dog_bank(8, centers=0), r"Invalid centers for dog_bank: .*got 0"),
        (lambda: gabor(8, theta=0.0, frequency=0.2, phase=0.0, sigma=0.0), r"Invalid sigma for gabor: .*got 0\.0"),
        (lambda: difference_of_gaussians(8, sigma=1.0, ratio=-2.0), r"Invalid ratio for difference_of_gaussians"),
        (lambda: active_fields(torch.zeros(1, 1, 6, 6), (3, 3), (1, 1), math.nan), r"Invalid threshold for active_f"),
        (lambda: SkipPlan(torch.ones(2, 4, 4), (3, 3), (1, 1), torch.float32), r"Invalid active for SkipPlan: .*bool"),
        (lambda: SkipPlan(torch.ones(2, 4, 4) > 0, (0, 3), (1, 1), torch.float32), r"Invalid kernel for SkipPlan"),
    ],
)  # fmt: skip
def test_template_and_skip_helpers_refuse_bad_arguments(call: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_edge_values_that_are_allowed_still_build() -> None:
    """Zero weights, numpy integers, (H, W) pairs, the smallest windows and an ε of 0 where the layer allows it."""
    rica = RICA(np.int64(16), np.int64(8), sparsity=0, weight_decay=0.0, generator=torch.Generator().manual_seed(0))
    assert (rica.input_dim, rica.features, rica.sparsity) == (16, 8, 0.0) and type(rica.input_dim) is int
    assert rica.weight.shape == (8, 16)
    assert SparseAutoencoder(16, 8, penalty=PenaltySpec("kl", 3.0, 0.05)).weight.shape == (8, 16)
    assert GaussianBernoulliRBM(16, 8, cd_k=3, pcd=True, penalty=PenaltySpec("kl", 0.0, 0.1), seed=2**32 - 1).pcd
    assert ConvAutoencoder([1, 8, 8], features=2, receptive_field=8).weight.shape == (2, 1, 8, 8)
    layer = LocallyConnected2d(1, 2, (8, 6), (3, 6), (1, 2), bias=True)
    assert layer.out_size == (6, 1) and layer.bias is not None
    assert L2Pool2d(1, padding=0, epsilon=0).epsilon == 0.0
    assert LocalContrastNorm2d(1, sigma=1, epsilon=1).sigma == 1.0
    net = CatNetwork(torch.Size([1, 16, 16]), receptive_field=6, maps=2, pool=3, lcn=1, epsilon=0.0, tied=True)
    assert net.shape == (1, 16, 16) and len(net.stages) == 1


@pytest.mark.parametrize("name", ["rica", "sparse-ae", "rbm", "conv", "cat"])
def test_every_design_still_builds_from_its_config(name: str) -> None:
    """The config layer passes validated values; none of them may be refused (small fields for 16x16 examples)."""
    config = ModelConfig(name=name, features=8, receptive_field=6, maps=2, pool=3, lcn=3, weight_decay=0.0)
    model = build_model(config, 256, seed=0, shape=(1, 16, 16))
    assert model.loss(torch.randn(4, 256)).isfinite()
