"""Reconstruction and penalty terms as small composable functions on batches (first dimension = examples).

Every term is a mean over the examples of the batch (a sum over each example's values), so terms add up and a
design's cost is ``squared_reconstruction + penalty(model.penalty) + weight_decay(model.weight_decay)``.
:func:`penalty` turns a parsed ``model.penalty`` (:class:`~downpour.penalty_spec.PenaltySpec`) into its term.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from downpour.errors import ConfigError
from downpour.penalty_spec import PenaltySpec, parse_penalty

_KL_CLAMP = 1e-6  # keeps log(ρ̂) and log(1 − ρ̂) finite when a unit saturates


def squared_reconstruction(reconstruction: Tensor, target: Tensor) -> Tensor:
    """Mean over examples of ``‖x̂ − x‖²`` (summed over the example's dimensions).

    The reconstruction term of RICA (Le et al., NIPS 2011) and of the cat network (Le et al., ICML 2012); the UFLDL
    sparse autoencoder writes it with a factor ½, which only rescales the penalty weights.
    """
    return (reconstruction - target).pow(2).flatten(1).sum(1).mean()


def smooth_l1(activations: Tensor, *, epsilon: float) -> Tensor:
    """Mean over examples of ``Σⱼ sqrt(ε + hⱼ²)``, the smoothed L1 sparsity penalty of RICA (Le et al. 2011)."""
    return torch.sqrt(epsilon + activations.pow(2)).flatten(1).sum(1).mean()


def pooled_smooth_l1(pooled: Tensor) -> Tensor:
    """Mean over examples of ``Σₖ sqrt(ε + Σ_{j∈Pₖ} hⱼ²)`` given ``pooled`` = the L2 pooling's output.

    The pooled RICA/TICA penalty of the cat network (Le et al., ICML 2012, eq. 1; Hyvärinen et al. 2009): units in
    one pooling neighbourhood share one smoothed-L1 cost, so they learn similar (invariant) templates.
    """
    return pooled.flatten(1).sum(1).mean()


def l1_activity(activations: Tensor) -> Tensor:
    """Mean over examples of ``Σⱼ |hⱼ|``: the L1 sparsity penalty on hidden activations (Olshausen & Field 1996)."""
    return activations.abs().flatten(1).sum(1).mean()


def l2_activity(activations: Tensor) -> Tensor:
    """Mean over examples of ``Σⱼ hⱼ²``: an L2 (energy) penalty on hidden activations; shrinks, does not sparsify."""
    return activations.pow(2).flatten(1).sum(1).mean()


def kl_sparsity(activations: Tensor, *, target: float) -> Tensor:
    """``Σⱼ KL(ρ ‖ ρ̂ⱼ) = Σⱼ ρ log(ρ/ρ̂ⱼ) + (1 − ρ) log((1 − ρ)/(1 − ρ̂ⱼ))``, ρ̂ⱼ = mean over the batch of unit j.

    The sparsity term of the UFLDL sparse autoencoder (Ng, *Sparse autoencoder*, CS294A lecture notes, 2011): it
    pushes every unit's average activation towards ρ. Activations must lie in (0, 1) (sigmoid units); every axis but
    the first counts as units (a convolutional map's positions are averaged as extra examples of that map).
    """
    if not 0 < target < 1:
        raise ValueError(f"Invalid target: {target} (must be in (0, 1))")
    mean = activations.transpose(0, 1).flatten(1).mean(1) if activations.dim() > 2 else activations.mean(0)  # (K,)
    # kept off 0 and 1 for the logs, but with the gradient of the unclamped mean: a clamp's zero gradient left a
    # saturated unit (ρ̂ < 1e-6) without the push back towards ρ that UFLDL's gradient gives it
    mean = mean + (mean.clamp(_KL_CLAMP, 1 - _KL_CLAMP) - mean).detach()
    kl = target * torch.log(target / mean) + (1 - target) * torch.log((1 - target) / (1 - mean))
    return kl.sum()


def weight_decay(weights: Iterable[Tensor]) -> Tensor:
    """``½ Σ W²`` over ``weights``: the weight-decay term of the UFLDL sparse autoencoder (times ``λ``, the key
    ``model.weight_decay``); its gradient is ``W``."""
    total: Tensor | None = None
    for weight in weights:
        term = 0.5 * weight.pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("weight_decay needs at least one weight")
    return total


def resolve_penalty(text: str, default: PenaltySpec, *, design: str, sigmoid: bool) -> PenaltySpec:
    """The penalty ``model.penalty = text`` names for ``design`` (its ``default`` for ``"default"``); ``kl`` only
    for designs whose hidden units are sigmoid (``sigmoid``), since ρ̂ must be a mean activation in (0, 1)."""
    spec = parse_penalty(text) or default
    if spec.kind == "kl" and not sigmoid:
        raise ConfigError(
            f"invalid model.penalty: {text!r} (kl needs sigmoid hidden units; {design}'s are linear: "
            "use l1, l2 or rica, or model.name = sparse-ae or rbm)"
        )
    return spec


def penalty(spec: PenaltySpec, activations: Tensor, *, epsilon: float, pooled: Tensor | None = None) -> Tensor | None:
    """The weighted term of ``spec`` on ``activations`` (None for ``none``); ``rica`` uses ``pooled`` (the L2
    pooling of the activations, computed with ``epsilon``) when the design pools, else the unpooled smooth L1."""
    if spec.kind == "none":
        return None
    if spec.kind == "l1":
        return spec.weight * l1_activity(activations)
    if spec.kind == "l2":
        return spec.weight * l2_activity(activations)
    if spec.kind == "kl":
        return spec.weight * kl_sparsity(activations, target=spec.target)
    if spec.kind == "rica":
        term = pooled_smooth_l1(pooled) if pooled is not None else smooth_l1(activations, epsilon=epsilon)
        return spec.weight * term
    raise ValueError(f"Invalid penalty kind: {spec.kind!r}")


def regularised(cost: Tensor, *terms: Tensor | None) -> Tensor:
    """``cost`` plus every term that is not None (in order, so that an absent term leaves ``cost`` bit-identical)."""
    for term in terms:
        if term is not None:
            cost = cost + term
    return cost


def decay_term(coefficient: float, weights: Iterable[Tensor]) -> Tensor | None:
    """``coefficient · ½ Σ W²`` (None when the coefficient is 0, so the cost is unchanged bit for bit)."""
    return coefficient * weight_decay(weights) if coefficient > 0 else None
