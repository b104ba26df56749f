"""How Gabor-like first-layer filters are: fit a 2-D Gabor function to each, count those with R² > 0.8.

The model fitted to a filter's ``(H, W)`` values (x along columns, y along rows; u, v rotated by θ about (x₀, y₀))::

    g(x, y) = A · exp(−u²/2σᵤ² − v²/2σᵥ²) · cos(2πf·u + φ) + c,
    u = (x − x₀) cos θ + (y − y₀) sin θ,   v = −(x − x₀) sin θ + (y − y₀) cos θ

(the fit of Jones & Palmer 1987 for V1 simple cells, used on learned filters by e.g. Rehn & Sommer 2007), with
``R² = 1 − Σ(w − g)² / Σ(w − w̄)²``. The start comes from the filter's spectrum (the peak gives f and θ), its
energy centroid (x₀, y₀) and a linear least-squares solve for the amplitude and phase; then Levenberg–Marquardt
refines all nine parameters: with residuals r and Jacobian J, each step solves ``(JᵀJ + λ·D) h = −Jᵀr`` (D: the
largest diag(JᵀJ) seen so far, Marquardt 1963 / Moré 1978) and the damping λ follows the gain ratio
ρ = actual / predicted decrease of ½‖r‖² (Nielsen 1999: λ·max(1/3, 1 − (2ρ − 1)³) after a kept step, λ·ν with ν
doubling after a rejected one). All filters are fitted at once, as one batch of 9×9 solves per step (numpy), so 256
filters take a fraction of a second. Every filter gets a short run first; only those with R² ≥ 0.5 by then go on
(noise is what would use up the step limit). A multi-channel filter is fitted on its mean over channels. At most
``max_filters`` filters are fitted (evenly spaced), and the result says how many.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from torch import Tensor

R2_THRESHOLD = 0.8
MAX_FILTERS = 256
_QUICK_STEPS = 25  # Levenberg–Marquardt steps every filter gets
_PROMISING = 0.5  # R² after the quick steps below which a filter is not refined further
_MAX_STEPS = 115  # in all; a Gabor converges in ~10–30
_TOLERANCE = 1e-8  # stop when a kept step lowers ½‖r‖² by less than this fraction, or moves the parameters so little
_DAMPING = 1e-2  # λ at the start
_LOG_SIGMA = (-4.0, 8.0)  # log σ is clipped to this range in the model: σ in [0.02, 3000] pixels


@dataclass(frozen=True)
class GaborFit:
    """One filter's fit: R² and the Gabor's parameters (θ in radians, f in cycles/pixel, σ in pixels)."""

    r2: float
    x0: float
    y0: float
    theta: float
    frequency: float
    phase: float
    sigma_u: float
    sigma_v: float
    amplitude: float
    offset: float


def _parts(params: np.ndarray, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, ...]:
    """For ``params`` ``(B, 9)`` and pixel coordinates ``(N,)``: u, v, the envelope·cos ψ, the envelope·sin ψ, each
    ``(B, N)``, and σᵤ², σᵥ² ``(B, 1)`` (ψ = 2πf·u + φ)."""
    x0, y0, theta, frequency, phase, log_su, log_sv = (params[:, i : i + 1] for i in range(7))  # each (B, 1)
    dx, dy = x - x0, y - y0  # (B, N)
    cos_t, sin_t = np.cos(theta), np.sin(theta)
    u = dx * cos_t + dy * sin_t
    v = -dx * sin_t + dy * cos_t
    var_u, var_v = (np.exp(2 * np.clip(s, *_LOG_SIGMA)) for s in (log_su, log_sv))
    envelope = np.exp(-(u**2) / (2 * var_u) - v**2 / (2 * var_v))
    psi = 2 * math.pi * frequency * u + phase
    return u, v, envelope * np.cos(psi), envelope * np.sin(psi), var_u, var_v


def _gabor(params: np.ndarray, parts: tuple[np.ndarray, ...]) -> np.ndarray:
    """g at every pixel: ``(B, N)``, from :func:`_parts` of ``params``."""
    return params[:, 7:8] * parts[2] + params[:, 8:9]


def _jacobian(params: np.ndarray, parts: tuple[np.ndarray, ...]) -> np.ndarray:
    """Jᵀ: ∂g/∂(x₀, y₀, θ, f, φ, log σᵤ, log σᵥ, A, c) at every pixel, ``(B, 9, N)``, from :func:`_parts` of
    ``params``."""
    theta, frequency, amplitude = params[:, 2:3], params[:, 3:4], params[:, 7:8]
    u, v, envelope_cos, envelope_sin, var_u, var_v = parts
    a_cos, a_sin = amplitude * envelope_cos, amplitude * envelope_sin
    d_u = -a_cos * u / var_u - 2 * math.pi * frequency * a_sin  # ∂g/∂u
    d_v = -a_cos * v / var_v  # ∂g/∂v
    c, s = np.cos(theta), np.sin(theta)
    columns = [
        -c * d_u + s * d_v,  # x₀: ∂u/∂x₀ = −cos θ, ∂v/∂x₀ = sin θ
        -s * d_u - c * d_v,  # y₀
        v * d_u - u * d_v,  # θ: ∂u/∂θ = v, ∂v/∂θ = −u
        -a_sin * 2 * math.pi * u,  # f
        -a_sin,  # φ
        a_cos * u**2 / var_u,  # log σᵤ
        a_cos * v**2 / var_v,  # log σᵥ
        envelope_cos,  # A
        np.ones_like(u),  # c
    ]
    return np.stack(columns, 1)


def _normal_equations(
    params: np.ndarray, parts: tuple[np.ndarray, ...], residual: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """JᵀJ ``(B, 9, 9)`` and Jᵀr ``(B, 9)`` at ``params``."""
    jac_t = _jacobian(params, parts)  # (B, 9, N)
    return jac_t @ jac_t.transpose(0, 2, 1), (jac_t @ residual[..., None])[..., 0]


def _start(images: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Initial parameters ``(B, 9)`` for ``images`` ``(B, H, W)``: spectral peak, energy centroid, linear
    amplitude and phase."""
    count, height, width = images.shape
    centred = images - images.mean((1, 2), keepdims=True)
    pad = 4 * max(height, width)
    spectrum = np.abs(np.fft.fft2(centred, s=(pad, pad)))  # (B, pad, pad); axis 1 = fy, axis 2 = fx
    spectrum[:, 0, 0] = 0.0
    iy, ix = np.unravel_index(np.argmax(spectrum.reshape(count, -1), 1), (pad, pad))  # each (B,)
    fy, fx = np.fft.fftfreq(pad)[iy], np.fft.fftfreq(pad)[ix]
    frequency = np.maximum(np.hypot(fx, fy), 1e-3)
    theta = np.arctan2(fy, fx)
    energy = centred.reshape(count, -1) ** 2  # (B, N)
    total = energy.sum(1)
    total[total == 0] = 1.0
    x0, y0 = (energy * x).sum(1) / total, (energy * y).sum(1) / total
    log_sigma = np.log(np.minimum(0.5 / frequency, max(height, width) / 2))
    zero, one = np.zeros(count), np.ones(count)
    params = np.stack([x0, y0, theta, frequency, zero, log_sigma, log_sigma, one, zero], 1)  # (B, 9)
    # amplitude and phase: g = env·(a cos + b sin) + c is linear in (a, b, c)
    _, _, cos_part, sin_part, _, _ = _parts(params, y, x)  # env·cos(2πfu), env·sin(2πfu): each (B, N)
    design = np.stack([cos_part, sin_part, np.ones_like(cos_part)], -1)  # (B, N, 3)
    normal = design.transpose(0, 2, 1) @ design + 1e-12 * np.eye(3)  # (B, 3, 3)
    rhs = design.transpose(0, 2, 1) @ images.reshape(count, -1, 1)  # (B, 3, 1)
    a, b, c = _solve(normal, rhs[..., 0]).T  # each (B,)
    params[:, 4] = np.arctan2(-b, a)  # a cos t + b sin t = A cos(t + φ), φ = atan2(−b, a)
    params[:, 7], params[:, 8] = np.hypot(a, b), c
    return params


