"""One forward + backward step of a layer, as a training loop runs it, and how ``downpour bench layers`` times it."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def training_step(forward: Callable[[], torch.Tensor], *leaves: torch.Tensor) -> Callable[[], None]:
    """``forward().sum().backward()``, with the gradients of ``leaves`` set to None first.

    That is how ``optimizer.zero_grad()`` leaves them in plain PyTorch (``set_to_none``, its default since 2.0), so
    each step writes fresh gradients. Without the reset, every step after the first would also add its gradients
    into the old ones: for an untied layer, one more read and write of all its weights. (Downpour's own workers do
    pay a pass like that: they keep gradients in one flat buffer, zero it, and autograd adds into it. The timing
    leaves it out for every implementation alike.)
    """

    def step() -> None:
        for leaf in leaves:
            leaf.grad = None
        forward().sum().backward()

    return step


def fastest_ms(step: Callable[[], None], repeats: int, device: str) -> float:
    """Milliseconds of the fastest of ``repeats`` runs of ``step``, after one run to warm up.

    On the CPU: wall-clock time. On CUDA: the GPU's own time between two CUDA events around each step, as
    ``triton.testing.do_bench`` uses, with the steps queued back to back and one synchronization at the end (unlike
    ``do_bench``: no flush of the L2 cache between steps, and the fastest step rather than the mean). The host
    prepares the next step while the GPU runs the current one, as it does in training. A step whose kernels take
    less time than the host needs to issue them is still measured at the host's pace, because the GPU waits between
    the events.
    """
    step()
    if torch.device(device).type != "cuda":
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            best = min(best, time.perf_counter() - start)
        return best * 1e3
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return min(start.elapsed_time(end) for start, end in events)


def fastest_of_each(steps: dict[str, Callable[[], None]], repeats: int, device: str) -> dict[str, float]:
    """:func:`fastest_ms` of each of ``steps``, which on the CPU take turns: after one warm-up run each, ``repeats``
    rounds of one run of every step. Timed one after another, a burst of load on a shared machine could slow all of
    one implementation's runs and none of the next's. (Taking turns does not help against load that lasts: with
    another process busy on one of two cores, a reviewer saw the 2-thread layer at 492 ms against unfold + bmm's
    344 ms, and 8.3 against 91 ms once the machine was quieter.) On CUDA each step is timed as :func:`fastest_ms`
    does (the GPU's own time between events, steps queued back to back)."""
    if torch.device(device).type == "cuda":
        return {name: fastest_ms(step, repeats, device) for name, step in steps.items()}
    for step in steps.values():
        step()
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: seconds * 1e3 for name, seconds in best.items()}
