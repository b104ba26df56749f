"""Baselines the parameter server is measured against: a plain PyTorch loop and a Hogwild pair.

Both train the same model on the same data with the same batch size, one intra-op thread per process.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.multiprocessing as mp
from torch import Tensor, nn

from downpour.config import ModelConfig

WINDOW = 0.5  # seconds per measured window


def _model(config: ModelConfig, dim: int) -> nn.Module:
    from downpour.models import build_model

    return build_model(config, dim, seed=0)


def window_rates(
    count: Callable[[], int], seconds: float, *, window: float = WINDOW, poll: Callable[[], None] = lambda: None
) -> list[float]:
    """Examples/s in consecutive ``window``-second windows over ``seconds``, reading a running example ``count``."""
    rates = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        first, start = count(), time.perf_counter()
        while time.perf_counter() - start < window:
            poll()
            time.sleep(0.02)
        rates.append((count() - first) / (time.perf_counter() - start))
    return rates


def plain_loop(config: ModelConfig, examples: Tensor, *, batch_size: int, lr: float, seconds: float) -> list[float]:
    """A single-process loop with ``torch.optim.Adagrad``, no server: examples/s per window."""
    torch.set_num_threads(1)
    model = _model(config, examples.shape[1])
    optimizer = torch.optim.Adagrad(model.parameters(), lr=lr)
    count, batches = examples.shape[0], examples.shape[0] // batch_size

    def step(i: int) -> None:
        optimizer.zero_grad(set_to_none=False)
        model.loss(examples[(i % batches) * batch_size :][:batch_size]).backward()
        optimizer.step()

    for i in range(20):  # warm-up
        step(i)
    rates, done = [], 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        first, start = done, time.perf_counter()
        while time.perf_counter() - start < WINDOW:
            step(done)
            done += 1
        rates.append((done - first) * batch_size / (time.perf_counter() - start))
    return rates if count else [0.0]


def _hogwild_worker(
    rank: int, model: nn.Module, examples: Tensor, counter: Tensor, stop: Tensor, batch_size: int, lr: float
) -> None:
    torch.set_num_threads(1)
    # Each process its own optimizer on the shared parameters, as in PyTorch's Hogwild example; Adagrad, so that
    # every configuration in the benchmark does the same arithmetic per step.
    optimizer = torch.optim.Adagrad(model.parameters(), lr=lr)
    batches = examples.shape[0] // batch_size
    i = rank
    while not stop[0]:
        optimizer.zero_grad()
        model.loss(examples[(i % batches) * batch_size :][:batch_size]).backward()
        optimizer.step()
        counter[rank] += batch_size
        i += 2


def hogwild_pair(config: ModelConfig, examples: Tensor, *, batch_size: int, lr: float, seconds: float) -> list[float]:
    """Two processes updating one shared-memory model without locks (PyTorch's Hogwild example): examples/s per
    window."""
    model = _model(config, examples.shape[1])
    model.share_memory()
    examples = examples.share_memory_()
    counter = torch.zeros(2, dtype=torch.int64).share_memory_()
    stop = torch.zeros(1, dtype=torch.int64).share_memory_()
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_hogwild_worker, args=(rank, model, examples, counter, stop, batch_size, lr))
        for rank in range(2)
    ]
    for proc in procs:
        proc.start()
    try:
        while not bool((counter > 0).all()):
            if not all(proc.is_alive() for proc in procs):
                raise RuntimeError("a Hogwild benchmark process died before it started training")
            time.sleep(0.01)
        time.sleep(0.5)  # warm-up
        rates = window_rates(lambda: int(counter.sum()), seconds)
    finally:
        stop[0] = 1
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return rates
