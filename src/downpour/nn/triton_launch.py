"""Launching a resolved Triton kernel again without Triton's per-call work.

Each call ``fn[grid](*args, **constants)`` makes Triton bind the arguments, specialize each of them (a pointer's
16-byte alignment, an integer equal to 1 or divisible by 16, every dtype), build a cache key from that and the
options, and look the compiled kernel up: on an H100 host that took about 17 µs per launch, where the launch itself
takes a few. A :class:`Plan` keeps the compiled kernel that its first launch returned, for each *specialization key*
its caller gives (the arguments' strides, dtypes and pointer alignments: everything Triton specializes on that the
plan's shape does not already fix), and launches later calls with the same key through the compiled kernel's own
runner (``compiled[grid](*values)``), which only finds the current stream and launches.

The runner takes every parameter of the kernel in its order, ``tl.constexpr`` ones included (their values are
ignored there), in Triton 3.6 to 3.9 alike; 3.6 refuses a wrong count, later releases do not check it. That is
Triton's public ``CompiledKernel`` API, but how it takes its arguments has changed between releases before.
So a plan checks its first direct launch against Triton's: it launches once more into a scratch output and keeps
the direct path only when the two outputs are equal bit for bit. Otherwise (or when the runner refuses the
arguments) it warns once and every plan uses Triton's own launch from then on. Under the interpreter
(``TRITON_INTERPRET=1``) Triton returns no compiled kernel and plans always use its own launch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

OUTPUT = 2  # the argument every kernel of downpour.nn.local_triton writes (its third): where a check launch differs
DIRECT = {"enabled": True}  # off once a direct launch disagreed with Triton's (or by hand, to time Triton's own)
_SLOW = object()  # a specialization that launches through Triton every time (no compiled kernel to reuse)


class Plan:
    """One kernel's launch for one shape: the jitted function ``fn``, its ``grid`` and compile-time ``constants``
    (the ``tl.constexpr`` arguments by name, and launch options such as ``num_warps``), and, per specialization
    key, the runner of the kernel Triton compiled for it."""

    __slots__ = ("_runners", "constants", "fn", "grid")

    def __init__(self, fn: Any, grid: tuple[int, ...], constants: dict[str, Any]) -> None:
        self.fn, self.grid, self.constants = fn, grid, constants
        self._runners: dict[Hashable, Any] = {}

    def launch(self, args: tuple[Any, ...], spec: Hashable) -> None:
        """Run the kernel on ``args`` (its positional arguments, the tensors and integers that vary per call).
        ``spec`` must differ whenever Triton would specialize ``args`` differently (see the module's docstring)."""
        runner = self._runners.get(spec)
        if runner is not None and runner is not _SLOW and DIRECT["enabled"]:
            runner(*args)
            return
        compiled = self.fn[self.grid](*args, **self.constants)
        if runner is None and DIRECT["enabled"] and not _capturing(args):
            self._runners[spec] = checked_runner(compiled, self.fn, self.grid, self.constants, args) or _SLOW

    def direct(self) -> int:
        """How many specializations this plan launches directly (the rest go through Triton's own launch)."""
        return sum(runner is not _SLOW for runner in self._runners.values())


def checked_runner(compiled: Any, fn: Any, grid: tuple[int, ...], constants: dict[str, Any],
                   args: tuple[Any, ...]) -> Callable[..., None] | None:  # fmt: skip
    """A function launching ``compiled`` (what ``fn[grid](*args, **constants)`` returned) on new ``args`` directly,
    once a launch through it has given what Triton's own launch wrote to ``args[OUTPUT]``, bit for bit; None when
    there is no compiled kernel (the interpreter) or the check failed (then it warns and turns direct launches off
    for the process)."""
    if compiled is None or not hasattr(compiled, "__getitem__"):
        return None
    try:
        tail = runner_tail(fn, len(args), constants)
        if len(args) + len(tail) != len(fn.arg_names):  # later Triton releases would not notice a wrong count
            raise TypeError(f"{len(args) + len(tail)} arguments for a kernel of {len(fn.arg_names)} parameters")
        runner = compiled[(*grid, 1, 1)[:3]]  # the runner reads three grid sizes

        def launch(*call_args: Any) -> None:
            runner(*call_args, *tail)

        expected = args[OUTPUT]
        scratch = expected.clone()
        _bits(scratch).bitwise_not_()  # every bit wrong: a launch that leaves an element unwritten cannot pass
        launch(*args[:OUTPUT], scratch, *args[OUTPUT + 1 :])
        same = _bits(scratch).equal(_bits(expected))
        reason = "its results differed from Triton's own launch"
    except torch.OutOfMemoryError:
        return None  # no room for the check's output now: Triton's own launch, for this specialization
    except Exception as exc:  # whatever went wrong, Triton's own launch still works
        same, reason = False, f"it was refused: {type(exc).__name__}: {exc}"
    if same:
        return launch
    DIRECT["enabled"] = False
    warnings.warn(
        f"downpour: launching Triton's compiled kernels directly does not work with this Triton version ({reason}); "
        "every kernel now goes through Triton's own launch, which costs the host more time per call",
        RuntimeWarning,
        stacklevel=2,
    )
    return None


def runner_tail(fn: Any, positional: int, constants: dict[str, Any]) -> tuple[Any, ...]:
    """The values a compiled kernel's runner takes after a call's ``positional`` arguments: the rest of ``fn``'s
    parameters in their order (its ``tl.constexpr`` ones, given by name in ``constants``)."""
    return tuple(constants[name] for name in fn.arg_names[positional:])


def _bits(tensor: Tensor) -> Tensor:
    """``tensor``'s bits as integers (a view of the contiguous ``tensor``), so that NaNs compare equal to
    themselves."""
    integer = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.view(integer)


def _capturing(args: tuple[Any, ...]) -> bool:
    """Whether a CUDA graph is being captured on the current stream (no check launch may synchronize then; a
    capture in global mode on another thread is not seen)."""
    tensor = args[OUTPUT]
    return bool(tensor.is_cuda and torch.cuda.is_current_stream_capturing())
