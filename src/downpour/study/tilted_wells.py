"""The local-optima test's task (:mod:`downpour.study.optima`): separable tilted double wells, whose minima, their
losses and their basins of attraction are all known in closed form."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from downpour.errors import ConfigError

_TILT_LIMIT = 8.0 / (3.0 * math.sqrt(3.0))  # |c| below this: (x² − 1)² + c·x has two minima


DIVERGED = -1  # the class of a run that diverged


class Minimum(NamedTuple):
    """One minimum of :class:`TiltedWells`: its name (``m0`` is the global one), location, expected loss, and
    which well (``-1`` left, ``+1`` right) it sits in along each coordinate."""

    name: str
    location: tuple[float, ...]
    loss: float
    wells: tuple[int, ...]


def tilted_well_roots(tilt: float) -> tuple[float, float, float]:
    """The stationary points of ``(x² − 1)² + c·x``: ``(left minimum, local maximum, right minimum)``.

    They are the roots of ``4x³ − 4x + c = 0``, by the trigonometric formula for a cubic with three real roots:
    ``x_k = (2/√3)·cos(φ/3 − 2πk/3)``, ``φ = arccos(−3√3·c/8)``, ``k = 0, 1, 2``.
    """
    if not abs(tilt) < _TILT_LIMIT:
        raise ConfigError(f"invalid tilt: {tilt!r} (|c| must be < 8/(3√3) ≈ {_TILT_LIMIT:.4f} for two wells)")
    phi = math.acos(-3.0 * math.sqrt(3.0) * tilt / 8.0)
    roots = sorted(2.0 / math.sqrt(3.0) * math.cos(phi / 3.0 - 2.0 * math.pi * k / 3.0) for k in range(3))
    return roots[0], roots[1], roots[2]


@dataclass(frozen=True)
class TiltedWells:
    """A stochastic, separable, tilted multi-well objective in ``d = len(tilts)`` dimensions with ``2^d`` minima.

    One example is a random tilt ``a ~ N(c, noise²·I)``; its loss is ``ℓ(x; a) = Σᵢ (xᵢ² − 1)² + aᵢ·xᵢ``, and the
    expected loss is ``f(x) = E ℓ(x; a) = Σᵢ (xᵢ² − 1)² + cᵢ·xᵢ``. A mini-batch is ``batch_size`` fresh examples,
    so its gradient is ``∇f(x) + ε`` with ``ε ~ N(0, noise²/batch_size·I)`` (the mean of the batch's tilts is drawn
    directly: ``d`` normals per call instead of ``d·batch_size``).

    Minima, in closed form. Along coordinate ``i``, ``fᵢ(x) = (x² − 1)² + cᵢx`` has stationary points at the roots
    ``Lᵢ < Mᵢ < Rᵢ`` of ``4x³ − 4x + cᵢ`` (:func:`tilted_well_roots`): two minima ``Lᵢ``, ``Rᵢ`` and a local
    maximum ``Mᵢ``. ``f`` is a sum of such terms, so its minima are the ``2^d`` points with each coordinate at
    ``Lᵢ`` or ``Rᵢ``, with loss ``Σᵢ fᵢ(that root)``; the other ``3^d − 2^d`` stationary points are saddles or
    the maximum. For ``cᵢ > 0`` the left well is the deeper one, so the global minimum is ``(L₁, …, L_d)`` and the
    worst is ``(R₁, …, R_d)``. With the default tilts ``(0.3, 0.1)``: ``m0 = (−1.036, −1.012)`` with loss −0.406,
    ``m1 = (−1.036, +0.987)`` with −0.206, ``m2 = (+0.960, −1.012)`` with +0.194 and ``m3 = (+0.960, +0.987)`` with
    +0.394 (basin corner ``M = (0.075, 0.025)``); the barrier out of ``R₁`` is 0.72 high, out of ``L₁`` 1.32, out
    of ``R₂`` 0.90 and out of ``L₂`` 1.10.

    Basins, exactly. The gradient flow of a separable ``f`` moves each coordinate on its own, downhill away from
    ``Mᵢ``: a point with ``xᵢ < Mᵢ`` flows to ``Lᵢ`` and one with ``xᵢ > Mᵢ`` to ``Rᵢ``. So the basin of each
    minimum is an orthant with its corner at ``(M₁, …, M_d)``, and :meth:`classify` is exact (a point exactly on a
    boundary, a set of measure zero, goes to the right well).

    The instance is the simulator's gradient callable: ``task(params, worker, rng) -> (mini-batch loss, gradient)``.
    """

    tilts: tuple[float, ...] = (0.3, 0.1)
    noise: float = 12.0  # standard deviation of one example's tilt around its mean
    batch_size: int = 1

    def __post_init__(self) -> None:
        if not 1 <= len(self.tilts) <= 10:
            raise ConfigError(f"invalid tilts: {self.tilts!r} (1 to 10 dimensions)")
        for tilt in self.tilts:
            tilted_well_roots(tilt)
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise ConfigError(f"invalid noise: {self.noise!r} (must be a finite number >= 0)")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"invalid batch_size: {self.batch_size!r} (must be an integer >= 1)")

    @property
    def dim(self) -> int:
        """Number of parameters ``d``."""
        return len(self.tilts)

    @property
    def gradient_noise(self) -> float:
        """Standard deviation of each coordinate of a mini-batch gradient around ``∇f``: ``noise/√batch_size``."""
        return self.noise / math.sqrt(self.batch_size)

    # -- the expected loss, in closed form ---------------------------------------------------------------------

    def loss(self, x: np.ndarray | Tensor | Sequence[float]) -> np.ndarray:
        """The expected loss ``f(x)`` of points ``(..., d)``, as an array ``(...)`` (NaN or inf where ``x`` is not
        finite)."""
        x = _as_array(x, self.dim)
        c = np.asarray(self.tilts)
        with np.errstate(over="ignore", invalid="ignore"):
            return ((x * x - 1.0) ** 2 + c * x).sum(-1)

    def gradient(self, x: np.ndarray | Tensor | Sequence[float]) -> np.ndarray:
        """The expected gradient ``∇f(x) = 4x(x² − 1) + c`` of points ``(..., d)``, same shape."""
        x = _as_array(x, self.dim)
        with np.errstate(over="ignore", invalid="ignore"):
            return 4.0 * x * (x * x - 1.0) + np.asarray(self.tilts)

    def example_loss(self, x: Tensor, tilt: Tensor) -> Tensor:
        """One example's loss ``ℓ(x; a) = Σᵢ (xᵢ² − 1)² + aᵢ·xᵢ`` in torch (differentiable; for checks)."""
        return ((x * x - 1.0) ** 2 + tilt * x).sum(-1)

    # -- the known minima and their basins ---------------------------------------------------------------------

    def roots(self) -> list[tuple[float, float, float]]:
        """Per coordinate: ``(Lᵢ, Mᵢ, Rᵢ)``, left minimum, local maximum (the basin boundary), right minimum."""
        return [tilted_well_roots(c) for c in self.tilts]

    def minima(self) -> list[Minimum]:
        """All ``2^d`` minima, best first (``m0`` is the global minimum)."""
        roots = self.roots()
        found = []
        for wells in itertools.product((-1, 1), repeat=self.dim):
            location = tuple(r[0] if w < 0 else r[2] for r, w in zip(roots, wells, strict=True))
            found.append((float(self.loss(location)), location, wells))
        found.sort(key=lambda item: item[0])
        return [Minimum(f"m{k}", loc, loss, wells) for k, (loss, loc, wells) in enumerate(found)]

    def barriers(self) -> list[tuple[float, float]]:
        """Per coordinate: the height of the barrier ``fᵢ(Mᵢ) − fᵢ(well)`` out of the left and the right well."""
        out = []
        for c, (left, middle, right) in zip(self.tilts, self.roots(), strict=True):
            top = _well(middle, c)
            out.append((top - _well(left, c), top - _well(right, c)))
        return out

    def classify(self, points: np.ndarray | Tensor | Sequence[float]) -> np.ndarray:
        """The index into :meth:`minima` of the basin holding each point ``(..., d)`` -> ``(...)`` int64;
        :data:`DIVERGED` (−1) for a point that is not finite."""
        x = _as_array(points, self.dim)
        boundary = np.asarray([r[1] for r in self.roots()])
        wells = np.where(x < boundary, -1, 1)  # (..., d)
        lookup = {m.wells: k for k, m in enumerate(self.minima())}
        flat = wells.reshape(-1, self.dim)
        index = np.asarray([lookup[tuple(int(v) for v in row)] for row in flat], dtype=np.int64)
        index = index.reshape(x.shape[:-1])
        return np.where(np.isfinite(x).all(-1), index, DIVERGED)

    def distance_to_minimum(self, points: np.ndarray | Tensor | Sequence[float]) -> np.ndarray:
        """Euclidean distance from each point ``(..., d)`` to the minimum of its basin (inf when not finite)."""
        x = _as_array(points, self.dim)
        classes = self.classify(x)
        locations = np.asarray([m.location for m in self.minima()])  # (2^d, d)
        with np.errstate(over="ignore", invalid="ignore"):
            dist = np.linalg.norm(x - locations[np.maximum(classes, 0)], axis=-1)
        return np.where(classes == DIVERGED, np.inf, dist)

    # -- the simulator's gradient callable ---------------------------------------------------------------------

    def __call__(self, params: Tensor, worker: int, rng: np.random.Generator) -> tuple[float, Tensor]:
        """One mini-batch at ``params``: ``(ℓ(x; ā), ∇f(x) + (ā − c))``, ā the mean tilt of ``batch_size`` fresh
        examples, drawn from ``rng`` (``d`` standard normals per call)."""
        x = params.tolist()
        z = rng.standard_normal(len(x)).tolist()
        s = self.gradient_noise
        loss = 0.0
        grad = []
        for xi, ci, zi in zip(x, self.tilts, z, strict=True):
            a = ci + s * zi
            sq = xi * xi - 1.0
            loss += sq * sq + a * xi
            grad.append(4.0 * xi * sq + a)
        return loss, torch.tensor(grad, dtype=params.dtype)


def _well(x: float, c: float) -> float:
    return (x * x - 1.0) ** 2 + c * x


def _as_array(x: np.ndarray | Tensor | Sequence[float], dim: int) -> np.ndarray:
    array = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)
    if array.ndim == 0 or array.shape[-1] != dim:
        raise ValueError(f"points must have shape (..., {dim}), got {array.shape}")
    return array
