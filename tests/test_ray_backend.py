"""The Ray backend on a real Ray cluster: training, placement, and surviving killed worker and shard actors.

With ``DOWNPOUR_RAY_ADDRESS`` set (CI: ``scripts/ray_cluster.sh start``, two nodes on 127.0.0.1) the tests connect
to that cluster; otherwise they start a private single-node instance for this module. Skipped where Ray is not
installed.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

ray = pytest.importorskip("ray")

import torch  # noqa: E402

from downpour.backends.chaos import parse_chaos  # noqa: E402
from downpour.backends.ray import RayCluster, connect  # noqa: E402
from downpour.config import Config  # noqa: E402
from downpour.data import Dataset, load_dataset  # noqa: E402
from downpour.errors import ConfigError  # noqa: E402
from downpour.models import build_model  # noqa: E402
from downpour.ps.flat import flat_copy  # noqa: E402
from downpour.train import HeldOutLoss  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """This process connected to the CI cluster, or to a private instance started (and shut down) here."""
    address = os.environ.get("DOWNPOUR_RAY_ADDRESS", "")
    temp_dir = connect(address, num_cpus=2)
    try:
        yield address
    finally:
        ray.shutdown()
        if temp_dir is not None:
            import shutil

            shutil.rmtree(temp_dir, ignore_errors=True)


def _config(steps: int) -> Config:
    """rica on scikit-learn's 8x8 digits (real data, loaded in a moment), 2 workers, 2 shards."""
    config = Config()
    config.data.source = "digits"
    config.model.features = 64
    config.train.steps = steps
    config.cluster.workers = 2
    config.cluster.threads_per_worker = 1
    config.ps.shards = 2
    return config


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset(_config(1).data, seed=0)


def _cluster(config: Config, data: Dataset, **kwargs: Any) -> tuple[RayCluster, HeldOutLoss, float]:
    model = build_model(config.model, data.dim, seed=config.train.seed, shape=data.shape)
    initial = flat_copy(model)
    held_out = HeldOutLoss(config, data)
    cluster = RayCluster(config, data.train.clone(), initial, worker_seeds=[11, 12], t0=time.time(), shape=data.shape,
                         address=os.environ.get("DOWNPOUR_RAY_ADDRESS", ""), **kwargs)  # fmt: skip
    return cluster, held_out, held_out(initial)


def _train(cluster: RayCluster, *, seconds: float, tick: Callable[[float], None] | None = None
           ) -> tuple[list[tuple], list[Any]]:  # fmt: skip
    """Start, poll until the budget is spent or ``seconds`` pass (calling ``tick(elapsed)``), stop."""
    records: list[tuple] = []
    events: list[Any] = []
    cluster.start()
    start = time.monotonic()
    while cluster.alive() and time.monotonic() - start < seconds:
        more, more_events = cluster.poll()
        records += more
        events += more_events
        if tick is not None:
            tick(time.monotonic() - start)
        time.sleep(0.05)
    more, more_events = cluster.stop()
    return records + more, events + more_events


def _final_loss(cluster: RayCluster, held_out: HeldOutLoss) -> tuple[float, list[dict[str, Any]]]:
    snapshots = cluster.snapshots()
    return held_out(torch.cat([s["values"] for s in snapshots])), snapshots


def test_two_workers_two_shards_train_digits(ray_cluster: str, digits: Dataset) -> None:
    """Two worker actors and two shard actors: the held-out loss falls, every push is recorded with its staleness."""
    cluster, held_out, initial_loss = _cluster(_config(400), digits)
    try:
        records, events = _train(cluster, seconds=60)
        final_loss, snapshots = _final_loss(cluster, held_out)
        assert cluster.steps() == 400  # train.steps counts pushes across workers, exactly
        assert [s["version"] for s in snapshots] == [400, 400]
        assert cluster.faults() == {"worker_restarts": 0, "shard_restores": 0, "lost_updates": 0}
        # Each worker computes one more gradient, which finds the budget spent and is not pushed.
        assert 400 * 128 <= cluster.examples_done() <= 402 * 128
    finally:
        cluster.close()
    assert not events
    assert final_loss < 0.25 * initial_loss
    assert len(records) == 2 * 400
    assert {r[1] for r in records} == {0, 1} and {r[2] for r in records} == {0, 1}  # (t, worker, shard, ...)
    for shard in (0, 1):  # per shard, applied versions are exactly 1..400
        assert sorted(r[3] for r in records if r[2] == shard) == list(range(1, 401))
    staleness = [r[4] for r in records if r[6]]
    assert len(staleness) == 800 and min(staleness) >= 0
    assert sum(staleness) > 0  # two asynchronous workers: some pushes were computed on stale parameters


def test_shards_are_spread_over_the_nodes(ray_cluster: str, digits: Dataset) -> None:
    """With two nodes, shard i lands on node i mod 2, and the two workers on both nodes too."""
    nodes = sorted(node["NodeID"] for node in ray.nodes() if node["Alive"])
    if len(nodes) < 2:
        pytest.skip("a single-node Ray instance (set DOWNPOUR_RAY_ADDRESS to a 2-node cluster)")
    cluster, _, _ = _cluster(_config(20), digits)
    try:
        cluster.start()
        placement = cluster.placement()
        cluster.stop()
    finally:
        cluster.close()
    assert len(set(placement["shards"])) == 2
    assert len(set(placement["workers"])) == 2
    assert set(placement["shards"]) <= set(nodes)


