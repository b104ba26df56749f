"""Hand-made template banks (shapes, orientations, centre-surround) and the Gabor fit of the run summary."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from downpour.nn.templates import (
    difference_of_gaussians,
    dog_bank,
    gabor,
    gabor_bank,
    gabor_frequencies,
    templates,
)
from downpour.report.gabor_fit import fit_gabor, fit_gabors, gabor_fraction


def _peak_angle(image: torch.Tensor) -> float:
    """The angle (mod π) of the strongest Fourier component of ``image`` ``(S, S)``, zero-padded 8×."""
    size = image.shape[0] * 8
    spectrum = torch.fft.fft2(image - image.mean(), s=(size, size)).abs()  # (size, size): axis 0 = fy, 1 = fx
    iy, ix = np.unravel_index(int(spectrum.argmax()), spectrum.shape)
    fy, fx = np.fft.fftfreq(size)[iy], np.fft.fftfreq(size)[ix]
    return math.atan2(fy, fx) % math.pi


@pytest.mark.parametrize("theta", [0.0, math.pi / 8, math.pi / 4, math.pi / 2, 3 * math.pi / 4])
def test_a_gabor_at_angle_theta_has_its_strongest_fourier_component_at_theta(theta: float) -> None:
    image = gabor(16, theta=theta, frequency=0.2, phase=0.0, sigma=3.0)
    difference = abs(_peak_angle(image) - theta) % math.pi
    assert min(difference, math.pi - difference) < math.radians(4)


def test_gabor_bank_shape_orientations_and_unit_norm() -> None:
    bank = gabor_bank(16, orientations=8, frequencies=[0.2, 0.1], phases=(0.0, math.pi / 2))
    assert bank.shape == (8 * 2 * 2, 16, 16)
    assert torch.allclose(bank.flatten(1).norm(dim=1), torch.ones(32, dtype=bank.dtype))
    angles = sorted({round(math.degrees(_peak_angle(bank[i])) / 22.5) % 8 for i in range(0, 16, 2)})
    assert angles == list(range(8))  # the first frequency's 8 orientations are 22.5° apart


def test_difference_of_gaussians_is_centre_surround_and_sums_to_zero() -> None:
    on = difference_of_gaussians(9, sigma=1.0)
    assert on[4, 4] > 0 and on[4, 7] < 0  # excitatory centre, inhibitory surround
    assert abs(float(on.sum())) < 1e-6
    assert torch.equal(difference_of_gaussians(9, sigma=1.0, on=False), -on)
    assert dog_bank(16, centers=2).shape == (4 * 3 * 2, 16, 16)  # 4 places × σ 0.5, 1, 2 (≤ 16/6) × on/off


def test_gabor_frequencies_are_octaves_from_the_nyquist_margin_to_the_field() -> None:
    """Octave-spaced frequencies whose wavelength fits the field (1/2.5, 1/5, 1/10, ... ≥ 1/size): each wavelength
    twice the last, from 2.5 px up to the field's side."""
    assert gabor_frequencies(24) == pytest.approx([1 / 2.5, 1 / 5, 1 / 10, 1 / 20])
    assert gabor_frequencies(40) == pytest.approx([1 / 2.5, 1 / 5, 1 / 10, 1 / 20, 1 / 40])
    assert gabor_frequencies(3) == pytest.approx([1 / 2.5])


@pytest.mark.parametrize("frequency", [0.1, 0.2])
def test_gabor_bank_envelopes_have_sigma_half_a_wavelength(frequency: float) -> None:
    """The bank's envelope σ is 0.5/f (about one octave of bandwidth), measured on the template: at θ = 0 and
    phase 0 the carrier is 1 along the middle column, so that column is the Gaussian envelope alone, and σ follows
    from how it falls d pixels from the centre: v(d)/v(0) = exp(−d²/2σ²)."""
    template = gabor_bank(25, orientations=1, frequencies=[frequency], phases=(0.0,))[0]  # (25, 25), centre (12, 12)
    column = template[:, 12]
    for d in (2, 4):
        sigma = math.sqrt(-(d**2) / (2 * math.log(float(column[12 + d] / column[12]))))
        assert sigma == pytest.approx(0.5 / frequency, rel=1e-9)


