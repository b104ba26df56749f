"""Developer tool for a CUDA machine (not part of the package): sweep the Triton kernels' launch settings around
the measured ones, then time the whole layer step with each kernel's winner patched into ``_TUNED``.

Run on the GPU machine by scripts/gpu_check.sh (which installs its wheels in a private folder on PYTHONPATH).
Check it on a CPU first:  TRITON_INTERPRET=1 PYTHONPATH=src .venv/bin/python scripts/triton_sweep.py --small
``--sweep-seconds N`` (default 300): part 2 starts no new setting after N seconds from the start.

Prints, in this order (so a timeout still leaves the important part):
1. layer step ms (default _TUNED), fp32 and TF32, unfold+bmm (fp32 and TF32) and conv2d, same process, timed as
   ``downpour bench layers`` times them (GPU time per step, steps back to back, fresh gradients), and the fp32 layer
   and unfold+bmm once more as the README's first H100 table was timed (a sync after each step, gradients added up);
2. per kernel and precision: every setting's ms and error vs float64 (one JSON line each): first the autotune
   candidates, then a wider sweep around the measured settings until ``--sweep-seconds`` (``--x3`` also times
   every float32 candidate with ``precision="tf32x3"``, 3 TF32 products per product: on an H100 on 2026-11-27
   they kept float32's accuracy, but each kernel's fastest took 1.5-2.1x as long as its fastest in float32);
3. the winners, the layer step with them patched in, the layer step choosing its own settings among
   local_triton._CANDIDATES (DOWNPOUR_TRITON_AUTOTUNE=1), and the ratios to unfold+bmm;
4. CPU-side cost per step at a tiny shape (launch overhead: what stride 18 is made of), a Triton launch alone, and
   the host's profile of the cat layer's step (cProfile, the functions that took most of its own time).
"""

import argparse
import json
import os
import time

import torch

from downpour.bench import steps as steps_mod
from downpour.bench.layers import unfold_bmm
from downpour.nn import LocallyConnected2d, triton_autotune, triton_launch
from downpour.nn import local_triton as lt

os.environ[triton_autotune.ENVIRONMENT] = "0"  # the measured settings unless a setting is given, until part 3

ARGS = argparse.ArgumentParser(description="Sweep the Triton kernels' launch settings (a developer tool).")
ARGS.add_argument("out", nargs="?", default="/tmp/triton_sweep.json", help="where the JSON goes")
ARGS.add_argument("--small", action="store_true", help="a tiny shape on the CPU (under TRITON_INTERPRET=1)")
ARGS.add_argument("--sweep-seconds", type=float, default=300.0, help="part 2 starts no setting after this")
ARGS.add_argument("--x3", action="store_true", help="also time every float32 candidate in precision 'tf32x3'")
OPTIONS = ARGS.parse_args()
SMALL = OPTIONS.small
DEVICE = "cpu" if SMALL else "cuda"
B, C, S, K, M = (4, 1, 12, 6, 8) if SMALL else (64, 1, 96, 18, 8)
OUT_PATH = OPTIONS.out
SWEEP_SECONDS = min(120, OPTIONS.sweep_seconds) if SMALL else OPTIONS.sweep_seconds
DEADLINE = time.monotonic() + SWEEP_SECONDS  # part 2 starts no setting after this
results: dict = {"shape": [B, C, S, K, M], "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"}


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def synced_ms(fn, repeats: int = 30) -> float:
    """The README's first H100 table's method: a synchronization after every step, gradients accumulating."""
    fn()
    sync()
    best = float("inf")
    for _ in range(1 if SMALL else repeats):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def fastest_ms(fn, repeats: int = 30) -> float:
    """``downpour bench layers``' method: GPU time per step, steps queued back to back."""
    return steps_mod.fastest_ms(fn, 1 if SMALL else repeats, DEVICE)


def bench_ms(fn) -> float:
    if SMALL:
        return fastest_ms(fn, 1)
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=25)


def emit(**row) -> None:
    print(json.dumps(row, default=str), flush=True)


