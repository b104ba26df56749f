"""Skipping flat fields in the Triton kernels of LocallyConnected2d (CUDA's variance skip).

The groups each program computes are checked against plain loops here; the kernels themselves run on CUDA where
there is one, elsewhere in a subprocess under Triton's interpreter (``TRITON_INTERPRET=1``), and are compiled for an
H100 (sm_90) with Triton's own ptxas, no GPU needed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from downpour.nn import LocallyConnected2d
from downpour.nn.local import locally_connected_reference
from downpour.nn.triton_skip import TritonSkip, band_groups, compact, tile_groups

HAS_TRITON = importlib.util.find_spec("triton") is not None

# (batch, in_channels, out_channels, in_size, kernel, stride): banded kernels (bands of 8 locations and a partial
# one; two channels and a stride over 1, more maps than a band of 8 holds; a rectangular kernel and 3 maps), then
# non-overlapping fields (one program per location). Over 16 examples: more than one block of a group's examples.
CASES = [
    (19, 1, 8, (9, 20), 6, 1),
    (18, 2, 16, (7, 14), (3, 6), (2, 1)),
    (17, 2, 3, (7, 9), (3, 4), (2, 1)),
    (18, 1, 2, 12, 4, 4),
]


def _coherent_mask(batch: int, out_hw: tuple[int, int], seed: int) -> torch.Tensor:
    """``(B, H_out, W_out)``: patches of active and flat fields, as pictures have (flat regions span many fields);
    example 0 has no active field, example 1 only active ones."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 1, -(-out_hw[0] // 3), -(-out_hw[1] // 3), generator=generator) > 0.5
    active = F.interpolate(coarse.float(), size=out_hw, mode="nearest")[:, 0] > 0.5  # (B, H_out, W_out)
    active[0], active[1] = False, True
    return active


def test_compact_puts_each_groups_active_examples_first_in_order() -> None:
    group_active = torch.tensor([[True, False, False], [False, False, True], [True, False, True], [False, False, True]])
    order, count = compact(group_active)  # 4 examples, 3 groups
    assert count.tolist() == [2, 0, 3]
    assert order.dtype == torch.int32 and order.shape == (3, 4) and order.is_contiguous()
    assert order[0, :2].tolist() == [0, 2] and order[2, :3].tolist() == [1, 2, 3]
    assert all(sorted(row) == [0, 1, 2, 3] for row in order.tolist())  # every example once: a permutation


@pytest.mark.parametrize("locs", [1, 3, 8])
def test_band_groups_are_the_fields_of_each_band(locs: int) -> None:
    active = _coherent_mask(5, (4, 10), seed=locs)
    grouped = band_groups(active, locs)
    bands = math.ceil(10 / locs)
    assert grouped.shape == (5, 4 * bands)
    for b in range(5):
        for y in range(4):
            for band in range(bands):
                expected = bool(active[b, y, band * locs : (band + 1) * locs].any())
                assert bool(grouped[b, y * bands + band]) == expected, (b, y, band)


