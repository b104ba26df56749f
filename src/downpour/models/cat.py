"""The "cat" network (Le, Ranzato, Monga, Devin, Chen, Corrado, Dean & Ng, ICML 2012).

Stacked stages of locally connected filtering (untied weights) → L2 pooling → local contrast normalization, each
stage trained with the reconstruction-ICA cost of the paper:
``‖W₂ᵀ W₁ x − x‖² + λ Σⱼ sqrt(ε + Hⱼ(W₁ x)²)``, H the L2 pooling, W₁ the encoding and W₂ the decoding weights
(the paper writes the same cost with its weights transposed: ``‖W₂W₁ᵀx − x‖²``).

``greedy = True``: every stage learns its own cost on the previous stage's output with no gradient across stages
(layer-wise learning, all stages at once). ``greedy = False``: the stage costs are summed and differentiated
through the whole stack. ``tied = True`` puts convolution (one set of templates for every location) in place of
the local connections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from downpour.errors import ConfigError
from downpour.models.shapes import as_images, require_examples
from downpour.nn import L2Pool2d, LocalContrastNorm2d, LocallyConnected2d
from downpour.nn import arguments as check
from downpour.nn.skip import SkipPlan, active_fields
from downpour.objectives import decay_term, penalty, regularised, squared_reconstruction
from downpour.penalty_spec import PenaltySpec


@dataclass(frozen=True)
class StageShape:
    """Sizes through one stage: input, filter responses, pooled (= normalised) output."""

    in_channels: int
    in_size: int
    response_size: int
    pooled_size: int


def stage_shapes(
    channels: int, size: int, *, stages: int, receptive_field: int, pool: int, maps: int, lcn: int = 1
) -> list[StageShape]:
    """The sizes of every stage, or a :class:`ConfigError` naming the key that makes an image too small."""
    shapes = []
    for index in range(stages):
        response = size - receptive_field + 1
        if response < 1:
            raise ConfigError(
                f"invalid model.receptive_field: {receptive_field} (stage {index + 1} sees {size}x{size} inputs; "
                f"use a smaller field, fewer model.stages or larger examples: data.source = natural-images with "
                f"data.image_size, or data.patch_size with natural-patches)"
            )
        pooled = response - pool + 1
        if pooled < 1:
            raise ConfigError(f"invalid model.pool: {pool} (stage {index + 1} has {response}x{response} responses)")
        if pooled <= lcn // 2:
            raise ConfigError(f"invalid model.lcn: {lcn} (stage {index + 1} pools to {pooled}x{pooled}, too small)")
        shapes.append(StageShape(channels, size, response, pooled))
        channels, size = maps, pooled  # the next stage sees this stage's maps
    return shapes


class CatStage(nn.Module):
    """One stage: ``h = W₁x`` (locally connected or convolution), L2 pooling of ``h``, contrast normalization.

    With ``skip_variance = τ > 0``, receptive fields whose input variance is below τ output zero and (on the CPU
    kernels) are not computed, in the encoder and the decoder alike (:mod:`downpour.nn.skip`).
    """

    def __init__(self, in_channels: int, in_size: int, *, receptive_field: int, maps: int, pool: int, lcn: int,
                 tied: bool, sparsity: float, epsilon: float, skip_variance: float = 0.0,
                 penalty: PenaltySpec | None = None, weight_decay: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        if skip_variance > 0 and tied:
            raise ConfigError("invalid model.skip_variance: skipping needs untied layers (model.tied = false)")
        self.in_channels, self.in_size, self.tied = in_channels, in_size, tied
        self.sparsity, self.epsilon, self.skip_variance = sparsity, epsilon, skip_variance
        self.penalty = penalty if penalty is not None else PenaltySpec("rica", sparsity)  # λ Σ sqrt(ε + H(h²))
        self.weight_decay = weight_decay
        self.skip_counts = torch.zeros(3, dtype=torch.float64)  # fields seen, zeroed, not computed
        if tied:
            self.encoder = nn.Conv2d(in_channels, maps, receptive_field, bias=False)
        else:
            self.encoder = LocallyConnected2d(in_channels, maps, in_size, receptive_field)
        self.decoder_weight = nn.Parameter(self.encoder.weight.detach().clone())  # W₂, initialised as W₁
        self.pool = L2Pool2d(pool, stride=1, epsilon=epsilon)
        self.norm = LocalContrastNorm2d(lcn)

    def reset_parameters(self) -> None:
        """W₁ initialised anew (the encoder's own initialisation) and W₂ as a copy of it, as at construction; also for
        a stage built on the ``meta`` device and materialised with ``to_empty``."""
        self.encoder.reset_parameters()
        with torch.no_grad():
            self.decoder_weight.copy_(self.encoder.weight)

    def active(self, x: Tensor) -> SkipPlan | None:
        """The fields to compute for ``x`` (None when nothing is skipped), counted in :attr:`skip_counts`: one plan
        shared by the encoder, the decoder and their backward passes."""
        if self.skip_variance <= 0:
            return None
        active = active_fields(x, self.encoder.kernel_size, self.encoder.stride, self.skip_variance)
        plan = self.encoder.skip_plan(active, x.shape[0])
        seen = active.numel()
        zeroed, skipped = (0.0, 0.0) if plan is None else (plan.zeroed_fraction, plan.skipped_fraction)
        if math.isnan(zeroed):  # a mask mapped by torch.func.vmap: how many fields it zeroes is not known here
            return plan
        self.skip_counts += torch.tensor([seen, seen * zeroed, seen * skipped], dtype=torch.float64)
        return plan

    def encode(self, x: Tensor, active: SkipPlan | None = None) -> Tensor:
        """Filter responses ``W₁x``: ``(B, C, S, S) -> (B, maps, S', S')``."""
        return self.encoder(x) if active is None else self.encoder(x, active)

    def decode(self, h: Tensor, active: SkipPlan | None = None) -> Tensor:
        """Reconstruction ``W₂ᵀh`` back in the stage's input space."""
        if self.tied:
            return F.conv_transpose2d(h, self.decoder_weight)
        return self.encoder.transpose(h, self.decoder_weight, active)

    def cost(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The stage's RICA cost on ``x`` (mean over examples) and its pooled responses."""
        active = self.active(x)
        h = self.encode(x, active)
        pooled = self.pool(h)  # sqrt(ε + Σ_neighbourhood h²)
        cost = regularised(squared_reconstruction(self.decode(h, active), x),
                           penalty(self.penalty, h, epsilon=self.epsilon, pooled=pooled),
                           decay_term(self.weight_decay, [self.encoder.weight, self.decoder_weight]))  # fmt: skip
        return cost, pooled

    def forward(self, x: Tensor) -> Tensor:
        """The stage's output: contrast-normalised pooled responses."""
        return self.norm(self.pool(self.encode(x, self.active(x))))


class CatNetwork(nn.Module):
    """Stages of :class:`CatStage` over ``(channels, size, size)`` images; ``loss`` is the sum of stage costs."""

    def __init__(self, shape: tuple[int, int, int], *, stages: int = 1, receptive_field: int = 18, maps: int = 8,
                 pool: int = 5, lcn: int = 5, greedy: bool = True, tied: bool = False, sparsity: float = 0.1,
                 epsilon: float = 0.01, skip_variance: float = 0.0, penalty: PenaltySpec | None = None,
                 weight_decay: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        owner = type(self).__name__
        shape = check.sizes(owner, "shape", shape, 3)  # type: ignore[assignment]
        channels, height, width = shape
        if height != width:
            raise ConfigError(f"the cat network takes square images, got {height}x{width}")
        stages = check.integer(owner, "stages", stages)
        receptive_field = check.integer(owner, "receptive_field", receptive_field)
        maps, pool = check.integer(owner, "maps", maps), check.integer(owner, "pool", pool)
        lcn = check.integer(owner, "lcn", lcn)
        check.require(lcn % 2 == 1, owner, "lcn", lcn, "an odd integer >= 1 (a centred window)")
        tied = check.flag(owner, "tied", tied)
        for name, value in (("sparsity", sparsity), ("epsilon", epsilon), ("skip_variance", skip_variance),
                            ("weight_decay", weight_decay)):  # fmt: skip
            check.number(owner, name, value)
        check.penalty(owner, penalty if penalty is not None else PenaltySpec("rica", sparsity), sigmoid=False)
        self.shape, self.greedy = shape, check.flag(owner, "greedy", greedy)
        self.shapes = stage_shapes(
            channels, height, stages=stages, receptive_field=receptive_field, pool=pool, maps=maps, lcn=lcn
        )
        self.stages = nn.ModuleList()
        in_channels = channels
        for stage_shape in self.shapes:
            self.stages.append(
                CatStage(in_channels, stage_shape.in_size, receptive_field=receptive_field, maps=maps, pool=pool,
                         lcn=lcn, tied=tied, sparsity=sparsity, epsilon=epsilon, skip_variance=skip_variance,
                         penalty=penalty, weight_decay=weight_decay)
            )  # fmt: skip
            in_channels = maps
        self.filter_shape = (channels, receptive_field, receptive_field)

    def reset_parameters(self) -> None:
        """Every stage's weights initialised anew (:meth:`CatStage.reset_parameters`): after a build on the ``meta``
        device and ``to_empty``. (A loop calling ``reset_parameters`` on every submodule works too, but resets each
        encoder after its stage, so W₂ starts as a different random draw than W₁.)"""
        for stage in self.stages:
            stage.reset_parameters()

    def _images(self, x: Tensor) -> Tensor:
        return as_images(x, self.shape, "CatNetwork", like=self.stages[0].encoder.weight)  # (B, C, S, S)

    def forward(self, x: Tensor) -> Tensor:
        """The last stage's output for flat ``(B, C·S·S)`` or image ``(B, C, S, S)`` input."""
        x = self._images(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def loss(self, x: Tensor) -> Tensor:
        """Σ over stages of the stage's RICA cost; greedy stages see their input without gradient."""
        require_examples(x, "CatNetwork")
        x = self._images(x)
        total = x.new_zeros(())
        for stage in self.stages:
            if self.greedy:
                x = x.detach()
            cost, pooled = stage.cost(x)
            total = total + cost
            x = stage.norm(pooled)
        return total

    def skip_summary(self) -> dict[str, float] | None:
        """Fractions of receptive fields zeroed (flat) and not computed since the last call; None without skipping."""
        counts = sum((stage.skip_counts for stage in self.stages), torch.zeros(3, dtype=torch.float64))
        for stage in self.stages:
            stage.skip_counts.zero_()
        if self.stages[0].skip_variance <= 0 or counts[0] == 0:
            return None
        return {"fields": int(counts[0]), "zeroed_fraction": float(counts[1] / counts[0]),
                "skipped_fraction": float(counts[2] / counts[0])}  # fmt: skip

    def filters(self, count: int = 64) -> Tensor:
        """First-stage encoding filters ``(K, C·f·f)``: every map at up to ``count // maps`` evenly spaced places."""
        weight = self.stages[0].encoder.weight.detach()
        if weight.dim() == 4:  # tied: (maps, C, f, f)
            return weight.flatten(1)
        locations, maps = weight.shape[0], weight.shape[1]  # untied: (L, maps, P)
        places = max(1, min(locations, count // maps))
        picks = torch.linspace(0, locations - 1, places).round().long()
        return weight[picks].reshape(-1, weight.shape[2])  # (places·maps, P)


def layout_report(shape: tuple[int, int, int], **kwargs: object) -> dict[str, object]:
    """Build the network on PyTorch's meta device (no memory) and count its connections and parameters."""
    with torch.device("meta"):
        network = CatNetwork(shape, **kwargs)  # type: ignore[arg-type]
    encoder = sum(st.encoder.weight.numel() * _locations_if_tied(st) for st in network.stages)
    params = sum(p.numel() for p in network.parameters())
    return {
        "shape": list(shape),
        "stages": [vars(s) for s in network.shapes],
        "connections": encoder,  # input-to-unit connections of the encoders (a tied weight counts at every place)
        "parameters": params,  # encoding + decoding weights
        "bytes_fp32": params * 4,
        "gib_fp32": params * 4 / 2**30,
        "flops_per_example": 2 * encoder,
    }


def _locations_if_tied(stage: CatStage) -> int:
    """A tied stage applies its weights at every location; an untied one has a weight per location already."""
    if not stage.tied:
        return 1
    response = stage.in_size - stage.encoder.kernel_size[0] + 1
    return response * response


def build_cat(shape: tuple[int, int, int], config: object, *, seed: int) -> CatNetwork:
    """The cat network of ``config`` (a ``ModelConfig``) for ``shape`` images, initialised from ``seed``."""
    if len(shape) != 3 or math.prod(shape) <= 0:
        raise ConfigError(f"the cat network needs image examples (C, H, W), got {shape}")
    from downpour.models.first_layer import apply_first_layer
    from downpour.objectives import resolve_penalty

    spec = resolve_penalty(config.penalty, PenaltySpec("rica", config.sparsity), design="cat", sigmoid=False)  # type: ignore[attr-defined]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = CatNetwork(
            shape,
            stages=config.stages,  # type: ignore[attr-defined]
            receptive_field=config.receptive_field,  # type: ignore[attr-defined]
            maps=config.maps,  # type: ignore[attr-defined]
            pool=config.pool,  # type: ignore[attr-defined]
            lcn=config.lcn,  # type: ignore[attr-defined]
            greedy=config.greedy,  # type: ignore[attr-defined]
            tied=config.tied,  # type: ignore[attr-defined]
            sparsity=config.sparsity,  # type: ignore[attr-defined]
            epsilon=config.epsilon,  # type: ignore[attr-defined]
            skip_variance=config.skip_variance,  # type: ignore[attr-defined]
            penalty=spec,
            weight_decay=config.weight_decay,  # type: ignore[attr-defined]
        )
    first = network.stages[0]
    apply_first_layer(network, first.encoder.weight, config, network.filter_shape, seed=seed, design="cat")
    if config.init != "learned":  # type: ignore[attr-defined]
        with torch.no_grad():
            first.decoder_weight.copy_(first.encoder.weight)  # W₂ starts as W₁, as in the default init
    return network