def _levenberg_marquardt(images: np.ndarray, params: np.ndarray, variance: np.ndarray, y: np.ndarray,
                         x: np.ndarray) -> np.ndarray:  # fmt: skip
    """Refine ``params`` ``(B, 9)`` for the flat ``images`` ``(B, N)`` (each of total variance ``variance``); every
    filter stops on its own (converged, hopeless after the quick steps, or out of steps)."""
    parts = _parts(params, y, x)
    residual = _gabor(params, parts) - images  # (B, N)
    cost = 0.5 * (residual**2).sum(1)  # (B,)
    jtj, gradient = _normal_equations(params, parts, residual)  # (B, 9, 9), (B, 9): kept until a step is taken
    scale = np.diagonal(jtj, axis1=1, axis2=2).copy()  # D: the largest diag(JᵀJ) so far, per parameter
    damping, growth = np.full(len(images), _DAMPING), np.full(len(images), 2.0)
    active = variance > 0
    for step in range(_MAX_STEPS):
        if step == _QUICK_STEPS:
            active &= 1.0 - 2 * cost / np.where(variance > 0, variance, 1.0) >= _PROMISING
        rows = np.flatnonzero(active)
        if not len(rows):
            break
        p, g = params[rows], gradient[rows]
        d = np.where(scale[rows] > 0, scale[rows], 1.0)  # (k, 9)
        with np.errstate(all="ignore"):  # a wild trial step may overflow; it is then rejected
            h = _solve(jtj[rows] + (damping[rows, None] * d)[:, :, None] * np.eye(9), -g)  # (k, 9)
            trial = p + h
            trial_parts = _parts(trial, y, x)
            trial_residual = _gabor(trial, trial_parts) - images[rows]  # (k, N)
            trial_cost = 0.5 * (trial_residual**2).sum(1)
            predicted = 0.5 * (h * (damping[rows, None] * d * h - g)).sum(1)  # L(0) − L(h) of the linear model
            rho = (cost[rows] - trial_cost) / predicted  # gain ratio
        kept = np.isfinite(trial_cost) & np.isfinite(trial).all(1) & (predicted > 0) & (rho > 0)
        small = (cost[rows] - trial_cost <= _TOLERANCE * cost[rows]) | (
            np.linalg.norm(h, axis=1) <= _TOLERANCE * (np.linalg.norm(p, axis=1) + _TOLERANCE)
        )
        active[rows[(kept & small) | (damping[rows] > 1e16)]] = False
        taken, refused = rows[kept], rows[~kept]
        params[taken], residual[taken], cost[taken] = trial[kept], trial_residual[kept], trial_cost[kept]
        jtj[taken], gradient[taken] = _normal_equations(trial[kept], tuple(t[kept] for t in trial_parts),
                                                        trial_residual[kept])  # fmt: skip
        scale[taken] = np.maximum(scale[taken], np.diagonal(jtj[taken], axis1=1, axis2=2))
        damping[taken] *= np.maximum(1 / 3, 1 - (2 * rho[kept] - 1) ** 3)
        growth[taken] = 2.0
        damping[refused] *= growth[refused]
        growth[refused] *= 2
    return params