torch.manual_seed(0)
Ho = S - K + 1
L, P = Ho * Ho, C * K * K
geo = ((Ho, Ho), (K, K), (1, 1))
x = torch.randn(B, C, S, S, device=DEVICE)
w = torch.randn(L, M, P, device=DEVICE) / K
g = torch.randn(B, M, Ho, Ho, device=DEVICE)
ref_layer = LocallyConnected2d(C, M, S, K, implementation="bands").to(DEVICE).double()
with torch.no_grad():
    ref_layer.weight.copy_(w.double())
x64 = x.double().requires_grad_(True)
ref_out = ref_layer(x64)
ref_out.backward(g.double())
ref = {"forward": ref_out.detach(), "transpose": x64.grad, "weight_grad": ref_layer.weight.grad}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


layer = LocallyConnected2d(C, M, S, K).to(DEVICE)
xg = x.clone().requires_grad_(True)
conv = torch.nn.Conv2d(C, M, K, bias=False).to(DEVICE)
wl = w.transpose(1, 2).contiguous().requires_grad_(True)
layer_step = steps_mod.training_step(lambda: layer(xg), xg, layer.weight)
PRECISIONS = (("fp32", "highest"), ("tf32", "high"))


def layer_steps(tag: str) -> dict:
    out = {}
    for label, precision in PRECISIONS:
        torch.set_float32_matmul_precision(precision)
        out[f"layer_{label}_ms"] = fastest_ms(layer_step)
    torch.set_float32_matmul_precision("highest")
    results[tag] = out
    emit(**{tag: out})
    return out


def triton_launches(on: bool) -> None:
    """Launch through Triton's own path (``on`` False) or the plans' direct one, from the next call on."""
    triton_launch.DIRECT["enabled"] = on
    lt.forget_plans()


def direct_runners() -> int:
    """How many specializations the plans launch directly (0: every launch went through Triton's own path)."""
    return sum(plan.direct() for plan in lt._PLANS.values())


# 1. The layer as it is, against unfold+bmm (also in TF32) and conv2d (TF32 allowed for cuDNN, as the bench does);
# then with Triton's own launch instead of the plans' direct one, and direct again (alternated: a noisy host).
base = layer_steps("default")
results["direct_runners"] = direct_runners()
for tag, on in (
    ("triton_launch", False),
    ("direct_launch", True),
    ("triton_launch_2", False),
    ("direct_launch_2", True),
):
    triton_launches(on)
    layer_steps(tag)
emit(direct_runners=results["direct_runners"], direct_warned=not triton_launch.DIRECT["enabled"])
results["layer_fp32_synced_ms"] = synced_ms(lambda: layer(xg).sum().backward())  # the old method, for comparison
unfold_step = steps_mod.training_step(lambda: unfold_bmm(xg, wl, K, 1), xg, wl)
results["unfold_bmm_ms"] = fastest_ms(unfold_step)
torch.set_float32_matmul_precision("high")
results["unfold_bmm_tf32_ms"] = fastest_ms(unfold_step)
torch.set_float32_matmul_precision("highest")
results["unfold_bmm_synced_ms"] = synced_ms(lambda: unfold_bmm(xg, wl, K, 1).sum().backward())
torch.backends.cudnn.allow_tf32 = True
results["conv2d_ms"] = fastest_ms(steps_mod.training_step(lambda: conv(xg), xg, conv.weight))
emit(**{key: value for key, value in results.items() if key.endswith("_ms")})

