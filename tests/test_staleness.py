"""Staleness: scripted interleavings of fetches and pushes, the real worker loop, and the histogram summary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from downpour.errors import ConfigError
from downpour.models.rica import RICA
from downpour.ps.budget import GlobalSteps
from downpour.ps.flat import FlatParameters, flat_copy
from downpour.ps.rules import SGD
from downpour.ps.shard import PushResult, Shard
from downpour.ps.sharding import contiguous_bounds
from downpour.ps.staleness import StalenessHistogram
from downpour.ps.worker import DownpourWorker, PushRecord, WorkerSettings, epoch_batches

# ---------------------------------------------------------------------------------------------- scripted interleaving


def test_scripted_two_worker_interleaving() -> None:
    """Two workers driven by hand against one shard; every staleness is what the script predicts."""
    shard = Shard(0, 0, torch.zeros(3), SGD(lr=1.0))
    a_vals, b_vals = torch.empty(3), torch.empty(3)
    one = torch.ones(3)

    a = shard.fetch_into(a_vals)  # A fetches v0
    b = shard.fetch_into(b_vals)  # B fetches v0
    assert (a, b) == (0, 0)
    assert shard.push(one, a, worker=0) == PushResult(True, 0, 1)  # A: nothing applied since its fetch
    assert shard.push(one, b, worker=1) == PushResult(True, 1, 2)  # B: A's push came in between
    a = shard.fetch_into(a_vals)  # A fetches v2
    assert a == 2 and a_vals.tolist() == [-2.0, -2.0, -2.0]
    assert shard.push(one, b, worker=1) == PushResult(True, 2, 3)  # B again without fetching: 2 pushes since v0
    assert shard.push(one, a, worker=0) == PushResult(True, 1, 4)  # A: B's second push since v2
    # B pushes and pulls in one call: staleness still counts from v0, and B now holds v5.
    result = shard.push(one, b, worker=1, fetch_into=b_vals)
    assert result == PushResult(True, 4, 5)
    b = result.version
    assert b_vals.tolist() == [-5.0, -5.0, -5.0]
    # A rejected push neither bumps the version nor counts toward anyone's staleness.
    assert shard.push(torch.full((3,), float("nan")), a, worker=0) == PushResult(False, -1, 5)
    assert shard.push(one, a, worker=0) == PushResult(True, 3, 6)  # A: v3, v4, v5 applied since its fetch of v2
    assert shard.push(one, b, worker=1) == PushResult(True, 1, 7)  # B: only A's last push since v5
    assert shard.version == 7 and shard.rejected == 1
    out = torch.empty(3)
    shard.fetch_into(out)
    assert out.tolist() == [-7.0, -7.0, -7.0]


def test_scripted_interleaving_two_shards_are_independent() -> None:
    """Each shard keeps its own version: a push to one does not make pushes to the other stale."""
    shards = [Shard(i, 2 * i, torch.zeros(2), SGD(lr=1.0)) for i in range(2)]
    buf = torch.empty(2)
    fetched = [shard.fetch_into(buf) for shard in shards]
    shards[0].push(torch.ones(2), fetched[0], worker=1)  # another worker touches only shard 0
    assert shards[0].push(torch.ones(2), fetched[0]).staleness == 1
    assert shards[1].push(torch.ones(2), fetched[1]).staleness == 0


# ---------------------------------------------------------------------------------------------- the real worker

INPUT_DIM, FEATURES = 16, 8  # RICA with 8 filters of 16 values: 128 parameters


def _cluster(num_shards: int, seed: int = 0) -> tuple[RICA, list[Shard]]:
    model = RICA(input_dim=INPUT_DIM, features=FEATURES, generator=torch.Generator().manual_seed(seed))
    initial = flat_copy(model)
    shards = [
        Shard(i, start, initial[start:stop].clone(), SGD(lr=0.01))
        for i, (start, stop) in enumerate(contiguous_bounds(initial.numel(), num_shards))
    ]
    return model, shards


def _examples(count: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, INPUT_DIM, generator=torch.Generator().manual_seed(seed))


def _run_worker(
    steps: int, num_shards: int, settings: WorkerSettings, seed: int = 0
) -> tuple[DownpourWorker, list[Shard], list[PushRecord], GlobalSteps]:
    model, shards = _cluster(num_shards, seed)
    records: list[PushRecord] = []
    budget = GlobalSteps(limit=steps)
    worker = DownpourWorker(
        0,
        model,
        shards,
        _examples(seed=seed),
        settings,
        rng=np.random.default_rng(seed),
        budget=budget,
        should_stop=lambda: False,
        record=records.append,
    )
    worker.run()
    return worker, shards, records, budget


@pytest.mark.parametrize(
    ("params", "shards", "expected"),
    [
        (3, 3, [(0, 1), (1, 2), (2, 3)]),  # as many shards as parameters: one each
        (7, 3, [(0, 3), (3, 5), (5, 7)]),  # 7 = 3 + 2 + 2: the first 7 % 3 = 1 shard is one longer
        (6, 3, [(0, 2), (2, 4), (4, 6)]),
        (5, 1, [(0, 5)]),
    ],
)
def test_contiguous_bounds_cut_near_equal_slices(params: int, shards: int, expected: list[tuple[int, int]]) -> None:
    """ps.shards contiguous slices covering every parameter once, sizes differing by at most one, the longer ones
    first; one parameter per shard is allowed (it is the most shards a model can have)."""
    assert contiguous_bounds(params, shards) == expected


@pytest.mark.parametrize(("params", "shards"), [(2, 3), (5, 0)])
def test_contiguous_bounds_refuse_an_empty_shard(params: int, shards: int) -> None:
    """More shards than parameters would leave a shard with nothing; no shard at all holds nothing: both refused,
    naming ps.shards."""
    with pytest.raises(ConfigError, match=rf"invalid ps\.shards: {shards}"):
        contiguous_bounds(params, shards)


def _staleness_by_shard(records: list[PushRecord], num_shards: int) -> list[list[int]]:
    return [[r.staleness for r in records if r.shard == i] for i in range(num_shards)]


def test_single_worker_fetching_every_step_is_never_stale() -> None:
    """n_fetch = n_push = 1, one worker: exactly N pushes per shard, all with staleness 0, versions 1..N."""
    steps, num_shards = 12, 3
    worker, shards, records, budget = _run_worker(steps, num_shards, WorkerSettings(batch_size=8))
    assert len(records) == steps * num_shards
    assert worker.pushes_ == steps and budget.value == steps
    for i, shard in enumerate(shards):
        mine = [r for r in records if r.shard == i]
        assert len(mine) == steps
        assert [r.staleness for r in mine] == [0] * steps
        assert [r.version for r in mine] == list(range(1, steps + 1))
        assert all(r.applied and r.worker == 0 and np.isfinite(r.loss) for r in mine)
        assert shard.version == steps


def test_single_worker_equals_plain_sgd() -> None:
    """With one worker and fetch/push every step, the shards end exactly where local SGD on the same batches does."""
    steps, batch_size, lr = 10, 8, 0.01
    _, shards, _, _ = _run_worker(steps, 2, WorkerSettings(batch_size=batch_size))

    model = RICA(input_dim=INPUT_DIM, features=FEATURES, generator=torch.Generator().manual_seed(0))
    flat = FlatParameters(model)
    batches = epoch_batches(_examples(seed=0), batch_size, np.random.default_rng(0))
    for _ in range(steps):
        flat.zero_grad()
        model.loss(next(batches)).backward()
        flat.values.add_(flat.grads, alpha=-lr)
    served = torch.cat([shard.snapshot()["values"] for shard in shards])
    torch.testing.assert_close(served, flat.values, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(served, flat_copy(RICA(INPUT_DIM, FEATURES, generator=torch.Generator().manual_seed(0))))


# Derivation from ps/worker.py (one worker, so staleness = the worker's own pushes since its last fetch):
#  * n_fetch=3, n_push=1: fetch before steps 0, 3, 6, ...; the push after the 3rd step of each window is a
#    push-pull (steps_ % 3 == 0), so the fetch before the next window is skipped but the versions are fresh.
#    Pushes per window: fetched v, applied at v, v+1, v+2  ->  staleness 0, 1, 2, then 0, 1, 2, ...
#  * n_fetch=3, n_push=2: pushes after steps 2, 4, 6, 8, 10, 12; fetches before steps 0 and 3 (steps_ 3 % 3 == 0,
#    no push-pull just before), push-pull after step 6 (6 % 3 == 0), fetch before step 9, push-pull after 12.
#      push@2: fetched v0 at v0 -> 0      push@4: fetched v1 (step 3) at v1 -> 0
#      push@6: fetched v1 at v2 -> 1 (pull v3)    push@8: fetched v3 at v3 -> 0
#      push@10: fetched v4 (step 9) at v4 -> 0    push@12: fetched v4 at v5 -> 1     ... period 0, 0, 1
#  * n_fetch=1, n_push=2: a fetch before every step, so every push is against the newest version -> all 0.
#  * n_fetch=2, n_push=3: pushes after steps 3, 6, 9, 12; fetch before steps 0, 2, 4 (no push-pull at 3: 3 % 2),
#    push-pull at 6, fetch before 8, 10, push-pull at 12.
#      push@3: fetched v0 (step 2) at v0 -> 0   push@6: fetched v1 (step 4) at v1 -> 0 (pull v2)
#      push@9: fetched v2 (step 8) at v2 -> 0   push@12: fetched v3 (step 10) at v3 -> 0  -> all 0
STALENESS_CASES = [
    (3, 1, 9, [0, 1, 2, 0, 1, 2, 0, 1, 2]),
    (3, 2, 6, [0, 0, 1, 0, 0, 1]),
    (1, 2, 5, [0, 0, 0, 0, 0]),
    (2, 3, 4, [0, 0, 0, 0]),
    (4, 1, 8, [0, 1, 2, 3, 0, 1, 2, 3]),
]


@pytest.mark.parametrize(("n_fetch", "n_push", "pushes", "expected"), STALENESS_CASES)
def test_worker_staleness_sequence(n_fetch: int, n_push: int, pushes: int, expected: list[int]) -> None:
    """The staleness sequence per shard follows from n_fetch, n_push and the push-pull shortcut."""
    num_shards = 2
    settings = WorkerSettings(batch_size=8, n_fetch=n_fetch, n_push=n_push)
    worker, shards, records, _ = _run_worker(pushes, num_shards, settings)
    assert _staleness_by_shard(records, num_shards) == [expected] * num_shards
    assert worker.pushes_ == pushes
    assert [shard.version for shard in shards] == [pushes] * num_shards
    # The budget stops the worker on the step that would have been push number ``pushes + 1``.
    assert worker.steps_ == (pushes + 1) * n_push


def test_worker_fetch_count_matches_push_pull_shortcut() -> None:
    """With n_fetch=3, n_push=1 the worker fetches only once; later windows are refreshed by push-pulls."""
    _, shards = _cluster(1)
    calls = {"fetch": 0, "push_pull": 0}
    shard = shards[0]
    real_fetch, real_push = shard.fetch_into, shard.push

    def fetch_into(out: torch.Tensor) -> int:
        calls["fetch"] += 1
        return real_fetch(out)

    def push(update, fetched_version, worker=-1, *, fetch_into=None):  # type: ignore[no-untyped-def]
        calls["push_pull"] += fetch_into is not None
        return real_push(update, fetched_version, worker, fetch_into=fetch_into)

    shard.fetch_into, shard.push = fetch_into, push  # type: ignore[method-assign]
    model = RICA(input_dim=INPUT_DIM, features=FEATURES, generator=torch.Generator().manual_seed(0))
    worker = DownpourWorker(
        0,
        model,
        [shard],
        _examples(),
        WorkerSettings(batch_size=8, n_fetch=3, n_push=1),
        rng=np.random.default_rng(0),
        budget=GlobalSteps(limit=9),
        should_stop=lambda: False,
        record=lambda record: None,
    )
    worker.run()
    assert calls == {"fetch": 1, "push_pull": 3}  # pushes 3, 6 and 9 pull


def test_worker_stops_when_asked() -> None:
    """``should_stop`` ends the loop before the budget does."""
    model, shards = _cluster(1)
    records: list[PushRecord] = []
    worker = DownpourWorker(
        0,
        model,
        shards,
        _examples(),
        WorkerSettings(batch_size=8),
        rng=np.random.default_rng(0),
        budget=GlobalSteps(limit=0),
        should_stop=lambda: len(records) >= 4,
        record=records.append,
    )
    worker.run()
    assert len(records) == 4 and shards[0].version == 4


# ---------------------------------------------------------------------------------------------- histogram


def _inverted_cdf(values: np.ndarray, q: float) -> int:
    return int(np.percentile(values, q, method="inverted_cdf"))


@pytest.mark.parametrize("seed", range(5))
def test_histogram_summary_matches_numpy(seed: int) -> None:
    """mean, p50, p99 and max agree with NumPy on random staleness values, added in several batches."""
    rng = np.random.default_rng(seed)
    values = rng.poisson(lam=3 + seed, size=1000 + 37 * seed).astype(np.int64)
    values[rng.integers(values.size)] = 40 + seed  # a rare large value at some position
    histogram = StalenessHistogram()
    for chunk in np.array_split(values, 7):  # batches grow and shrink the binned range
        histogram.add(chunk)
    summary = histogram.summary()
    assert histogram.total == values.size
    assert summary["mean"] == pytest.approx(values.mean(), rel=1e-12)
    assert summary["p50"] == _inverted_cdf(values, 50)
    assert summary["p99"] == _inverted_cdf(values, 99)
    assert summary["max"] == values.max()
    np.testing.assert_array_equal(histogram.counts, np.bincount(values))


def test_histogram_small_hand_example() -> None:
    """Staleness [0, 0, 1, 5]: mean 1.5, p50 0 (half at or below 0), p99 5, max 5."""
    histogram = StalenessHistogram()
    histogram.add(np.array([5, 0]))
    histogram.add(np.array([1, 0]))
    assert histogram.counts.tolist() == [2, 1, 0, 0, 0, 1]
    assert histogram.summary() == {"mean": 1.5, "p50": 0, "p99": 5, "max": 5}
    assert histogram.percentile(75) == 1


def test_histogram_resumes_from_counts() -> None:
    """A histogram rebuilt from saved counts (on resume) keeps counting where it stopped."""
    histogram = StalenessHistogram([3, 0, 2])
    histogram.add(np.array([1, 1, 4]))
    assert histogram.counts.tolist() == [3, 2, 2, 0, 1]
    assert histogram.total == 8
    histogram.add(np.array([], dtype=np.int64))
    assert histogram.total == 8


def test_histogram_empty_summary() -> None:
    """No pushes counted: all zeros."""
    assert StalenessHistogram().summary() == {"mean": 0.0, "p50": 0, "p99": 0, "max": 0}
    assert StalenessHistogram().percentile(50) == 0


class _HalfBroken(torch.nn.Module):
    """Two parameters of 4 values: ``a``'s gradient is NaN, ``b``'s finite (each lands in its own shard)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(4))
        self.b = torch.nn.Parameter(torch.ones(4))

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        return (self.a * float("nan")).sum() + (self.b * batch.mean()).pow(2).sum()


