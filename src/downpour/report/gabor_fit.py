"""How Gabor-like first-layer filters are: fit a 2-D Gabor function to each, count those with R² > 0.8.

The model fitted to a filter's ``(H, W)`` values (x along columns, y along rows; u, v rotated by θ about (x₀, y₀))::

    g(x, y) = A · exp(−u²/2σᵤ² − v²/2σᵥ²) · cos(2πf·u + φ) + c,
    u = (x − x₀) cos θ + (y − y₀) sin θ,   v = −(x − x₀) sin θ + (y − y₀) cos θ

(the fit of Jones & Palmer 1987 for V1 simple cells, used on learned filters by e.g. Rehn & Sommer 2007), with
``R² = 1 − Σ(w − g)² / Σ(w − w̄)²``. The start comes from the filter's spectrum (the peak gives f and θ), its
energy centroid (x₀, y₀) and a linear least-squares solve for the amplitude and phase; then Levenberg–Marquardt
(:func:`scipy.optimize.least_squares`, ``method="lm"``) refines all nine parameters. A multi-channel filter is
fitted on its mean over channels. At most ``max_filters`` filters are fitted (evenly spaced, a few milliseconds
each), and the result says how many.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from torch import Tensor

R2_THRESHOLD = 0.8
MAX_FILTERS = 256
_QUICK_EVALUATIONS = 15
_PROMISING = 0.5  # R² after the quick run below which a filter is not refined further
_MAX_EVALUATIONS = 100  # Levenberg–Marquardt steps (analytic Jacobian); a Gabor converges in ~10–30


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
    """u, v, the envelope, cos ψ, sin ψ and σᵤ², σᵥ² at every pixel (ψ = 2πf·u + φ)."""
    x0, y0, theta, frequency, phase, log_su, log_sv = params[:7]
    dx, dy = x - x0, y - y0
    u = dx * math.cos(theta) + dy * math.sin(theta)
    v = -dx * math.sin(theta) + dy * math.cos(theta)
    var_u, var_v = (math.exp(2 * min(max(s, -4.0), 8.0)) for s in (log_su, log_sv))  # σ kept in [0.02, 3000]
    envelope = np.exp(-(u**2) / (2 * var_u) - v**2 / (2 * var_v))
    psi = 2 * math.pi * frequency * u + phase
    return u, v, envelope, np.cos(psi), np.sin(psi), var_u, var_v


def _gabor(params: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    _, _, envelope, cos, _, _, _ = _parts(params, y, x)
    return params[7] * envelope * cos + params[8]


def _jacobian(params: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """∂g/∂(x₀, y₀, θ, f, φ, log σᵤ, log σᵥ, A, c) at every pixel: ``(H·W, 9)``."""
    theta, frequency, amplitude = params[2], params[3], params[7]
    u, v, envelope, cos, sin, var_u, var_v = _parts(params, y, x)
    d_u = amplitude * envelope * (-u / var_u * cos - 2 * math.pi * frequency * sin)  # ∂g/∂u
    d_v = amplitude * envelope * cos * (-v / var_v)  # ∂g/∂v
    c, s = math.cos(theta), math.sin(theta)
    columns = [
        -c * d_u + s * d_v,  # x₀: ∂u/∂x₀ = −cos θ, ∂v/∂x₀ = sin θ
        -s * d_u - c * d_v,  # y₀
        v * d_u - u * d_v,  # θ: ∂u/∂θ = v, ∂v/∂θ = −u
        -amplitude * envelope * sin * 2 * math.pi * u,  # f
        -amplitude * envelope * sin,  # φ
        amplitude * envelope * cos * u**2 / var_u,  # log σᵤ
        amplitude * envelope * cos * v**2 / var_v,  # log σᵥ
        envelope * cos,  # A
        np.ones_like(u),  # c
    ]
    return np.stack([col.ravel() for col in columns], 1)


def _start(image: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Initial parameters: spectral peak, energy centroid, linear amplitude and phase."""
    height, width = image.shape
    centred = image - image.mean()
    pad = 4 * max(height, width)
    spectrum = np.abs(np.fft.fft2(centred, s=(pad, pad)))  # (pad, pad); axis 0 = fy, axis 1 = fx
    spectrum[0, 0] = 0.0
    iy, ix = np.unravel_index(int(np.argmax(spectrum)), spectrum.shape)
    fy, fx = np.fft.fftfreq(pad)[iy], np.fft.fftfreq(pad)[ix]
    frequency = max(math.hypot(fx, fy), 1e-3)
    theta = math.atan2(fy, fx)
    energy = centred**2
    total = energy.sum() or 1.0
    x0, y0 = float((energy * x).sum() / total), float((energy * y).sum() / total)
    sigma = min(0.5 / frequency, max(height, width) / 2)
    params = np.array([x0, y0, theta, frequency, 0.0, math.log(sigma), math.log(sigma), 1.0, 0.0])
    # amplitude and phase: g = env·(a cos + b sin) is linear in (a, b, c)
    cos_part = _gabor(params, y, x)
    params[4] = math.pi / 2
    sin_part = -_gabor(params, y, x)  # env·sin(2πfu)
    design = np.stack([cos_part.ravel(), sin_part.ravel(), np.ones(image.size)], 1)  # (H·W, 3)
    (a, b, c), *_ = np.linalg.lstsq(design, image.ravel(), rcond=None)
    params[4] = math.atan2(-b, a)  # a cos t + b sin t = A cos(t + φ), φ = atan2(−b, a)
    params[7], params[8] = math.hypot(a, b), c
    return params


