"""``downpour bench layers``: LocallyConnected2d against the usual unfold + bmm, and untied against tied.

Times are forward + backward in fp32, the fastest of several repetitions, all measured side by side in one run, of
a training step's work: gradients start at None as after ``optimizer.zero_grad()``, and on CUDA the GPU's time per
step with the steps queued back to back (:mod:`downpour.bench.steps`).
Memory is what autograd keeps between the passes (saved tensors), counted with ``saved_tensors_hooks``; PyTorch
does not track CPU allocations, and a process's peak resident set was dominated by one-time allocations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from downpour.bench import skip as bench_skip
from downpour.bench.steps import fastest_ms, fastest_of_each, training_step
from downpour.nn import LocallyConnected2d

# The shapes: (batch, channels, size, kernel, stride, maps)
CPU_SHAPE = (32, 1, 48, 8, 1, 8)
CUDA_SHAPE = (64, 1, 96, 18, 1, 8)


def unfold_bmm(x: torch.Tensor, weight_lpm: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """The usual locally connected layer: ``F.unfold``, a per-location ``bmm``, autograd for the rest."""
    batch, maps = x.shape[0], weight_lpm.shape[2]
    out_size = (x.shape[2] - kernel) // stride + 1
    cols = F.unfold(x, kernel, stride=stride)  # (B, P, L)
    out = torch.bmm(cols.permute(2, 0, 1), weight_lpm)  # (L, B, M)
    return out.permute(1, 2, 0).reshape(batch, maps, out_size, out_size)


def _implementations(shape: tuple[int, ...], device: str) -> dict[str, Callable[[], None]]:
    batch, channels, size, kernel, stride, maps = shape
    torch.manual_seed(0)
    layer = LocallyConnected2d(channels, maps, size, kernel, stride).to(device)
    weight_lpm = layer.weight.detach().transpose(1, 2).contiguous().requires_grad_(True)  # (L, P, M)
    conv = torch.nn.Conv2d(channels, maps, kernel, stride, bias=False).to(device)
    x = torch.randn(batch, channels, size, size, device=device, requires_grad=True)
    steps = {
        "ours": training_step(lambda: layer(x), x, layer.weight),
        "unfold_bmm": training_step(lambda: unfold_bmm(x, weight_lpm, kernel, stride), x, weight_lpm),
        "conv2d": training_step(lambda: conv(x), x, conv.weight),
    }
    if device == "cuda":  # the band-wise bmm kernels that "auto" uses without Triton, and TF32 products
        bands = LocallyConnected2d(channels, maps, size, kernel, stride, implementation="bands").to(device)
        steps["ours_bands"] = training_step(lambda: bands(x), x, bands.weight)
        steps["ours_tf32"] = _with_tf32(steps["ours"])
        steps["unfold_bmm_tf32"] = _with_tf32(steps["unfold_bmm"])  # its bmm in TF32 too: like against like
    return steps


def _with_tf32(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` run with PyTorch's float32 products allowed to use TF32 (what cuDNN's conv2d does by default)."""

    def tf32_step() -> None:
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        try:
            step()
        finally:
            torch.set_float32_matmul_precision(before)

    return tf32_step


def arithmetic_gflop(shape: tuple[int, ...]) -> float:
    """GFLOP of one forward + backward of the layer ``shape``: the forward, the input gradient and the weight
    gradient each do every multiply-add once (2 FLOPs), ``batch · locations · maps · patch`` of them."""
    batch, channels, size, kernel, stride, maps = shape
    out = (size - kernel) // stride + 1
    return 3 * 2 * batch * out * out * maps * channels * kernel * kernel / 1e9


def time_layers(shape: tuple[int, ...], device: str = "cpu", repeats: int = 5) -> dict[str, float]:
    """Milliseconds per forward + backward for ours, unfold + bmm and tied conv2d of the same shape."""
    return fastest_of_each(_implementations(shape, device), repeats, device)


