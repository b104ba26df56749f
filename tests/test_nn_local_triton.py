"""The Triton kernels of LocallyConnected2d against the float64 per-location loop.

On a CUDA machine they run on the GPU; elsewhere in a subprocess under Triton's interpreter
(``TRITON_INTERPRET=1``, which must be set before Triton compiles anything), so CI checks the same kernel code.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from downpour.nn import LocallyConnected2d
from downpour.nn.local import locally_connected_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None

CASES = [
    # (batch, in_channels, out_channels, in_size, kernel, stride); which kernels run: local_triton._banded
    (6, 1, 8, 12, 6, 1),  # the cat layer's shape, small: banded kernels, a partial block of locations
    (66, 2, 16, (7, 14), (3, 6), (2, 1)),  # banded, batch over one block, two channels, stride > 1
    (5, 1, 8, 7, 4, 1),  # a small kernel: one program per location
    (17, 2, 3, (7, 9), (3, 4), (2, 1)),  # batch not a block multiple, rectangular, stride > 1
    (3, 3, 20, 8, 8, 1),  # one location, more maps than a block of 16
    (4, 1, 2, 12, 4, 4),  # non-overlapping fields
    (18, 1, 1, 7, 2, 3),  # one map; the last row and column are not covered
]


def compare(device: str) -> list[dict[str, float]]:
    """Relative errors of every output and gradient of the Triton path against the float64 loop, per case."""
    results = []
    for batch, cin, cout, size, kernel, stride in CASES:
        torch.manual_seed(0)
        layer = LocallyConnected2d(cin, cout, size, kernel, stride, implementation="triton").to(device)
        h, w = layer.in_size
        x64 = torch.randn(batch, cin, h, w, dtype=torch.float64)
        g64 = torch.randn(batch, cout, *layer.out_size, dtype=torch.float64)
        w64 = layer.weight.detach().double().cpu().requires_grad_(True)
        xr = x64.clone().requires_grad_(True)
        gr = g64.clone().requires_grad_(True)
        ref = locally_connected_reference(xr, w64, layer.kernel_size, layer.stride)
        ref_t = torch.autograd.grad(ref, xr, gr, create_graph=True)[0]  # Wᵀg, differentiable in g and W
        (ref * g64).sum().backward()
        ref_gx, ref_gw = xr.grad.clone(), w64.grad.clone()
        (ref_t * x64).sum().backward()  # the transpose's own backward
        ref_tgg, ref_tgw = gr.grad.clone(), w64.grad - ref_gw

        # A non-contiguous input (a slice of a wider tensor) exercises the kernels' stride arguments.
        wide = torch.zeros(batch, cin, h, w + 3, device=device)
        wide[..., 1 : w + 1] = x64.float().to(device)
        x = wide[..., 1 : w + 1].requires_grad_(True)
        out = layer(x)
        (out * g64.float().to(device)).sum().backward()
        gw = layer.weight.grad.clone()
        layer.weight.grad = None
        g = g64.float().to(device).requires_grad_(True)
        t = layer.transpose(g)
        (t * x64.float().to(device)).sum().backward()

        def rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
            return float((ours.detach().double().cpu() - ref.detach()).norm() / ref.detach().norm())

        results.append({
            "forward": rel(out, ref), "grad_input": rel(x.grad, ref_gx), "grad_weight": rel(gw, ref_gw),
            "transpose": rel(t, ref_t), "transpose_grad_input": rel(g.grad, ref_tgg),
            "transpose_grad_weight": rel(layer.weight.grad, ref_tgw),
        })  # fmt: skip
    return results


# Launch settings other than the defaults (as a sweep tries them) for the first case: each kernel's result is the same.
# The flat settings run a band's kernel rows (the transpose: its rows of locations) as one sequence of chunks; a
# band of 3 locations is not a power of two, so its product has columns no location fills.
TUNED = {
    "forward": [
        {"block_b": 16, "block_l": 4, "block_k": 32, "num_warps": 2, "num_stages": 2},
        {"block_b": 16, "block_l": 3, "block_k": 16, "flat": True},
    ],
    "weight_grad": [
        {"block_b": 16, "block_l": 2, "block_k": 16, "num_warps": 2, "num_stages": 2},
        {"block_b": 16, "block_l": 3, "block_k": 32, "flat": True},
    ],
    "transpose": [
        {"block_b": 16, "block_lx": 2, "tile": (2, 4), "num_warps": 2, "num_stages": 2},
        {"block_b": 16, "block_lx": 2, "tile": (4, 4), "flat": True},
    ],
}


# Flat settings on other cases (as in CASES): several batch blocks, two channels, strides over 1, one map.
FLAT_CASES = {
    (20, 2, 16, (7, 10), (3, 6), (2, 1)): {
        "forward": {"block_b": 16, "block_l": 3, "block_k": 16, "flat": True},
        "weight_grad": {"block_b": 16, "block_l": 3, "block_k": 32, "flat": True},
        "transpose": {"block_b": 16, "block_lx": 2, "tile": (2, 8), "flat": True},
    },
    CASES[6]: {
        "forward": {"block_b": 16, "block_l": 2, "block_k": 16, "flat": True},
        "weight_grad": {"block_b": 16, "block_l": 2, "block_k": 16, "flat": True},
        "transpose": {"block_b": 16, "block_lx": 16, "tile": (4, 4), "flat": True},  # 16 wide with one map
    },
}


def tuned(device: str) -> dict[str, float]:
    """Largest absolute difference of each kernel under :data:`TUNED` (and :data:`FLAT_CASES`) from its default
    launch; the refusal of an unknown setting."""
    from downpour.nn import local_triton as lt

    diffs: dict[str, float | str] = {}
    for index, (case, settings) in enumerate([(CASES[0], TUNED), *((c, {k: [v] for k, v in s.items()})
                                                                   for c, s in FLAT_CASES.items())]):  # fmt: skip
        batch, cin, cout, size, kernel, stride = case
        (h, w), (kh, kw), (sh, sw) = ((v, v) if isinstance(v, int) else v for v in (size, kernel, stride))
        torch.manual_seed(1)
        out_hw = ((h - kh) // sh + 1, (w - kw) // sw + 1)
        geometry = ((kh, kw), (sh, sw))
        x = torch.randn(batch, cin, h, w, device=device)
        weight = torch.randn(out_hw[0] * out_hw[1], cout, cin * kh * kw, device=device)
        g = torch.randn(batch, cout, *out_hw, device=device)
        runs = {
            "forward": lambda x=x, weight=weight, out_hw=out_hw, geometry=geometry, **kw: lt.lc_forward(
                x, weight, out_hw, *geometry, tf32=False, **kw),
            "weight_grad": lambda g=g, x=x, weight=weight, out_hw=out_hw, geometry=geometry, **kw: lt.lc_weight_grad(
                g, x, weight.shape, out_hw, *geometry, tf32=False, **kw),
            "transpose": lambda g=g, weight=weight, chw=(cin, h, w), geometry=geometry, **kw: lt.lc_transpose(
                g, weight, chw, *geometry, tf32=False, **kw),
        }  # fmt: skip
        for name, run in runs.items():
            default = run()
            for setting in settings[name]:
                diffs[f"case {index} {name} {setting}"] = float((run(**setting) - default).abs().max())
        if index == 0:
            try:
                runs["forward"](block_kk=16)
            except ValueError as exc:
                diffs["refusal"] = str(exc)
            try:
                runs["forward"](precision="fp16")
            except ValueError as exc:
                diffs["precision refusal"] = str(exc)
            diffs["precision launched"] = _launched_precisions(runs)
    # Launches are resolved once per shape and kept: the same input with a smaller output (fewer locations, as a
    # caller of these functions may ask) must be a launch of its own, not the larger one's grid.
    # Second derivatives (the backward passes run through the same kernels): a gradient penalty's weight gradient.
    batch, cin, cout, size, kernel, stride = CASES[0]
    layer = LocallyConnected2d(cin, cout, size, kernel, stride, implementation="triton").to(device)
    x = torch.randn(batch, cin, size, size, device=device, requires_grad=True)
    w64 = layer.weight.detach().double().cpu().requires_grad_(True)
    x64 = x.detach().double().cpu().requires_grad_(True)
    for ours, xx, weight in ((True, x, layer.weight), (False, x64, w64)):
        out = layer(xx) if ours else locally_connected_reference(xx, weight, layer.kernel_size, layer.stride)
        (grad,) = torch.autograd.grad(out.pow(2).sum(), xx, create_graph=True)
        grad.pow(2).sum().backward()
    diffs["double backward, weight"] = float((layer.weight.grad.double().cpu() - w64.grad).abs().max()
                                             / w64.grad.abs().max())  # fmt: skip
    diffs["double backward, input"] = float((x.grad.double().cpu() - x64.grad).abs().max() / x64.grad.abs().max())
    # The smaller output first: a later call reusing its grid would leave part of the larger output unwritten.
    x = torch.randn(3, 1, 12, 12, device=device)
    calls = [((3, 3), out_hw) for out_hw in ((2, 2), (4, 4), (2, 2))]  # one program per location (stride = kernel)
    calls += [((1, 1), out_hw) for out_hw in ((3, 3), (7, 7))]  # banded: kernel 6, stride 1
    for call, (step, out_hw) in enumerate(calls):
        k = 3 if step == (3, 3) else 6
        weight = torch.randn(out_hw[0] * out_hw[1], 8, k * k, device=device)
        g = torch.randn(3, 8, *out_hw, device=device)
        used = ((out_hw[0] - 1) * step[0] + k, (out_hw[1] - 1) * step[1] + k)
        x_used = x[..., : used[0], : used[1]].double().requires_grad_(True)
        w64 = weight.double().requires_grad_(True)
        ref = locally_connected_reference(x_used, w64, (k, k), step)
        ref.backward(g.double())
        got = lt.lc_forward(x, weight, out_hw, (k, k), step, tf32=False)
        got_w = lt.lc_weight_grad(g, x, weight.shape, out_hw, (k, k), step, tf32=False)
        diffs[f"forward, call {call}, output {out_hw}"] = float((got.double() - ref.detach()).abs().max())
        diffs[f"weight_grad, call {call}, output {out_hw}"] = float((got_w.double() - w64.grad).abs().max())
    return diffs


def _launched_precisions(runs: dict[str, Any]) -> dict[str, str]:
    """The ``PRECISION`` each kernel was launched with when asked for ``precision="tf32x3"`` (the interpreter computes
    every precision in float32, so only the launch shows whether the setting reached the kernel; the spy does not
    run the kernel: its result is not looked at)."""
    from downpour.nn import local_triton as lt

    seen: dict[str, str] = {}

    class Spy:
        def __init__(self, name: str, kernel: Any) -> None:
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid: Any) -> Any:
            def launch(*args: Any, **kwargs: Any) -> None:  # records what it was launched with; runs nothing
                seen[self.name] = kwargs["PRECISION"]

            return launch

    names = {
        "forward": "_forward_band_kernel", "weight_grad": "_weight_grad_band_kernel", "transpose": "_transpose_kernel",
    }  # fmt: skip
    originals = {name: getattr(lt, attribute) for name, attribute in names.items()}
    try:
        for name, attribute in names.items():
            setattr(lt, attribute, Spy(name, originals[name]))
            runs[name](precision="tf32x3")
    finally:
        for name, attribute in names.items():
            setattr(lt, attribute, originals[name])
    return seen


def autotuned(device: str) -> dict[str, object]:
    """The layer's forward and backward with launch settings chosen by timing (on the CPU: forced on, under the
    interpreter): its errors against the float64 loop, and what was chosen among how many candidates."""
    from downpour.nn import local_triton as lt
    from downpour.nn import triton_autotune

    before = os.environ.get(triton_autotune.ENVIRONMENT)
    os.environ[triton_autotune.ENVIRONMENT] = "1"
    try:
        return _autotuned_layer(device, lt, triton_autotune)
    finally:
        if before is None:
            del os.environ[triton_autotune.ENVIRONMENT]
        else:
            os.environ[triton_autotune.ENVIRONMENT] = before


def _autotuned_layer(device: str, lt: Any, triton_autotune: Any) -> dict[str, object]:
    batch, cin, cout, size, kernel, stride = 2, 1, 8, 10, 6, 1  # small (banded): the interpreter runs each twice
    torch.manual_seed(2)
    layer = LocallyConnected2d(cin, cout, size, kernel, stride, implementation="triton").to(device)
    x64 = torch.randn(batch, cin, size, size, dtype=torch.float64, requires_grad=True)
    w64 = layer.weight.detach().double().cpu().requires_grad_(True)
    ref = locally_connected_reference(x64, w64, layer.kernel_size, layer.stride)
    ref.sum().backward()
    x = x64.detach().float().to(device).requires_grad_(True)
    out = layer(x)
    out.sum().backward()

    def rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
        return float((ours.detach().double().cpu() - ref.detach()).norm() / ref.detach().norm())

    choices = {
        key[0]: {"setting": choice.setting, "timed": len(choice.milliseconds), "ran": sum(t is not None for t in
                 choice.milliseconds), "candidates": [dict(c) for c in lt._CANDIDATES[key[0], key[1]]]}
        for key, choice in triton_autotune.chosen().items()
    }  # fmt: skip
    errors = {"forward": rel(out, ref), "grad_input": rel(x.grad, x64.grad), "grad_weight": rel(layer.weight.grad,
              w64.grad)}  # fmt: skip
    return {"errors": errors, "choices": choices}


def _compare_somewhere() -> dict[str, object]:
    """:func:`compare`, :func:`tuned` and :func:`autotuned` on CUDA, or else each in its own interpreter subprocess,
    all three at once (the interpreter runs on one core; this machine has two)."""
    parts = ("compare", "tuned", "autotuned")
    if torch.cuda.is_available():
        return {"cases" if part == "compare" else part: globals()[part]("cuda") for part in parts}
    load = (
        "import importlib.util, json\n"
        f"spec = importlib.util.spec_from_file_location('triton_checks', {str(Path(__file__))!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    running = {
        part: subprocess.Popen([sys.executable, "-c", f"{load}print(json.dumps(module.{part}('cpu')))"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for part in parts
    }  # fmt: skip
    from conftest import finish_all  # here: this module is also loaded by the subprocesses, outside pytest

    results: dict[str, object] = {}
    for part, done in finish_all(running, timeout=300).items():
        assert done.returncode == 0, done.stderr[-3000:]
        results["cases" if part == "compare" else part] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (CUDA builds of PyTorch ship it)")
def test_triton_kernels_equal_the_per_location_loop() -> None:
    """Every case against the float64 loop; other launch settings (``tuning``) give the same results, and a
    misspelt one is refused by name; settings chosen by timing the candidates give the same results too."""
    checks = _compare_somewhere()
    tuned_diffs = checks["tuned"]
    assert len(tuned_diffs) == sum(map(len, TUNED.values())) + 3 * len(FLAT_CASES) + 3 + 12
    for key, diff in tuned_diffs.items():
        if "refusal" not in key and "launched" not in key:
            assert diff < 1e-4, f"{key} differs by {diff}"
    assert "Unknown forward launch settings ['block_kk']" in tuned_diffs["refusal"]
    assert tuned_diffs["precision refusal"] == "Unknown forward precision 'fp16' (one of ieee, tf32, tf32x3)"
    assert tuned_diffs["precision launched"] == dict.fromkeys(("forward", "weight_grad", "transpose"), "tf32x3")
    autotuned = checks["autotuned"]
    for name, error in autotuned["errors"].items():
        assert error < 2e-6, f"autotuned {name} off by {error:.2e} relative"
    assert set(autotuned["choices"]) == {"forward", "weight_grad", "transpose"}
    for name, choice in autotuned["choices"].items():
        assert choice["timed"] == len(choice["candidates"]) and choice["ran"] >= 1, (name, choice)
        assert choice["setting"] in choice["candidates"], (name, choice)
    results = checks["cases"]
    assert len(results) == len(CASES)
    for case, errors in zip(CASES, results, strict=True):
        for name, error in errors.items():
            assert error < 2e-6, f"{case}: {name} off by {error:.2e} relative"


def test_forcing_triton_where_it_cannot_run_names_the_reason() -> None:
    layer = LocallyConnected2d(1, 2, 6, 3, implementation="triton").double()
    with pytest.raises(ValueError, match=r"implementation='triton' needs .*torch\.float64"):
        layer(torch.zeros(1, 1, 6, 6, dtype=torch.float64))


def test_unknown_implementation_is_refused() -> None:
    with pytest.raises(ValueError, match=r"Invalid implementation: 'cuda'"):
        LocallyConnected2d(1, 2, 6, 3, implementation="cuda")


def test_bands_are_used_on_cpu_by_default() -> None:
    layer = LocallyConnected2d(1, 2, 6, 3)
    assert layer.implementation == "auto"
    assert layer._triton(torch.zeros(1, 1, 6, 6)) is (os.environ.get("TRITON_INTERPRET") == "1" and HAS_TRITON)


def test_autotune_switch_is_read_strictly(monkeypatch: pytest.MonkeyPatch) -> None:
    """``DOWNPOUR_TRITON_AUTOTUNE``: unset means on for CUDA only; 0 and 1 force it; anything else is refused by name
    (a typo must not silently leave the measured settings in place, or time candidates on every machine)."""
    from downpour.nn import triton_autotune

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(triton_autotune.ENVIRONMENT, raising=False)
    assert (triton_autotune.enabled(cpu), triton_autotune.enabled(cuda)) == (False, True)
    monkeypatch.setenv(triton_autotune.ENVIRONMENT, "0")
    assert not triton_autotune.enabled(cuda)
    monkeypatch.setenv(triton_autotune.ENVIRONMENT, "1")
    assert triton_autotune.enabled(cpu)
    monkeypatch.setenv(triton_autotune.ENVIRONMENT, "yes")
    with pytest.raises(ValueError, match=r"DOWNPOUR_TRITON_AUTOTUNE must be 0 \(off\) or 1 \(on\), got 'yes'"):
        triton_autotune.enabled(cpu)
    monkeypatch.setenv(triton_autotune.ENVIRONMENT, "0")
    assert triton_autotune.choose("forward", ("key",), [{"a": 1}, {"a": 2}], lambda s: None, cpu) == {"a": 1}  # off


def test_forgetting_the_plans_forgets_the_choices_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """A choice is timed once per shape and kept; ``forget_plans`` (for sweeps that change the settings) drops the
    resolved launches and the choices, so that the next call times the candidates again."""
    pytest.importorskip("triton")
    from downpour.nn import local_triton as lt
    from downpour.nn import triton_autotune

    monkeypatch.setenv(triton_autotune.ENVIRONMENT, "1")
    timed: list[dict] = []
    candidates = [{"a": 1}, {"a": 2}]
    for _ in range(2):
        triton_autotune.choose("probe", ("shape",), candidates, timed.append, torch.device("cpu"))
    assert timed == candidates and ("probe", "shape") in triton_autotune.chosen()  # timed once, then kept
    lt._PLANS["probe", "shape"] = (None, (1,), {})
    lt.forget_plans()
    assert ("probe", "shape") not in lt._PLANS and ("probe", "shape") not in triton_autotune.chosen()
    triton_autotune.choose("probe", ("shape",), candidates, timed.append, torch.device("cpu"))
    assert timed == candidates * 2


def test_candidates_suit_the_maps_they_run_with() -> None:
    """The timed candidates are only those whose product fits the maps: all at the cat layer's 8 maps; at 256 maps
    only the measured settings and one more (a band of 4 locations of 256 maps needs 4x the shared memory an H100
    has); the flat transpose's product is at least 16 wide (``tl.dot``), so not at 1-4 maps. The measured band
    (``block_l`` for 8 maps) holds fewer locations as maps grow: never over 128 columns."""
    pytest.importorskip("triton")
    from downpour.nn import local_triton as lt

    def suited(kernel: str, tf32: bool, maps: int) -> list[dict]:
        return [c for c in lt._CANDIDATES[kernel, tf32] if lt._suits(kernel, tf32, c, maps)]

    for (kernel, tf32), candidates in lt._CANDIDATES.items():
        assert suited(kernel, tf32, 8) == list(candidates)
        # at 256 maps: the measured settings, and the transpose's batch split or the bands' earlier pipeline
        assert suited(kernel, tf32, 256) == [candidates[0], candidates[-1]]
        assert "block_l" not in candidates[-1]  # its band width follows the maps
    for maps in (1, 2, 3, 4):
        assert suited("transpose", False, maps) == [c for c in lt._CANDIDATES["transpose", False] if not c.get("flat")]
    assert [c.get("block_l") for c in suited("forward", False, 16)] == [None, 8, 4, None]
    widths = {}
    for maps in (1, 8, 16, 100, 256):
        band = lt._band_launch("weight_grad", maps, False, {})
        widths[maps] = (band["LOCS"], band["BLOCK_L"] * band["BLOCK_M"])
    assert widths == {1: (15, 16), 8: (15, 128), 16: (8, 128), 100: (1, 128), 256: (1, 256)}
    assert lt._band_launch("weight_grad", 16, False, {"block_l": 15})["LOCS"] == 15  # a setting given is kept


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (CUDA builds of PyTorch ship it)")
def test_flat_candidates_compile_for_an_h100() -> None:
    """Triton compiles each kernel's flat float32 setting at the cat shape for sm_90 with its own ptxas (the
    measured forward and weight gradient, the transpose's flat candidate), no GPU needed: the interpreter does not
    check what the compiler refuses (tl.dot sides, constructs) or the shared memory a launch needs, so this is CI's
    only check of that."""
    spec = importlib.util.spec_from_file_location("triton_sass", Path(__file__).parents[1] / "scripts/triton_sass.py")
    sass = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sass)
    from downpour.nn import local_triton as lt

    for (kernel, tf32), candidates in lt._CANDIDATES.items():
        if tf32:
            continue  # the same kernels with another precision constant: compiled on the GPU machine's tests
        setting = {} if lt._TUNED[kernel, tf32].get("flat") else next(c for c in candidates if c.get("flat"))
        fn, constants, _, _, launch = sass.plan(kernel, setting, tf32)
        assert constants["FLAT"], (kernel, setting)
        compiled = sass.compile_kernel(fn, constants, 90, launch["num_warps"], 3)
        code = sass.machine_code(compiled)
        assert code["shared"] <= 227 * 1024, (kernel, tf32, setting, code)  # an H100's shared memory per block
        assert code["loops"], (kernel, tf32, setting)  # the chunk loop is there, found in the machine code
        if kernel == "forward":  # "tf32x3" reaches the products: tensor-core instructions instead of float32 FMAs
            mixes = {}
            for precision in ("ieee", "tf32x3"):
                fn, constants, _, _, launch = sass.plan(kernel, {**setting, "precision": precision}, tf32)
                code = sass.machine_code(sass.compile_kernel(fn, constants, 90, launch["num_warps"], 3))
                loop = code["loops"][0]
                mixes[precision] = (loop.get("FFMA", 0) > 0, loop.get("HMMA", 0) + loop.get("HGMMA", 0) > 0)
            assert mixes == {"ieee": (True, False), "tf32x3": (False, True)}, mixes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: compiled kernels exist only there")
@pytest.mark.parametrize(("kernel", "stride"), [(6, 1), (5, 5)])  # banded kernels; one program per location
def test_direct_launches_equal_tritons_own_on_cuda(monkeypatch: pytest.MonkeyPatch, kernel: int, stride: int) -> None:
    """Later calls launch Triton's compiled kernels directly (downpour.nn.triton_launch): on this Triton version the
    check against Triton's own launch passes (no warning), every kernel of the layer step is launched directly, and
    its outputs and gradients equal those of Triton's own launch bit for bit, for each specialization: a contiguous
    input and ``sum()``'s expanded gradient (stride 0), then a slice of a wider input and a dense gradient. Every
    call gets new numbers, so that an output left unwritten (holding a freed buffer's old bits) cannot pass."""
    import warnings

    from downpour.nn import local_triton as lt
    from downpour.nn import triton_autotune, triton_launch

    monkeypatch.setenv(triton_autotune.ENVIRONMENT, "0")  # the same settings both ways: equal bits
    torch.manual_seed(3)
    layer = LocallyConnected2d(1, 8, 20, kernel, stride, implementation="triton").cuda()
    calls = 4  # the first resolves the plan, the second makes and checks the direct runner, two more use it
    wides = torch.randn(2, calls, 4, 1, 20, 23, device="cuda")  # per specialization and call
    grads = torch.randn(calls, 4, 8, *layer.out_size, device="cuda")

    def steps() -> list[torch.Tensor]:
        results = []
        for spec in range(2):
            for call in range(calls):
                wide = wides[spec, call]
                x = (wide[..., :20].contiguous() if spec == 0 else wide[..., 2:22]).requires_grad_(True)
                layer.weight.grad = None
                out = layer(x)
                out.sum().backward() if spec == 0 else out.backward(grads[call])
                results += [out.detach(), x.grad, layer.weight.grad]
        return results

    try:
        triton_launch.DIRECT["enabled"] = False
        lt.forget_plans()
        own = steps()
        triton_launch.DIRECT["enabled"] = True
        lt.forget_plans()
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            direct = steps()
        runners = {key[0]: plan.direct() for key, plan in lt._PLANS.items()}
    finally:
        triton_launch.DIRECT["enabled"] = True
        lt.forget_plans()
    assert runners == {"forward": 2, "weight_grad": 2, "transpose": 2}, runners
    assert len(direct) == len(own) == 2 * calls * 3
    for index, (ours, theirs) in enumerate(zip(direct, own, strict=True)):
        assert torch.equal(ours, theirs), f"result {index} (specialization, call, tensor) differs"