def fit_gabor(image: np.ndarray) -> GaborFit:
    """The best Gabor for one filter ``(H, W)`` (or ``(C, H, W)``, fitted on the channel mean)."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 3:
        image = image.mean(0)
    y, x = np.mgrid[0 : image.shape[0], 0 : image.shape[1]].astype(np.float64)  # each (H, W)
    variance = float(((image - image.mean()) ** 2).sum())
    if variance <= 0:
        return GaborFit(0.0, *([math.nan] * 9))
    from scipy.optimize import least_squares  # here: importing it costs a second that only a fit needs

    params = _start(image, y, x)
    # A short Levenberg–Marquardt run first; only fits that are already promising get the long one (noise is
    # what hits the step limit, and it is what would make 256 fits slow).
    for steps in (_QUICK_EVALUATIONS, _MAX_EVALUATIONS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # exp overflow on a wild trial step is rejected by LM
            result = least_squares(lambda p: (_gabor(p, y, x) - image).ravel(), params,
                                   jac=lambda p: _jacobian(p, y, x), method="lm", max_nfev=steps)  # fmt: skip
        if np.all(np.isfinite(result.x)) and np.all(np.isfinite(result.fun)):
            params = result.x
        if result.status > 0 or 1.0 - 2 * result.cost / variance < _PROMISING:  # converged, or hopeless
            break
    residual = float(((_gabor(params, y, x) - image) ** 2).sum())
    r2 = 1.0 - residual / variance
    x0, y0, theta, frequency, phase, log_su, log_sv, amplitude, offset = (float(p) for p in params)
    sigma_u, sigma_v = (math.exp(min(max(s, -4.0), 8.0)) for s in (log_su, log_sv))  # as the model clips them
    return GaborFit(r2, x0, y0, theta, abs(frequency), phase, sigma_u, sigma_v, amplitude, offset)


def gabor_fraction(filters: Tensor | np.ndarray, shape: tuple[int, int, int], *, threshold: float = R2_THRESHOLD,
                   max_filters: int = MAX_FILTERS) -> dict[str, float | int]:  # fmt: skip
    """The fraction of ``filters`` ``(K, C·H·W)`` whose Gabor fit has R² > ``threshold`` (the run summary's
    ``gabor_fit``): ``fraction``, ``median_r2``, ``fitted`` (how many were fitted: at most ``max_filters``, evenly
    spaced), ``filters`` (K) and ``threshold``."""
    values = filters.detach().float().cpu().numpy() if isinstance(filters, Tensor) else np.asarray(filters)
    count = values.shape[0]
    picks = np.unique(np.linspace(0, count - 1, min(count, max_filters)).round().astype(int))
    r2 = np.array([fit_gabor(values[i].reshape(shape)).r2 for i in picks])
    return {
        "fraction": float((r2 > threshold).mean()),
        "median_r2": float(np.median(r2)),
        "fitted": len(picks),
        "filters": count,
        "threshold": threshold,
    }
