"""``downpour bench ps`` (a real subprocess) and ``downpour bench layers`` (in this process, through ``cli.main``) run
every configuration and report positive, consistent numbers."""

from __future__ import annotations

import json
import math
import types
from collections.abc import Callable

import pytest
import torch
from rich.console import Console

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
    for key, (a, b) in {"local_1w_vs_plain": ("local1", "plain"), "local_2w_vs_plain": ("local2", "plain"),
                        "hogwild_vs_plain": ("hogwild", "plain")}.items():  # fmt: skip
        per_round = sorted(x / y for x, y in zip(windows[a], windows[b], strict=True))
        assert ratios[key] == pytest.approx(sum(per_round) / 2), key
    assert ratios["push_pull_vs_memcpy"] == pytest.approx(report["push_pull_gbps"] / report["memcpy_gbps"])
    one_call = report["push_pull_gbps"] / report["memcpy_one_call_gbps"]
    assert ratios["push_pull_vs_memcpy_one_call"] == pytest.approx(one_call)


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
    assert untied["bytes"] == 3_442_688 and tied["bytes"] == 2_048  # 4 bytes per float32 weight
    assert cpu["arithmetic_gflop"] == pytest.approx(3 * 2 * 32 * 41 * 41 * 8 * 64 / 1e9)  # 5.16: fwd + 2 bwd
    # each ratio is the quotient of the two times it names (× the reference's speed: its time over ours)
    assert cpu["speedup_vs_unfold_bmm"] == cpu["unfold_bmm_ms"] / cpu["ours_ms"]
    nov = report["cpu_non_overlapping"]
    assert nov["stride"] == 8 and nov["ours_vs_conv2d"] == nov["conv2d_ms"] / nov["ours_ms"]
    assert cpu["saved_ratio"] == cpu["ours_saved_mb"] / cpu["unfold_bmm_saved_mb"] == 0.0
    skip = report["skip_time"]  # τ at quantiles of the field variance: zeroed fractions follow the quantiles
    assert [row["quantile"] for row in skip] == [0.0, 0.25, 0.5, 0.75, 0.9]
    for row in skip:
        assert abs(row["zeroed_fraction"] - row["quantile"]) < 0.02
        assert row["skipped_fraction"] == pytest.approx(row["zeroed_fraction"])  # on the CPU: every flat field
        assert row["dense_ms"] > 0 and row["skip_ms"] > 0
        if row["skipped_fraction"] > 0:  # the table's "saved / not computed"
            assert row["saved_per_skipped"] == row["saved_fraction"] / row["skipped_fraction"]
        else:
            assert row["saved_per_skipped"] is None  # NaN (nothing skipped), which strict JSON writes as null
    assert skip[0]["skipped_fraction"] == 0.0 and skip[-1]["skipped_fraction"] > 0.3
    if torch.cuda.is_available():  # the GPU machine: every implementation timed, TF32 against TF32 too
        for key in ("cuda", "cuda_non_overlapping"):
            gpu = report[key]
            for name in ("ours", "ours_tf32", "ours_bands", "unfold_bmm", "unfold_bmm_tf32", "conv2d"):
                assert gpu[f"{name}_ms"] > 0, (key, name)
            assert gpu["tf32_speedup_vs_unfold_bmm_tf32"] == gpu["unfold_bmm_tf32_ms"] / gpu["ours_tf32_ms"]
            locations = {"cuda": 79 * 79, "cuda_non_overlapping": 5 * 5}[key]  # 96x96, kernel 18, stride 1 or 18
            assert gpu["arithmetic_gflop"] == pytest.approx(3 * 2 * 64 * locations * 8 * 18 * 18 / 1e9)
        gpu_skip = report["cuda_skip_time"]  # the Triton kernels leave out bands with no active field
        assert [row["quantile"] for row in gpu_skip] == [0.0, 0.25, 0.5, 0.75, 0.9]
        for row in gpu_skip:
            assert abs(row["zeroed_fraction"] - row["quantile"]) < 0.02 and row["dense_ms"] > 0 and row["skip_ms"] > 0
            assert 0.0 <= row["skipped_fraction"] <= row["zeroed_fraction"] + 1e-9
        assert gpu_skip[-1]["skipped_fraction"] > 0.3  # flat regions span whole bands
    losses = report["skip_loss"]
    assert losses[0]["loss_change"] == 0.0 and losses[0]["final_loss"] == losses[0]["final_loss_without_skip"]
    assert all(row["final_loss"] > 0 for row in losses)
    for row in losses:  # the change of the final loss against τ = 0's, relative
        assert row["loss_change"] == pytest.approx(row["final_loss"] / losses[0]["final_loss"] - 1.0)
    assert any(row["final_loss_without_skip"] != row["final_loss"] for row in losses[1:])  # evaluated both ways


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


