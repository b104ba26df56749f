"""The discrete-event simulator: determinism, staleness it produces, every policy's coordination (sync barrier,
SSP bound, EASGD exchange), a 1,000-worker run of the real RICA model, and the published staleness effect."""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from conftest import CliResult, read_jsonl
from downpour.backends.sim import ModelGradient, SimResult, SimSettings, parameter_copies, simulate
from downpour.config import DataConfig, ModelConfig
from downpour.data import load_dataset
from downpour.errors import ConfigError
from downpour.models import build_model
from downpour.ps.policies import EASGD, POLICIES, Sync, easgd_exchange, make_policy
from downpour.ps.rules import make_rule, sgd

# ---- a small convex problem: least squares, gradients without autograd (fast) ------------------------------


class LeastSquares:
    """``f(w) = ½ mean (Xw − y)²`` on a fixed random problem; mini-batch gradients of 16 rows."""

    def __init__(self, rows: int = 512, dim: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(rows, dim, generator=g) * torch.linspace(0.3, 1.0, dim)  # (M, D)
        self.y = self.x @ torch.randn(dim, generator=g) + 0.1 * torch.randn(rows, generator=g)  # (M,)
        self.dim = dim

    def loss(self, w: Tensor) -> float:
        return float(0.5 * ((self.x @ w - self.y) ** 2).mean())

    def optimum(self) -> float:
        return self.loss(torch.linalg.lstsq(self.x, self.y.unsqueeze(1)).solution.squeeze(1))

    def __call__(self, w: Tensor, worker: int, rng: np.random.Generator) -> tuple[float, Tensor]:
        index = torch.from_numpy(rng.integers(0, self.x.shape[0], size=16))
        xb, yb = self.x[index], self.y[index]  # (B, D), (B,)
        residual = xb @ w - yb  # (B,)
        return float(0.5 * (residual * residual).mean()), xb.t() @ residual / 16


PROBLEM = LeastSquares()
W0 = torch.zeros(PROBLEM.dim)
BUSY = {"compute_sigma": 0.5, "stragglers": 0.25, "straggler_slowdown": 4.0, "network_mean": 0.1, "network_sigma": 0.5}


def _run(policy: str, workers: int, steps: int, *, lr: float = 0.05, seed: int = 0, **timing: float) -> SimResult:
    settings = SimSettings(workers=workers, steps=steps, seed=seed, **timing)
    return simulate(W0, make_rule("sgd", lr=lr), make_policy(policy, workers=workers, lr=lr), PROBLEM, settings)


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """Real data: scikit-learn's digits, mean-removed and whitened, ``(N, 64)``."""
    return load_dataset(DataConfig(source="digits", held_out=64), seed=0).train


def _rica_grad(examples: torch.Tensor, *, features: int, batch_size: int, workers: int | None = None) -> ModelGradient:
    model = build_model(ModelConfig(name="rica", features=features), examples.shape[1], seed=0)
    return ModelGradient(model, examples, batch_size=batch_size, workers=workers)


# ---- determinism --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_same_seed_same_bits_other_seed_other_result(policy: str) -> None:
    """Same seed: torch.equal parameters and identical records; another seed: different ones."""
    a = _run(policy, 12, 240, seed=7, **BUSY)
    b = _run(policy, 12, 240, seed=7, **BUSY)
    c = _run(policy, 12, 240, seed=8, **BUSY)
    assert len(a.records) >= 240
    assert torch.equal(a.params, b.params) and a.records.equals(b.records) and a.sim_time == b.sim_time
    assert not torch.equal(a.params, c.params)
    assert not a.records.equals(c.records)
    assert np.all(np.diff(a.records.t) >= 0)  # the server handles pushes in simulated-time order


# ---- staleness ----------------------------------------------------------------------------------------------


def test_downpour_constant_compute_staleness_is_exactly_n_minus_1() -> None:
    """N workers, constant compute, no delay: the first round sees 0..N−1, every later push exactly N−1."""
    n = 16
    result = _run("downpour", n, 10 * n)
    staleness = result.records.staleness
    assert staleness[:n].tolist() == list(range(n))
    assert np.all(staleness[n:] == n - 1)
    assert result.records.t[-1] == 10.0 and result.sim_time == 10.0


def test_downpour_lognormal_mean_staleness_is_about_n_minus_1() -> None:
    """With random compute times a push still sees the other N−1 workers' pushes on average."""
    n = 32
    result = _run("downpour", n, 4000, compute_sigma=0.5, network_mean=0.1, network_sigma=0.5)
    later = result.records.staleness[10 * n :]
    assert later.mean() == pytest.approx(n - 1, rel=0.1)
    assert later.max() > n  # a slow draw sees many more


@pytest.mark.parametrize(("fraction", "workers", "count"), [(0.1, 4, 1), (0.1, 5, 1), (0.25, 10, 3), (0.5, 1, 1),
                                                             (0.3, 10, 3), (0.0, 8, 0), (1.0, 6, 6), (0.58, 25, 15),
                                                             (0.29, 50, 15)])  # fmt: skip
def test_straggler_count_rounds_half_up_and_a_positive_fraction_gives_one(fraction: float, workers: int,
                                                                          count: int) -> None:  # fmt: skip
    """``round`` took 0.1 × 5 = 0.5 and 0.25 × 10 = 2.5 to the even 0 and 2, and 0.1 of 4 workers to none, silently
    simulating no straggler where one was asked for."""
    result = _run("downpour", workers, 10, stragglers=fraction, straggler_slowdown=4.0)
    assert len(result.stragglers) == count


def test_stragglers_see_more_staleness_than_fast_workers() -> None:
    """A worker 4x slower is overtaken by ~4x as many pushes; stragglers are chosen by the seed."""
    result = _run("downpour", 20, 3000, stragglers=0.25, straggler_slowdown=4.0)
    assert len(result.stragglers) == 5
    slow = np.isin(result.records.worker, result.stragglers)
    later = np.arange(len(result.records)) > 200
    ratio = result.records.staleness[slow & later].mean() / result.records.staleness[~slow & later].mean()
    assert 3.0 < ratio < 5.0
    assert slow.mean() < 0.25  # they push less often than their share of workers


# ---- sync ---------------------------------------------------------------------------------------------------


def test_sync_with_one_worker_equals_plain_sgd_exactly(digits: torch.Tensor) -> None:
    """sync, N = 1, on the real RICA model and digits: bit-identical to a sequential SGD loop."""
    grad = _rica_grad(digits, features=16, batch_size=8)
    start = grad.flat.values.clone()
    settings = SimSettings(workers=1, steps=200, seed=3, compute_sigma=0.7, network_mean=0.2, network_sigma=0.3)
    result = simulate(start, make_rule("sgd", lr=0.01), make_policy("sync", workers=1), grad, settings)
    w, rng = start.clone(), np.random.default_rng(3)
    losses = []
    for _ in range(200):
        loss, g = grad(w, 0, rng)
        sgd(w, g, lr=0.01, out=w)
        losses.append(loss)
    assert torch.equal(result.params, w)
    assert result.records.loss.tolist() == losses
    assert np.all(result.records.staleness == 0) and result.records.version.tolist() == list(range(1, 201))


def test_sync_barrier_staleness_zero_and_one_shared_copy() -> None:
    """Every version is the mean of one push from each of the N workers, applied with staleness 0; all N workers
    computed on one shared copy of the parameters."""
    n = 16
    result = _run("sync", n, 20 * n, **BUSY)
    records = result.records
    assert np.all(records.applied) and np.all(records.staleness == 0)
    for version in range(1, 21):
        in_round = records.version == version
        assert sorted(records.worker[in_round].tolist()) == list(range(n))
        assert np.all(records.fetched_version[in_round] == version - 1)
    assert result.peak_copies == 1 and result.dropped == 0


def test_sync_backup_workers_drop_late_pushes() -> None:
    """N = 12, b = 3: each version averages the first 9 pushes; late ones (mostly stragglers) are dropped."""
    result = _run("sync:3", 12, 600, **BUSY)
    records = result.records
    applied, dropped = records.applied, ~records.applied
    assert result.dropped == dropped.sum() > 0
    assert np.all(np.bincount(records.version[applied])[1:] == 9)
    assert np.all(records.staleness[dropped] >= 1) and np.all(np.isnan(records.loss[dropped]))
    straggler_share = np.isin(records.worker[dropped], result.stragglers).mean()
    assert straggler_share > 0.5  # 3 of 12 workers are stragglers, most drops are theirs
    assert result.grad_evals == applied.sum()  # late pushes are not computed


# ---- ssp ----------------------------------------------------------------------------------------------------


def _ssp_violations(result: SimResult, bound: int) -> int:
    """Pushes whose iteration k started while some worker had finished fewer than k − bound iterations."""
    records, n = result.records, int(result.records.worker.max()) + 1
    finished_at = [np.sort(records.t[records.worker == u]) for u in range(n)]  # push times per worker
    iteration = np.zeros(len(records), dtype=np.int64)  # k: how many pushes the worker made before this one
    for u in range(n):
        mine = np.flatnonzero(records.worker == u)
        iteration[mine] = np.arange(len(mine))
    slowest = np.min([np.searchsorted(times, records.fetched_t, side="right") for times in finished_at], axis=0)
    return int((iteration - slowest > bound).sum())


def test_ssp_never_exceeds_its_bound_with_stragglers() -> None:
    """Over the whole record: no push started more than s clocks ahead of the slowest worker, and the running
    push counts never spread by more than s + 1. Downpour in the same cluster breaks the bound (the check bites)."""
    bound = 2
    result = _run("ssp:2", 16, 1500, **BUSY)
    assert _ssp_violations(result, bound) == 0
    counts = np.zeros(16, dtype=np.int64)
    for w in result.records.worker.tolist():
        counts[w] += 1
        assert counts.max() - counts.min() <= bound + 1
    downpour = _run("downpour", 16, 1500, **BUSY)
    assert _ssp_violations(downpour, bound) > 100
    # the bound costs the fast workers time: stragglers get a larger share of the pushes than under downpour
    share = np.isin(result.records.worker, result.stragglers).mean()
    assert share > 1.5 * np.isin(downpour.records.worker, downpour.stragglers).mean()


# ---- easgd and dc-asgd wiring -------------------------------------------------------------------------------


def test_easgd_one_worker_matches_a_hand_loop() -> None:
    """N = 1, tau = 3: three local SGD steps, then the elastic exchange, repeated — bit for bit."""
    lr, rho, tau = 0.05, 4.0, 3
    policy = EASGD(lr=lr, rho=rho, tau=tau)
    result = simulate(W0, make_rule("sgd", lr=lr), policy, PROBLEM, SimSettings(workers=1, steps=50, seed=5))
    x, center, rng = W0.clone(), W0.clone(), np.random.default_rng(5)
    for _ in range(50):
        for _ in range(tau):
            _, g = PROBLEM(x, 0, rng)
            x.add_(g, alpha=-lr)
        easgd_exchange(x, center, alpha=lr * rho)
    assert torch.equal(result.params, center)
    assert result.grad_evals == 50 * tau and len(result.records) == 50


def test_easgd_many_workers_converges_and_is_stale() -> None:
    """N = 16 constant compute: each exchange sees the other 15 workers' exchanges; the center converges."""
    result = _run("easgd", 16, 1600, lr=0.05)
    assert np.all(result.records.staleness[16:] == 15)
    assert PROBLEM.loss(result.params) < 2 * PROBLEM.optimum()


def test_a_stop_between_an_easgd_cycles_local_steps_ends_the_run() -> None:
    """``stop()`` is asked between EASGD's local steps, not only after an exchange: with tau = 10⁹ one cycle would
    hold up Ctrl-C for good (a run needed kill -9). A stop during the first cycle ends the run at once: no record,
    the center as it started. (A gradient taken long after the stop fails the test instead of running for days.)"""
    asked, taken = [], []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 20

    def gradient(w: Tensor, worker: int, rng: np.random.Generator) -> tuple[float, Tensor]:
        taken.append(1)
        assert len(taken) < 1000, "the stop was not asked between local steps"
        return PROBLEM(w, worker, rng)

    policy = EASGD(lr=0.05, rho=4.0, tau=10**9)
    result = simulate(W0, make_rule("sgd", lr=0.05), policy, gradient, SimSettings(workers=1, steps=0, seconds=1e9),
                      stop=stop)  # fmt: skip
    assert len(result.records) == 0 and torch.equal(result.params, W0)
    assert len(asked) == 21 and len(taken) == 20


def test_dc_asgd_with_zero_lambda_is_downpour_and_with_lambda_differs() -> None:
    """The compensation is wired in: λ = 0 gives downpour's bits, λ > 0 other ones."""
    plain = _run("downpour", 8, 300, **BUSY)
    assert torch.equal(_run("dc-asgd:0", 8, 300, **BUSY).params, plain.params)
    assert not torch.equal(_run("dc-asgd:0.5", 8, 300, **BUSY).params, plain.params)


# ---- scale, budgets, failure handling -----------------------------------------------------------------------


def test_a_thousand_workers_of_real_rica_in_about_two_seconds(digits: torch.Tensor) -> None:
    """1,000 simulated workers training RICA on digits (disjoint data slices), 2,000 pushes, a quarter of them 4x
    slower, lognormal compute and network delay: nearly every fast worker pushes, staleness reaches the hundreds, and it
    takes about 2 s of CPU."""
    grad = _rica_grad(digits, features=16, batch_size=8, workers=1000)
    start = grad.flat.values.clone()
    settings = SimSettings(workers=1000, steps=2000, seed=0, **BUSY)
    t0 = time.process_time()  # this process's CPU time: a test running beside it on a busy machine does not count
    result = simulate(start, make_rule("adagrad", lr=0.01), make_policy("staleness-lr"), grad, settings)
    elapsed = time.process_time() - t0
    assert elapsed < 3.0, f"{elapsed:.2f} s"
    assert len(result.records) == 2000 and result.grad_evals == 2000 and result.rejected == 0
    fast = set(range(1000)) - set(result.stragglers.tolist())
    assert len(fast) == 750 and len(fast - set(result.records.worker.tolist())) < 8  # all but a few slow draws
    assert result.staleness_histogram().summary()["p50"] > 300
    assert result.peak_copies <= 1000
    assert torch.isfinite(result.params).all() and not torch.equal(result.params, start)


def test_simulated_seconds_budget_and_observe_hook() -> None:
    """train.seconds bounds simulated time; observe sees every k-th push with the live parameters."""
    seen: list[tuple[float, int]] = []
    settings = SimSettings(workers=4, steps=0, seconds=5.5)
    result = simulate(
        W0,
        make_rule("sgd", lr=0.05),
        make_policy("downpour"),
        PROBLEM,
        settings,
        observe=lambda t, pushes, params: seen.append((t, pushes)),
        observe_every=4,
    )
    assert len(result.records) == 20 and result.records.t.max() == 5.0
    assert seen == [(float(k), 4 * k) for k in range(1, 6)]


@pytest.mark.parametrize("policy", ["downpour", "sync"])
def test_a_push_that_arrives_exactly_when_the_seconds_run_out_counts(policy: str) -> None:
    """The budget is inclusive: with constant 1 s gradients and no network, pushes land at 1, 2 and 3 s, and a
    budget of 3 s takes all three from each worker (2.999 s takes two)."""
    for seconds, each in ((3.0, 3), (2.999, 2)):
        settings = SimSettings(workers=2, steps=0, seconds=seconds)
        result = simulate(W0, make_rule("sgd", lr=0.05), make_policy(policy, workers=2), PROBLEM, settings)
        assert sorted(result.records.t.tolist()) == [float(t) for t in range(1, each + 1) for _ in range(2)]


def test_nan_pushes_are_rejected_and_counted() -> None:
    """A worker whose gradients are NaN never touches the parameters; its pushes are counted as rejected."""

    def grad(w: Tensor, worker: int, rng: np.random.Generator) -> tuple[float, Tensor]:
        loss, g = PROBLEM(w, worker, rng)
        return (math.nan, torch.full_like(g, math.nan)) if worker == 0 else (loss, g)

    result = simulate(W0, make_rule("sgd", lr=0.05), make_policy("downpour"), grad, SimSettings(workers=4, steps=400))
    assert result.rejected == 100 and np.all(result.records.staleness[~result.records.applied] == -1)
    assert torch.isfinite(result.params).all() and PROBLEM.loss(result.params) < PROBLEM.loss(W0) / 10
    # sync, as a real shard: the NaN push is rejected yet counts toward its round, whose mean is the other three's
    synced = simulate(W0, make_rule("sgd", lr=0.05), make_policy("sync", workers=4), grad, SimSettings(workers=4,
                      steps=400))  # fmt: skip
    records = synced.records
    assert synced.rejected == 100 and records.applied.sum() == 300 and synced.dropped == 0
    assert np.all(records.applied == (records.worker != 0)) and np.all(records.staleness[records.worker == 0] == -1)
    assert np.all(np.bincount(records.version[records.applied])[1:] == 3)  # 100 rounds of three pushes each
    assert PROBLEM.loss(synced.params) < PROBLEM.loss(W0) / 10


@pytest.mark.parametrize("policy", ["downpour", "sync"])
def test_an_update_whose_result_overflows_is_refused_as_by_a_real_shard(policy: str) -> None:
    """Finite gradients at lr 1e38 make the values Inf: a real shard computes into its spare buffer and refuses to
    publish that; the simulator applied it in place (and then reported the run diverged)."""
    result = simulate(W0 + 10.0, make_rule("sgd", lr=3e38), make_policy(policy, workers=2), PROBLEM,
                      SimSettings(workers=2, steps=10))  # fmt: skip
    assert not result.records.applied.any() and result.rejected == 10
    assert torch.equal(result.params, W0 + 10.0)


@pytest.mark.parametrize("policy", ["sync", "sync:1", "sync:2", "sync:3"])
def test_sync_records_exactly_the_step_budget(policy: str) -> None:
    """train.steps counts pushes under sync too: a budget that ends mid-round closes that round with the pushes that
    arrived (as the local backend does), instead of recording the whole round beyond the budget."""
    for steps in range(3, 48, 3):
        for seed in range(3):  # a late push that reaches the budget closes the open round too (45 steps, seed 2)
            result = _run(policy, 4, steps, seed=seed, **BUSY)
            assert len(result.records) == steps, (policy, steps, seed)
            assert result.records.applied.sum() + result.dropped == steps
            assert result.grad_evals == steps - result.dropped  # every gradient computed is applied and recorded


def test_model_gradient_reads_only_the_workers_slice() -> None:
    """With workers=4, worker 2 of 4 draws only examples 50..74 of 100."""

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))
            self.seen: list[Tensor] = []

        def loss(self, batch: Tensor) -> Tensor:
            self.seen.append(batch[:, 0].clone())
            return (self.w * batch.sum()) ** 2

    examples = torch.arange(100, dtype=torch.float32).unsqueeze(1)  # (100, 1): example i holds the value i
    probe = Probe()
    grad = ModelGradient(probe, examples, batch_size=32, workers=4)
    rng = np.random.default_rng(0)
    for _ in range(10):
        grad(torch.zeros(1), 2, rng)
    values = torch.cat(probe.seen)
    assert values.min() >= 50 and values.max() <= 74 and len(values.unique()) > 15


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (SimSettings(workers=0), r"invalid cluster\.workers: 0"),
        (SimSettings(steps=0, seconds=0.0), r"invalid train\.steps: 0 \(set train\.steps or train\.seconds\)"),
        (SimSettings(compute_mean=0.0), r"invalid cluster\.sim_compute_mean: 0\.0"),
        (SimSettings(compute_sigma=-1.0), r"invalid cluster\.sim_compute_sigma: -1\.0"),
        (SimSettings(stragglers=1.5), r"invalid cluster\.sim_stragglers: 1\.5"),
        (SimSettings(straggler_slowdown=0.5), r"invalid cluster\.sim_straggler_slowdown: 0\.5"),
        (SimSettings(network_mean=math.inf), r"invalid cluster\.sim_network_mean: inf"),
    ],
)
def test_bad_settings_name_the_key(settings: SimSettings, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings.validate()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (SimSettings(compute_sigma=5.0), r"invalid cluster\.sim_compute_sigma: 5\.0 \(must be in \[0, 4\]"),
        (SimSettings(compute_sigma=1e200), r"invalid cluster\.sim_compute_sigma: 1e\+200"),
        (SimSettings(network_mean=0.1, network_sigma=1e308), r"invalid cluster\.sim_network_sigma: 1e\+308"),
        (SimSettings(compute_mean=1e308, stragglers=0.5, straggler_slowdown=10.0), r"cluster\.sim_compute_mean"),
        (SimSettings(network_mean=1e308), r"invalid cluster\.sim_compute_mean: 1\.0 \(the slowest worker's mean cycle"),
    ],
)
def test_a_sigma_whose_draws_cannot_keep_the_mean_and_an_infinite_cycle_are_refused(settings: SimSettings,
                                                                                     message: str) -> None:  # fmt: skip
    """Accepted before: σ = 50 made every duration 0 s, so a ``train.seconds`` run never ended (simulated time stood
    at 0); σ = 1e308 drew NaN times and the run ended silently after 25 of 2,000 pushes; σ = 5 averaged half the
    mean asked for; a finite mean × slowdown of 1e309 gave infinite simulated time (``Infinity`` in summary.json)."""
    with pytest.raises(ConfigError, match=message):
        settings.validate()
    assert SimSettings(compute_sigma=4.0, network_mean=0.1, network_sigma=4.0).validate() is None  # the edge is in


