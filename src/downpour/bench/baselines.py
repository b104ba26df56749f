"""Baselines the parameter server is measured against: a plain PyTorch loop and a Hogwild pair.

Both train the same model on the same data with the same batch size and the same optimizer (Adagrad), one
intra-op thread per process, and count examples in a shared tensor that the benchmark reads.
"""

from __future__ import annotations

import torch
from torch import Tensor

from downpour.backends.processes import become_worker, driver_alive
from downpour.config import ModelConfig

DRIVER_CHECK_STEPS = 100


def train_forever(rank: int, stride: int, model: torch.nn.Module, examples: Tensor, counter: Tensor, stop: Tensor,
                  batch_size: int, lr: float) -> None:  # fmt: skip
    """A plain training loop with ``torch.optim.Adagrad`` on ``model`` until ``stop[0]`` is set.

    One process running it is the plain single-process loop; two running it on one shared-memory model, each with
    its own optimizer and no lock, are PyTorch's Hogwild example. ``counter[rank]`` counts examples done. It also
    stops when its driver is gone (checked every :data:`DRIVER_CHECK_STEPS` steps, as a local worker checks each
    second).
    """
    become_worker()
    torch.set_num_threads(1)
    optimizer = torch.optim.Adagrad(model.parameters(), lr=lr)
    batches = examples.shape[0] // batch_size
    i = rank
    while not stop[0] and (i // stride % DRIVER_CHECK_STEPS or driver_alive()):
        optimizer.zero_grad(set_to_none=False)
        model.loss(examples[(i % batches) * batch_size :][:batch_size]).backward()
        optimizer.step()
        counter[rank] += batch_size
        i += stride


def shared_model(config: ModelConfig, dim: int) -> torch.nn.Module:
    """The benchmark's model, its parameters in shared memory."""
    from downpour.models import build_model

    model = build_model(config, dim, seed=0)
    model.share_memory()
    return model
