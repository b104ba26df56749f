"""The ``model.penalty`` string, parsed without importing torch (config validation reads it).

Forms (``λ``, ``β`` weights ≥ 0; ``ρ`` a target activation in (0, 1)):

- ``"default"``: the design's own penalty (``rica:<model.sparsity>`` for rica, cat and conv; ``kl:0.05,3`` for
  sparse-ae; ``none`` for rbm);
- ``"none"``: reconstruction only;
- ``"l1:λ"``, ``"l2:λ"``: λ·Σ|h|, λ·Σh² on the hidden activations;
- ``"kl:ρ,β"``: β·Σⱼ KL(ρ ‖ ρ̂ⱼ) on the mean activation ρ̂ⱼ of each hidden unit (sigmoid units only);
- ``"rica:λ"``: λ·Σ sqrt(ε + h²) (pooled through the design's L2 pooling where it has one).

The formulas and sources are in :mod:`downpour.objectives`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from downpour.errors import ConfigError

PENALTIES = ("none", "l1", "l2", "kl", "rica")
FORMS = 'default, none, l1:λ, l2:λ, kl:ρ,β or rica:λ (e.g. "l1:0.1", "kl:0.05,3")'


@dataclass(frozen=True)
class PenaltySpec:
    """One penalty: its kind (one of :data:`PENALTIES`), weight (λ or β) and, for ``kl``, the target ρ."""

    kind: str
    weight: float = 0.0
    target: float = 0.0

    def __str__(self) -> str:
        if self.kind == "none":
            return "none"
        if self.kind == "kl":
            return f"kl:{self.target:g},{self.weight:g}"
        return f"{self.kind}:{self.weight:g}"


def _number(text: str, what: str, key: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"invalid {key}: {spec!r} ({what} {text!r} is not a number; forms: {FORMS})") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"invalid {key}: {spec!r} ({what} must be a finite number >= 0)")
    return value


def parse_penalty(spec: str, *, key: str = "model.penalty") -> PenaltySpec | None:
    """The :class:`PenaltySpec` of ``spec``, or None for ``"default"``; a :class:`ConfigError` names what is wrong."""
    text = spec.strip().lower()
    if text == "default":
        return None
    if text == "none":
        return PenaltySpec("none")
    kind, sep, args = text.partition(":")
    if kind not in PENALTIES:
        raise ConfigError(f"invalid {key}: {spec!r} (unknown penalty {kind!r}; forms: {FORMS})")
    if not sep or not args.strip():
        raise ConfigError(f"invalid {key}: {spec!r} ({kind} needs its weight after a colon; forms: {FORMS})")
    parts = [part.strip() for part in args.split(",")]
    if kind == "kl":
        if len(parts) != 2:
            raise ConfigError(f"invalid {key}: {spec!r} (kl takes a target and a weight: kl:ρ,β, e.g. kl:0.05,3)")
        target = _number(parts[0], "the target ρ", key, spec)
        if not 0 < target < 1:
            raise ConfigError(f"invalid {key}: {spec!r} (the target ρ must be between 0 and 1, exclusive)")
        return PenaltySpec("kl", _number(parts[1], "the weight β", key, spec), target)
    if len(parts) != 1:
        raise ConfigError(f"invalid {key}: {spec!r} ({kind} takes one weight, e.g. {kind}:0.1)")
    return PenaltySpec(kind, _number(parts[0], "the weight λ", key, spec))
