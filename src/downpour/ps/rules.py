"""Server-side update rules: pure functions on tensors, wrapped in small classes that a shard calls.

Each rule reads the shard's current values and state and writes the new ones into ``out`` tensors (which may be
the same tensors, for in-place use in tests). The shard double-buffers, so a rule never sees half of an update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from downpour.errors import ConfigError


class PushMeta(NamedTuple):
    """Who sent an update and against which version (ps-lite's meta: sender and version ride along)."""

    worker: int
    fetched_version: int
    version: int  # the shard's version when it applies this push

    @property
    def staleness(self) -> int:
        """Pushes other than this one applied since the worker fetched: ``version - fetched_version``."""
        return self.version - self.fetched_version


@dataclass
class ShardState:
    """One buffer of a shard: its parameter values and the rule's per-parameter state."""

    values: Tensor
    state: dict[str, Tensor]


def sgd(values: Tensor, update: Tensor, *, lr: float, out: Tensor) -> None:
    """Plain SGD, ``w ← w − lr·g`` (Robbins & Monro 1951)."""
    torch.add(values, update, alpha=-lr, out=out)


def adagrad(
    values: Tensor, sum_sq: Tensor, update: Tensor, *, lr: float, eps: float, out: Tensor, out_sum_sq: Tensor
) -> None:
    """Per-parameter Adagrad, ``G ← G + g²; w ← w − lr·g / (√G + eps)`` (Duchi et al. 2011; DistBelief's server)."""
    torch.addcmul(sum_sq, update, update, out=out_sum_sq)
    denom = out_sum_sq.sqrt().add_(eps)
    torch.addcdiv(values, update, denom, value=-lr, out=out)


# PyTorch's fused CPU/GPU Adagrad kernel (private; present since 2.4). The pure function above is the reference.
_FUSED_ADAGRAD = getattr(torch, "_fused_adagrad_", None)


class Rule(Protocol):
    """The narrow callable a shard applies: ``rule(meta, update, current, out)``."""

    name: str
    state_names: tuple[str, ...]

    def __call__(self, meta: PushMeta, update: Tensor, current: ShardState, out: ShardState) -> None: ...


class SGD:
    """Server-side SGD: ``w ← w − lr·g``."""

    name = "sgd"
    state_names: tuple[str, ...] = ()

    def __init__(self, *, lr: float) -> None:
        if not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"invalid ps.lr: {lr!r} (must be a finite number > 0)")
        self.lr = lr

    def __call__(self, meta: PushMeta, update: Tensor, current: ShardState, out: ShardState) -> None:
        sgd(current.values, update, lr=self.lr, out=out.values)


class Adagrad:
    """Server-side Adagrad as in DistBelief: ``G ← G + g²; w ← w − lr·g / (√G + eps)`` (Duchi et al. 2011)."""

    name = "adagrad"
    state_names: tuple[str, ...] = ("sum_sq",)

    def __init__(self, *, lr: float, eps: float = 1e-8) -> None:
        if not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"invalid ps.lr: {lr!r} (must be a finite number > 0)")
        if not (math.isfinite(eps) and eps > 0):  # an infinite eps makes every step lr·g/∞ = 0: nothing trains
            raise ConfigError(f"invalid ps.adagrad_eps: {eps!r} (must be a finite number > 0)")
        self.lr, self.eps = lr, eps
        self._step = torch.zeros(())  # required by the fused kernel; unused with lr_decay = 0

    def __call__(self, meta: PushMeta, update: Tensor, current: ShardState, out: ShardState) -> None:
        if _FUSED_ADAGRAD is not None and update.dtype == torch.float32:
            # One pass instead of four: PyTorch's fused kernel works in place, so start from a copy.
            if out.values is not current.values:
                out.values.copy_(current.values)
                out.state["sum_sq"].copy_(current.state["sum_sq"])
            _FUSED_ADAGRAD(
                [out.values],
                [update],
                [out.state["sum_sq"]],
                [self._step],
                lr=self.lr,
                lr_decay=0.0,
                weight_decay=0.0,
                eps=self.eps,
                maximize=False,
            )
            return
        adagrad(
            current.values,
            current.state["sum_sq"],
            update,
            lr=self.lr,
            eps=self.eps,
            out=out.values,
            out_sum_sq=out.state["sum_sq"],
        )


def make_rule(name: str, *, lr: float, adagrad_eps: float = 1e-8) -> Rule:
    """The rule named by ``ps.rule``."""
    if name == "sgd":
        return SGD(lr=lr)
    if name == "adagrad":
        return Adagrad(lr=lr, eps=adagrad_eps)
    raise ConfigError(f"invalid ps.rule: {name!r} (choose one of sgd, adagrad)")