def test_sync_policy_must_match_the_worker_count() -> None:
    with pytest.raises(ConfigError, match=r"invalid cluster\.workers: 3"):
        simulate(W0, make_rule("sgd", lr=0.1), Sync(workers=4), PROBLEM, SimSettings(workers=3, steps=10))


def test_a_run_whose_fetched_copies_cannot_fit_is_refused_before_simulating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: Callable[..., CliResult]
) -> None:
    """Memory grows with workers × model size: a fetched copy per version in flight. A run whose copies cannot fit
    was simulated until the kernel killed it (or an allocation failed after 1,260 pushes, with no summary and a
    message naming neither the workers nor the model); now it is refused up front. ``sync`` shares one copy, so
    the same cluster fits under it; a run of fewer pushes than workers makes at most ``steps + 1`` versions."""
    assert parameter_copies(make_policy("downpour"), SimSettings(workers=64, steps=1000)) == 66
    assert parameter_copies(make_policy("downpour"), SimSettings(workers=64, steps=9)) == 12
    assert parameter_copies(make_policy("sync", workers=64), SimSettings(workers=64)) == 3
    assert parameter_copies(make_policy("easgd"), SimSettings(workers=64)) == 67
    params = 256 * 64  # the default 256 RICA features on digits' 64 values
    monkeypatch.setattr("downpour.backends.local.available_memory", lambda: 20 * 4 * params)  # 20 copies
    common = ("train", "--backend", "sim", "--workers", "64", "--steps", "100", "--set", "data.source=digits",
              "--set", "data.held_out=64", "--no-progress")  # fmt: skip
    refused = cli(*common, "--out", str(tmp_path / "downpour"))
    assert refused.returncode == 2, refused.stderr
    assert "cluster.workers = 64 simulated workers under ps.policy = 'downpour' hold up to 66 copies" in refused.stderr
    assert "lower cluster.workers or model.features" in refused.stderr
    assert not (tmp_path / "downpour" / "metrics.jsonl").exists()
    assert cli(*common, "--set", "ps.policy=sync", "--out", str(tmp_path / "sync")).returncode == 0


