"""The variance skip in ``downpour bench layers``: time saved against the fraction of fields skipped, and what it
does to training.

Timing: the layer of the CPU benchmark (batch 32, 48×48 crops of the bundled photos with their means removed,
kernel 8, 8 maps), forward + backward with and without the skip in ``repeats`` alternating pairs: the fastest of
each, and the time saved as 1 − the median of the pairs' ratios; τ at quantiles of the crops' field variances. On
CUDA the same at the CUDA benchmark's shape (batch 64, 96×96 crops, kernel 18, 8 maps), each step's wall-clock time
up to a synchronization (so that the skip's planning on the GPU and the host counts).
Loss: the default cat network (32×32 whitened crops, one stage) trained for a fixed number of Adam steps from the
same start on the same batches at each τ; its final cost on held-out crops is evaluated the same way it was trained
(flat fields zeroed) and, for comparison, without skipping.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from downpour import config as config_mod
from downpour.bench.steps import training_step
from downpour.data import load_dataset
from downpour.data.sources import natural_patches
from downpour.models.cat import CatNetwork
from downpour.nn import LocallyConnected2d
from downpour.nn.skip import active_fields, field_variance

QUANTILES = (0.0, 0.25, 0.5, 0.75, 0.9)


def _crops(count: int, size: int, seed: int) -> torch.Tensor:
    x = torch.from_numpy(natural_patches(count, size, np.random.default_rng(seed)))  # (B, 1, S, S)
    return x - x.mean(dim=(1, 2, 3), keepdim=True)


def _paired_times(dense: Callable[[], None], skip: Callable[[], None], repeats: int,
                  device: str = "cpu") -> tuple[float, float, float]:  # fmt: skip
    """``repeats`` alternating pairs: the fastest of each (ms) and the median of the pairs' ratios skip ÷ dense
    (robust to a burst of load on this shared machine, which a ratio of two minimums is not)."""
    best, ratios = [float("inf"), float("inf")], []
    dense(), skip()
    synchronize = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    synchronize()
    for _ in range(repeats):
        seconds = []
        for index, step in enumerate((dense, skip)):
            start = time.perf_counter()
            step()
            synchronize()
            seconds.append(time.perf_counter() - start)
            best[index] = min(best[index], seconds[-1])
        ratios.append(seconds[1] / seconds[0])
    return best[0] * 1e3, best[1] * 1e3, float(np.median(ratios))


def time_saved(shape: tuple[int, ...], repeats: int = 5, device: str = "cpu") -> list[dict[str, float]]:
    """One row per τ: fractions of fields zeroed and not computed, dense and skipping times, time saved."""
    batch, channels, size, kernel, stride, maps = shape
    torch.manual_seed(0)
    layer = LocallyConnected2d(channels, maps, size, kernel, stride).to(device)
    x = _crops(batch, size, seed=0).to(device).requires_grad_(True)  # (B, 1, S, S): grayscale, as the shapes are
    variance = field_variance(x.detach(), layer.kernel_size, layer.stride).flatten()
    rows = []
    for q in QUANTILES:
        tau = float(torch.quantile(variance, q)) if q > 0 else 0.0
        active = active_fields(x, layer.kernel_size, layer.stride, tau)
        dense_ms, skip_ms, ratio = _paired_times(  # the skip's time includes planning its pairs (as every batch)
            training_step(lambda: layer(x), x, layer.weight),
            training_step(lambda active=active: layer(x, active), x, layer.weight),
            repeats,
            device,
        )
        plan = layer.skip_plan(active, batch)
        skipped = plan.skipped_fraction if plan is not None else 0.0
        saved = 1.0 - ratio
        rows.append({"quantile": q, "tau": tau, "zeroed_fraction": 1.0 - float(active.float().mean()),
                     "skipped_fraction": skipped, "dense_ms": dense_ms, "skip_ms": skip_ms, "saved_fraction": saved,
                     "saved_per_skipped": saved / skipped if skipped > 0 else float("nan")})  # fmt: skip
    return rows


def loss_change(steps: int = 150, batch: int = 64, seed: int = 0) -> list[dict[str, float]]:
    """Final held-out cost of the default cat network trained with each τ (quantiles of the training fields)."""
    config = config_mod.load(None, ["model.name=cat", "data.source=natural-images", "data.examples=4000",
                                    "data.held_out=256"])  # fmt: skip
    data = load_dataset(config.data, seed=seed)
    train, held_out = data.train.view(-1, *data.shape), data.held_out.view(-1, *data.shape)  # (N, C, S, S)
    m = config.model
    kernel = (m.receptive_field, m.receptive_field)
    variance = field_variance(train[:512], kernel, (1, 1)).flatten()
    order = torch.from_numpy(np.random.default_rng(seed).integers(0, len(train), size=(steps, batch)))
    rows = []
    for q in QUANTILES:
        tau = float(torch.quantile(variance, q)) if q > 0 else 0.0
        torch.manual_seed(seed)
        net = CatNetwork(data.shape, stages=1, receptive_field=m.receptive_field, maps=m.maps, pool=m.pool, lcn=m.lcn,
                         sparsity=m.sparsity, epsilon=m.epsilon, skip_variance=tau)  # fmt: skip
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
        net.loss(train[order[0]]).backward()  # untimed: compiles the skip's kernels (its gradients are zeroed below)
        net.skip_summary()
        start = time.perf_counter()
        for indices in order:
            optimizer.zero_grad()
            net.loss(train[indices]).backward()
            optimizer.step()
        seconds = time.perf_counter() - start
        net.skip_summary()
        with torch.no_grad():
            as_trained = float(net.loss(held_out))
            skip = net.skip_summary()
            net.stages[0].skip_variance = 0.0
            without_skip = float(net.loss(held_out))
        rows.append({"quantile": q, "tau": tau, "zeroed_fraction": skip["zeroed_fraction"] if skip else 0.0,
                     "skipped_fraction": skip["skipped_fraction"] if skip else 0.0, "train_seconds": seconds,
                     "final_loss": as_trained, "final_loss_without_skip": without_skip})  # fmt: skip
    base = rows[0]["final_loss"]
    for row in rows:
        row["loss_change"] = row["final_loss"] / base - 1.0
    return rows
