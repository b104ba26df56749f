"""Up-front checks of the arguments of the public constructors (``downpour.nn`` layers, ``downpour.models``).

A bad argument is one ``ValueError`` that names the class, the argument, what is allowed and the value given::

    Invalid input_dim for RICA: must be an integer >= 1, got 0

(a ``TypeError`` where an object of some class is expected, e.g. a ``torch.Generator``), raised before anything is
built, instead of a traceback from deep inside torch or a model that trains on nonsense.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch

from downpour.penalty_spec import PENALTIES, PenaltySpec


def require(ok: bool, owner: str, name: str, value: object, allowed: str) -> None:
    """Raise ``ValueError("Invalid {name} for {owner}: must be {allowed}, got {value!r}")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"Invalid {name} for {owner}: must be {allowed}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # True is an int, never a size


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _sizes_ok(values: Any, length: int, minimum: int = 1) -> bool:
    """Whether ``values`` is a sequence (not a string) of ``length`` integers >= ``minimum``."""
    ok = isinstance(values, Sequence) and not isinstance(values, str) and len(values) == length
    return ok and all(_is_int(v) and v >= minimum for v in values)


def integer(owner: str, name: str, value: Any, *, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` as an ``int`` when it is an integer (a bool is not) in ``minimum..maximum``; else a ``ValueError``."""
    allowed = f"an integer >= {minimum}" if maximum is None else f"an integer {minimum}..{maximum}"
    ok = _is_int(value) and value >= minimum and (maximum is None or value <= maximum)
    require(ok, owner, name, value, allowed)
    return int(value)


def number(owner: str, name: str, value: Any, *, positive: bool = False) -> float:
    """``value`` as a ``float`` when it is a finite real number ``>= 0`` (``> 0`` with ``positive``); else a
    ``ValueError`` (NaN and ±inf included)."""
    ok = _is_real(value) and math.isfinite(value) and (value > 0 if positive else value >= 0)
    require(ok, owner, name, value, f"a finite number {'>' if positive else '>='} 0")
    return float(value)


def flag(owner: str, name: str, value: object) -> bool:
    """``value`` when it is ``True`` or ``False`` (not merely truthy, such as ``"no"``); else a ``ValueError``."""
    require(isinstance(value, bool), owner, name, value, "True or False")
    return bool(value)


def sizes(owner: str, name: str, value: Any, length: int) -> tuple[int, ...]:
    """``value`` as a tuple when it is a sequence of ``length`` integers >= 1 (e.g. a ``(C, H, W)`` shape)."""
    require(_sizes_ok(value, length), owner, name, value, f"{length} integers >= 1")
    return tuple(int(v) for v in value)


def pair(owner: str, name: str, value: Any, *, minimum: int = 1) -> tuple[int, int]:
    """``(value, value)`` for one integer >= ``minimum``, ``value`` as a tuple for a pair of them; else a
    ``ValueError``."""
    values = (value, value) if _is_int(value) else value
    require(_sizes_ok(values, 2, minimum), owner, name, value, f"an integer >= {minimum} or a pair of them")
    return int(values[0]), int(values[1])


def floating_tensor(owner: str, x: object) -> None:
    """A ``TypeError`` unless ``x`` is a floating-point ``torch.Tensor`` (what a layer's input must be)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner} expects a floating-point torch.Tensor, got {type(x).__module__}.{type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{owner} expects a floating-point torch.Tensor, got a {x.dtype} one (e.g. x.float())")


def instance(owner: str, name: str, value: object, cls: type, what: str, *, optional: bool = False) -> None:
    """A ``TypeError`` unless ``value`` is a ``cls`` (or None, with ``optional``); ``what`` names the class to users
    (e.g. ``"torch.Generator"``)."""
    if not (isinstance(value, cls) or (optional and value is None)):
        allowed = f"a {what}" + (" or None" if optional else "")
        raise TypeError(f"Invalid {name} for {owner}: must be {allowed}, got {value!r}")


def penalty(owner: str, value: object, *, sigmoid: bool) -> None:
    """Check a :class:`~downpour.penalty_spec.PenaltySpec`: a known kind, a finite weight >= 0, a ``kl`` target in
    (0, 1), and ``kl`` only for sigmoid hidden units (``sigmoid``: its ρ̂ must be a mean activation in (0, 1))."""
    if not isinstance(value, PenaltySpec):
        raise TypeError(f"Invalid penalty for {owner}: must be a PenaltySpec (e.g. "
                        f"downpour.penalty_spec.parse_penalty('l1:0.1')), got {value!r}")  # fmt: skip
    require(value.kind in PENALTIES, owner, "penalty kind", value.kind, f"one of {', '.join(PENALTIES)}")
    number(owner, "penalty weight", value.weight)
    if value.kind == "kl":
        require(sigmoid, owner, "penalty", value, f"none, l1, l2 or rica (kl needs sigmoid hidden units; {owner}'s "
                "are linear)")  # fmt: skip
        target = value.target
        require(_is_real(target) and 0 < target < 1, owner, "penalty target", target,
                "a kl target ρ in (0, 1), exclusive")  # fmt: skip