def saved_for_backward_mb(impl: str, shape: tuple[int, ...]) -> float:
    """MiB (2**20 bytes; the JSON keys say ``mb``) that autograd keeps from the forward pass for the backward pass
    (parameters and the input excluded).

    This is the memory that grows with batch and layer size between the passes; it is not the whole peak (the
    transient buffers of either pass are not counted).
    """
    batch, channels, size, kernel, stride, maps = shape
    torch.manual_seed(0)
    layer = LocallyConnected2d(channels, maps, size, kernel, stride)
    weight_lpm = layer.weight.detach().transpose(1, 2).contiguous().requires_grad_(True)
    x = torch.randn(batch, channels, size, size, requires_grad=True)
    exclude = {t.untyped_storage().data_ptr() for t in (x, layer.weight, weight_lpm)}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in exclude:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = layer(x) if impl == "ours" else unfold_bmm(x, weight_lpm, kernel, stride)
    out.sum().backward()
    return sum(storages.values()) / 2**20


def untied_vs_tied(shape: tuple[int, ...], repeats: int = 3) -> list[dict[str, Any]]:
    """Untied (locally connected) vs tied (convolution) at equal maps and at equal parameter memory, per example."""
    _, channels, size, kernel, stride, maps = shape
    out = (size - kernel) // stride + 1
    patch = channels * kernel * kernel
    locations = out * out
    rows = []
    configs = [
        ("untied, locally connected", maps, False),
        ("tied conv, equal maps", maps, True),
        ("tied conv, equal parameter memory", maps * locations, True),
    ]
    for name, m, tied in configs:
        batch = 1 if m > 64 else shape[0]
        torch.manual_seed(0)
        x = torch.randn(batch, channels, size, size, requires_grad=True)
        layer = (
            torch.nn.Conv2d(channels, m, kernel, stride, bias=False)
            if tied
            else LocallyConnected2d(channels, m, size, kernel, stride)
        )
        params = sum(p.numel() for p in layer.parameters())
        flops = 2 * locations * m * patch  # multiply-adds per example, forward
        ms = fastest_ms(training_step(lambda layer=layer, x=x: layer(x), x, *layer.parameters()), repeats, "cpu")
        ms /= batch
        rows.append({"layer": name, "maps": m, "params": params, "bytes": params * 4, "flops_per_example": flops,
                     "fwd_bwd_ms_per_example": ms})  # fmt: skip
    return rows


def run(*, repeats: int = 5, memory: bool = True, skip_steps: int = 150) -> dict[str, Any]:
    """Every measurement of ``downpour bench layers`` as one JSON-ready dict (``skip_steps`` = 0: no skip training)."""
    threads = torch.get_num_threads()
    cpu = time_layers(CPU_SHAPE, "cpu", repeats)
    b, c, s, k, _, m = CPU_SHAPE
    non_overlapping = time_layers((b, c, s, k, k, m), "cpu", repeats)
    result: dict[str, Any] = {
        "cpu": {
            "shape": dict(zip(("batch", "channels", "size", "kernel", "stride", "maps"), CPU_SHAPE, strict=True)),
            "threads": threads,
            "ours_ms": cpu["ours"],
            "unfold_bmm_ms": cpu["unfold_bmm"],
            "conv2d_ms": cpu["conv2d"],
            "speedup_vs_unfold_bmm": cpu["unfold_bmm"] / cpu["ours"],
            "arithmetic_gflop": arithmetic_gflop(CPU_SHAPE),
        },
        "cpu_non_overlapping": {
            "stride": k,
            "ours_ms": non_overlapping["ours"],
            "conv2d_ms": non_overlapping["conv2d"],
            "ours_vs_conv2d": non_overlapping["conv2d"] / non_overlapping["ours"],
        },
        "untied_vs_tied": untied_vs_tied(CPU_SHAPE),
        "skip_time": bench_skip.time_saved(CPU_SHAPE, 3 * repeats),  # short calls: more repeats (15 by default)
    }
    if skip_steps > 0:
        result["skip_loss"] = bench_skip.loss_change(steps=skip_steps)
    if memory:
        ours_mb, usual_mb = saved_for_backward_mb("ours", CPU_SHAPE), saved_for_backward_mb("unfold_bmm", CPU_SHAPE)
        result["cpu"].update(ours_saved_mb=ours_mb, unfold_bmm_saved_mb=usual_mb, saved_ratio=ours_mb / usual_mb)
    if torch.cuda.is_available():
        result["cuda"] = cuda_result(CUDA_SHAPE, max(repeats, 20))
        b, c, s, k, _, m = CUDA_SHAPE
        result["cuda_non_overlapping"] = cuda_result((b, c, s, k, k, m), max(repeats, 20))
        result["cuda_skip_time"] = bench_skip.time_saved(CUDA_SHAPE, max(3 * repeats, 20), device="cuda")
    return result


