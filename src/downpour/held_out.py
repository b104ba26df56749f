"""The loss of the fixed held-out batch for any flat parameter vector: what every checkpoint, eval row and
summary of a run measures."""

from __future__ import annotations

import torch
from rich.console import Console

from downpour.config import Config
from downpour.console import warn
from downpour.data import Dataset
from downpour.models import build_model
from downpour.ps.flat import FlatParameters

CHUNK_VALUES = 1 << 25  # responses of the held-out examples computed at once (128 MiB of float32)


class HeldOutLoss:
    """The model's loss on the fixed held-out batch for any flat parameter vector.

    A batch whose responses would exceed :data:`CHUNK_VALUES` values is evaluated in chunks of examples and the
    chunks' losses averaged, weighted by their sizes: the same loss, since each term is a mean over examples,
    except a KL sparsity penalty, whose mean activation is then each chunk's. (At ``model.features = 10⁶`` the
    1,024 held-out examples' responses took 4 GB a copy, and the driver peaked at 23.6 GB.)"""

    def __init__(self, config: Config, dataset: Dataset, model: torch.nn.Module | None = None) -> None:
        """``model``: the run's model, taken over (every evaluation overwrites its parameters), so that the driver
        holds one copy of a large network rather than two; None builds one from ``config``."""
        if model is None:
            model = build_model(config.model, dataset.dim, seed=config.train.seed, shape=dataset.shape)
        self.model = model
        self.flat = FlatParameters(self.model)
        self.batch = dataset.held_out
        self.skip: dict[str, float] | None = None  # fields skipped in the last evaluation (model.skip_variance)
        with torch.no_grad():
            responses = self.model(self.batch[:1]).numel()  # of one example
        self.chunk = max(1, min(len(self.batch), CHUNK_VALUES // max(1, responses)))

    @torch.no_grad()
    def __call__(self, params: torch.Tensor) -> float:
        self.flat.values.copy_(params)
        skip_summary = getattr(self.model, "skip_summary", None)
        if skip_summary is not None:
            skip_summary()  # start counting afresh
        count = len(self.batch)
        if self.chunk >= count:
            loss = float(self.model.loss(self.batch))
        else:
            chunks = torch.split(self.batch, self.chunk)
            loss = sum(float(self.model.loss(chunk)) * len(chunk) for chunk in chunks) / count
        if skip_summary is not None:
            self.skip = skip_summary()
        return loss


def warn_if_every_field_is_flat(held_out_loss: HeldOutLoss, config: Config, console: Console) -> None:
    """Warn, before training, when ``model.skip_variance`` zeroed every receptive field of the held-out batch in its
    last evaluation: no field varies that much, so the network outputs zeros and learns nothing."""
    if held_out_loss.skip is not None and held_out_loss.skip["zeroed_fraction"] >= 1.0:
        warn(console, f"model.skip_variance = {config.model.skip_variance:g} zeroes every receptive field of the "
                      "held-out examples (none varies that much): the network outputs zeros and learns nothing; "
                      "lower model.skip_variance")  # fmt: skip
