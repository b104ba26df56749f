"""``downpour bench ps`` (a real subprocess) and ``downpour bench layers`` (in this process, through ``cli.main``) run
every configuration and report positive, consistent numbers."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch

from conftest import CliResult, downpour


def test_bench_ps_json_has_every_figure_and_consistent_ratios() -> None:
    """A short run of the benchmark: each rate is positive and the ratios are the rates' quotients."""
    result = downpour("bench", "ps", "--seconds", "0.3", "--rounds", "2", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    keys = (
        "plain_examples_per_s", "hogwild_2w_examples_per_s", "local_1w_examples_per_s", "local_2w_examples_per_s",
        "push_pull_gbps", "memcpy_gbps", "server_process_push_pull_gbps",
    )  # fmt: skip
    for key in keys:
        assert report[key] > 0, key
    ratios = report["ratios"]
    windows = report["windows"]
    assert all(len(windows[name]) == 2 and min(windows[name]) > 0 for name in ("plain", "hogwild", "local1", "local2"))
    paired = sorted(a / b for a, b in zip(windows["local2"], windows["hogwild"], strict=True))
    assert ratios["local_2w_vs_hogwild"] == sum(paired) / 2  # median of the per-round ratios
    assert report["workload"]["num_params"] == 256 * 256
    shared_vs_pipes = report["push_pull_gbps"] / report["server_process_push_pull_gbps"]
    assert ratios["shared_memory_vs_server_process"] == pytest.approx(shared_vs_pipes)


def test_server_processes_apply_every_push_and_stop() -> None:
    """The design-not-taken servers of ``bench ps``: started once, timed in several windows, each push applied
    (values = -lr·update per push so far), and every server process gone after ``close``."""
    from downpour.bench.transport import ServerProcesses

    with ServerProcesses(1001, 2) as servers:
        assert servers.push_pull_gbps(0.05) > 0 and servers.push_pull_gbps(0.05) > 0
        values = [v.copy() for v in servers._values]  # the buffers are refilled in place
        servers._round_trip()
        after = list(servers._values)
        processes = list(servers._servers)
    assert [len(v) for v in after] == [501, 500]
    for before, now in zip(values, after, strict=True):
        assert before.max() < 0 and torch.allclose(torch.from_numpy(now - before), torch.tensor(-1e-6), atol=1e-9)
    assert all(not proc.is_alive() and proc.exitcode == 0 for proc in processes)


def test_bench_layers_json_reports_every_row(cli: Callable[..., CliResult]) -> None:
    """``downpour bench layers --json``: timings for each implementation, the untied-vs-tied rows, and the memory
    autograd keeps between the passes (deterministic: ours keeps nothing new, unfold+bmm the patches)."""
    result = cli("bench", "layers", "--repeats", "1", "--skip-steps", "5", "--json")  # in this process
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    cpu = report["cpu"]
    assert min(cpu["ours_ms"], cpu["unfold_bmm_ms"], cpu["conv2d_ms"]) > 0
    batch, size, kernel = 32, 48, 8
    patches_mb = batch * (size - kernel + 1) ** 2 * kernel * kernel * 4 / 2**20
    assert cpu["unfold_bmm_saved_mb"] >= patches_mb  # the unfolded input, kept for the weight gradient
    assert cpu["ours_saved_mb"] == 0.0  # only the input and the weights, which exist anyway (patches: recomputed)
    rows = {row["layer"]: row for row in report["untied_vs_tied"]}
    untied, tied = rows["untied, locally connected"], rows["tied conv, equal maps"]
    assert untied["params"] == 41 * 41 * 8 * 64 == 860_672  # counted from the layer's own parameters
    assert tied["params"] == 8 * 64
    assert rows["tied conv, equal parameter memory"]["params"] == untied["params"]
    assert untied["flops_per_example"] == tied["flops_per_example"] == 2 * 41 * 41 * 8 * 64
    skip = report["skip_time"]  # τ at quantiles of the field variance: zeroed fractions follow the quantiles
    assert [row["quantile"] for row in skip] == [0.0, 0.25, 0.5, 0.75, 0.9]
    for row in skip:
        assert abs(row["zeroed_fraction"] - row["quantile"]) < 0.02
        assert row["skipped_fraction"] == pytest.approx(row["zeroed_fraction"])  # on the CPU: every flat field
        assert row["dense_ms"] > 0 and row["skip_ms"] > 0
    assert skip[0]["skipped_fraction"] == 0.0 and skip[-1]["skipped_fraction"] > 0.3
    if torch.cuda.is_available():  # the GPU machine: every implementation timed, TF32 against TF32 too
        for key in ("cuda", "cuda_non_overlapping"):
            gpu = report[key]
            for name in ("ours", "ours_tf32", "ours_bands", "unfold_bmm", "unfold_bmm_tf32", "conv2d"):
                assert gpu[f"{name}_ms"] > 0, (key, name)
            assert gpu["tf32_speedup_vs_unfold_bmm_tf32"] == gpu["unfold_bmm_tf32_ms"] / gpu["ours_tf32_ms"]
    losses = report["skip_loss"]
    assert losses[0]["loss_change"] == 0.0 and losses[0]["final_loss"] == losses[0]["final_loss_without_skip"]
    assert all(row["final_loss"] > 0 for row in losses)


def test_training_step_starts_each_step_from_fresh_gradients() -> None:
    """The timed step is a training step's work: after any number of steps the gradients are one step's, not a sum
    (accumulating would add a pass over all of an untied layer's weights to every timing)."""
    from downpour.bench.steps import fastest_ms, training_step
    from downpour.nn import LocallyConnected2d

    torch.manual_seed(0)
    layer = LocallyConnected2d(1, 2, 6, 3)
    x = torch.randn(2, 1, 6, 6, requires_grad=True)
    layer(x).sum().backward()
    once_w, once_x = layer.weight.grad.clone(), x.grad.clone()
    calls = []
    step = training_step(lambda: calls.append(1) or layer(x), x, layer.weight)
    assert fastest_ms(step, repeats=3, device="cpu") > 0
    assert len(calls) == 4  # one warm-up run, then the timed ones
    torch.testing.assert_close(layer.weight.grad, once_w, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, once_x, rtol=0, atol=0)


def test_a_round_whose_denominator_did_no_work_is_left_out_of_the_ratio() -> None:
    """A window in which a configuration did no work (a tiny --seconds on a busy machine) divided by zero."""
    import math

    from downpour.bench.ps import paired_median

    assert paired_median([10.0, 30.0, 5.0], [5.0, 0.0, 5.0]) == 1.5
    assert math.isnan(paired_median([1.0], [0.0]))


def test_bench_sim_ratio_is_the_median_of_per_repeat_ratios(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ratio`` is the median over repeats of sim seconds / plain seconds (the docstring), so that a repeat hit by
    a burst of load does not decide it: repeats (2 s, 1 s), (3 s, 2 s), (12 s, 3 s) give ratios 2, 1.5, 4 and a
    ratio of 2, where the ratio of the medians would be 3/2 and plain/sim 0.5. The other figures use the median
    seconds (sim 3 s, plain 2 s) over the 100 pushes: 33.3 pushes/s, 20,000 µs per gradient, (3 − 2)/100 s =
    10,000 µs of overhead per push."""
    from downpour.bench import sim as bench_sim

    monkeypatch.setattr(bench_sim, "workload", lambda **_: (torch.zeros(4), lambda p, w, rng: (0.0, torch.zeros(4))))
    timings = iter([(2.0, 1.0, 1.0), (3.0, 2.0, 1.5), (12.0, 3.0, 4.0)])

    def canned(*args: object, **kwargs: object) -> dict[str, float]:
        sim_s, plain_s, inside_s = next(timings)
        return {"sim_s": sim_s, "plain_s": plain_s, "inside_s": inside_s, "grad_evals": 100}

    monkeypatch.setattr(bench_sim, "interleaved", canned)
    result = bench_sim.run(workers=4, steps=100, repeats=3)
    assert result["ratio"] == 2.0
    assert result["in_run_ratio"] == 2.0  # median of 2, 2, 3
    assert (result["sim_s"], result["plain_s"]) == (3.0, 2.0)
    assert result["events_per_s"] == pytest.approx(100 / 3)
    assert result["grad_us"] == pytest.approx(20_000)
    assert result["overhead_us_per_push"] == pytest.approx(10_000)


def test_bench_sim_plain_loop_makes_as_many_gradient_calls_as_the_simulator() -> None:
    """Taking turns every ``chunk`` pushes, the plain loop catches up by the simulator's calls since the last turn:
    over the whole run both sides make the same number of gradient calls (here 100 pushes, turns every 7)."""
    import numpy as np

    from downpour.backends.sim import SimSettings
    from downpour.bench.sim import interleaved
    from downpour.ps.policies import make_policy
    from downpour.ps.rules import make_rule

    calls = [0]

    def grad(p: torch.Tensor, worker: int, rng: np.random.Generator) -> tuple[float, torch.Tensor]:
        calls[0] += 1
        return 0.0, torch.zeros_like(p)

    settings = SimSettings(workers=3, steps=100, compute_sigma=0.5)
    totals = interleaved(torch.zeros(4), grad, make_rule("sgd", lr=0.1), make_policy("downpour"), settings, lr=0.1,
                         chunk=7)  # fmt: skip
    assert totals["grad_evals"] == 100
    assert calls[0] == 2 * 100


def test_arithmetic_of_a_layer_step() -> None:
    """Forward, input gradient and weight gradient each do every multiply-add once: 3 · 2 · batch · locations ·
    maps · patch FLOPs (batch 32, 41x41 locations, 8 maps, 8x8 patches: 5.16 GFLOP; at stride 8, 6x6 locations)."""
    from downpour.bench.layers import arithmetic_gflop

    assert arithmetic_gflop((32, 1, 48, 8, 1, 8)) == pytest.approx(6 * 32 * 1681 * 8 * 64 / 1e9)
    assert arithmetic_gflop((32, 1, 48, 8, 8, 8)) == pytest.approx(6 * 32 * 36 * 8 * 64 / 1e9)
    assert arithmetic_gflop((64, 3, 96, 18, 1, 8)) == pytest.approx(6 * 64 * 79 * 79 * 8 * 3 * 18 * 18 / 1e9)