def test_a_seconds_budget_run_evaluates_about_fifty_times(tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    """``--steps 0 --seconds 20`` at 50 workers (about 1,000 pushes, lognormal compute times): an ``eval`` row in
    every 0.4 simulated seconds, about 50, the progress bar moving with them. It evaluated every 20 × workers pushes:
    not once in this run, nor in a 10-second run of 1,000 workers."""
    run_dir = tmp_path / "run"
    result = cli("train", "--backend", "sim", "--workers", "50", "--steps", "0", "--seconds", "20", "--set",
                 "cluster.sim_compute_sigma=0.5", "--set", "data.source=digits", "--set", "data.held_out=64",
                 "--set", "model.features=16", "--set", "train.batch_size=8", "--no-progress",
                 "--out", str(run_dir))  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert 900 < sum(row["event"] == "push" for row in rows) < 1100
    times = [row["t"] for row in rows if row["event"] == "eval"]
    assert 45 <= len(times) <= 50 and times[0] < 0.5 and times[-1] > 19.6
    assert all(int(a / 0.4) < int(b / 0.4) for a, b in itertools.pairwise(times))  # one per 0.4 s at most


def test_a_run_whose_simulated_seconds_end_before_its_steps_says_so(tmp_path: Path,
                                                                    cli: Callable[..., CliResult]) -> None:  # fmt: skip
    """``train.seconds`` (60 by default) counts simulated seconds: 4 workers, each push 1 s, stop at 5 s, about 20
    of the 500 pushes asked. The run says where it stopped and how to lift the time budget (a reviewer's sync run
    stopped at 338 of 600 pushes without a word); a run that made its steps says nothing of it."""
    common = ("train", "--backend", "sim", "--workers", "4", "--set", "data.source=digits", "--set",
              "data.held_out=64", "--set", "model.features=8", "--no-progress")  # fmt: skip
    result = cli(*common, "--steps", "500", "--seconds", "5", "--out", str(tmp_path / "short"))
    assert result.returncode == 0, result.stderr
    steps = json.loads((tmp_path / "short" / "summary.json").read_text())["steps"]
    assert 0 < steps < 500
    said = " ".join(result.stderr.split())
    assert (f"train.seconds = 5 simulated seconds ran out after {steps} of the train.steps = 500 pushes "
            "(--seconds 0: no time budget)") in said, result.stderr  # fmt: skip
    result = cli(*common, "--steps", "20", "--seconds", "60", "--out", str(tmp_path / "whole"))
    assert result.returncode == 0 and "ran out" not in result.stderr, result.stderr


# ---- the published effect (Zhang et al. 2016) ---------------------------------------------------------------


def test_fixed_lr_degrades_with_workers_while_staleness_lr_converges() -> None:
    """Least squares, lr 0.3, 1500 pushes, lognormal compute: a fixed rate converges with 1 worker and diverges
    with 16 and 64 (staleness ≈ N − 1); dividing the rate by the staleness converges at every N."""
    initial, optimum = PROBLEM.loss(W0), PROBLEM.optimum()
    final = {
        (policy, n): PROBLEM.loss(_run(policy, n, 1500, lr=0.3, compute_sigma=0.5).params)
        for policy in ("downpour", "staleness-lr")
        for n in (1, 16, 64)
    }
    assert final["downpour", 1] < 1.5 * optimum
    for n in (16, 64):
        assert not final["downpour", n] < initial  # diverged (inf/nan) or at least no better than the start
        assert final["staleness-lr", n] < 3 * optimum
    assert final["staleness-lr", 1] == final["downpour", 1]  # no staleness with one worker: the same run


def test_bench_sim_reports_both_sides() -> None:
    """``downpour bench sim``'s measurement on a tiny run: both sides make the same gradient calls."""
    from rich.console import Console

    from downpour.bench import sim as bench_sim

    result = bench_sim.run(workers=20, steps=100, repeats=1, chunk=25, features=8, batch_size=8)
    assert result["workers"] == 20 and result["grad_evals"] == 100
    assert result["ratio"] > 0 and result["in_run_ratio"] > 1.0 and result["events_per_s"] > 0
    console = Console(record=True, width=120)
    bench_sim.print_table(result, console)
    assert "20 workers" in console.export_text()


# ---- durations: the documented distributions, measured on one worker's cycle --------------------------------


def _zero_grad(w: Tensor, worker: int, rng: np.random.Generator) -> tuple[float, Tensor]:
    """No gradient work at all: these tests are about simulated time only."""
    return 0.0, torch.zeros_like(w)


def _cycles(policy: str, steps: int, **timing: float) -> np.ndarray:
    """One worker's simulated seconds from each fetch to its push (one worker: each push starts the next cycle)."""
    settings = SimSettings(workers=1, steps=steps, seed=11, **timing)
    result = simulate(W0, make_rule("sgd", lr=0.05), make_policy(policy, workers=1, lr=0.05), _zero_grad, settings)
    return np.diff(np.concatenate([[0.0], result.records.t]))


def test_lognormal_compute_times_keep_the_mean_and_have_sigma_of_the_log() -> None:
    """``compute_sigma > 0``: "lognormal with this sigma (of the log), same mean" (README, SimSettings). With one
    worker and no network each cycle is one compute time: mean ``compute_mean`` = 2, std of its log 0.5, so the
    median is 2·exp(−σ²/2) = 1.765. (Factors exp(σz) have median 2 and mean 2.27 instead.)"""
    cycles = _cycles("downpour", 6000, compute_mean=2.0, compute_sigma=0.5)
    assert cycles.mean() == pytest.approx(2.0, rel=0.03)  # standard error ~0.7%
    assert np.log(cycles).std() == pytest.approx(0.5, rel=0.05)
    assert np.median(cycles) == pytest.approx(2.0 * math.exp(-0.125), rel=0.03)


def test_constant_network_delay_is_paid_on_the_fetch_and_on_the_push() -> None:
    """``arrival = t + delay + compute + delay``: compute 1 s and a 0.25 s one-way delay give a push every 1.5 s,
    each fetched (``fetched_t``) 1.5 s before it arrives, at the previous push."""
    settings = SimSettings(workers=1, steps=6, network_mean=0.25)
    result = simulate(W0, make_rule("sgd", lr=0.05), make_policy("downpour"), _zero_grad, settings)
    assert result.records.t.tolist() == [1.5, 3.0, 4.5, 6.0, 7.5, 9.0]
    assert result.records.fetched_t.tolist() == [0.0, 1.5, 3.0, 4.5, 6.0, 7.5]


def test_lognormal_network_delays_are_two_independent_draws_of_the_same_mean() -> None:
    """Fetch and push each take their own lognormal delay of mean ``network_mean``: with compute fixed at 1 s and
    a 0.5 s mean delay (σ = 0.5) a cycle lasts 1 + 0.5·(f₁ + f₂), mean 2 and variance 0.25·2·(e^{σ²} − 1) = 0.142
    (one factor drawn for both delays would double the variance)."""
    cycles = _cycles("downpour", 6000, network_mean=0.5, network_sigma=0.5)
    variance = 0.25 * 2 * (math.exp(0.25) - 1)
    assert cycles.mean() == pytest.approx(2.0, rel=0.02)
    assert cycles.var() == pytest.approx(variance, rel=0.15)  # standard error ~4%
    assert cycles.min() > 1.0


def test_easgd_cycle_computes_tau_gradients_each_with_its_own_time() -> None:
    """An EASGD worker computes ``tau`` gradients per exchange: constant 1 s computes give an exchange every
    ``tau`` = 3 s; lognormal ones (σ = 0.5, tau = 4) give a cycle that is the sum of 4 independent draws: mean 4,
    variance 4·(e^{σ²} − 1) = 1.14 (one draw scaled by 4 would have variance 4.5)."""
    assert _cycles("easgd:3", 5).tolist() == [3.0] * 5
    cycles = _cycles("easgd:4", 3000, compute_sigma=0.5)
    assert cycles.mean() == pytest.approx(4.0, rel=0.03)
    assert cycles.var() == pytest.approx(4 * (math.exp(0.25) - 1), rel=0.2)  # standard error ~5%


def test_easgd_records_the_mean_loss_of_its_tau_local_steps() -> None:
    """SimRecords.loss under easgd is the mean mini-batch loss over the tau local steps (replayed by hand, as in
    the one-worker hand loop above), not the last step's loss."""
    lr, rho, tau = 0.05, 4.0, 3
    result = simulate(W0, make_rule("sgd", lr=lr), EASGD(lr=lr, rho=rho, tau=tau), PROBLEM,
                      SimSettings(workers=1, steps=10, seed=5))  # fmt: skip
    x, center, rng = W0.clone(), W0.clone(), np.random.default_rng(5)
    means = []
    for _ in range(10):
        losses = []
        for _ in range(tau):
            loss, g = PROBLEM(x, 0, rng)
            x.add_(g, alpha=-lr)
            losses.append(loss)
        easgd_exchange(x, center, alpha=lr * rho)
        means.append(sum(losses) / tau)
    np.testing.assert_allclose(result.records.loss, means, rtol=1e-12)
    assert result.records.loss[0] != losses[0]  # the local steps' losses differ: the mean is not any one of them


def test_ssp_wakes_a_waiting_worker_when_the_slowest_catches_up() -> None:
    """SSP with bound 0, two workers, one 2x slower, constant 1 s computes: the fast worker finishes at t = 1 and
    must wait; the slow one finishes at t = 2, which frees both, and so on in lockstep: a push every second,
    alternating fast/slow, every cycle fetched at an even second. (A waiting worker left asleep deadlocks the run.)"""
    settings = SimSettings(workers=2, steps=10, stragglers=0.5, straggler_slowdown=2.0)
    result = simulate(W0, make_rule("sgd", lr=0.05), make_policy("ssp:0"), _zero_grad, settings)
    (slow,) = result.stragglers.tolist()
    fast = 1 - slow
    records = result.records
    assert records.t.tolist() == [float(k) for k in range(1, 11)]
    assert records.worker.tolist() == [fast, slow] * 5
    assert records.fetched_t.tolist() == [0.0, 0.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 8.0, 8.0]
    assert records.staleness.tolist() == [0, 1] * 5  # the slow one's push always lands after the fast one's
