"""The local-optima test (issue 4, item 4): do stale gradients change which minimum SGD reaches?

One guess about Downpour SGD is that staleness helps: a push computed against old parameters lands somewhere its
author did not aim at, which might kick a run out of a poor basin. This module makes the guess testable on a task
whose minima, their losses and their basins are all known in closed form (:class:`TiltedWells`), runs the same
seeds under ``sync`` and ``downpour`` (or any policies) in the discrete-event simulator, and compares the arms
with paired tests (:func:`run_optima`, :func:`compare_arms`, :func:`write_report`).

The design, in one paragraph. Seed ``s`` fixes a start ``x₀`` (uniform in ``[−start_box, start_box]^d``, from
``default_rng([s, 2])``) and the simulator's seed; both arms start from the same ``x₀`` with the same seed, so each
seed is a *pair*. Each arm gets the same number of gradient evaluations (``steps`` pushes) and the same learning
rate **per gradient** (``lr_match="gradient"``, the default): an asynchronous push applies ``lr·g``, a ``sync``
update applies ``(N−b)·lr·mean(g)`` (Goyal et al. 2017's linear scaling rule), so that both arms follow the same
gradient flow for the same time ``steps·lr`` with the same gradient-noise temperature. What differs is how the same
number of gradients is used: ``sync`` takes one large step on ``N`` fresh gradients, ``downpour`` ``N`` small steps,
each on parameters about ``N`` updates old; the arm ``downpour@1`` (one worker: plain sequential SGD, neither
staleness nor large steps) separates the two.
``lr_match="update"`` instead gives every arm the same ``lr`` per server update and the same number of server
updates (``sync`` then needs ``(N−b)·steps`` pushes: N times the compute). A run *reaches* the minimum whose basin
of attraction (under the noise-free gradient flow of the expected loss) holds its final parameters; a run whose
parameters became non-finite, or with a rejected push, *diverged*.
"""

from __future__ import annotations

import itertools
import json
import math
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from downpour.backends.sim import SimSettings, simulate
from downpour.errors import ConfigError
from downpour.ps.policies import Sync, make_policy
from downpour.ps.rules import make_rule
from downpour.study.earlier import as_json, check_earlier

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


# ---------------------------------------------------------------------------------------------------------------
# Paired statistics
# ---------------------------------------------------------------------------------------------------------------


def mcnemar_exact(base_hit: np.ndarray, other_hit: np.ndarray) -> dict[str, Any]:
    """Exact McNemar test on paired booleans (e.g. "reached the global minimum"): a two-sided binomial test on the
    discordant pairs. Returns the counts, ``p`` and the odds ratio ``other_only / base_only`` (the matched-pairs
    effect size; inf when ``base_only`` is 0, NaN when there are no discordant pairs)."""
    from scipy.stats import binomtest

    base_hit, other_hit = np.asarray(base_hit, bool), np.asarray(other_hit, bool)
    base_only = int((base_hit & ~other_hit).sum())
    other_only = int((other_hit & ~base_hit).sum())
    discordant = base_only + other_only
    p = 1.0 if discordant == 0 else float(binomtest(other_only, discordant, 0.5).pvalue)
    odds = math.nan if discordant == 0 else (math.inf if base_only == 0 else other_only / base_only)
    return {
        "base_hits": int(base_hit.sum()),
        "other_hits": int(other_hit.sum()),
        "base_only": base_only,
        "other_only": other_only,
        "p": min(1.0, p),
        "odds_ratio": odds,
    }