def cuda_result(shape: tuple[int, ...], repeats: int) -> dict[str, Any]:
    """Times of every implementation on the GPU for one shape, and which kernels "ours" ran."""
    # Imported here: importing Triton on a CPU-only run prints leak warnings at exit.
    from downpour.nn import local_triton, triton_autotune

    batch, channels, size, kernel, stride, maps = shape
    gpu = time_layers(shape, "cuda", repeats)
    # What the first calls chose for this shape, with every candidate's ms (None: could not run). A choice's key is
    # (name, tf32, device, maps, input shape, kernel, stride, ...); kernels without candidates choose nothing.
    this_shape = ((batch, channels, size, size), (kernel, kernel), (stride, stride))
    launch = [
        {"kernel": key[0], "tf32": key[1], "setting": choice.setting, "candidates_ms": choice.milliseconds}
        for key, choice in triton_autotune.chosen().items()
        if key[4:7] == this_shape
    ]
    return {
        "launch_settings": launch,
        "device": torch.cuda.get_device_name(),
        "shape": dict(zip(("batch", "channels", "size", "kernel", "stride", "maps"), shape, strict=True)),
        "kernels": "triton" if local_triton.usable(torch.empty(0, device="cuda"), maps) else "bands",
        **{f"{name}_ms": ms for name, ms in gpu.items()},
        "speedup_vs_unfold_bmm": gpu["unfold_bmm"] / gpu["ours"],
        "ours_vs_conv2d": gpu["conv2d"] / gpu["ours"],
        "tf32_speedup_vs_unfold_bmm": gpu["unfold_bmm"] / gpu["ours_tf32"],
        "tf32_speedup_vs_unfold_bmm_tf32": gpu["unfold_bmm_tf32"] / gpu["ours_tf32"],
        "conv2d_tf32": torch.backends.cudnn.allow_tf32,
        "arithmetic_gflop": arithmetic_gflop(shape),
    }


def _skip_table(where: str, rows: list[dict[str, float]], digits: int) -> Table:
    """The time saved by the variance skip at each τ (``digits``: decimals of the milliseconds)."""
    table = Table(title=f"{where}: tau at quantiles of the field variance")
    for column in ("tau (quantile)", "fields zeroed", "not computed", "dense ms", "skip ms", "saved (median pair)",
                   "saved / not computed"):  # fmt: skip
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(f"{row['tau']:.3g} ({row['quantile']:.0%})", f"{row['zeroed_fraction']:.1%}",
                      f"{row['skipped_fraction']:.1%}", f"{row['dense_ms']:.{digits}f}", f"{row['skip_ms']:.{digits}f}",
                      f"{row['saved_fraction']:.1%}", f"{row['saved_per_skipped']:.2f}")  # fmt: skip
    return table


