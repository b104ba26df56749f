"""A plan launches Triton's compiled kernel directly only after checking that path against Triton's own launch.

Compiled kernels exist only on a GPU, so here a small stand-in plays a ``@triton.jit`` function and the kernel it
compiles: ``fn[grid](*args, **constants)`` writes ``x·SCALE + n`` into its output and returns the kernel compiled
for its arguments, which, like Triton's, holds an ``n`` of 1 as a constant; its runner takes every parameter in
order, as Triton's does. The real kernels are checked
both ways on CUDA in ``test_nn_local_triton.py``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from downpour.nn import triton_launch
from downpour.nn.triton_launch import Plan

CONSTANTS = {"SCALE": 3.0, "BLOCK": 16, "num_warps": 4}  # two tl.constexpr parameters, one launch option


class Compiled:
    """Stands in for Triton's CompiledKernel: ``compiled[grid](*every parameter)``; ``mode`` makes it wrong."""

    def __init__(self, jit: Jit, mode: str, n: int) -> None:
        self.jit, self.mode, self.constant_n = jit, mode, n if n == 1 else None

    def __getitem__(self, grid: tuple[int, ...]) -> Any:
        def runner(*values: Any) -> None:
            self.jit.grids.append(grid)
            if self.mode == "refuses" or len(values) != len(Jit.arg_names):
                raise TypeError(f"function takes exactly {len(Jit.arg_names)} arguments ({len(values)} given)")
            if self.mode == "fails":
                raise RuntimeError("CUDA error: invalid resource handle")
            if self.mode == "writes nothing":
                return
            x, _, out, n, scale, _ = values
            n = n if self.constant_n is None else self.constant_n  # compiled for n = 1: any other n is ignored
            shift = 1.0 if self.mode == "differs" else 0.0
            out.copy_(x * scale + n + shift)
            self.jit.direct += 1

        return runner


class Jit:
    """Stands in for a ``@triton.jit`` function: counts its launches and the specializations it compiled."""

    arg_names = ("x_ptr", "w_ptr", "out_ptr", "n", "SCALE", "BLOCK")

    def __init__(self, mode: str = "right") -> None:
        self.mode, self.launches, self.direct, self.grids = mode, 0, 0, []

    def __getitem__(self, grid: tuple[int, ...]) -> Any:
        def launch(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, n: int, **constants: Any) -> Any:
            assert constants == CONSTANTS
            self.launches += 1
            out.copy_(x * constants["SCALE"] + n)
            return None if self.mode == "interpreter" else Compiled(self, self.mode, n)

        return launch


@pytest.fixture(autouse=True)
def direct_launches_on() -> Iterator[None]:
    triton_launch.DIRECT["enabled"] = True
    yield
    triton_launch.DIRECT["enabled"] = True


def call(plan: Plan, x: torch.Tensor, n: int = 2) -> torch.Tensor:
    out = torch.empty_like(x)
    plan.launch((x, None, out, n), spec=(x.stride(), n))
    return out


def test_a_checked_runner_launches_later_calls_directly() -> None:
    jit = Jit()
    plan = Plan(jit, (5, 2), CONSTANTS)
    x = torch.arange(6.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = call(plan, x)
        assert (jit.launches, jit.direct) == (1, 1)  # Triton's launch, then the check's direct one
        assert plan.direct() == 1
        for _ in range(3):
            assert torch.equal(call(plan, x), first)
    assert torch.equal(first, x * 3 + 2)
    assert (jit.launches, jit.direct) == (1, 4)
    assert set(jit.grids) == {(5, 2, 1)}  # a runner reads three grid sizes: the plan's two, padded
    call(plan, x, n=1)  # another specialization (n = 1 is compiled in): through Triton once, then checked and kept
    assert (jit.launches, plan.direct()) == (2, 2)
    assert torch.equal(call(plan, x, n=1), x * 3 + 1) and jit.launches == 2
    assert torch.equal(call(plan, x, n=5), x * 3 + 5)  # not the kernel compiled for n = 1
    assert (jit.launches, plan.direct()) == (3, 3)


@pytest.mark.parametrize(
    ("mode", "reason", "x"),
    [
        ("differs", "results differed", torch.randn(8)),
        ("writes nothing", "results differed", torch.zeros(8)),  # even where Triton's output is all zeros
        ("refuses", "refused: TypeError", torch.randn(8)),
        ("fails", "refused: RuntimeError: CUDA error", torch.randn(8)),
    ],
)
def test_a_runner_that_fails_its_check_turns_direct_launches_off(mode: str, reason: str, x: torch.Tensor) -> None:
    jit = Jit(mode)
    plan = Plan(jit, (4,), CONSTANTS)
    with pytest.warns(RuntimeWarning, match=f"does not work with this Triton version.*{reason}"):
        first = call(plan, x)
    assert torch.equal(first, x * 3 + 2)  # the output Triton's launch wrote, not the check's
    assert not triton_launch.DIRECT["enabled"] and plan.direct() == 0
    other = Plan(jit, (4,), CONSTANTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: nothing is tried again
        for p in (plan, other, plan):
            assert torch.equal(call(p, x), x * 3 + 2)
    assert jit.launches == 4 and other.direct() == 0


def test_turning_direct_launches_off_stops_the_runners_made() -> None:
    """``DIRECT["enabled"] = False`` (a failed check elsewhere, or by hand to time Triton's own launch) holds for
    plans that already launch directly too."""
    jit = Jit()
    plan = Plan(jit, (4,), CONSTANTS)
    x = torch.randn(8)
    call(plan, x)
    call(plan, x)
    assert (jit.launches, plan.direct()) == (1, 1)
    triton_launch.DIRECT["enabled"] = False
    assert torch.equal(call(plan, x), x * 3 + 2)
    assert jit.launches == 2


def test_no_compiled_kernel_means_tritons_own_launch_every_time() -> None:
    jit = Jit("interpreter")  # under TRITON_INTERPRET=1 a launch returns no compiled kernel
    plan = Plan(jit, (4,), CONSTANTS)
    x = torch.randn(8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            assert torch.equal(call(plan, x), x * 3 + 2)
    assert (jit.launches, jit.direct, plan.direct()) == (3, 0, 0)
    assert triton_launch.DIRECT["enabled"]


def test_nan_outputs_pass_the_check() -> None:
    """The check compares bits: a NaN written both ways is the same result (``torch.equal`` would say it differs)."""
    jit = Jit()
    plan = Plan(jit, (4,), CONSTANTS)
    x = torch.tensor([1.0, float("nan"), float("inf"), -0.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call(plan, x)
    assert plan.direct() == 1 and triton_launch.DIRECT["enabled"]


def test_runner_tail_follows_the_signature() -> None:
    assert triton_launch.runner_tail(Jit(), 4, CONSTANTS) == (3.0, 16)
    with pytest.raises(KeyError):
        triton_launch.runner_tail(Jit(), 3, CONSTANTS)  # "n" is not a compile-time constant