def wilcoxon_paired(base: np.ndarray, other: np.ndarray, *, tie: float = 1e-9) -> dict[str, Any]:
    """Wilcoxon signed-rank test on paired final losses (``other − base``), two-sided, zero differences dropped.

    A difference within ``tie·(1 + |base|)`` counts as zero: two arms that reach the same point by different
    summation orders differ by rounding alone, and the rank test would call a consistent sign of rounding errors
    significant.

    Non-finite losses (diverged runs) rank above every finite one. Effect sizes: the matched-pairs rank-biserial
    correlation ``r = (W₊ − W₋)/(W₊ + W₋)`` (−1: ``other`` always lower, +1: always higher), the median and mean
    paired difference, and how many pairs each arm won. ``p = 1`` when every pair ties.
    """
    from scipy.stats import rankdata, wilcoxon

    base, other = _rankable(np.asarray(base, float), np.asarray(other, float))
    diff = other - base
    diff = np.where(np.abs(diff) <= tie * (1.0 + np.abs(base)), 0.0, diff)
    nonzero = diff[diff != 0]
    result: dict[str, Any] = {
        "pairs": len(diff),
        "other_lower": int((diff < 0).sum()),
        "other_higher": int((diff > 0).sum()),
        "ties": int((diff == 0).sum()),
        "median_difference": float(np.median(diff)) if len(diff) else math.nan,
        "mean_difference": float(np.mean(diff)) if len(diff) else math.nan,
    }
    if len(nonzero) == 0:
        return {**result, "statistic": 0.0, "p": 1.0, "rank_biserial": 0.0}
    ranks = rankdata(np.abs(nonzero))
    w_plus, w_minus = float(ranks[nonzero > 0].sum()), float(ranks[nonzero < 0].sum())
    test = wilcoxon(nonzero, zero_method="wilcox", alternative="two-sided")
    return {
        **result,
        "statistic": float(test.statistic),
        "p": float(min(1.0, test.pvalue)),
        "rank_biserial": (w_plus - w_minus) / (w_plus + w_minus),
    }