def test_difference_of_gaussians_subtracts_a_surround_ratio_times_wider() -> None:
    """``G_σ − G_{ratio·σ}``, each normalised to unit sum, written out here: the surround's width is ratio·σ (its
    variance (ratio·σ)²)."""
    size, sigma, ratio = 15, 1.5, 2.5
    axis = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    r2 = axis.view(-1, 1) ** 2 + axis.view(1, -1) ** 2
    centre, surround = torch.exp(-r2 / (2 * sigma**2)), torch.exp(-r2 / (2 * (ratio * sigma) ** 2))
    expected = centre / centre.sum() - surround / surround.sum()
    torch.testing.assert_close(difference_of_gaussians(size, sigma=sigma, ratio=ratio), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", ["gabor", "dog", "random"])
def test_templates_fill_any_count_with_unit_rows_on_every_channel(kind: str) -> None:
    bank = templates(kind, 100, (3, 8, 8), generator=torch.Generator().manual_seed(0))
    assert bank.shape == (100, 3 * 64)
    assert torch.allclose(bank.norm(dim=1), torch.ones(100), atol=1e-5)
    if kind != "random":
        per_channel = bank.reshape(100, 3, 64)
        assert torch.equal(per_channel[:, 0], per_channel[:, 2])  # the same template on every channel
    assert len({tuple(row.tolist()) for row in bank}) == 100  # no template twice


def test_gabor_fit_recovers_a_known_gabor() -> None:
    image = gabor(16, theta=0.7, frequency=0.2, phase=0.3, sigma=2.5, center=(7.2, 8.1)).numpy()
    fit = fit_gabor(image)
    assert fit.r2 > 0.999
    assert fit.frequency == pytest.approx(0.2, abs=1e-3)
    assert (fit.theta - 0.7) % math.pi == pytest.approx(0.0, abs=1e-3) or (fit.theta - 0.7) % math.pi == pytest.approx(
        math.pi, abs=1e-3
    )
    assert (fit.x0, fit.y0) == pytest.approx((8.1, 7.2), abs=1e-3)


def test_gabor_fraction_accepts_gabors_and_rejects_noise() -> None:
    gabors = templates("gabor", 24, (1, 12, 12))
    noisy = gabors + 0.02 * torch.randn(24, 144, generator=torch.Generator().manual_seed(0))
    assert gabor_fraction(noisy, (1, 12, 12))["fraction"] == 1.0
    noise = torch.randn(24, 144, generator=torch.Generator().manual_seed(1))
    result = gabor_fraction(noise, (1, 12, 12))
    assert result["fraction"] == 0.0 and result["median_r2"] < 0.4
    assert result["fitted"] == 24 and result["threshold"] == 0.8
    assert gabor_fraction(noise, (1, 12, 12), max_filters=5)["fitted"] == 5  # the cap subsamples evenly


def test_filters_fitted_together_get_the_fits_each_gets_alone() -> None:
    """The batched fit treats every filter on its own: a constant filter (R² = 0, no parameters), a clean and a
    noisy Gabor, noise, and a two-channel filter (fitted on its channel mean) come out as when fitted one by one."""
    generator = torch.Generator().manual_seed(2)
    clean = gabor(10, theta=1.1, frequency=0.25, phase=0.0, sigma=2.0).numpy()
    noise = torch.randn(10, 10, generator=generator).numpy()
    two_channel = np.stack([clean, clean + 0.1 * noise])  # (2, 10, 10): its mean is clean + noise / 20
    filters = np.stack([np.ones((2, 10, 10)), np.stack([clean, clean]), np.stack([noise, noise]), two_channel])
    together = fit_gabors(filters)  # (4, 2, 10, 10)
    assert together == [fit_gabor(f) for f in filters]
    assert together[0].r2 == 0.0 and math.isnan(together[0].frequency)
    assert together[1].r2 > 0.999 and together[1].frequency == pytest.approx(0.25, abs=1e-3)
    assert together[2].r2 < 0.5 and 0.9 < together[3].r2 < together[1].r2


def test_no_filters_and_non_finite_filters_fit_as_nothing() -> None:
    """An empty batch gives no fits; a filter with a NaN or infinite value gets R² = 0 (as a constant one) and
    leaves its neighbours' fits alone, so the summary's median stays a number."""
    assert fit_gabors(np.zeros((0, 5, 5))) == []
    clean = gabor(10, theta=0.4, frequency=0.2, phase=0.0, sigma=2.0).numpy()
    broken = [clean.copy(), clean.copy()]
    broken[0][3, 3], broken[1][0, 0] = np.nan, np.inf
    fits = fit_gabors(np.stack([clean, *broken]))
    assert fits[0] == fit_gabor(clean) and fits[0].r2 > 0.999
    assert [f.r2 for f in fits[1:]] == [0.0, 0.0]
    result = gabor_fraction(torch.from_numpy(np.stack([clean, *broken]).reshape(3, 100)), (1, 10, 10))
    assert result["fraction"] == pytest.approx(1 / 3) and math.isfinite(result["median_r2"])
