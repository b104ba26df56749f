"""Paired significance tests for two arms run on the same seeds (:mod:`downpour.study.optima`): exact McNemar,
Stuart–Maxwell marginal homogeneity, Wilcoxon signed-rank, each with its effect size (scipy does the
distributions)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from downpour.study.tilted_wells import DIVERGED


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

    base, other = rankable(np.asarray(base, float), np.asarray(other, float))
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


def rankable(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
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