def _rankable(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Replace non-finite values by one number above every finite value (ranks are all that matter)."""
    finite = np.concatenate([a[np.isfinite(a)] for a in arrays])
    top = 2.0 * float(np.abs(finite).max()) + 1.0 if len(finite) else 1.0
    return tuple(np.where(np.isfinite(a), a, top) for a in arrays)


def stuart_maxwell(base: np.ndarray, other: np.ndarray, categories: int) -> dict[str, Any]:
    """Stuart–Maxwell test of marginal homogeneity for paired categories (McNemar generalized to ``k`` classes):
    do the two arms reach the minima (and divergence) with the same frequencies, given that they are paired?

    ``base``, ``other``: class per pair in ``0..categories−1``. ``χ² = dᵀ S⁻¹ d`` on ``k−1`` of the differences
    ``d_i = n_i· − n_·i`` with ``S_ii = n_i· + n_·i − 2n_ii``, ``S_ij = −(n_ij + n_ji)``; classes no pair uses
    are left out, ``S⁻¹`` is a pseudo-inverse with ``df = rank(S)``; ``p = 1`` when every pair agrees.
    """
    from scipy.stats import chi2

    table = np.zeros((categories, categories), dtype=np.int64)
    np.add.at(table, (np.asarray(base, np.int64), np.asarray(other, np.int64)), 1)
    used = np.flatnonzero(table.sum(0) + table.sum(1))
    sub = table[np.ix_(used, used)].astype(float)
    rows, cols = sub.sum(1), sub.sum(0)
    d = (rows - cols)[:-1]
    s = -(sub + sub.T)
    np.fill_diagonal(s, rows + cols - 2.0 * np.diag(sub))
    s = s[:-1, :-1]
    df = int(np.linalg.matrix_rank(s)) if s.size else 0
    if df == 0:
        return {"table": table.tolist(), "statistic": 0.0, "df": 0, "p": 1.0}
    statistic = float(d @ np.linalg.pinv(s) @ d)
    return {"table": table.tolist(), "statistic": statistic, "df": df, "p": float(chi2.sf(statistic, df))}


def compare_arms(base: dict[str, Any], other: dict[str, Any], *, categories: int) -> dict[str, Any]:
    """Paired comparison of two arms of :func:`run_optima` (dicts with ``minimum`` and ``final_loss`` per seed):
    McNemar on "reached the global minimum", Stuart–Maxwell on the minima reached, Wilcoxon on the final losses."""
    base_min, other_min = np.asarray(base["minimum"]), np.asarray(other["minimum"])
    if len(base_min) != len(other_min):
        raise ValueError(f"arms have {len(base_min)} and {len(other_min)} runs; a paired test needs the same seeds")
    shifted = categories  # divergence is the last category
    return {
        "base": base["name"],
        "other": other["name"],
        "global_minimum": mcnemar_exact(base_min == 0, other_min == 0),
        "minima": stuart_maxwell(
            np.where(base_min == DIVERGED, shifted, base_min),
            np.where(other_min == DIVERGED, shifted, other_min),
            categories + 1,
        ),
        "final_loss": wilcoxon_paired(np.asarray(base["final_loss"], float), np.asarray(other["final_loss"], float)),
    }


# ---------------------------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------------------------

DEFAULTS: dict[str, Any] = {
    "workers": 64,
    "seeds": 100,
    "steps": 4000,
    "lr": 0.002,
}


def start_point(seed: int, dim: int, box: float) -> np.ndarray:
    """The start of seed ``seed``: uniform in ``[−box, box]^dim`` from ``default_rng([seed, 2])`` (a stream of its
    own, apart from the simulator's ``default_rng(seed)`` and ``SeedSequence([seed, 1])``)."""
    return np.random.default_rng([seed, 2]).uniform(-box, box, size=dim)


def _arm_policy(spec: str, workers: int) -> tuple[str, int]:
    """A policy name with its own worker count: ``"downpour@1"`` -> ``("downpour", 1)``, ``"sync"`` -> ``("sync",
    workers)``."""
    name, at, count = spec.partition("@")
    if not at:
        return spec, workers
    if not count.isdigit() or int(count) < 1:
        raise ConfigError(f"invalid policies: {spec!r} (the worker count after '@' must be an integer >= 1)")
    return name, int(count)


def _whole_rounds(steps: int, policies: Sequence[str], workers: int, lr: float) -> int:
    """The largest budget up to ``steps`` pushes that is a whole number of rounds for every ``sync`` arm (every arm
    then gets it, so that all compute the same number of gradients). A last round of the leftover pushes would
    take sync's full-size step on the mean of fewer gradients: over 300 seeds at 64 workers (4,000 pushes: 62
    rounds and 32 pushes) that alone made sync's final losses worse than downpour's (Wilcoxon p = 6e-12, against
    0.067 with whole rounds)."""
    quorums = []
    for spec in policies:
        name, count = _arm_policy(spec, workers)
        policy = make_policy(name, workers=count, lr=lr)
        if isinstance(policy, Sync) and policy.backup_workers:
            raise ConfigError(
                f"invalid policies: {spec!r} with lr_match='gradient' (a sync arm with backup workers drops late "
                "pushes, which count toward the budget, so its rounds cannot be whole: use lr_match='update')"
            )
        if isinstance(policy, Sync):
            quorums.append(policy.quorum)
    unit = math.lcm(*quorums) if quorums else 1
    if steps < unit:
        raise ConfigError(f"invalid steps: {steps} (fewer than {unit} pushes: a whole number of rounds of every sync "
                          f"arm, whose rounds take {', '.join(map(str, quorums))})")  # fmt: skip
    return steps - steps % unit


def _arm_names(policies: Sequence[str]) -> list[str]:
    names: list[str] = []
    for policy in policies:
        name, k = policy, 2
        while name in names:
            name, k = f"{policy}#{k}", k + 1
        names.append(name)
    return names


def run_optima(
    *,
    workers: int = DEFAULTS["workers"],
    seeds: int = DEFAULTS["seeds"],
    steps: int = DEFAULTS["steps"],
    lr: float = DEFAULTS["lr"],
    policies: Sequence[str] = ("sync", "downpour"),
    out: Path | None = None,
    task: TiltedWells | None = None,
    lr_match: str = "gradient",
    start_box: float = 1.6,
    first_seed: int = 0,
    compute_sigma: float = 0.5,
    network_mean: float = 0.0,
    alpha: float = 0.05,
    trace_seeds: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every policy on the same ``seeds`` paired starts in the simulator and compare each with the first.

    ``policies``: :func:`~downpour.ps.policies.make_policy` names, each optionally with ``@N`` to run that arm on
    ``N`` workers instead of ``workers`` (``downpour@1`` is plain sequential SGD: the control with neither
    staleness nor averaging). ``steps``: pushes (gradient evaluations) per run, for every arm (with
    ``lr_match="update"``, server updates per run: ``sync`` then runs ``(N−b)·steps`` pushes). ``lr``: the
    server's SGD learning rate per push; under ``lr_match="gradient"`` a ``sync`` update uses ``(N−b)·lr`` (see the
    module docstring). ``task``: the objective (default :class:`TiltedWells()`). The cluster: ``workers`` workers,
    lognormal compute times with ``compute_sigma``, one-way network delay ``network_mean``. ``trace_seeds``: how
    many seeds' trajectories to keep for the landscape picture. ``out``: when given, :func:`write_report` writes
    there. ``progress``: called with one line after each arm.

    Returns a JSON-ready dict: ``settings``, ``task`` (minima, barriers), ``arms`` (per policy: per seed the start,
    end, start basin, minimum reached, final expected loss, distance to that minimum; plus counts per minimum and
    summaries), ``comparisons`` (each arm against the first: :func:`compare_arms`), ``answer`` (one sentence),
    ``call`` and ``command`` (how to reproduce it), ``seconds`` (wall time), and ``files`` when ``out`` is given.
    """
    started = time.perf_counter()
    task = task or TiltedWells()
    if lr_match not in ("gradient", "update"):
        raise ConfigError(f"invalid lr_match: {lr_match!r} (choose gradient or update)")
    for key, value, low in (("workers", workers, 1), ("seeds", seeds, 1), ("steps", steps, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"invalid {key}: {value!r} (must be an integer >= {low})")
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"invalid lr: {lr!r} (must be a finite number > 0)")
    if len(policies) < 2:
        raise ConfigError(f"invalid policies: {list(policies)!r} (name at least two to compare)")
    if not (math.isfinite(start_box) and start_box > 0):
        raise ConfigError(f"invalid start_box: {start_box!r} (must be > 0)")
    names = _arm_names(policies)
    if lr_match == "gradient":
        steps = _whole_rounds(steps, policies, workers, lr)
    study_settings = {"workers": workers, "seeds": seeds, "first_seed": first_seed, "steps": steps, "lr": lr,
                      "lr_match": lr_match, "policies": list(policies), "start_box": start_box,
                      "compute_sigma": compute_sigma, "network_mean": network_mean, "alpha": alpha,
                      "task": asdict(task)}  # fmt: skip
    if out is not None:  # before any run
        check_earlier(Path(out) / "optima.json", lambda earlier: earlier.get("settings") == as_json(study_settings))
    minima = task.minima()
    seed_list = list(range(first_seed, first_seed + seeds))
    starts = np.stack([start_point(s, task.dim, start_box) for s in seed_list])  # (S, d)
    arms = []
    for name, policy_name in zip(names, policies, strict=True):
        base_name, arm_workers = _arm_policy(policy_name, workers)
        policy = make_policy(base_name, workers=arm_workers, lr=lr)
        is_sync = isinstance(policy, Sync)
        quorum = policy.quorum if isinstance(policy, Sync) else 1
        arm_lr = lr * quorum if (is_sync and lr_match == "gradient") else lr
        arm_steps = steps * quorum if (is_sync and lr_match == "update") else steps
        rule = make_rule("sgd", lr=arm_lr)
        ends, rejected, traces, sim_time, updates, pushes = [], [], [], [], [], []
        for k, seed in enumerate(seed_list):
            settings = SimSettings(
                workers=arm_workers,
                steps=arm_steps,
                compute_sigma=compute_sigma,
                network_mean=network_mean,
                seed=seed,
            )
            path: list[list[float]] = []
            keep = k < trace_seeds
            observe = (lambda t, n, p, path=path: path.append(p.tolist())) if keep else None
            every = max(1, arm_steps // 400) if keep else 0
            params = torch.from_numpy(starts[k].copy())
            result = simulate(params, rule, policy, task, settings, observe=observe, observe_every=every)
            ends.append(result.params.tolist())
            rejected.append(result.rejected)
            sim_time.append(result.sim_time)
            updates.append(result.records.version[-1] if len(result.records) else 0)
            pushes.append(len(result.records))
            if keep:
                traces.append([starts[k].tolist(), *path])
        end = np.asarray(ends, dtype=np.float64)  # (S, d)
        minimum = task.classify(end)
        minimum = np.where(np.asarray(rejected) > 0, DIVERGED, minimum)
        final_loss = task.loss(end)
        final_loss = np.where(np.isfinite(final_loss), final_loss, np.inf)
        counts = {m.name: int((minimum == k).sum()) for k, m in enumerate(minima)}
        counts["diverged"] = int((minimum == DIVERGED).sum())
        start_min = task.classify(starts)
        finite = final_loss[np.isfinite(final_loss)]
        arms.append(
            {
                "name": name,
                "policy": policy_name,
                "workers": arm_workers,
                "lr": arm_lr,
                "steps": arm_steps,
                "pushes": int(max(pushes)),  # pushes handled (the most over seeds)
                "updates": int(max(updates)),  # server updates applied (the most over seeds)
                "seeds": seed_list,
                "start": starts.tolist(),
                "end": end.tolist(),
                "start_minimum": start_min.tolist(),
                "minimum": minimum.tolist(),
                "final_loss": final_loss.tolist(),
                "distance": task.distance_to_minimum(end).tolist(),
                "rejected": rejected,
                "sim_time_mean": float(np.mean(sim_time)),
                "counts": counts,
                "escaped_to_better": int(((minimum >= 0) & (minimum < start_min)).sum()),
                "fell_to_worse": int((minimum > start_min).sum()),
                "final_loss_median": float(np.median(final_loss)),
                "final_loss_mean": float(np.mean(finite)) if len(finite) else math.nan,
                "traces": traces,
            }
        )
        if progress is not None:
            progress(f"{name}: {counts} ({time.perf_counter() - started:.1f} s)")
    comparisons = [compare_arms(arms[0], arm, categories=len(minima)) for arm in arms[1:]]
    call = (
        f"run_optima(workers={workers}, seeds={seeds}, steps={steps}, lr={lr}, policies={tuple(policies)!r}, "
        f"lr_match={lr_match!r}, start_box={start_box}, first_seed={first_seed}, compute_sigma={compute_sigma}, "
        f"network_mean={network_mean}, task={task!r})"
    )
    result: dict[str, Any] = {
        "settings": study_settings,
        "task": {
            "formula": "f(x) = sum_i (x_i^2 - 1)^2 + c_i x_i; one example: c ~ N(c, noise^2 I)",
            "minima": [m._asdict() for m in minima],
            "basin_boundaries": [r[1] for r in task.roots()],
            "barriers": task.barriers(),
            "gradient_noise": task.gradient_noise,
        },
        "arms": arms,
        "comparisons": comparisons,
        "call": call,
        "command": _command(
            workers, seeds, steps, lr, policies, lr_match, start_box, first_seed, compute_sigma, network_mean, task
        ),
    }
    result["answer"] = answer_sentence(result, alpha=alpha)
    result["seconds"] = time.perf_counter() - started
    if out is not None:
        result["files"] = [str(p) for p in write_report(result, Path(out))]
    return result


def _command(
    workers: int,
    seeds: int,
    steps: int,
    lr: float,
    policies: Sequence[str],
    lr_match: str,
    start_box: float,
    first_seed: int,
    compute_sigma: float,
    network_mean: float,
    task: TiltedWells,
) -> str | None:
    """The ``downpour study optima`` command line for these settings, or None when one of them has no flag."""
    other = (lr, tuple(policies), lr_match, start_box, first_seed, compute_sigma, network_mean, task)
    plain = (DEFAULTS["lr"], ("sync", "downpour"), "gradient", 1.6, 0, 0.5, 0.0, TiltedWells())
    if other != plain:
        return None
    args = ["downpour", "study", "optima"]
    for flag, value in (("--workers", workers), ("--seeds", seeds), ("--steps", steps)):
        if value != DEFAULTS[flag[2:]]:
            args += [flag, str(value)]
    return shlex.join(args)


def _p(p: float) -> str:
    return f"{p:.2g}" if p >= 0.001 else f"{p:.1e}"


def answer_sentence(result: dict[str, Any], *, alpha: float = 0.05) -> str:
    """One plain verdict per comparison with the first arm: which arm reached the global minimum more often (exact
    McNemar), whether the minima reached differ (Stuart–Maxwell), which arm ended lower (Wilcoxon), each with its
    p-value and whether it is significant at ``alpha``."""
    arms = {arm["name"]: arm for arm in result["arms"]}
    seeds = result["settings"]["seeds"]
    sentences = []
    for comparison in result["comparisons"]:
        base, other = comparison["base"], comparison["other"]
        g, w, m = comparison["global_minimum"], comparison["final_loss"], comparison["minima"]
        hits = f"{g['other_hits']}/{seeds} runs for {other} vs {g['base_hits']}/{seeds} for {base}"
        if g["p"] < alpha:
            more, fewer = (other, base) if g["other_hits"] > g["base_hits"] else (base, other)
            verdict = f"{more} reached the global minimum significantly more often than {fewer}"
        else:
            verdict = f"no significant difference between {other} and {base} in reaching the global minimum"
        a, b = arms[other], arms[base]
        minima = (
            f"the minima reached {'differ' if m['p'] < alpha else 'do not differ significantly'} "
            f"({_counts(a)} vs {_counts(b)}; Stuart–Maxwell p={_p(m['p'])}; {other} left its starting basin for a "
            f"better minimum in {a['escaped_to_better']} runs and for a worse one in {a['fell_to_worse']}, {base} in "
            f"{b['escaped_to_better']} and {b['fell_to_worse']})"
        )
        if w["p"] < alpha:
            lower = other if w["rank_biserial"] < 0 else base
            loss = f"final losses are significantly lower for {lower}"
        else:
            loss = "final losses do not differ significantly"
        loss += (
            f" ({other} lower in {w['other_lower']} pairs, {base} in {w['other_higher']}, {w['ties']} ties; median "
            f"paired difference {other} − {base} = {w['median_difference']:+.3g}, rank-biserial "
            f"r={w['rank_biserial']:+.2f}; Wilcoxon p={_p(w['p'])})"
        )
        sentences.append(f"{verdict[0].upper()}{verdict[1:]}: {hits} (exact McNemar p={_p(g['p'])}); {minima}; {loss}.")
    return " ".join(sentences)


def _counts(arm: dict[str, Any]) -> str:
    parts = [f"{k} {v}" for k, v in arm["counts"].items() if k != "diverged" or v]
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------


def _json_ready(value: Any) -> Any:
    """Non-finite floats become None (JSON has no inf or NaN); tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        return _json_ready(value.item())
    return value


def write_report(result: dict[str, Any], out: Path) -> list[Path]:
    """Write ``optima.json`` (the whole result, strict JSON: inf and NaN as null), ``optima.md`` (the tables and
    the answer) and three pictures: ``optima_landscape.png`` (the expected loss, its minima and basin boundaries,
    every run's end point per policy and the first seeds' trajectories), ``optima_final_loss.png`` (final-loss
    distributions and paired differences), ``optima_minima.png`` (runs per minimum per policy). Returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "optima.json", out / "optima.md"]
    payload = _json_ready({k: v for k, v in result.items() if k != "files"})
    paths[0].write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
    paths[1].write_text(_markdown(result))
    paths += _pictures(result, out)
    return paths


def _markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    minima = result["task"]["minima"]
    lines = [
        "# The local-optima test",
        "",
        f"**Answer.** {result['answer']}",
        "",
        f"Reproduce: `{result['command']}`" if result.get("command") else f"Reproduce: `{result['call']}`",
        "",
        f"Task: `{result['task']['formula']}` with tilts c = {list(s['task']['tilts'])}, noise = {s['task']['noise']}"
        f", batch size {s['task']['batch_size']} (gradient noise σ = {result['task']['gradient_noise']:.3g} per "
        "coordinate). A run reaches the minimum whose basin (an orthant with its corner at the per-coordinate local "
        f"maxima {[round(b, 4) for b in result['task']['basin_boundaries']]}) holds its final parameters.",
        "",
        f"Cluster: {s['workers']} simulated workers, lognormal compute times (σ = {s['compute_sigma']}), network "
        f"delay {s['network_mean']}; {s['seeds']} paired seeds (the same start and simulator seed in every arm), "
        f"starts uniform in [−{s['start_box']}, {s['start_box']}]^d. Learning rate matched per "
        f"{'gradient' if s['lr_match'] == 'gradient' else 'server update'}: lr = {s['lr']}.",
        "",
        "| minimum | location | loss |",
        "|---|---|---|",
    ]
    lines += [f"| {m['name']} | ({', '.join(f'{v:+.4f}' for v in m['location'])}) | {m['loss']:+.4f} |" for m in minima]
    lines += [
        "",
        "| arm | server lr | pushes | updates | "
        + " | ".join(m["name"] for m in minima)
        + " | diverged | escaped to a better basin | fell to a worse one | median final loss | mean final loss |",
        "|---|---|---|---|" + "---|" * (len(minima) + 5),
    ]
    for arm in result["arms"]:
        counts = " | ".join(str(arm["counts"][m["name"]]) for m in minima)
        lines.append(
            f"| {arm['name']} | {arm['lr']:.4g} | {arm['pushes']} | {arm['updates']} | {counts} | "
            f"{arm['counts']['diverged']} | {arm['escaped_to_better']} | {arm['fell_to_worse']} | "
            f"{arm['final_loss_median']:+.4f} | {arm['final_loss_mean']:+.4f} |"
        )
    lines += [
        "",
        "| comparison | global minimum (McNemar) | minima (Stuart–Maxwell) | final loss (Wilcoxon) |",
        "|---|---|---|---|",
    ]
    for c in result["comparisons"]:
        g, m, w = c["global_minimum"], c["minima"], c["final_loss"]
        lines.append(
            f"| {c['other']} vs {c['base']} | {g['other_hits']} vs {g['base_hits']}; discordant {g['other_only']}/"
            f"{g['base_only']}; odds ratio {g['odds_ratio']:.3g}; p = {_p(g['p'])} | χ² = {m['statistic']:.3g}, "
            f"df = {m['df']}, p = {_p(m['p'])} | lower in {w['other_lower']}/{w['other_higher']} pairs "
            f"({w['ties']} ties); median diff {w['median_difference']:+.3g}; r = {w['rank_biserial']:+.2f}; "
            f"p = {_p(w['p'])} |"
        )
    lines += ["", f"Wall time: {result.get('seconds', math.nan):.1f} s.", ""]
    return "\n".join(lines)


def _pictures(result: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib
    from matplotlib.figure import Figure  # not pyplot: a caller's backend and open figures stay as they were

    task = TiltedWells(**{k: tuple(v) if k == "tilts" else v for k, v in result["settings"]["task"].items()})
    minima = task.minima()
    arms = result["arms"]
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "oxs^vD*P"
    paths = []

    # the landscape, in the first two coordinates (the others at the global minimum)
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    lim = max(2.0, result["settings"]["start_box"] + 0.3)
    grid = np.linspace(-lim, lim, 241)
    gx, gy = np.meshgrid(grid, grid)
    points = np.broadcast_to(np.asarray(minima[0].location), (*gx.shape, task.dim)).copy()  # (H, W, d)
    points[..., 0] = gx
    if task.dim > 1:
        points[..., 1] = gy
    z = task.loss(points)
    ax.contourf(gx, gy, z, levels=np.linspace(z.min(), min(z.max(), z.min() + 8.0), 30), cmap="Greys_r")
    boundaries = [r[1] for r in task.roots()]
    ax.axvline(boundaries[0], color="k", lw=0.8, ls=":")
    if task.dim > 1:
        ax.axhline(boundaries[1], color="k", lw=0.8, ls=":")
    for k, arm in enumerate(arms):
        end = np.asarray(arm["end"], dtype=float)
        ok = np.isfinite(end).all(1)
        end = np.clip(end[ok], -lim, lim)
        ax.scatter(
            end[:, 0],
            end[:, 1] if task.dim > 1 else np.zeros(len(end)),
            s=14,
            alpha=0.6,
            marker=markers[k % len(markers)],
            color=colors[k % len(colors)],
            label=f"{arm['name']} end points",
        )
        for j, trace in enumerate(arm["traces"]):
            t = np.clip(np.asarray(trace, dtype=float), -lim, lim)
            label = f"{arm['name']} path (seed {arm['seeds'][j]})" if j == 0 else None
            y = t[:, 1] if task.dim > 1 else np.zeros(len(t))
            ax.plot(t[:, 0], y, lw=0.7, alpha=0.8, color=colors[k % len(colors)], label=label)
    for m in minima:
        if all(abs(a - b) < 1e-12 for a, b in zip(m.location[2:], minima[0].location[2:], strict=True)):
            y = m.location[1] if task.dim > 1 else 0.0
            ax.plot(m.location[0], y, "*", color="gold", ms=14, mec="k")
            ax.annotate(
                f"{m.name}: f={m.loss:+.3f}",
                (m.location[0], y),
                xytext=(8, 10),
                textcoords="offset points",
                fontsize=9,
                bbox={"boxstyle": "round", "fc": "white", "alpha": 0.8},
            )
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_xlabel("x₁")
    ax.set_ylabel("x₂")
    ax.set_title("expected loss, minima (stars), basin boundaries (dotted), end points")
    ax.legend(loc="lower right", fontsize=8)
    paths.append(out / "optima_landscape.png")
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")

    # final-loss distributions and the paired differences
    fig = Figure(figsize=(11, 4.5))
    (left, right) = fig.subplots(1, 2)
    losses = [_rankable(np.asarray(arm["final_loss"], float))[0] for arm in arms]
    left.boxplot(losses, showfliers=False)
    left.set_xticks(range(1, len(arms) + 1), [arm["name"] for arm in arms])
    rng = np.random.default_rng(0)
    for k, values in enumerate(losses):
        left.scatter(k + 1 + rng.uniform(-0.15, 0.15, len(values)), values, s=8, alpha=0.5, color=colors[k])
    for m in minima:
        left.axhline(m.loss, color="gold", lw=0.8, ls="--")
    left.set_ylabel("final expected loss f(x) (dashed: the minima)")
    left.set_title("final loss per run")
    for k, c in enumerate(result["comparisons"]):
        diff = losses[k + 1] - losses[0]
        right.hist(
            diff,
            bins=30,
            alpha=0.6,
            color=colors[(k + 1) % len(colors)],
            label=f"{c['other']} − {c['base']} (Wilcoxon p={_p(c['final_loss']['p'])})",
        )
    right.axvline(0.0, color="k", lw=0.8)
    right.set_xlabel("paired difference in final loss (same seed)")
    right.set_ylabel("seeds")
    right.legend(fontsize=8)
    right.set_title("paired differences")
    paths.append(out / "optima_final_loss.png")
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")

    # runs per minimum
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    labels = [m.name for m in minima] + ["diverged"]
    width = 0.8 / len(arms)
    for k, arm in enumerate(arms):
        heights = [arm["counts"][name] for name in labels]
        ax.bar(
            np.arange(len(labels)) + (k - (len(arms) - 1) / 2) * width,
            heights,
            width,
            label=arm["name"],
            color=colors[k % len(colors)],
        )
    ax.set_xticks(range(len(labels)), [f"{m.name}\n{m.loss:+.3f}" for m in minima] + ["diverged"])
    ax.set_ylabel("runs")
    g = result["comparisons"][0]["global_minimum"]
    ax.set_title(f"minimum reached per run (global minimum: McNemar p={_p(g['p'])})")
    ax.legend()
    paths.append(out / "optima_minima.png")
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    return paths


__all__ = [
    "DEFAULTS",
    "DIVERGED",
    "Minimum",
    "TiltedWells",
    "answer_sentence",
    "compare_arms",
    "mcnemar_exact",
    "run_optima",
    "start_point",
    "stuart_maxwell",
    "tilted_well_roots",
    "wilcoxon_paired",
    "write_report",
]