def print_tables(result: dict[str, Any], console: Console) -> None:
    """The benchmark as tables."""
    cpu = result["cpu"]
    shape = cpu["shape"]
    table = Table(
        title=f"LocallyConnected2d fwd+bwd, fp32, CPU ({cpu['threads']} threads): batch {shape['batch']}, "
        f"{shape['channels']} channel, {shape['size']}x{shape['size']}, kernel {shape['kernel']}, "
        f"stride {shape['stride']}, {shape['maps']} maps"
    )
    for column in ("implementation", "ms", "× ours", "saved for backward, MiB"):
        table.add_column(column, justify="left" if column == "implementation" else "right")
    peaks = {"ours": cpu.get("ours_saved_mb"), "unfold_bmm": cpu.get("unfold_bmm_saved_mb")}
    for name, key in (("downpour LocallyConnected2d", "ours"), ("unfold + bmm", "unfold_bmm"),
                      ("tied conv2d (not the same layer)", "conv2d")):  # fmt: skip
        peak = peaks.get(key)
        table.add_row(name, f"{cpu[f'{key}_ms']:.1f}", f"{cpu[f'{key}_ms'] / cpu['ours_ms']:.2f}",
                      "" if peak is None else f"{peak:.1f}")  # fmt: skip
    console.print(table)
    nov = result["cpu_non_overlapping"]
    console.print(
        f"non-overlapping fields (stride = kernel = {nov['stride']}): ours {nov['ours_ms']:.2f} ms, "
        f"tied conv2d {nov['conv2d_ms']:.2f} ms ({nov['ours_vs_conv2d']:.2f}x conv2d's speed)"
    )
    tied = Table(title="untied vs tied, per example (forward multiply-adds x2 = FLOPs)")
    for column in ("layer", "maps", "params", "bytes", "FLOPs", "fwd+bwd ms"):
        tied.add_column(column, justify="left" if column == "layer" else "right")
    for row in result["untied_vs_tied"]:
        tied.add_row(row["layer"], f"{row['maps']:,}", f"{row['params']:,}", f"{row['bytes']:,}",
                     f"{row['flops_per_example']:,}", f"{row['fwd_bwd_ms_per_example']:.3f}")  # fmt: skip
    console.print(tied)
    console.print(_skip_table("variance skip, CPU layer above on 48x48 photo crops", result["skip_time"], 1))
    if "skip_loss" in result:
        loss = Table(title="variance skip and training: default cat network, same start and batches, Adam")
        for column in ("tau (quantile)", "fields zeroed", "not computed", "train s", "final loss", "change",
                       "final loss, evaluated without skip"):  # fmt: skip
            loss.add_column(column, justify="right")
        for row in result["skip_loss"]:
            loss.add_row(f"{row['tau']:.3g} ({row['quantile']:.0%})", f"{row['zeroed_fraction']:.1%}",
                         f"{row['skipped_fraction']:.1%}", f"{row['train_seconds']:.1f}", f"{row['final_loss']:.3f}",
                         f"{row['loss_change']:+.1%}", f"{row['final_loss_without_skip']:.3f}")  # fmt: skip
        console.print(loss)
    for key in ("cuda", "cuda_non_overlapping"):
        if key in result:
            g = result[key]
            shape = g["shape"]
            table = Table(
                title=f"LocallyConnected2d fwd+bwd on CUDA ({g['device']}): batch {shape['batch']}, "
                f"{shape['channels']} channel, {shape['size']}x{shape['size']}, kernel {shape['kernel']}, "
                f"stride {shape['stride']}, {shape['maps']} maps"
            )
            for column in ("implementation", "ms", "unfold+bmm / this"):
                table.add_column(column, justify="left" if column == "implementation" else "right")
            conv_name = f"tied conv2d (cuDNN, TF32 {'on' if g['conv2d_tf32'] else 'off'})"
            rows = [
                (f"downpour ({g['kernels']}), float32", "ours"),
                (f"downpour ({g['kernels']}), TF32", "ours_tf32"),
                ("downpour band-wise bmm", "ours_bands"),
                ("unfold + bmm", "unfold_bmm"),
                ("unfold + bmm, TF32", "unfold_bmm_tf32"),
                (conv_name, "conv2d"),
            ]
            for name, k in rows:
                table.add_row(name, f"{g[f'{k}_ms']:.3f}", f"{g['unfold_bmm_ms'] / g[f'{k}_ms']:.1f}")
            console.print(table)
            console.print(f"TF32 against unfold + bmm also in TF32: {g['tf32_speedup_vs_unfold_bmm_tf32']:.1f}x")
    if "cuda_skip_time" in result:
        console.print(_skip_table(f"variance skip on CUDA ({result['cuda']['device']}), the float32 layer above on "
                                  "96x96 photo crops", result["cuda_skip_time"], 3))  # fmt: skip