# 2. Settings: first every kernel's autotune candidates (and in float32 each of them in "tf32x3"), then a wider sweep.
runs = {
    "forward": lambda **kw: lt.lc_forward(x, w, *geo, **kw),
    "weight_grad": lambda **kw: lt.lc_weight_grad(g, x, w.shape, *geo, **kw),
    "transpose": lambda **kw: lt.lc_transpose(g, w, (C, S, S), (K, K), (1, 1), **kw),
}
X3 = {"precision": "tf32x3"}  # three TF32 products per product: about float32's accuracy on tensor cores
# The wider sweep, after every kernel's candidates: around the settings measured on an H100 on 2026-11-27 (flat
# bands of 8 locations for the float32 forward, 15 for the rest; the transpose's tiles of 4x8 or 8x8 pixels),
# float32 first. Settings that name no band or tile take the measured one.
grids = {
    (False, "forward"): [dict(block_l=bl, block_k=bk) for bl in (6, 7, 10, 12) for bk in (16, 32)]
    + [dict(block_k=16), dict(num_warps=2), dict(num_stages=2), dict(num_stages=4), dict(block_b=32)],
    (False, "weight_grad"): [dict(block_l=12), dict(block_k=64), dict(block_l=12, block_k=16), dict(block_k=64,
                             num_warps=8), dict(num_stages=2), dict(num_stages=4), dict(block_b=32)],
    (False, "transpose"): [dict(tile=tile, num_warps=nw) for tile in ((4, 8), (8, 8), (4, 16), (2, 16), (8, 4))
                           for nw in (2, 4, 8)]
    + [dict(block_lx=2), dict(block_lx=8), dict(num_stages=2), dict(num_stages=4), dict(block_b=32, num_warps=2)],
    (True, "forward"): [dict(block_l=16), dict(block_k=128), dict(num_warps=4, block_k=128), dict(num_stages=2),
                        dict(num_stages=4), dict(block_b=32), dict(block_l=12, block_k=64)],
    (True, "weight_grad"): [dict(block_k=64), dict(block_k=64, num_warps=8), dict(num_stages=2), dict(num_stages=4),
                            dict(block_b=32), dict(block_l=12)],
    (True, "transpose"): [dict(tile=tile, num_warps=nw) for tile in ((8, 8), (4, 8), (8, 16), (4, 16)) for nw in (4, 8)]
    + [dict(num_stages=2), dict(num_stages=4), dict(block_lx=8)],
}  # fmt: skip


def first_pass(tf32: bool) -> list[tuple[str, dict]]:
    """Each kernel's autotune candidates (the measured setting first), and with ``--x3`` in float32 the same in
    "tf32x3"."""
    out = []
    for name in runs:
        candidates = [dict(c) for c in lt._CANDIDATES[name, tf32]]
        x3 = OPTIONS.x3 and not tf32
        out += [(name, c) for c in candidates] + ([(name, {**c, **X3}) for c in candidates] if x3 else [])
    return out


plan = [(tf32, name, setting) for tf32 in (False, True) for name, setting in first_pass(tf32)]
plan += [(tf32, name, setting) for (tf32, name), grid in grids.items() for setting in grid
         if (tf32, name, setting) not in plan]  # fmt: skip
if SMALL:
    plan = [item for item in plan if item[2] in ({}, X3)]
rows = []
for tf32, name, setting in plan:
    if time.monotonic() > DEADLINE:
        emit(deadline=f"{len(plan) - len(rows)} settings not timed")
        break
    try:
        ms = bench_ms(lambda name=name, setting=setting, tf32=tf32: runs[name](tf32=tf32, **setting))
        err = rel(runs[name](tf32=tf32, **setting), ref[name])
    except Exception as exc:  # an invalid combination (e.g. shared memory): record it and go on
        emit(kernel=name, tf32=tf32, setting=setting, error=repr(exc)[:200])
        continue
    rows.append({"kernel": name, "tf32": tf32, "setting": setting, "ms": ms, "err": err})
    emit(**rows[-1])
results["rows"] = rows

ORIGINAL_TUNED = {key: dict(value) for key, value in lt._TUNED.items()}
# 3. Winners per kernel and precision (fp32 must stay accurate), patched into _TUNED, the layer step again.
winners = {}
for label, _ in PRECISIONS:
    tf32 = label == "tf32"
    for name in runs:
        ok = [r for r in rows if r["kernel"] == name and r["tf32"] == tf32 and (tf32 or r["err"] < 2e-6)]
        if ok:
            top = min(ok, key=lambda r: r["ms"])
            default = next((r["ms"] for r in ok if r["setting"] == {}), None)
            winners[f"{name} {label}"] = {"setting": top["setting"], "ms": top["ms"], "default_ms": default}
            lt._TUNED[name, tf32] = {**lt._TUNED[name, tf32], **top["setting"]}
lt.forget_plans()  # the layer's launches were resolved with the old _TUNED
results["winners"] = winners
results["tuned_after"] = {f"{k[0]} {k[1]}": v for k, v in lt._TUNED.items()}
emit(winners=winners)
best = layer_steps("tuned")
os.environ[triton_autotune.ENVIRONMENT] = "1"  # the layer's own choice among local_triton._CANDIDATES
for (name, tf32), _ in list(lt._TUNED.items()):
    lt._TUNED[name, tf32] = dict(ORIGINAL_TUNED[name, tf32])