@pytest.mark.parametrize(("in_hw", "tile", "kernel", "stride"), [
    ((12, 22), (4, 8), (6, 6), (1, 1)), ((7, 14), (2, 8), (3, 6), (2, 1)), ((12, 12), (4, 4), (4, 4), (4, 4)),
    ((9, 9), (8, 8), (2, 2), (3, 3)),  # pixels no field covers; a tile past the last field
])  # fmt: skip
def test_tile_groups_are_the_fields_that_touch_each_tile(in_hw, tile, kernel, stride) -> None:
    out_hw = tuple((n - k) // s + 1 for n, k, s in zip(in_hw, kernel, stride, strict=True))
    active = _coherent_mask(4, out_hw, seed=sum(in_hw))
    grouped = tile_groups(active, in_hw, tile, kernel, stride)
    tiles = [(y0, x0) for y0 in range(0, in_hw[0], tile[0]) for x0 in range(0, in_hw[1], tile[1])]
    assert grouped.shape == (4, len(tiles))
    for b in range(4):
        for index, (y0, x0) in enumerate(tiles):
            touching = [
                bool(active[b, ly, lx])
                for ly in range(out_hw[0]) for lx in range(out_hw[1])
                if ly * stride[0] < y0 + tile[0] and ly * stride[0] + kernel[0] > y0
                and lx * stride[1] < x0 + tile[1] and lx * stride[1] + kernel[1] > x0
            ]  # fmt: skip
            assert bool(grouped[b, index]) == any(touching), (b, y0, x0)


def test_computed_fraction_counts_the_blocks_of_examples_each_band_computes() -> None:
    """Per band, its active examples rounded up to blocks (a program computes a whole block), out of the blocks the
    batch fills; with blocks of one example, the products of the (band, example) pairs with an active field."""
    active = torch.zeros(3, 2, 10, dtype=torch.bool)
    active[0, 0, 0] = True  # band 0 of row 0 (locations 0-3) computed for example 0
    active[1, 1, 9] = True  # the partial last band of row 1 (locations 8-9) for example 1
    active[2] = True  # everything for example 2
    skip = TritonSkip(active)
    assert skip.computed_fraction(4, block=1) == pytest.approx((4 + 2 + 20) / 60)
    assert skip.computed_fraction(1, block=1) == pytest.approx(22 / 60)
    assert skip.computed_fraction(4) == 1.0  # 3 examples are one block of 16: a band with one active is computed
    order, count, fields = skip.bands(4)
    assert count.tolist() == [2, 1, 1, 1, 1, 2]  # per (row, band): example 2 everywhere, 0 and 1 in one band each
    assert fields.shape == (20, 3) and fields.dtype == torch.int8 and int(fields.sum()) == 22  # (L, B)
    assert skip.bands(4)[0] is order  # made once per grouping
    many = torch.zeros(20, 1, 8, dtype=torch.bool)
    many[:17, 0, :4] = True  # band 0: 17 examples, two blocks of 16
    many[:4, 0, 4:] = True  # band 1: 4 examples, one block
    assert TritonSkip(many).computed_fraction(4) == pytest.approx((2 * 4 + 1 * 4) / (2 * 8))


def test_a_plan_that_would_leave_no_block_out_runs_the_dense_kernels() -> None:
    """Where every band has an active field in every block of examples, nothing would be left out: the plan runs the
    dense kernels (zeroing the flat fields) instead of paying for the compaction, and says nothing was skipped."""
    from downpour.nn.skip import SkipPlan

    active = torch.ones(20, 2, 8, dtype=torch.bool)
    active[:, :, 1::2] = False  # half the fields flat, but each band of 4 has an active one for every example
    plan = SkipPlan(active, (3, 3), (1, 1), torch.float32, triton_band=4)
    assert plan.triton is None and plan.skipped_fraction == 0.0 and plan.zeroed_fraction == 0.5
    active[:16, 0, :4] = False  # 16 examples flat in one band: one block left out
    plan = SkipPlan(active, (3, 3), (1, 1), torch.float32, triton_band=4)
    assert plan.triton is not None and plan.skipped_fraction == pytest.approx(4 * 16 / (2 * 16 * 16))
    assert not plan.skips  # the CPU's pair kernels are not planned for a layer that runs Triton


def skipping(device: str) -> list[dict[str, float]]:
    """Per case: relative errors of the skipping layer (forward, both gradients, the transpose and its gradients)
    against the float64 loop with flat fields zeroed, the fractions its plan reports, and whether it read the
    inputs of an example with no active field (NaN there)."""
    results = []
    for index, (batch, cin, cout, size, kernel, stride) in enumerate(CASES):
        torch.manual_seed(index)
        layer = LocallyConnected2d(cin, cout, size, kernel, stride, implementation="triton").to(device)
        active = _coherent_mask(batch, layer.out_size, seed=index)
        mask = active[:, None].double()  # (B, 1, H_out, W_out)
        x64 = torch.randn(batch, cin, *layer.in_size, dtype=torch.float64)
        x64[0] = 0.0  # no field of example 0 is computed: it adds nothing anywhere
        g64 = torch.randn(batch, cout, *layer.out_size, dtype=torch.float64)
        w64 = layer.weight.detach().double().cpu().requires_grad_(True)
        xr, gr = x64.clone().requires_grad_(True), g64.clone().requires_grad_(True)
        ref = locally_connected_reference(xr, w64, layer.kernel_size, layer.stride) * mask
        ref_t = torch.autograd.grad(ref, xr, gr, create_graph=True)[0]  # Wᵀ(mask·g)
        (ref * g64).sum().backward()
        ref_gx, ref_gw = xr.grad.clone(), w64.grad.clone()
        (ref_t * x64).sum().backward()
        ref_tgg, ref_tgw = gr.grad.clone(), w64.grad - ref_gw

        x_in = x64.float()
        x_in[0] = float("nan")  # read by a kernel, it would show in the weight gradient
        x = x_in.to(device).requires_grad_(True)
        plan = layer.skip_plan(active.to(device), batch)
        out = layer(x, plan)
        (out * g64.float().to(device)).sum().backward()
        gw = layer.weight.grad.clone()
        layer.weight.grad = None
        g = g64.float().to(device).requires_grad_(True)
        t = layer.transpose(g, None, plan)
        (t * x64.float().to(device)).sum().backward()

        def rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
            return float((ours.detach().double().cpu() - ref.detach()).norm() / ref.detach().norm())

        blocks = _other_blocks(layer, plan, x64.float().to(device), g.detach()) if index == 0 else {}
        grad_input = x.grad.clone()
        grad_input[0] = torch.where(grad_input[0] == 0, 0.0, float("nan"))  # exactly 0 there
        results.append({
            "forward": rel(out, ref), "grad_input": rel(grad_input, ref_gx), "grad_weight": rel(gw, ref_gw),
            "transpose": rel(t, ref_t), "transpose_grad_input": rel(g.grad, ref_tgg),
            "transpose_grad_weight": rel(layer.weight.grad, ref_tgw), "on_triton": plan.triton is not None,
            "zeroed_fraction": plan.zeroed_fraction, "skipped_fraction": plan.skipped_fraction,
            "flat_fraction": 1.0 - float(active.double().mean()), "other_blocks": blocks,
            "blocks_left_out": _blocks_left_out(active, _forward_band(layer)),
        })  # fmt: skip
    return results


def _forward_band(layer: LocallyConnected2d) -> int:
    from downpour.nn import local_triton as lt

    return lt.forward_band(layer.out_channels, layer.kernel_size, layer.stride)


def _blocks_left_out(active: torch.Tensor, band: int, block: int = 16) -> float:
    """The fraction of a forward's (location, example) products in blocks of ``block`` examples that a band of
    ``band`` locations leaves out (its examples with no active field in it, ``block`` at a time), by loops."""
    batch, out_h, out_w = active.shape
    computed = 0
    for y in range(out_h):
        for x0 in range(0, out_w, band):
            examples = sum(bool(active[b, y, x0 : x0 + band].any()) for b in range(batch))
            computed += math.ceil(examples / block) * block * min(band, out_w - x0)
    return 1.0 - computed / (math.ceil(batch / block) * block * out_h * out_w)


def _other_blocks(layer: LocallyConnected2d, plan: object, x: torch.Tensor, g: torch.Tensor) -> dict[str, float]:
    """Per kernel, the largest difference of its skipping launch with 32 or 64 examples per block (the ``block_b``
    setting, for sweeps) from its default launch of 16."""
    from downpour.nn import local_triton as lt

    geometry, w, skip = (layer.kernel_size, layer.stride), layer.weight.detach(), plan.triton
    runs = {
        "forward": lambda **kw: lt.lc_forward(x, w, layer.out_size, *geometry, skip=skip, **kw),
        "weight_grad": lambda **kw: lt.lc_weight_grad(g, x, w.shape, layer.out_size, *geometry, skip=skip, **kw),
        "transpose": lambda **kw: lt.lc_transpose(g, w, (layer.in_channels, *layer.in_size), *geometry, skip=skip,
                                                  **kw),
    }  # fmt: skip
    blocks = {}
    for name, run in runs.items():
        default = run()
        blocks[name] = max(float((run(block_b=b) - default).abs().max()) for b in (32, 64))
    return blocks


def _skipping_somewhere() -> list[dict[str, float]]:
    if torch.cuda.is_available():
        return skipping("cuda")
    load = (
        "import importlib.util, json\n"
        f"spec = importlib.util.spec_from_file_location('triton_skip_checks', {str(Path(__file__))!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
    )
    done = subprocess.run([sys.executable, "-c", f"{load}print(json.dumps(module.skipping('cpu')))"],
                          capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "1"},
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (CUDA builds of PyTorch ship it)")
def test_triton_kernels_skip_flat_fields_and_equal_the_loop_with_them_zeroed() -> None:
    """The kernels leave out the blocks of a group's examples with no active field: the example with none is never
    read (its NaN inputs would make the weight gradient NaN), and the results equal the float64 loop's with flat
    fields zeroed; the plan reports the fraction of the forward's products left out (whole blocks of 16 examples),
    as loops count it."""
    results = _skipping_somewhere()
    assert len(results) == len(CASES)
    for case, result in zip(CASES, results, strict=True):
        for name in ("forward", "grad_input", "grad_weight", "transpose", "transpose_grad_input",
                     "transpose_grad_weight"):  # fmt: skip
            assert result[name] < 2e-6, f"{case}: {name} off by {result[name]:.2e} relative"
        assert result["on_triton"], case
        assert result["zeroed_fraction"] == pytest.approx(result["flat_fraction"])
        assert 0.0 < result["skipped_fraction"] <= result["zeroed_fraction"] + 1e-12, (case, result)
        assert result["skipped_fraction"] == pytest.approx(result["blocks_left_out"]), (case, result)
    assert set(results[0]["other_blocks"]) == {"forward", "weight_grad", "transpose"}
    for name, diff in results[0]["other_blocks"].items():
        assert diff < 1e-5, f"{name} with 32 or 64 examples per block differs by {diff}"


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (CUDA builds of PyTorch ship it)")
def test_skipping_kernels_compile_for_an_h100() -> None:
    """Each kernel with ``SKIP`` compiles for sm_90 at the cat shape with Triton's own ptxas (the interpreter does not
    check what the compiler refuses, or the shared memory a launch needs)."""
    spec = importlib.util.spec_from_file_location("triton_sass", Path(__file__).parents[1] / "scripts/triton_sass.py")
    sass = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sass)
    from downpour.nn import local_triton as lt

    for kernel in ("forward", "weight_grad", "transpose"):
        fn, constants, _, _, launch = sass.plan(kernel, {}, False, skip=True)
        assert constants["SKIP"] and constants["BLOCK_B"] == lt.SKIP_BLOCK_B
        code = sass.machine_code(sass.compile_kernel(fn, constants, 90, launch["num_warps"], 3))
        assert code["shared"] <= 227 * 1024 and code["loops"], (kernel, code)
    rows = dict(KH=5, KW=5, SH=5, SW=5, BLOCK_B=16, BLOCK_M=16, BLOCK_KW=16, PRECISION="ieee", SKIP=True)
    for fn in (lt._forward_rows_kernel, lt._weight_grad_rows_kernel):  # fields that barely overlap
        code = sass.machine_code(sass.compile_kernel(fn, rows, 90, 4, 3))
        assert code["loops"] and code["stack"] == 0, code
