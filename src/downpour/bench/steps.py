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