def _solve(matrices: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``matrices⁻¹ rhs`` for a batch ``(k, 9, 9)``, ``(k, 9)``; no step (zeros) for a singular matrix."""
    try:
        return np.linalg.solve(matrices, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError:  # one singular system fails the batch: solve one by one
        return np.stack([_solve_or_zero(m, r) for m, r in zip(matrices, rhs, strict=True)])


def _solve_or_zero(matrix: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``matrix⁻¹ rhs``, or zeros (no step) where ``matrix`` is singular."""
    try:
        return np.linalg.solve(matrix, rhs)
    except np.linalg.LinAlgError:
        return np.zeros_like(rhs)


def fit_gabors(images: np.ndarray) -> list[GaborFit]:
    """The best Gabor for each filter of ``images`` ``(B, H, W)`` (or ``(B, C, H, W)``, fitted on the channel
    mean), fitted together. A constant filter, or one with a NaN or infinite value, gets R² = 0 and NaN
    parameters."""
    images = np.asarray(images, dtype=np.float64)
    if images.ndim == 4:
        images = images.mean(1)
    count, height, width = images.shape
    if count == 0:
        return []
    finite = np.isfinite(images).all((1, 2))  # (B,)
    images = np.where(finite[:, None, None], images, 0.0)  # a non-finite filter is fitted as a constant one
    y, x = (grid.ravel() for grid in np.mgrid[0:height, 0:width].astype(np.float64))  # each (N,), N = H·W
    flat = images.reshape(count, -1)  # (B, N)
    variance = ((flat - flat.mean(1, keepdims=True)) ** 2).sum(1)
    params = _levenberg_marquardt(flat, _start(images, y, x), variance, y, x)
    r2 = 1.0 - ((_gabor(params, _parts(params, y, x)) - flat) ** 2).sum(1) / np.where(variance > 0, variance, 1.0)
    fits = []
    for row, fit_r2, var in zip(params, r2, variance, strict=True):
        if var <= 0:
            fits.append(GaborFit(0.0, *([math.nan] * 9)))
            continue
        x0, y0, theta, frequency, phase, log_su, log_sv, amplitude, offset = (float(p) for p in row)
        sigma_u, sigma_v = (math.exp(min(max(s, _LOG_SIGMA[0]), _LOG_SIGMA[1])) for s in (log_su, log_sv))
        fits.append(GaborFit(float(fit_r2), x0, y0, theta, abs(frequency), phase, sigma_u, sigma_v, amplitude, offset))
    return fits


def fit_gabor(image: np.ndarray) -> GaborFit:
    """The best Gabor for one filter ``(H, W)`` (or ``(C, H, W)``, fitted on the channel mean)."""
    image = np.asarray(image, dtype=np.float64)
    return fit_gabors(image[None])[0]


def gabor_fraction(filters: Tensor | np.ndarray, shape: tuple[int, int, int], *, threshold: float = R2_THRESHOLD,
                   max_filters: int = MAX_FILTERS) -> dict[str, float | int]:  # fmt: skip
    """The fraction of ``filters`` ``(K, C·H·W)`` whose Gabor fit has R² > ``threshold`` (the run summary's
    ``gabor_fit``): ``fraction``, ``median_r2``, ``fitted`` (how many were fitted: at most ``max_filters``, evenly
    spaced), ``filters`` (K) and ``threshold``."""
    values = filters.detach().float().cpu().numpy() if isinstance(filters, Tensor) else np.asarray(filters)
    count = values.shape[0]
    picks = np.unique(np.linspace(0, count - 1, min(count, max_filters)).round().astype(int))
    r2 = np.array([fit.r2 for fit in fit_gabors(values[picks].reshape(len(picks), *shape))])
    return {
        "fraction": float((r2 > threshold).mean()),
        "median_r2": float(np.median(r2)),
        "fitted": len(picks),
        "filters": count,
        "threshold": threshold,
    }
