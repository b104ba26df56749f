"""Optimal stimulus of a unit (Le et al. 2012): the input that excites it most under a norm bound.

``x* = argmax_x f_u(x)`` subject to ``‖x − mean(x)‖₂ ≤ r``, solved by projected gradient ascent: a step of
``η_t · r`` along the normalised gradient (``η_t`` falling linearly from ``lr`` to 0), then a projection back onto
the ball. ``x`` is a raw image, passed through the run's own preprocessing
(mean removal, ZCA) into the network, so the stimulus is what a picture fed to the trained system should look
like. For a linear unit ``w·Z(x − x̄)`` the answer is ``x* ∝ Zw`` (centred): a check the tests make.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from downpour.errors import DownpourError
from downpour.runs import TrainedRun

# Default norm bound: this RMS contrast per value (natural 16x16 patches of the bundled photos have about 0.07).
CONTRAST = 0.1
# An ascent raised a response when it ends above its start by more than this fraction of the larger of the two: a
# search that never left its start (a diverged network's gradient overflows) still differs in the last float bits.
RAISE_TOLERANCE = 1e-5


def check_units(units: list[int], count: int) -> None:
    """Raise a DownpourError for a unit index outside ``0..count-1``."""
    for unit in units:
        if not 0 <= unit < count:
            raise DownpourError(f"invalid unit: {unit} (this model has units 0..{count - 1})")


def _project(x: Tensor, radius: float) -> Tensor:
    """Remove each image's mean and scale it into the ball of ``radius``: ``(U, C, H, W)``."""
    flat = x.flatten(1)  # (U, D)
    flat = flat - flat.mean(dim=1, keepdim=True)
    norms = flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (flat * torch.clamp(radius / norms, max=1.0)).view_as(x)


class Ascent(NamedTuple):
    """What one gradient ascent found: the stimuli, each unit's response to them and to the random start."""

    stimuli: Tensor  # (U, C, H, W) centred images on the norm bound (add 0.5 to show them)
    responses: Tensor  # (U,) each unit's response to its stimulus
    start_responses: Tensor  # (U,) each unit's response to the random image the search started from

    def raised(self) -> list[bool]:
        """Per unit, whether the ascent did its job: both responses finite and the final one above the start's (by
        more than :data:`RAISE_TOLERANCE` of the larger). False flags a search that failed (a diverged network's
        overflowing gradient, a unit with no gradient), whose "optimal" stimulus is no optimum."""
        start, final = self.start_responses.double(), self.responses.double()
        ok = torch.isfinite(start) & torch.isfinite(final)
        margin = RAISE_TOLERANCE * torch.maximum(start.abs(), final.abs())
        return (ok & (final - start > margin)).tolist()


def _responses(trained: TrainedRun, x: Tensor, index: Tensor) -> Tensor:
    """Each unit's response to its own image: ``x`` ``(U, C, H, W)``, ``index`` ``(U,)`` → ``(U,)``."""
    return trained.model(trained.preprocess(x + 0.5)).flatten(1).gather(1, index[:, None])[:, 0]  # (U,)


def ascend(
    trained: TrainedRun, units: list[int], *, steps: int = 100, lr: float = 0.5, radius: float | None = None,
    seed: int = 0, progress: Callable[[int], None] | None = None,
) -> Ascent:  # fmt: skip
    """The optimal stimulus of each of ``units`` by projected gradient ascent, with the responses before and after.

    ``radius`` defaults to ``CONTRAST · sqrt(D)``; ``progress(done)`` is called after each step when given.
    """
    if steps < 1:
        raise DownpourError(f"invalid --steps: {steps} (must be at least 1)")
    with torch.no_grad():
        width = trained.features(torch.full((1, *trained.input_shape), 0.5)).shape[1]
    check_units(units, width)
    radius = CONTRAST * math.sqrt(trained.input_dim) if radius is None else radius
    generator = torch.Generator().manual_seed(seed)
    # the search starts on the bound: a fainter start can leave every field of a model that skips flat ones
    # (model.skip_variance) zeroed, with no gradient to leave it by
    x = _project(torch.randn(len(units), *trained.input_shape, generator=generator), radius)
    index = torch.tensor(units)
    with torch.no_grad():
        start = _responses(trained, x, index)  # (U,)
    for step in range(steps):
        x.requires_grad_(True)
        (grad,) = torch.autograd.grad(_responses(trained, x, index).sum(), x)
        with torch.no_grad():
            direction = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            x = _project(x + lr * (1 - step / steps) * radius * direction, radius)
        if progress is not None:
            progress(step + 1)
    with torch.no_grad():
        final = _responses(trained, x, index)  # (U,)
    return Ascent(x.detach(), final, start)


def optimal_stimuli(
    trained: TrainedRun, units: list[int], *, steps: int = 100, lr: float = 0.5, radius: float | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The optimal stimulus of each of ``units``: centred images ``(U, C, H, W)`` and their responses ``(U,)``.

    ``radius`` defaults to ``CONTRAST · sqrt(D)``; the returned images are mean-free (add 0.5 to show them). See
    :func:`ascend` for the responses at the start too (whether the search raised them).
    """
    found = ascend(trained, units, steps=steps, lr=lr, radius=radius, seed=seed)
    return found.stimuli, found.responses
