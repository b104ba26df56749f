"""Hand-designed first-layer templates: Gabor functions and differences of Gaussians.

The early visual areas of the brain are laid out regularly: V1 simple cells respond like Gabor functions (a
sinusoid under a Gaussian envelope; Daugman 1985, Jones & Palmer 1987), retinal and LGN cells like a centre minus
a surround, a difference of Gaussians (Rodieck 1965; Marr & Hildreth 1980). These banks let a design start from
(and, with ``model.freeze_first``, keep) such templates in place of learned ones.

Coordinates: ``x`` runs along columns (left to right), ``y`` along rows (top to bottom); a Gabor at angle θ varies
along the direction (cos θ, sin θ), so its strongest Fourier component is at frequency f·(cos θ, sin θ).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from downpour.nn import arguments as check

TEMPLATE_KINDS = ("gabor", "dog", "random")
GABOR_MIN_WAVELENGTH = 2.5  # pixels: a little above the Nyquist limit of 2
SURROUND_RATIO = 2.0  # σ_surround / σ_centre of the difference of Gaussians


def _grid(size: int) -> tuple[Tensor, Tensor]:
    """Pixel coordinates ``(y, x)``, each ``(size, size)``."""
    axis = torch.arange(size, dtype=torch.float64)
    return torch.meshgrid(axis, axis, indexing="ij")


def gabor(size: int, *, theta: float, frequency: float, phase: float, sigma: float,
          center: tuple[float, float] | None = None) -> Tensor:  # fmt: skip
    """``exp(−r²/2σ²) · cos(2πf·(x cos θ + y sin θ) + φ)`` on a ``size × size`` grid, r measured from ``center``
    (``(y, x)``, default the middle): a Gabor function cropped to the field, ``(size, size)`` float64."""
    check.integer("gabor", "size", size)
    check.number("gabor", "sigma", sigma, positive=True)
    check.number("gabor", "frequency", frequency)
    y, x = _grid(size)
    cy, cx = center if center is not None else ((size - 1) / 2, (size - 1) / 2)
    dy, dx = y - cy, x - cx
    envelope = torch.exp(-(dx**2 + dy**2) / (2 * sigma**2))
    return envelope * torch.cos(2 * math.pi * frequency * (dx * math.cos(theta) + dy * math.sin(theta)) + phase)


def difference_of_gaussians(size: int, *, sigma: float, ratio: float = SURROUND_RATIO, on: bool = True,
                            center: tuple[float, float] | None = None) -> Tensor:  # fmt: skip
    """Centre minus surround, ``G_σ − G_{ratio·σ}`` (each normalised to unit sum, so a flat input gives about 0);
    negated for an off-centre cell: ``(size, size)`` float64."""
    check.integer("difference_of_gaussians", "size", size)
    check.number("difference_of_gaussians", "sigma", sigma, positive=True)
    check.number("difference_of_gaussians", "ratio", ratio, positive=True)
    y, x = _grid(size)
    cy, cx = center if center is not None else ((size - 1) / 2, (size - 1) / 2)
    r2 = (x - cx) ** 2 + (y - cy) ** 2
    centre = torch.exp(-r2 / (2 * sigma**2))
    surround = torch.exp(-r2 / (2 * (ratio * sigma) ** 2))
    dog = centre / centre.sum() - surround / surround.sum()
    return dog if on else -dog


def gabor_frequencies(size: int) -> list[float]:
    """Octave-spaced frequencies (cycles/pixel) whose wavelength fits the field: 1/2.5, 1/5, 1/10, ... ≥ 1/size."""
    frequencies, wavelength = [], GABOR_MIN_WAVELENGTH
    while wavelength <= max(size, GABOR_MIN_WAVELENGTH):
        frequencies.append(1 / wavelength)
        wavelength *= 2
    return frequencies


def gabor_bank(size: int, *, orientations: int = 8, frequencies: list[float] | None = None,
               phases: tuple[float, ...] = (0.0, math.pi / 2),
               center: tuple[float, float] | None = None) -> Tensor:  # fmt: skip
    """Gabors over orientations θ = kπ/orientations × frequencies × phases, envelope σ = 0.5/f (about one octave
    of bandwidth), cropped to the field: ``(orientations·len(frequencies)·len(phases), size, size)``, unit norm."""
    check.integer("gabor_bank", "size", size, minimum=2)  # a Gabor needs a field of at least 2x2
    check.integer("gabor_bank", "orientations", orientations)
    check.require(len(phases) > 0, "gabor_bank", "phases", phases, "at least one phase")
    check.require(frequencies is None or len(frequencies) > 0, "gabor_bank", "frequencies", frequencies,
                  "None or at least one frequency")  # fmt: skip
    frequencies = frequencies if frequencies is not None else gabor_frequencies(size)
    bank = [
        gabor(size, theta=math.pi * k / orientations, frequency=f, phase=phase, sigma=0.5 / f, center=center)
        for f in frequencies
        for k in range(orientations)
        for phase in phases
    ]
    return _unit(torch.stack(bank))  # (N, size, size)


def dog_bank(size: int, *, sigmas: list[float] | None = None, centers: int = 1) -> Tensor:
    """On- and off-centre differences of Gaussians at ``centers × centers`` places × centre widths ``sigmas``
    (default 0.5, 1, 2, ... up to size/6 px): ``(centers²·len(sigmas)·2, size, size)``, unit norm."""
    check.integer("dog_bank", "size", size, minimum=3)  # a centre and its surround need a field of at least 3x3
    check.integer("dog_bank", "centers", centers)
    check.require(sigmas is None or len(sigmas) > 0, "dog_bank", "sigmas", sigmas, "None or at least one width")
    if sigmas is None:
        sigmas, sigma = [], 0.5
        while sigma <= max(size / 6, 0.5):
            sigmas.append(sigma)
            sigma *= 2
    places = _places(size, centers)
    bank = [
        difference_of_gaussians(size, sigma=s, on=on, center=c) for c in places for s in sigmas for on in (True, False)
    ]
    return _unit(torch.stack(bank))


def _places(size: int, n: int) -> list[tuple[float, float]]:
    """The centres of an ``n × n`` grid of equal cells over the field (the middle when n = 1); grids of different
    powers of two share no centre, so banks at 1, 2, 4, ... places never repeat a template."""
    coords = [(k + 0.5) / n * size - 0.5 for k in range(n)]
    return [(cy, cx) for cy in coords for cx in coords]


def _unit(bank: Tensor) -> Tensor:
    norms = bank.flatten(1).norm(dim=1).clamp_min(1e-12)
    return bank / norms[:, None, None]


def _fill(make: Callable[[int], Tensor], count: int) -> Tensor:
    """Banks at 1, 2, 4, 8, ... × as many places until ``count`` templates exist; then ``count`` evenly spaced."""
    n = 1
    bank = make(n)
    while bank.shape[0] < count:
        n *= 2
        bank = torch.cat([bank, make(n)])
    picks = torch.linspace(0, bank.shape[0] - 1, count).round().long() if bank.shape[0] > count else torch.arange(count)
    return bank[picks]


def templates(kind: str, count: int, shape: tuple[int, int, int], *,
              generator: torch.Generator | None = None) -> Tensor:  # fmt: skip
    """``count`` first-layer templates for ``(C, f, f)`` fields, flattened ``(count, C·f·f)``, each of unit norm.

    ``gabor`` and ``dog`` repeat each grayscale template on every channel; a bank smaller than ``count`` is
    repeated at more centres across the field (2×2, 4×4, ... places); a larger one is subsampled evenly.
    ``random`` draws i.i.d. Gaussian templates from ``generator``.
    """
    check.require(kind in TEMPLATE_KINDS, "templates", "kind", kind, f"one of {', '.join(TEMPLATE_KINDS)}")
    count = check.integer("templates", "count", count)
    channels, height, width = check.sizes("templates", "shape", shape, 3)
    check.instance("templates", "generator", generator, torch.Generator, "torch.Generator", optional=True)
    if kind == "random":
        bank = torch.randn(count, channels * height * width, generator=generator, dtype=torch.float64)
        return (bank / bank.norm(dim=1, keepdim=True)).float()
    if height != width:
        raise ValueError(f"Invalid shape: {shape} (hand-made templates need square fields)")
    size = height
    if kind == "gabor":
        spatial = _fill(lambda n: torch.cat([gabor_bank(size, center=c) for c in _places(size, n)]), count)
    else:
        spatial = _fill(lambda n: dog_bank(size, centers=n), count)
    flat = spatial.reshape(count, 1, size * size).expand(count, channels, size * size)  # (K, C, f·f)
    return (flat.reshape(count, -1) / math.sqrt(channels)).float()  # (K, C·f·f), unit norm