def test_killed_worker_process_is_restarted_and_the_run_finishes(ray_cluster: str, digits: Dataset) -> None:
    """SIGKILL one worker actor's process mid-run: Ray restarts it, it fetches the current parameters and goes on."""
    steps = 1200
    cluster, held_out, initial_loss = _cluster(_config(steps), digits)
    killed: list[tuple[int, float]] = []  # (pid, seconds on the run's clock)

    def kill_once(elapsed: float) -> None:
        if not killed and cluster.steps() >= 200:
            pid = cluster.pids()[1]
            os.kill(pid, signal.SIGKILL)  # a real process, on this machine in every test cluster
            killed.append((pid, time.time() - cluster.t0))

    try:
        records, events = _train(cluster, seconds=75, tick=kill_once)
        final_loss, snapshots = _final_loss(cluster, held_out)
        faults = cluster.faults()
        pids_after = cluster.pids()
        steps_done = cluster.steps()
    finally:
        cluster.close()
    assert killed, "the run ended before the kill"
    assert faults["worker_restarts"] >= 1
    assert any(e.kind == "restarted" and e.worker == 1 for e in events)
    pid, killed_at = killed[0]
    assert pids_after[1] != pid  # a new process
    assert final_loss < 0.25 * initial_loss
    after = [r for r in records if r[1] == 1 and r[0] > killed_at]  # (t, worker, shard, version, ...)
    assert len(after) > 20  # the restarted worker trained again...
    assert min(r[3] for r in after) > 200  # ...from the current parameters: its first push landed on a fresh version
    # Pushes of the killed process after its last report may go unreported, and its claimed steps unused: the run
    # applies at most the budget, and nearly all of it.
    assert steps - 64 <= steps_done <= steps
    assert all(s["version"] <= steps for s in snapshots)


def test_killed_shard_is_restored_from_the_last_checkpoint(ray_cluster: str, digits: Dataset) -> None:
    """cluster.chaos kills a shard actor between two checkpoints: Ray restarts it, it loads the last checkpoint
    snapshot, and the updates lost are exactly those applied since that checkpoint (less than one interval's)."""
    steps = 2000
    interval = 0.5  # seconds between checkpoints (train.checkpoint_every)
    config = _config(steps)
    cluster, held_out, initial_loss = _cluster(config, digits, chaos="kill-shard:1.25s")
    checkpoints: list[tuple[float, list[int]]] = []  # (time.monotonic(), per-shard versions) of each snapshot
    next_checkpoint = [0.0]

    def checkpoint(elapsed: float) -> None:
        if cluster.examples_done() and elapsed >= next_checkpoint[0]:
            checkpoints.append((time.monotonic(), [s["version"] for s in cluster.snapshots()]))
            next_checkpoint[0] = elapsed + interval

    try:
        _, events = _train(cluster, seconds=75, tick=checkpoint)
        final_loss, _ = _final_loss(cluster, held_out)
        faults = cluster.faults()
        restores = cluster.restores()
        chaos_log = list(cluster.chaos_log)
    finally:
        cluster.close()
    assert len(chaos_log) == 1 and chaos_log[0][1] == "kill-shard"
    killed_at, _, shard = chaos_log[0]
    assert faults["shard_restores"] == 1 and len(restores) == 1
    assert restores[0][:2] == (shard, 1)  # (shard, incarnation, ...)
    restored_version = restores[0][2]
    before = [versions[shard] for when, versions in checkpoints if when < killed_at]
    assert len(before) >= 2, checkpoints
    assert restored_version == before[-1] > 0  # the last checkpoint before the death, not the start
    # Lost: what the dead incarnation applied after that checkpoint, less than one interval's updates (the kill
    # came half-way through an interval; slack for a machine whose speed varies).
    per_interval = [b - a for a, b in itertools.pairwise(before)]
    assert 0 < faults["lost_updates"] <= 1.5 * max(per_interval)
    assert final_loss < 0.25 * initial_loss
    assert any(e.kind == "shard_restored" for e in events)


def test_chaos_schedule_parses_and_errors_name_the_key() -> None:
    """``cluster.chaos`` reads KIND:TIME items in any order; every mistake names cluster.chaos and the value."""
    assert parse_chaos("") == []
    assert parse_chaos("kill-shard:60s, kill-worker:30s") == [("kill-worker", 30.0), ("kill-shard", 60.0)]
    assert parse_chaos("kill-worker:1.5,kill-worker:2m") == [("kill-worker", 1.5), ("kill-worker", 120.0)]
    for bad, words in [
        ("kill-node:30s", ["kill-node", "kill-worker, kill-shard"]),
        ("kill-worker", ["KIND:TIME"]),
        ("kill-worker:soon", ["'soon'"]),
        ("kill-worker:-5s", ["'-5s'"]),
        ("kill-worker:30s,,kill-shard:60s", ["empty item"]),
        ("kill-worker:30h", ["'30h'"]),
    ]:
        with pytest.raises(ConfigError) as error:
            parse_chaos(bad)
        message = str(error.value)
        assert message.startswith("invalid cluster.chaos: ") and repr(bad) in message
        for word in words:
            assert word in message