@pytest.mark.parametrize("policy", ["downpour", "sync", "easgd"])
def test_a_push_holding_nan_anywhere_is_refused_by_every_shard(policy: str) -> None:
    """Each shard checks only its own slice: a gradient whose NaN lies in shard 0's slice had shard 1 apply the rest
    (and an EASGD worker's diverged slice reset while the other was exchanged). The whole push is refused now,
    by every shard, as one shard refuses it; the values stay as they were."""
    from downpour.ps.clocks import SharedClocks
    from downpour.ps.policies import EASGD, Sync
    from downpour.ps.sync_shard import SyncShard
    from downpour.ps.worker_rounds import ElasticWorker, SyncWorker

    initial = flat_copy(_HalfBroken())
    bounds = contiguous_bounds(initial.numel(), 2)
    records: list[PushRecord] = []
    kind, extra = DownpourWorker, {}
    if policy == "sync":
        roster = SharedClocks(1, bound=0)
        shards = [SyncShard(i, lo, initial[lo:hi].clone(), SGD(lr=0.1), policy=Sync(workers=1), roster=roster)
                  for i, (lo, hi) in enumerate(bounds)]  # fmt: skip
        kind, extra = SyncWorker, {"roster": roster}
    else:
        shards = [Shard(i, lo, initial[lo:hi].clone(), SGD(lr=0.1)) for i, (lo, hi) in enumerate(bounds)]
        if policy == "easgd":
            kind, extra = ElasticWorker, {"policy": EASGD(lr=0.1, rho=1.0, tau=2)}
    worker = kind(0, _HalfBroken(), shards, _examples(), WorkerSettings(batch_size=8), rng=np.random.default_rng(0),
                  budget=GlobalSteps(limit=3), should_stop=lambda: False, record=records.append, **extra)  # fmt: skip
    worker.run()
    assert len(records) == 3 * 2 and not any(record.applied for record in records)
    assert [shard.snapshot()["rejected"] for shard in shards] == [3, 3]
    for shard, (lo, hi) in zip(shards, bounds, strict=True):
        out = torch.empty(hi - lo)
        shard.fetch_into(out)
        assert torch.equal(out, initial[lo:hi])
