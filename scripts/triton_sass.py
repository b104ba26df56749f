"""Developer tool, no GPU needed: compile the LocallyConnected2d Triton kernels for an NVIDIA card with Triton's own
ptxas and print what their machine code (SASS) needs, for every launch candidate (local_triton._CANDIDATES).

    PYTHONPATH=src .venv/bin/python scripts/triton_sass.py [--arch 90]

Per kernel and setting, at the cat shape (batch 64, 1 channel, 96x96, kernel 18, stride 1, 8 maps): registers per
thread, spilled bytes per thread (stack), shared memory, warps that fit one SM (occupancy), warps per SM the launch
supplies on average ("launched": programs x warps / 132; below what fits, SMs wait on latency: the measured
transpose supplies about 9), the instructions in each loop, and an issue-slot estimate: the instructions all warps
execute / (4 per clock per SM x 132 SMs x 1.755 GHz). The estimate ignores latency and memory: in float32 the H100's
measured times were 1.7-1.8x it for kernels that fit 12 warps per SM, and 3.7x for the forward that spilled
(README). It ranks settings; it does not time them. Triton here may be newer than on the GPU machine, so its code
may differ a little.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from downpour.nn import local_triton as lt

BATCH, SIZE, KERNEL, MAPS = 64, 96, 18, 8
OUT = SIZE - KERNEL + 1
SMS, CLOCK = 132, 1.755e9
TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_kernel(fn, constants: dict, arch: int, num_warps: int, num_stages: int):
    """``fn`` compiled for ``sm_{arch}`` with its tensors float32 pointers (a skip's int32 groups and int8 fields)
    and other arguments 32-bit integers."""
    pointers = {"order_ptr": "*i32", "count_ptr": "*i32", "field_ptr": "*i8"}
    signature = {
        name: "constexpr" if name in constants else pointers.get(name, "*fp32" if name.endswith("_ptr") else "i32")
        for name in fn.arg_names
    }
    source = ASTSource(fn=fn, signature=signature, constexprs=constants)
    options = {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True}  # as launches do
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def machine_code(compiled) -> dict:
    """Registers, spilled bytes, shared memory, instruction count, and the loops (backward branches) with their
    sizes, from ``cuobjdump`` and ``nvdisasm`` (run on the kernel's cubin in a private temporary directory, not a
    fixed name in /tmp that anyone could have made a link)."""
    with tempfile.TemporaryDirectory(prefix="downpour-sass-") as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as handle:
            handle.write(compiled.asm["cubin"])
        return {**_read_machine_code(path), "shared": compiled.metadata.shared}


def _read_machine_code(path: str) -> dict:
    """What :func:`machine_code` says of the cubin at ``path``, but its shared memory."""
    usage = subprocess.run([f"{TOOLS}/cuobjdump", "-res-usage", path], capture_output=True, text=True).stdout
    registers, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    sass = subprocess.run([f"{TOOLS}/nvdisasm", "-c", path], capture_output=True, text=True).stdout
    instructions, labels, pending = [], {}, []
    for line in sass.splitlines():
        label = re.match(r"(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        found = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?);", line)
        if found:
            offset = int(found.group(1), 16)
            instructions.append((offset, found.group(3), found.group(4)))
            labels.update(dict.fromkeys(pending, offset))
            pending = []
    loops = []
    for offset, op, arguments in instructions:
        target = re.search(r"(\.L_x_\d+)", arguments) if op.startswith("BRA") else None
        if target and labels.get(target.group(1), offset + 1) <= offset:
            start = labels[target.group(1)]
            body = collections.Counter(op.split(".")[0] for at, op, _ in instructions if start <= at <= offset)
            if sum(body.values()) > 1:
                loops.append(body)
    return {"registers": registers, "stack": stack, "count": len(instructions),
            "loops": sorted(loops, key=lambda body: sum(body.values()))}  # fmt: skip


def issue_ms(code: dict, programs: int, warps: int, trips: list[int]) -> float:
    """Issue-slot time of ``programs`` programs of ``warps`` warps whose nested loops (innermost first) run
    ``trips`` times each (loops of one trip that the compiler removed are dropped from ``trips``)."""
    sizes = [sum(body.values()) for body in code["loops"]]
    trips = [t for t in trips if t > 1] if len(trips) > len(sizes) else trips
    executed, inner = 0, 0
    for size, count in zip(sizes, trips, strict=True):
        executed, inner = count * (size - inner + executed), size
    return programs * warps * (executed + code["count"] - inner) / (SMS * 4 * CLOCK) * 1e3


def warps_per_sm(code: dict, warps: int) -> int:
    """Warps of this kernel that fit one H100 SM at once (65,536 registers, 228 KiB shared memory, 64 warps)."""
    blocks = min(65536 // (max(code["registers"], 1) * 32 * warps), 228 * 1024 // (code["shared"] + 1024), 64 // warps)
    return max(blocks, 0) * warps


def plan(kernel: str, setting: dict, tf32: bool, skip: bool = False) -> tuple:
    """The kernel function, its constants, the number of programs and its loops' trip counts at the cat shape
    (``skip``: the kernel that skips flat fields, with every field active)."""
    launch = {**lt._TUNED[kernel, tf32], **setting}
    precision = launch.get("precision", "tf32" if tf32 else "ieee")
    block_b = launch.get("block_b", lt.SKIP_BLOCK_B if skip else BATCH)
    batch_blocks = math.ceil(BATCH / block_b)  # the forward and the transpose split the batch over programs
    if kernel == "transpose":
        tile_h, tile_w = launch["tile"]
        block_lx = lt._block_lx(launch, MAPS)
        flat = bool(launch.get("flat", False))
        constants = dict(KH=KERNEL, KW=KERNEL, SH=1, SW=1, TILE_H=tile_h, TILE_W=tile_w, BLOCK_B=block_b, BLOCK_M=MAPS,
                         BLOCK_LX=block_lx, FLAT=flat, PRECISION=precision, SKIP=skip)  # fmt: skip
        rows, columns = KERNEL + tile_h - 1, KERNEL + tile_w - 1  # locations touching an inner tile
        trips = [math.ceil(rows * columns / block_lx)] if flat else [math.ceil(columns / block_lx), rows]
        programs = math.ceil(SIZE / tile_h) * math.ceil(SIZE / tile_w) * batch_blocks
        return lt._transpose_kernel, constants, programs, trips, launch
    band = lt._band_launch(kernel, MAPS, tf32, setting)
    warps, stages = band.pop("num_warps"), band.pop("num_stages")
    constants = dict(KH=KERNEL, KW=KERNEL, SH=1, SW=1, BLOCK_B=block_b, SKIP=skip, **band)  # band holds PRECISION
    span = band["LOCS"] - 1 + KERNEL
    chunk = band["BLOCK_K"]
    trips = [math.ceil(KERNEL * span / chunk)] if band["FLAT"] else [math.ceil(span / chunk), KERNEL]
    if kernel == "weight_grad":  # the batch is its sum: one program per band, the batch in blocks inside it
        constants["ONE_B_BLOCK"] = batch_blocks == 1 and not skip
        trips, batch_blocks = [batch_blocks, *trips], 1
    fn = lt._forward_band_kernel if kernel == "forward" else lt._weight_grad_band_kernel
    launch = {**launch, "num_warps": warps, "num_stages": stages}
    return fn, constants, OUT * math.ceil(OUT / band["LOCS"]) * batch_blocks, trips, launch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    arch = parser.parse_args().arch
    print(f"{'kernel':11s} {'tf32':5s} {'setting':58s} {'regs':>4s} {'spill':>5s} {'smem':>5s} {'warps/SM':>8s} "
          f"{'launched':>8s} {'loop sizes':>14s} {'issue ms':>8s}")  # fmt: skip
    for (kernel, tf32), candidates in lt._CANDIDATES.items():
        for setting in candidates:
            fn, constants, programs, trips, launch = plan(kernel, setting, tf32)
            compiled = compile_kernel(fn, constants, arch, launch["num_warps"], launch.get("num_stages", 3))
            code = machine_code(compiled)
            sizes = "/".join(str(sum(body.values())) for body in code["loops"])
            ms = issue_ms(code, programs, launch["num_warps"], trips)
            shown = str(setting or f"measured {lt._TUNED[kernel, tf32]}")
            print(f"{kernel:11s} {tf32!s:5s} {shown:58s} {code['registers']:4d} {code['stack']:5d} "
                  f"{code['shared'] // 1024:4d}K {warps_per_sm(code, launch['num_warps']):8d} "
                  f"{programs * launch['num_warps'] / SMS:8.1f} {sizes:>14s} {ms:8.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
