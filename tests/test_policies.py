"""Consistency policies: each update against hand-computed values, the SSP clock table, the sync aggregator,
the config checks, and a real shard applying a policy through PolicyRule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from downpour.config import load as load_config
from downpour.errors import ConfigError
from downpour.ps.policies import (
    DCASGD,
    EASGD,
    SSP,
    ClockTable,
    Downpour,
    PolicyRule,
    StalenessLR,
    Sync,
    SyncAggregator,
    apply_rule,
    config_policy,
    dc_asgd,
    easgd_exchange,
    make_policy,
    policy_rule,
    ssp_may_start,
    staleness_lr,
)
from downpour.ps.rules import SGD, Adagrad, PushMeta, ShardState
from downpour.ps.shard import Shard


def _t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _close(actual: torch.Tensor, expected: list[float], tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, _t(expected), atol=tol, rtol=0)


def _meta(staleness: int) -> PushMeta:
    return PushMeta(worker=0, fetched_version=10, version=10 + staleness)


# ---- staleness-lr -------------------------------------------------------------------------------------------


def test_staleness_lr_function() -> None:
    """lr / max(1, staleness): staleness 0 and 1 keep the rate, 4 divides it by 4."""
    assert staleness_lr(0.1, staleness=0) == 0.1
    assert staleness_lr(0.1, staleness=1) == 0.1
    assert staleness_lr(0.1, staleness=4) == pytest.approx(0.025)


def test_staleness_lr_with_sgd_hand_values() -> None:
    """w = [1, 2, 3], g = [0.5, -1, 2], lr = 0.1, staleness 4: w − 0.025·g = [0.9875, 2.025, 2.95]."""
    rule = PolicyRule(SGD(lr=0.1), StalenessLR())
    state = ShardState(_t([1.0, 2.0, 3.0]), {})
    out = ShardState(torch.zeros(3), {})
    rule(_meta(4), _t([0.5, -1.0, 2.0]), state, out)
    _close(out.values, [0.9875, 2.025, 2.95])
    _close(state.values, [1.0, 2.0, 3.0], tol=0)  # the live buffer is not touched


def test_staleness_lr_with_adagrad_hand_values() -> None:
    """Adagrad, lr 0.1 at staleness 2 → 0.05; w = [1, 2, 3], G = [0, 1, 0], g = [1, -2, 0]:
    G' = [1, 5, 0]; w' = [1 − 0.05/1, 2 + 0.1/√5, 3] = [0.95, 2.0447213595, 3]."""
    rule = PolicyRule(Adagrad(lr=0.1, eps=1e-8), StalenessLR())
    state = ShardState(_t([1.0, 2.0, 3.0]), {"sum_sq": _t([0.0, 1.0, 0.0])})
    out = ShardState(torch.zeros(3), {"sum_sq": torch.zeros(3)})
    rule(_meta(2), _t([1.0, -2.0, 0.0]), state, out)
    _close(out.values, [0.95, 2.0447213595, 3.0])
    _close(out.state["sum_sq"], [1.0, 5.0, 0.0])


def test_staleness_lr_zero_staleness_equals_plain_rule() -> None:
    """At staleness 0 the policy is the bare rule, bit for bit (Adagrad's fused path included)."""
    update = torch.randn(50, generator=torch.Generator().manual_seed(1))
    results = []
    for rule in (Adagrad(lr=0.1), PolicyRule(Adagrad(lr=0.1), StalenessLR())):
        state = ShardState(torch.ones(50), {"sum_sq": torch.full((50,), 0.5)})
        out = ShardState(torch.zeros(50), {"sum_sq": torch.zeros(50)})
        rule(_meta(0), update, state, out)
        results.append(out.values)
    assert torch.equal(results[0], results[1])


# ---- dc-asgd ------------------------------------------------------------------------------------------------

# g = [1, -2, 0.5], w_now = [1, 1, 1], w_fetched = [0.5, 2, 1], λ = 0.1:
#   w_now − w_fetched = [0.5, -1, 0];  g⊙g = [1, 4, 0.25];  λ·g⊙g⊙Δ = [0.05, -0.4, 0]
#   compensated g = [1.05, -2.4, 0.5]
DC_G, DC_NOW, DC_FETCHED, DC_EXPECTED = [1.0, -2.0, 0.5], [1.0, 1.0, 1.0], [0.5, 2.0, 1.0], [1.05, -2.4, 0.5]


def test_dc_asgd_function_hand_values() -> None:
    """Out of place and in place give g + λ·g⊙g⊙(w_now − w_fetched); the inputs are left alone."""
    update, now, fetched = _t(DC_G), _t(DC_NOW), _t(DC_FETCHED)
    _close(dc_asgd(update, now, fetched, dc_lambda=0.1), DC_EXPECTED)
    _close(update, DC_G, tol=0)
    _close(now, DC_NOW, tol=0)
    in_place = _t(DC_G)
    assert dc_asgd(in_place, now, fetched, dc_lambda=0.1, out=in_place) is in_place
    _close(in_place, DC_EXPECTED)
    with pytest.raises(ValueError, match="alias"):
        dc_asgd(update, now, fetched, dc_lambda=0.1, out=now)


def test_dc_asgd_policy_through_sgd_hand_values() -> None:
    """With SGD lr 0.1 on w_now = [1, 1, 1]: w' = w_now − 0.1·[1.05, -2.4, 0.5] = [0.895, 1.24, 0.95]."""
    rule = PolicyRule(SGD(lr=0.1), DCASGD(dc_lambda=0.1))
    assert rule.needs_fetched
    state, out = ShardState(_t(DC_NOW), {}), ShardState(torch.zeros(3), {})
    rule(_meta(3), _t(DC_G), state, out, fetched=_t(DC_FETCHED))
    _close(out.values, [0.895, 1.24, 0.95])
    with pytest.raises(ValueError, match="values_fetched"):
        rule(_meta(3), _t(DC_G), state, out)


def test_dc_asgd_zero_lambda_is_the_plain_gradient() -> None:
    """λ = 0 leaves the gradient exactly as it is."""
    g = torch.randn(20, generator=torch.Generator().manual_seed(2))
    adjusted = DCASGD(dc_lambda=0.0).adjust(g, _meta(5), values_now=torch.randn(20), values_fetched=torch.zeros(20))
    assert torch.equal(adjusted.update, g) and adjusted.lr_scale == 1.0


# ---- easgd --------------------------------------------------------------------------------------------------


def test_easgd_exchange_hand_values() -> None:
    """x = [1, 2], x̃ = [0, 4], α = 0.25: d = [0.25, -0.5]; x' = [0.75, 2.5], x̃' = [0.25, 3.5] (sum conserved)."""
    local, center = _t([1.0, 2.0]), _t([0.0, 4.0])
    easgd_exchange(local, center, alpha=0.25)
    _close(local, [0.75, 2.5])
    _close(center, [0.25, 3.5])
    policy = EASGD(lr=0.05, rho=5.0, tau=2)  # α = lr·rho = 0.25
    assert policy.alpha == pytest.approx(0.25)
    local, center, scratch = _t([1.0, 2.0]), _t([0.0, 4.0]), torch.zeros(2)
    policy.exchange(local, center, scratch=scratch)
    _close(local, [0.75, 2.5])
    _close(center, [0.25, 3.5])


# ---- downpour -----------------------------------------------------------------------------------------------


def test_downpour_is_the_identity() -> None:
    """Plain async: the same tensor, the same learning rate, whatever the staleness."""
    g = torch.randn(4)
    adjusted = Downpour().adjust(g, _meta(100), values_now=torch.zeros(4))
    assert adjusted.update is g and adjusted.lr_scale == 1.0


# ---- sync ---------------------------------------------------------------------------------------------------


def test_sync_aggregator_mean_backup_and_drops() -> None:
    """N = 3, b = 1: the mean of the first two pushes is applied; the third (late) is dropped and counted."""
    agg = SyncAggregator(2, workers=3, backup_workers=1)
    assert agg.add(_t([1.0, 2.0]), worker=0, fetched_version=0) is None
    assert agg.arrived == (0,)
    with pytest.raises(ValueError, match="twice"):
        agg.add(_t([1.0, 2.0]), worker=0, fetched_version=0)
    mean = agg.add(_t([3.0, 4.0]), worker=2, fetched_version=0)
    assert mean is not None
    _close(mean, [2.0, 3.0])
    assert agg.version_ == 1 and agg.arrived == ()
    assert agg.add(_t([100.0, 100.0]), worker=1, fetched_version=0) is None  # late: for version 0
    assert agg.dropped_ == 1
    with pytest.raises(ValueError, match="version 5"):
        agg.add(_t([0.0, 0.0]), worker=1, fetched_version=5)
    # the next round starts clean: the late push did not leak into it
    assert agg.add(_t([1.0, 1.0]), worker=1, fetched_version=1) is None
    _close(agg.add(_t([3.0, 5.0]), worker=0, fetched_version=1), [2.0, 3.0])


def test_sync_aggregator_one_worker_is_exact() -> None:
    """With one worker the 'mean' is the push itself, bit for bit."""
    g = torch.randn(30, generator=torch.Generator().manual_seed(3))
    agg = SyncAggregator(30, workers=1)
    for version in range(3):
        assert torch.equal(agg.add(g, worker=0, fetched_version=version), g)


def test_sync_aggregator_a_refused_push_closes_the_round_but_is_not_in_the_mean() -> None:
    """N = 2: worker 0's push was refused (NaN or Inf: ``None``), worker 1 pushes [2, 4]. The round closes on the
    second arrival, and its mean is over the one finite push, [2, 4] / 1, not [2, 4] / 2 (which would train a run
    with a diverging worker at half the rate without saying so); closed_summed says one push was in it."""
    agg = SyncAggregator(2, workers=2)
    assert agg.add(None, worker=0, fetched_version=0) is None
    assert agg.pending == 1
    mean = agg.add(_t([2.0, 4.0]), worker=1, fetched_version=0)
    assert mean is not None
    _close(mean, [2.0, 4.0], tol=0)
    assert agg.closed_summed == 1 and agg.version_ == 1


def test_sync_aggregator_never_closes_an_empty_round() -> None:
    """close(q) closes only once max(1, q) pushes arrived: with nothing arrived, a quorum of 0 (every worker gone)
    must not close a round of no pushes and publish a version nobody computed for."""
    agg = SyncAggregator(2, workers=2)
    assert agg.close(0) is None
    assert agg.version_ == 0 and agg.pending == 0
    agg.add(_t([1.0, 1.0]), worker=0, fetched_version=0, quorum=2)
    _close(agg.close(0), [1.0, 1.0], tol=0)  # one arrived: now a quorum of 0 (rounded up to 1) closes it
    assert agg.version_ == 1


# ---- ssp ----------------------------------------------------------------------------------------------------


def test_ssp_clock_table_hand_sequence() -> None:
    """Bound 1, three workers: worker 0 may run one clock ahead, not two; it resumes once the others catch up."""
    assert ssp_may_start(3, 2, staleness_bound=1) and not ssp_may_start(4, 2, staleness_bound=1)
    table = SSP(staleness_bound=1).clock_table(3)
    assert table.advance(0) is False  # clocks [1, 0, 0]
    assert table.can_advance(0)  # starting clock 1: 1 − 0 ≤ 1
    table.advance(0)  # [2, 0, 0]
    assert not table.can_advance(0)  # starting clock 2: 2 − 0 > 1
    with pytest.raises(RuntimeError, match="SSP violation"):
        table.advance(0)
    assert table.clocks.tolist() == [2, 0, 0]  # the refused advance changed nothing
    assert table.advance(1) is False  # [2, 1, 0]: the minimum is still 0
    assert table.advance(2) is True  # [2, 1, 1]: the minimum rises to 1
    assert table.min_clock == 1 and table.can_advance(0)


def test_ssp_clock_table_random_schedules_keep_the_bound() -> None:
    """Whatever legal order workers advance in, max − min ≤ bound + 1; bound 0 is lockstep."""
    rng = np.random.default_rng(0)
    for bound in (0, 1, 3):
        table = ClockTable(7, staleness_bound=bound)
        for _ in range(2000):
            allowed = [w for w in range(7) if table.can_advance(w)]
            table.advance(int(rng.choice(allowed)))
            clocks = table.clocks
            assert clocks.max() - clocks.min() <= bound + 1
            assert table.min_clock == clocks.min()


# ---- the seam: a real shard with a policy ------------------------------------------------------------------


def test_real_shard_applies_staleness_lr_through_policy_rule() -> None:
    """Shard(rule=PolicyRule(SGD(0.1), StalenessLR())), three pushes of g = [1, 1] all fetched at version 0:
    staleness 0, 1, 2 → rates 0.1, 0.1, 0.05 → values 0.9, 0.8, 0.75."""
    shard = Shard(0, 0, torch.ones(2), PolicyRule(SGD(lr=0.1), StalenessLR()))
    expected = [0.9, 0.8, 0.75]
    for step, value in enumerate(expected):
        result = shard.push(torch.ones(2), fetched_version=0, worker=step)
        assert result.applied and result.staleness == step
        out = torch.zeros(2)
        shard.fetch_into(out)
        _close(out, [value, value])


def test_apply_rule_scales_an_unknown_linear_rule_through_the_update() -> None:
    """A rule apply_rule does not know gets lr_scale·update (exact for a rule linear in the update)."""

    class Plain:
        name, state_names = "plain", ()

        def __call__(self, meta: PushMeta, update: torch.Tensor, current: ShardState, out: ShardState) -> None:
            torch.sub(current.values, update, out=out.values)

    state, out = ShardState(_t([1.0, 1.0]), {}), ShardState(torch.zeros(2), {})
    apply_rule(Plain(), _meta(0), _t([1.0, -2.0]), state, out, lr_scale=0.5)
    _close(out.values, [0.5, 2.0])


# ---- construction and config checks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: DCASGD(dc_lambda=-1), r"invalid ps\.dc_lambda: -1 \(must be a finite number >= 0\)"),
        (lambda: DCASGD(dc_lambda=math.nan), r"invalid ps\.dc_lambda: nan"),
        (lambda: EASGD(lr=0.1, rho=0.0), r"invalid ps\.easgd_rho: 0\.0"),
        (lambda: EASGD(lr=0.1, rho=10.0), r"invalid ps\.easgd_rho: 10\.0 \(the moving rate"),
        (lambda: EASGD(lr=0.1, rho=1.0, tau=0), r"invalid ps\.easgd_tau: 0"),
        (lambda: EASGD(lr=-0.1), r"invalid ps\.lr: -0\.1"),
        (lambda: SSP(staleness_bound=-1), r"invalid ps\.staleness_bound: -1"),
        (lambda: SSP(staleness_bound=1.5), r"invalid ps\.staleness_bound: 1\.5"),
        (
            lambda: Sync(workers=4, backup_workers=4),
            r"invalid ps\.backup_workers: 4 \(must be < cluster\.workers = 4\)",
        ),
        (lambda: Sync(workers=4, backup_workers=-1), r"invalid ps\.backup_workers: -1"),
        (lambda: make_policy("hogwild"), r"invalid ps\.policy: 'hogwild' \(choose one of downpour, sync, ssp"),
        (lambda: make_policy("ssp:many"), r"invalid ps\.policy: 'ssp:many'"),
        (lambda: make_policy("downpour:3"), r"invalid ps\.policy: 'downpour:3'"),
    ],
)
def test_bad_hyperparameters_name_the_key(build, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build()


def test_make_policy_builds_every_policy_with_its_parameters() -> None:
    """Every name in POLICIES, and the ``name:parameter`` shorthands of the study's --policies list."""
    assert isinstance(make_policy("downpour"), Downpour)
    assert isinstance(make_policy("staleness-lr"), StalenessLR)
    assert make_policy("dc-asgd", dc_lambda=0.5).dc_lambda == 0.5
    assert make_policy("dc-asgd:0.1").dc_lambda == 0.1
    assert make_policy("ssp:4").staleness_bound == 4
    sync = make_policy("sync:2", workers=8)
    assert isinstance(sync, Sync) and sync.quorum == 6
    easgd = make_policy("easgd:8", lr=0.01, easgd_rho=10.0)
    assert isinstance(easgd, EASGD) and easgd.tau == 8 and easgd.alpha == pytest.approx(0.1)
    assert "staleness_bound=4" in repr(make_policy("ssp:4"))


def test_a_real_shard_passes_the_workers_fetched_values_to_dc_asgd() -> None:
    """Shard.push(fetched_values=...) reaches the policy: g + λ·g⊙g⊙(w_now − w_fetched), then SGD."""
    shard = Shard(0, 0, torch.tensor([1.0, 2.0]), PolicyRule(SGD(lr=0.1), DCASGD(dc_lambda=0.5)))
    assert shard.needs_fetched
    fetched = torch.tensor([0.0, 2.0])  # the worker computed at these values; the shard now holds [1, 2]
    shard.push(torch.tensor([2.0, 1.0]), fetched_version=0, fetched_values=fetched)
    # g' = [2 + 0.5·4·(1 − 0), 1 + 0.5·1·0] = [4, 1]; w = [1 − 0.4, 2 − 0.1]
    out = torch.empty(2)
    shard.fetch_into(out)
    torch.testing.assert_close(out, torch.tensor([0.6, 1.9]))


def test_the_dc_asgd_rule_leaves_the_callers_gradient_alone() -> None:
    """DCASGD.adjust returns a new tensor: the pushed gradient is the worker's (it may reuse or log it), so the
    compensation g + λ·g⊙g⊙(w_now − w_fetched) must not be written over it. g = [1, -2, 0.5], w_now = [1, 1, 1],
    w_fetched = [0.5, 2, 1], λ = 0.1 → g' = [1.05, -2.4, 0.5]; SGD lr 0.1: w' = [0.895, 1.24, 0.95]; g unchanged."""
    update = _t(DC_G)
    adjusted = DCASGD(dc_lambda=0.1).adjust(update, _meta(3), values_now=_t(DC_NOW), values_fetched=_t(DC_FETCHED))
    _close(adjusted.update, DC_EXPECTED)
    assert adjusted.update is not update
    _close(update, DC_G, tol=0)
    rule = PolicyRule(SGD(lr=0.1), DCASGD(dc_lambda=0.1))
    state, out = ShardState(_t(DC_NOW), {}), ShardState(torch.zeros(3), {})
    rule(_meta(3), update, state, out, fetched=_t(DC_FETCHED))
    _close(out.values, [0.895, 1.24, 0.95])
    _close(update, DC_G, tol=0)


# ---- a Config's policy: config_policy and policy_rule ------------------------------------------------------


def test_config_policy_takes_every_ps_hyperparameter_from_the_config() -> None:
    """The ``ps.*`` keys reach the policy: dc_lambda, easgd_rho (α = lr·rho) and tau, backup_workers against
    cluster.workers, staleness_bound. None of the values is its default, so one dropped on the way shows."""
    dc = config_policy(load_config(None, ["ps.policy=dc-asgd", "ps.dc_lambda=0.3"]))
    assert isinstance(dc, DCASGD) and dc.dc_lambda == 0.3
    easgd = config_policy(load_config(None, ["ps.policy=easgd", "ps.lr=0.01", "ps.easgd_rho=20", "ps.easgd_tau=7"]))
    assert isinstance(easgd, EASGD) and easgd.alpha == pytest.approx(0.2) and easgd.tau == 7  # 0.01 · 20
    sync = config_policy(load_config(None, ["ps.policy=sync", "cluster.workers=5", "ps.backup_workers=2"]))
    assert isinstance(sync, Sync) and sync.workers == 5 and sync.quorum == 3  # N − b = 5 − 2
    ssp = config_policy(load_config(None, ["ps.policy=ssp", "ps.staleness_bound=6"]))
    assert isinstance(ssp, SSP) and ssp.staleness_bound == 6


@pytest.mark.parametrize("policy", ["sync", "ssp", "staleness-lr", "dc-asgd", "easgd"])
def test_policy_rule_puts_every_policy_but_downpour_in_front_of_the_rule(policy: str) -> None:
    """policy_rule(config) is the bare rule only for downpour; for any other policy it is a PolicyRule holding
    that policy (a bare rule would silently train it as plain downpour on the local and Ray backends)."""
    config = load_config(None, ["ps.rule=sgd", "ps.lr=0.01", f"ps.policy={policy}"])
    rule = policy_rule(config)
    assert isinstance(rule, PolicyRule) and rule.policy.name == policy and isinstance(rule.rule, SGD)
    assert isinstance(policy_rule(load_config(None, ["ps.rule=sgd"])), SGD)


def test_a_shard_built_with_policy_rule_scales_a_stale_push_by_staleness_lr() -> None:
    """ps.policy = staleness-lr, SGD lr 0.1: a Shard holding policy_rule(config) applies a push fetched 4 versions
    ago at lr/4. Four zero pushes take the shard from version 0 to 4 (w stays [1, 1]); then g = [1, 1] fetched at
    version 0 has staleness 4: w' = 1 − 0.1/4 = 0.975 (plain downpour would give 0.9)."""
    config = load_config(None, ["ps.rule=sgd", "ps.lr=0.1", "ps.policy=staleness-lr"])
    shard = Shard(0, 0, torch.ones(2), policy_rule(config))
    for version in range(4):
        shard.push(torch.zeros(2), fetched_version=version)
    result = shard.push(torch.ones(2), fetched_version=0)
    assert result.applied and result.staleness == 4
    out = torch.empty(2)
    shard.fetch_into(out)
    _close(out, [0.975, 0.975])