def _table_rows(text: str) -> dict[str, list[str]]:
    """The rows of rich tables in ``text``: first cell -> the row's other cells (stripped), the first such row."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("│┃").split("│")]
        if len(cells) > 1 and cells[0]:
            rows.setdefault(cells[0], cells[1:])
    return rows


def _printed(print_fn: Callable[..., None], result: dict) -> str:
    console = Console(record=True, width=250, color_system=None)
    print_fn(result, console)
    return console.export_text()


class _Clock:
    """A clock that moves only when a step says how long it took (seconds)."""

    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now

    def step(self, durations: list[float]) -> Callable[[], None]:
        it = iter(durations)

        def run() -> None:
            self.now += next(it)

        return run


def test_fastest_ms_is_the_fastest_timed_run_in_milliseconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs of 9 (the untimed warm-up), 3, 2 and 5 ms: the fastest timed one is 2 ms."""
    from downpour.bench import steps

    clock = _Clock()
    monkeypatch.setattr(steps, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    assert steps.fastest_ms(clock.step([0.009, 0.003, 0.002, 0.005]), 3, "cpu") == pytest.approx(2.0)


def test_implementations_take_turns_and_each_keeps_its_fastest_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Timed one after another, a burst of load could slow all of one implementation's runs and none of the
    next's: they now take turns, a warm-up each, then one run of each per round."""
    from downpour.bench import steps

    clock, order = _Clock(), []

    def logged(name: str, durations: list[float]) -> Callable[[], None]:
        run = clock.step(durations)
        return lambda: (order.append(name), run())[1]

    monkeypatch.setattr(steps, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    best = steps.fastest_of_each({"ours": logged("ours", [0.05, 0.004, 0.003, 0.006]),
                                  "unfold": logged("unfold", [0.2, 0.09, 0.12, 0.08])}, 3, "cpu")  # fmt: skip
    assert order == ["ours", "unfold"] * 4
    assert best == pytest.approx({"ours": 3.0, "unfold": 80.0})


def test_skip_timing_takes_the_fastest_of_each_and_the_median_of_the_pairs_ratios(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pairs (dense, skip) of (10, 4), (12, 9) and (20, 5) ms after an untimed warm-up pair: the fastest are 10 and
    4 ms, the ratios skip ÷ dense 0.4, 0.75 and 0.25, their median 0.4 (their mean would be 0.467)."""
    from downpour.bench import skip

    clock = _Clock()
    monkeypatch.setattr(skip, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    dense = clock.step([0.050, 0.010, 0.012, 0.020])
    skipping = clock.step([0.050, 0.004, 0.009, 0.005])
    dense_ms, skip_ms, ratio = skip._paired_times(dense, skipping, 3)
    assert (dense_ms, skip_ms) == (pytest.approx(10.0), pytest.approx(4.0))
    assert ratio == pytest.approx(0.4)


def test_block_throughput_is_the_bytes_of_a_block_over_its_fastest_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls of 1/1024 s each moving 1 MB: a block of 20 calls moves 20 MB in 20/1024 s, 1.024 GB/s."""
    from downpour.bench import transport

    clock = _Clock()
    monkeypatch.setattr(transport, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    calls = [0]

    def call() -> None:
        calls[0] += 1
        clock.now += 2**-10

    assert transport.fastest_block_gbps(call, 10**6, seconds=0.1) == pytest.approx(1.024)
    assert calls[0] == 50 + 6 * 20  # 50 warm-up calls, then blocks of 20 until 0.1 s have passed (6 · 20/1024 s)


def test_skip_rows_report_the_time_saved_as_one_minus_the_median_ratio(monkeypatch: pytest.MonkeyPatch) -> None:
    """With every pair's skip ÷ dense at 0.6 (the timer replaced by one call of each real step and that ratio), each
    τ row saves 40%; "saved / not computed" divides that by the fraction not computed (nothing at τ = 0: NaN); the
    fractions zeroed follow the quantiles of the field variances (8 crops of 16x16, kernel 4: 8 · 169 fields)."""
    from downpour.bench import skip

    def ratio_of_six_tenths(dense: Callable[[], None], skipping: Callable[[], None], repeats: int,
                            device: str) -> tuple:  # fmt: skip
        assert device == "cpu"
        dense(), skipping()
        return 10.0, 6.0, 0.6

    monkeypatch.setattr(skip, "_paired_times", ratio_of_six_tenths)
    rows = skip.time_saved((8, 1, 16, 4, 1, 2), repeats=1)
    assert [row["quantile"] for row in rows] == list(skip.QUANTILES)
    for row in rows:
        assert row["saved_fraction"] == pytest.approx(0.4)
        assert (row["dense_ms"], row["skip_ms"]) == (10.0, 6.0)
        assert abs(row["zeroed_fraction"] - row["quantile"]) <= 1 / 169
        if row["quantile"] > 0:
            assert row["saved_per_skipped"] == pytest.approx(0.4 / row["skipped_fraction"])
    assert rows[0]["tau"] == 0.0 and rows[0]["skipped_fraction"] == 0.0 and math.isnan(rows[0]["saved_per_skipped"])


def test_saved_for_backward_counts_what_autograd_keeps_in_mib() -> None:
    """unfold + bmm keeps its unfolded input, batch · locations · patch floats of 4 bytes (4 · 64 · 18 · 4 = 18,432
    bytes at batch 4, 2 channels, 10x10, kernel 3, stride 1: 8x8 locations; 4x4 at stride 2); ours keeps nothing
    beyond the input and the weights."""
    from downpour.bench.layers import saved_for_backward_mb

    assert saved_for_backward_mb("unfold_bmm", (4, 2, 10, 3, 1, 5)) == 4 * 8 * 8 * 2 * 3 * 3 * 4 / 2**20
    assert saved_for_backward_mb("unfold_bmm", (4, 2, 10, 3, 2, 5)) == 4 * 4 * 4 * 2 * 3 * 3 * 4 / 2**20
    assert saved_for_backward_mb("ours", (4, 2, 10, 3, 1, 5)) == 0.0


def test_untied_vs_tied_rows_count_parameters_bytes_and_flops(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch 2, 1 channel, 10x10, kernel 3, 4 maps: 8x8 = 64 locations of 9-value patches. Untied: 64 · 4 · 9 =
    2,304 weights, 9,216 bytes in float32, 2 · 64 · 4 · 9 = 4,608 FLOPs per example; a tied conv with 4 maps: 36
    weights, the same FLOPs; with the untied layer's memory: 4 · 64 = 256 maps, 2,304 weights, 64 times the FLOPs
    (timed one example at a time). A step timed at 8 ms is 4 ms per example at batch 2."""
    from downpour.bench import layers

    def eight_ms(step: Callable[[], None], repeats: int, device: str) -> float:
        step()
        return 8.0

    monkeypatch.setattr(layers, "fastest_ms", eight_ms)
    rows = layers.untied_vs_tied((2, 1, 10, 3, 1, 4), repeats=1)
    table = [(r["layer"], r["maps"], r["params"], r["bytes"], r["flops_per_example"], r["fwd_bwd_ms_per_example"])
             for r in rows]  # fmt: skip
    assert table == [
        ("untied, locally connected", 4, 2_304, 9_216, 4_608, 4.0),
        ("tied conv, equal maps", 4, 36, 144, 4_608, 4.0),
        ("tied conv, equal parameter memory", 256, 2_304, 9_216, 294_912, 8.0),
    ]


def test_arithmetic_of_a_layer_step() -> None:
    """Forward, input gradient and weight gradient each do every multiply-add once: 3 · 2 · batch · locations ·
    maps · patch FLOPs (batch 32, 41x41 locations, 8 maps, 8x8 patches: 5.16 GFLOP; at stride 8, 6x6 locations)."""
    from downpour.bench.layers import arithmetic_gflop

    assert arithmetic_gflop((32, 1, 48, 8, 1, 8)) == pytest.approx(6 * 32 * 1681 * 8 * 64 / 1e9)
    assert arithmetic_gflop((32, 1, 48, 8, 8, 8)) == pytest.approx(6 * 32 * 36 * 8 * 64 / 1e9)
    assert arithmetic_gflop((64, 3, 96, 18, 1, 8)) == pytest.approx(6 * 64 * 79 * 79 * 8 * 3 * 18 * 18 / 1e9)


def test_a_push_pull_round_moves_the_update_in_and_the_values_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each GB/s figure is for the bytes a round moves: 1,001 float32 updates in and 1,001 values out, 8,008 bytes,
    whether through the shards, plain copies, one copy or the server processes. The timer is replaced by one call of
    the round that reports the bytes it was told (the time is not what is checked); the servers' round is real:
    after it each value is −lr · update = −1e-3 · 1e-3."""
    from downpour.bench import ps as bench_ps
    from downpour.bench import transport

    def bytes_of_one_call(fn: Callable[[], None], nbytes: int, seconds: float, block: int = 20) -> float:
        fn()
        return float(nbytes)

    monkeypatch.setattr(bench_ps, "fastest_block_gbps", bytes_of_one_call)
    monkeypatch.setattr(transport, "fastest_block_gbps", bytes_of_one_call)
    result = bench_ps.push_pull(1001, 2, seconds=0.01)
    assert result == {"push_pull_gbps": 8008.0, "memcpy_gbps": 8008.0, "memcpy_one_call_gbps": 8008.0}
    with transport.ServerProcesses(1001, 2) as servers:
        assert servers.push_pull_gbps(0.01) == 8008.0
        values = torch.from_numpy(servers._values[0].copy())
    assert len(values) == 501 and torch.allclose(values, torch.full_like(values, -1e-6))


def test_a_window_counts_only_the_examples_done_in_it() -> None:
    """``measure_window`` rates the examples done during the window: a configuration that had done a million
    examples before it and does none in it is at 0 examples/s."""
    from downpour.bench.runners import Runner, measure_window

    class Idle(Runner):
        name = "idle"

        def pids(self) -> list[int]:
            return []

        def examples(self) -> int:
            return 1_000_000

    assert measure_window(Idle(), 0.05, warmup=0.0) == 0.0


def test_the_plain_loop_baseline_counts_examples_and_takes_its_turn_of_batches() -> None:
    """``train_forever`` as rank 1 of 2 (Hogwild's second process) trains on batches 1, 3, 5, ... (wrapping at the
    end of the data) and counts ``batch_size`` examples per step: 3 steps of 2 examples are 6. The model stops
    the loop after its third loss, as the benchmark's stop flag does."""
    from downpour.bench.baselines import train_forever

    examples = torch.arange(40, dtype=torch.float32).reshape(10, 4)  # 5 batches of 2 rows
    counter, stop = torch.zeros(2, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    seen = []

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(4))

        def loss(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x[:, 0].tolist())
            if len(seen) == 3:
                stop[0] = 1
            return (x * self.weight).sum()

    threads = torch.get_num_threads()
    try:
        train_forever(1, 2, Model(), examples, counter, stop, batch_size=2, lr=0.1)
    finally:
        torch.set_num_threads(threads)
    assert seen == [[8.0, 12.0], [24.0, 28.0], [0.0, 4.0]]  # batches 1, 3 and 5 % 5 = 0
    assert counter.tolist() == [0, 6]


def test_bench_sim_overhead_is_per_push_and_the_gradient_time_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """100 pushes made with 125 gradient calls (a sync round's extra calls, say), sim 3 s, plain 2 s: the overhead
    is (3 − 2) s / 100 pushes = 10,000 µs per push, and a gradient call takes 2 s / 125 = 16,000 µs."""
    from downpour.bench import sim as bench_sim

    monkeypatch.setattr(bench_sim, "workload", lambda **_: (torch.zeros(4), lambda p, w, rng: (0.0, torch.zeros(4))))
    monkeypatch.setattr(bench_sim, "interleaved", lambda *a, **k: {"sim_s": 3.0, "plain_s": 2.0, "inside_s": 1.0,
                                                                     "grad_evals": 125})  # fmt: skip
    result = bench_sim.run(workers=4, steps=100, repeats=1)
    assert result["overhead_us_per_push"] == pytest.approx(10_000)
    assert result["grad_us"] == pytest.approx(16_000)
    assert result["grad_evals"] == 125


def test_bench_sim_workers_read_their_own_slices_as_the_refusal_says() -> None:
    """``bench sim --workers N`` refuses more workers than examples because each simulated worker reads its own
    slice; they did not (every worker drew from all the examples). With one example per worker, each worker's
    batches now hold its own example only."""
    import numpy as np

    from downpour.bench import sim as bench_sim
    from downpour.config import DataConfig
    from downpour.data import load_dataset

    count = len(load_dataset(DataConfig(source="digits", held_out=64), seed=0).train)
    _, grad = bench_sim.workload(workers=count)
    rng = np.random.default_rng(0)
    for worker in (0, 1, count - 1):
        batch = grad.batches.draw(worker, rng)
        assert torch.equal(batch, grad.batches.examples[worker].expand_as(batch)), worker


def test_bench_sim_plain_loop_steps_down_the_gradient_round_robin() -> None:
    """The baseline applies ``w ← w − lr·g`` after each call and asks the workers in turn, across its runs: 5 calls
    of 3 workers in runs of 2 and 3 are workers 0, 1, 2, 0, 1, and w = −0.1 · 5 · g."""
    import numpy as np

    from downpour.bench.sim import PlainLoop

    workers = []

    def grad(p: torch.Tensor, worker: int, rng: np.random.Generator) -> tuple[float, torch.Tensor]:
        workers.append(worker)
        return 0.0, torch.tensor([1.0, -2.0])

    loop = PlainLoop(torch.zeros(2), grad, workers=3, lr=0.1)
    loop.run(2)
    loop.run(3)
    assert workers == [0, 1, 2, 0, 1]
    assert torch.allclose(loop.w, torch.tensor([-0.5, 1.0]))


def _layers_result() -> dict:
    """A ``bench layers`` result with round numbers (what the tables print is checked against them by hand)."""
    shape = {"batch": 32, "channels": 1, "size": 48, "kernel": 8, "stride": 1, "maps": 8}
    untied = {"layer": "untied, locally connected", "maps": 8, "params": 860_672, "bytes": 3_442_688,
              "flops_per_example": 1_721_344, "fwd_bwd_ms_per_example": 0.625}  # fmt: skip
    skip_row = {"quantile": 0.5, "tau": 0.25, "zeroed_fraction": 0.5, "skipped_fraction": 0.5, "dense_ms": 15.0,
                "skip_ms": 8.0, "saved_fraction": 0.4, "saved_per_skipped": 0.8}  # fmt: skip
    loss_row = {"quantile": 0.5, "tau": 0.25, "zeroed_fraction": 0.5, "skipped_fraction": 0.5, "train_seconds": 3.0,
                "final_loss": 2.5, "loss_change": 0.25, "final_loss_without_skip": 2.75}  # fmt: skip
    gpu = {"device": "a GPU", "shape": shape, "kernels": "triton", "conv2d_tf32": True, "ours_ms": 0.8,
           "ours_tf32_ms": 0.5, "ours_bands_ms": 10.0, "unfold_bmm_ms": 9.6, "unfold_bmm_tf32_ms": 9.0,
           "conv2d_ms": 3.2, "tf32_speedup_vs_unfold_bmm_tf32": 18.0}  # fmt: skip
    return {
        "cpu": {
            "shape": shape,
            "threads": 2,
            "ours_ms": 10.0,
            "unfold_bmm_ms": 125.0,
            "conv2d_ms": 8.0,
            "ours_saved_mb": 0.0,
            "unfold_bmm_saved_mb": 13.125,
        },
        "cpu_non_overlapping": {"stride": 8, "ours_ms": 1.0, "conv2d_ms": 2.5, "ours_vs_conv2d": 2.5},
        "untied_vs_tied": [untied],
        "skip_time": [skip_row],
        "skip_loss": [loss_row],
        "cuda": gpu,
        "cuda_skip_time": [{**skip_row, "dense_ms": 1.5, "skip_ms": 0.875}],
    }


def test_layers_tables_print_each_number_in_its_column() -> None:
    """``× ours`` is an implementation's time over ours (125 / 10 ms = 12.50, conv2d 8 / 10 = 0.80); the untied row
    shows its parameters, then its bytes, then its FLOPs; the skip rows their fractions in their own columns (saved
    40%, not the 50% not computed); the CUDA table unfold + bmm's time over each (9.6 / 0.8 = 12.0, / 0.5 = 19.2)."""
    from downpour.bench.layers import print_tables

    text = _printed(print_tables, _layers_result())
    rows = _table_rows(text)
    assert rows["downpour LocallyConnected2d"] == ["10.0", "1.00", "0.0"]
    assert rows["unfold + bmm"] == ["125.0", "12.50", "13.1"]
    assert rows["tied conv2d (not the same layer)"] == ["8.0", "0.80", ""]
    assert rows["untied, locally connected"] == ["8", "860,672", "3,442,688", "1,721,344", "0.625"]
    assert rows["0.25 (50%)"] == ["50.0%", "50.0%", "15.0", "8.0", "40.0%", "0.80"]  # the timing table
    assert "50.0% │ 50.0% │ 3.0 │ 2.500 │ +25.0% │ 2.750" in " ".join(text.split())  # the loss table's row
    assert "ours 1.00 ms, tied conv2d 2.50 ms (2.50x conv2d's speed)" in text
    assert rows["downpour (triton), float32"] == ["0.800", "12.0"]
    assert rows["downpour (triton), TF32"] == ["0.500", "19.2"]
    assert rows["tied conv2d (cuDNN, TF32 on)"] == ["3.200", "3.0"]
    assert "TF32 against unfold + bmm also in TF32: 18.0x" in text
    assert "variance skip on CUDA (a GPU)" in text
    assert "0.25 (50%) │ 50.0% │ 50.0% │ 1.500 │ 0.875 │ 40.0% │ 0.80" in " ".join(text.split())  # ms to the µs


def test_ps_table_prints_each_rate_with_its_own_ratio() -> None:
    """The Hogwild row shows Hogwild's ratio to the plain loop, the local rows theirs; the copy line the push-pull's
    share of a plain copy's rate (2 / 4 GB/s = 50%) and how many times slower the server processes were."""
    from downpour.bench.ps import print_table

    ratios = {
        "hogwild_vs_plain": 1.5,
        "local_1w_vs_plain": 0.97,
        "local_2w_vs_plain": 1.9,
        "local_2w_vs_hogwild": 1.25,
        "push_pull_vs_memcpy": 0.5,
        "push_pull_vs_memcpy_one_call": 0.25,
        "shared_memory_vs_server_process": 8.0,
    }
    result = {"plain_examples_per_s": 10_000.0, "hogwild_2w_examples_per_s": 15_000.0,
              "local_1w_examples_per_s": 9_700.0, "local_2w_examples_per_s": 19_000.0, "push_pull_gbps": 2.0,
              "memcpy_gbps": 4.0, "memcpy_one_call_gbps": 8.0, "server_process_push_pull_gbps": 0.25,
              "ratios": ratios}  # fmt: skip
    text = _printed(print_table, result)
    rows = _table_rows(text)
    assert rows["plain PyTorch loop (1 process)"][:2] == ["10,000", "1.00"]
    assert rows["Hogwild pair (2 processes, no locks)"][:2] == ["15,000", "1.50"]
    assert rows["local backend, 1 worker, 2 shards"] == ["9,700", "0.97", "≥ 0.95× plain"]
    assert rows["local backend, 2 workers, 2 shards"] == ["19,000", "1.90", "≥ 1.8× plain, ≥ Hogwild (is 1.25×)"]
    flat = " ".join(text.split())
    assert "2.00 GB/s; plain copies of the same bytes in the same transfers 4.00 GB/s: 50% (target ≥ 50%)" in flat
    assert "in one call 8.00 GB/s: 25%" in flat and "0.25 GB/s, 8.0x slower than shared-memory shards" in flat


def test_sim_table_prints_each_number_under_its_heading() -> None:
    """pushes, sim s, plain s, ratio, in-run ratio, pushes/s, grad µs, overhead µs/push: in that order."""
    from downpour.bench.sim import print_table

    result = {"workers": 1000, "policy": "downpour", "model": "rica", "pushes": 3000, "sim_s": 3.5, "plain_s": 2.5,
              "ratio": 1.4, "in_run_ratio": 1.6, "events_per_s": 857.0, "grad_us": 800.0,
              "overhead_us_per_push": 333.3}  # fmt: skip
    rows = _table_rows(_printed(print_table, result))
    assert rows["3,000"] == ["3.500", "2.500", "1.400", "1.600", "857", "800", "333.3"]
