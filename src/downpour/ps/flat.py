"""One flat parameter vector and one flat gradient vector behind a module's parameters.

The parameter server sees a model as a single 1-D tensor. Re-pointing every parameter (and its ``.grad``) at a
view of two flat buffers makes a fetch one copy into ``values`` and a push one slice of ``grads``, with no
per-parameter Python work; autograd accumulates straight into the flat gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FlatParameters:
    """Owns ``values`` and ``grads`` (both ``(num_params,)``) and ties ``module``'s parameters to views of them."""

    def __init__(self, module: nn.Module) -> None:
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{type(module).__name__} has no trainable parameters")
        total = sum(p.numel() for p in params)
        self.values = torch.empty(total, dtype=torch.float32)
        self.grads = torch.zeros(total, dtype=torch.float32)
        self.params = params
        offset = 0
        for p in params:
            size = p.numel()
            self.values[offset : offset + size].copy_(p.detach().reshape(-1))
            p.data = self.values[offset : offset + size].view_as(p)
            p.grad = self.grads[offset : offset + size].view_as(p)
            offset += size

    @property
    def numel(self) -> int:
        """Number of trainable parameters."""
        return self.values.numel()

    def zero_grad(self) -> None:
        """Zero the flat gradient (keeps every ``.grad`` a view of it)."""
        self.grads.zero_()

    def check_grads_are_views(self) -> None:
        """Raise if autograd replaced a ``.grad`` instead of accumulating into the flat buffer."""
        offset = 0
        for p in self.params:
            expected = self.grads[offset : offset + p.numel()]
            if p.grad is None or p.grad.data_ptr() != expected.data_ptr():
                raise RuntimeError("a parameter's .grad no longer points into the flat gradient buffer")
            offset += p.numel()


def flat_copy(module: nn.Module) -> Tensor:
    """The module's trainable parameters concatenated into a new 1-D tensor."""
    return torch.cat([p.detach().reshape(-1) for p in module.parameters() if p.requires_grad])
