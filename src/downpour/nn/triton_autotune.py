"""Choosing a kernel's launch settings by timing each candidate where it runs, once per shape.

The same idea as Triton's ``@triton.autotune`` (and cuDNN's ``benchmark`` mode): the fastest settings depend on the
card, so on the first call for a shape every candidate runs a few times and the fastest is kept for the rest of the
process. Unlike ``@triton.autotune`` this also runs under Triton's interpreter, so the CPU tests exercise it.

``DOWNPOUR_TRITON_AUTOTUNE=0`` turns it off (always the first candidate: the settings measured on an H100, and
bit-for-bit the same sums on every run); ``=1`` turns it on off CUDA too (slow: for tests). Unset or empty: on for
CUDA.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from downpour.errors import ConfigError

ENVIRONMENT = "DOWNPOUR_TRITON_AUTOTUNE"


@dataclass(frozen=True)
class Choice:
    """The settings kept for one kernel and shape, and every candidate's time in ms (None: it could not run)."""

    setting: dict[str, Any]
    milliseconds: tuple[float | None, ...]


_CHOSEN: dict[tuple[Hashable, ...], Choice] = {}


def switch() -> bool | None:
    """``DOWNPOUR_TRITON_AUTOTUNE``: True for 1, False for 0, None when unset or empty (on for CUDA only).

    Any other value is a :class:`~downpour.errors.ConfigError` that names the variable; ``downpour train``,
    ``bench`` and ``study`` check it before they start, not at the first CUDA call inside a run.
    """
    value = os.environ.get(ENVIRONMENT, "")
    if value not in ("", "0", "1"):
        raise ConfigError(f"{ENVIRONMENT} must be 0 (off) or 1 (on), got {value!r}")
    return None if value == "" else value == "1"


def enabled(device: torch.device) -> bool:
    """Whether calls on ``device`` choose their settings by timing (see the module's docstring)."""
    on = switch()
    return device.type == "cuda" if on is None else on


def forget() -> None:
    """Forget every choice made so far in this process: the next call for each shape times its candidates again."""
    _CHOSEN.clear()


def chosen() -> dict[tuple[Hashable, ...], Choice]:
    """Every choice made so far in this process, by ``(kernel, *shape key)``."""
    return dict(_CHOSEN)


def choose(kernel: str, key: tuple[Hashable, ...], candidates: Sequence[dict[str, Any]],
           run: Callable[[dict[str, Any]], None], device: torch.device) -> dict[str, Any]:  # fmt: skip
    """The fastest of ``candidates`` for ``kernel`` at ``key``, timing ``run(setting)`` for each on the first call.

    ``run`` must be repeatable (it writes its whole output each time). A candidate that cannot compile or launch
    on this card (too much shared memory, say) is left out; when none can, the first is returned, so that the
    caller's own launch raises its error.
    """
    if not enabled(device):
        return candidates[0]
    full_key = (kernel, *key)
    if full_key not in _CHOSEN:
        times = tuple(_milliseconds(lambda setting=setting: run(setting), device) for setting in candidates)
        ran = [(ms, index) for index, ms in enumerate(times) if ms is not None]
        best = min(ran)[1] if ran else 0
        _CHOSEN[full_key] = Choice(dict(candidates[best]), times)
    return _CHOSEN[full_key].setting


def _launch_errors() -> tuple[type[BaseException], ...]:
    """What a setting this card cannot run raises before anything is written: Triton refusing to compile it, ptxas
    refusing its code (newer Triton), or too much shared memory or too many registers for the card."""
    from triton.compiler.errors import CompilationError
    from triton.runtime import errors

    return tuple(e for e in (CompilationError, errors.OutOfResources, getattr(errors, "PTXASError", None)) if e)


def _milliseconds(run: Callable[[], None], device: torch.device) -> float | None:
    """The fastest of a few rounds of ``run`` in ms after one call that compiles it (on the CPU, where the
    interpreter compiles nothing and takes seconds per call, that one call); None when it cannot run."""
    cuda = device.type == "cuda"
    start = time.perf_counter()
    try:
        run()
    except _launch_errors():
        return None
    if not cuda:
        return (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(10):
            run()
        torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - start) / 10)
    return best * 1e3
