"""How many threads PyTorch's CPU operations use, for one block of code."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads (``torch.set_num_threads``), then restore the previous count.

    One thread suits small products (a worker's mini-batch, a simulated worker), and small LAPACK calls: on cores
    that other processes share, a parallel ``eigh`` of a 256×256 matrix waits at its many barriers for threads the
    system has descheduled, and takes seconds instead of 12 ms.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