lt.forget_plans()
auto = layer_steps("autotuned")
results["autotuned_choices"] = {str(k): {"setting": c.setting, "ms": c.milliseconds}
                                for k, c in triton_autotune.chosen().items()}  # fmt: skip
emit(autotuned_choices=results["autotuned_choices"])
for label, _ in PRECISIONS:
    steps = {"default": base, "tuned": best, "autotuned": auto}
    baseline = results["unfold_bmm_ms" if label == "fp32" else "unfold_bmm_tf32_ms"]
    emit(**{f"{label}: unfold_bmm ({label}) / layer, {name}": baseline / ms[f"layer_{label}_ms"]
            for name, ms in steps.items()})  # fmt: skip

# 4. CPU-side cost of a step where the GPU has almost nothing to do (stride 18 is like this): many steps queued
# without a sync in between, so the time per step is what the host spends issuing it; the layer with Triton's own
# launch and with the plans' direct one, alternated.
tiny_x = torch.randn(2, 1, 36, 36, device=DEVICE, requires_grad=True)
tiny = {"layer_k18_s18": LocallyConnected2d(1, M, 36, K, K).to(DEVICE), "conv2d_k18_s18": torch.nn.Conv2d(1, M, K, K,
        bias=False).to(DEVICE)}  # fmt: skip
steps = 3 if SMALL else 300
for round_ in (1, 2):
    for name, module in tiny.items():
        for on in (False, True) if name.startswith("layer") else (True,):
            triton_launches(on)
            tiny_step = steps_mod.training_step(lambda module=module: module(tiny_x), tiny_x, *module.parameters())
            tiny_step()
            tiny_step()  # the second call makes the direct runner (and checks it)
            sync()
            t = time.perf_counter()
            for _ in range(steps):
                tiny_step()
            sync()
            label = name if not name.startswith("layer") else f"{name}_{'direct' if on else 'triton'}_launch"
            results[f"host_us_per_step_{label}_{round_}"] = (time.perf_counter() - t) / steps * 1e6
small_w = torch.randn(4, M, P, device=DEVICE)
for on in (False, True, False, True):
    triton_launches(on)
    for _ in range(2):
        lt.lc_forward(tiny_x.detach(), small_w, (2, 2), (K, K), (K, K))
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        lt.lc_forward(tiny_x.detach(), small_w, (2, 2), (K, K), (K, K))
    sync()
    label = "direct" if on else "triton"
    results[f"host_us_per_lc_forward_{label}_launch"] = min(results.get(f"host_us_per_lc_forward_{label}_launch",
                                                            1e9), (time.perf_counter() - t) / steps * 1e6)  # fmt: skip
tiny_key = ((2, 1, 36, 36), (K, K), (K, K), (2, 2), 4)  # input shape, kernel, stride, output size, locations
tiny_plan = next(plan for key, plan in lt._PLANS.items() if key[0] == "forward" and key[5:] == tiny_key)
fn, grid, constants = tiny_plan.fn, tiny_plan.grid, tiny_plan.constants
tiny_out = torch.empty(2, M, 2, 2, device=DEVICE)
launch_args = (tiny_x.detach(), small_w, tiny_out, 2, 1, M, P, 4, 36, 2, *tiny_x.stride(), K, K, K, K)
t = time.perf_counter()
for _ in range(steps):
    fn[grid](*launch_args, **constants)  # Triton's own launch, without downpour's wrapper
sync()
results["host_us_per_triton_launch"] = (time.perf_counter() - t) / steps * 1e6
emit(**{k: v for k, v in results.items() if k.startswith("host_us")})
if not SMALL:  # where the host's time goes in the cat layer's step (float32): the 12 largest own times
    import cProfile
    import io
    import pstats

    profile = cProfile.Profile()
    profile.enable()
    for _ in range(steps):
        layer_step()
    sync()
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(12)
    results["host_profile"] = text.getvalue()
    print(text.getvalue(), flush=True)
with open(OUT_PATH, "w") as handle:
    json.dump(results, handle, indent=1, default=str)
print("wrote", OUT_PATH)
