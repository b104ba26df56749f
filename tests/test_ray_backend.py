"""The Ray backend on a real Ray cluster: training, placement, and surviving killed worker and shard actors.

With ``DOWNPOUR_RAY_ADDRESS`` set (CI: ``scripts/ray_cluster.sh start``, two nodes on 127.0.0.1) the tests connect
to that cluster; otherwise they start a private single-node instance for this module. Skipped where Ray is not
installed.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray")

# `make test` runs pytest in two processes (pytest-xdist): this file's tests share one Ray cluster of 2 CPUs, so they
# all run in one of them, one after another.
pytestmark = pytest.mark.xdist_group("ray")

import torch  # noqa: E402

from conftest import Collected, holds_flock, rows_written, stop_process  # noqa: E402
from downpour.backends.processes import process_gone  # noqa: E402
from downpour.backends.ray import RayCluster, connect  # noqa: E402
from downpour.backends.ray_connect import disconnect  # noqa: E402
from downpour.backends.ray_workers import PIPELINE_DEPTH, push_log_path  # noqa: E402
from downpour.config import Config  # noqa: E402
from downpour.data import Dataset, load_dataset  # noqa: E402
from downpour.errors import ConfigError  # noqa: E402
from downpour.held_out import HeldOutLoss  # noqa: E402
from downpour.models import build_model  # noqa: E402
from downpour.ps.flat import flat_copy  # noqa: E402
from downpour.resume import RunState, model_signature  # noqa: E402
from downpour.train import _worker_seeds  # noqa: E402
from downpour.watch import Taken, checkpoint_now  # noqa: E402
from test_local_policies import _synchronous_sgd  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """This process connected to the CI cluster, or to a private instance started (and shut down) here; yields
    the address other processes connect to."""
    address = os.environ.get("DOWNPOUR_RAY_ADDRESS", "")
    temp_dir = connect(address, num_cpus=2)
    try:
        yield address or ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        disconnect(temp_dir)


_PRIVATE_INSTANCES = """
import json, os, stat
import ray
from downpour.backends.ray_connect import connect, disconnect

@ray.remote
def add(a, b):
    return a + b

before = os.environ.get("RAY_AUTH_TOKEN_PATH")
seen, tokens = {}, []
for run in range(2):
    temp_dir = connect("", num_cpus=1)
    token = os.path.join(temp_dir, "auth_token")
    tokens.append(open(token).read())
    seen[run] = {"sum": ray.get(add.remote(run, 3)), "mode": stat.S_IMODE(os.stat(token).st_mode),
                 "dir_mode": stat.S_IMODE(os.stat(temp_dir).st_mode),
                 "env": os.environ.get("RAY_AUTH_TOKEN_PATH") == token}
    disconnect(temp_dir)
    seen[run].update(removed=not os.path.exists(temp_dir), restored=os.environ.get("RAY_AUTH_TOKEN_PATH") == before)
print(json.dumps({"runs": seen, "fresh": tokens[0] != tokens[1] and len(tokens[0]) == 64}))
"""


def test_a_private_instance_has_a_fresh_token_only_its_user_can_read(tmp_path: Path) -> None:
    """A private Ray instance (no ``cluster.address``) authenticates with a token of its own, written 0600 in its
    0700 temporary directory and removed with it; a second instance gets another. Left to Ray, a new instance
    wrote ``~/.ray/auth_token`` readable by every user and reused it for every later instance. Ray's own processes
    (a task's worker) still authenticate, and the process gets its own token settings back afterwards."""
    home = tmp_path / "home"
    home.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("DOWNPOUR_RAY_ADDRESS", "RAY_ADDRESS")}
    # a TMPDIR of the test's own (short: Ray's sockets live there): the first instance's processes, still exiting
    # while the second starts, wrote its session folder again after it was removed, and /tmp kept one per suite
    temp_dir = tempfile.mkdtemp(prefix="dp-")
    try:
        result = subprocess.run([sys.executable, "-c", _PRIVATE_INSTANCES], env={**env, "HOME": str(home),
                                "TMPDIR": temp_dir}, capture_output=True, text=True, timeout=300)  # fmt: skip
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    for run, expected_sum in (("0", 3), ("1", 4)):
        assert seen["runs"][run] == {"sum": expected_sum, "mode": 0o600, "dir_mode": 0o700, "env": True,
                                     "removed": True, "restored": True}, seen  # fmt: skip
    assert seen["fresh"] is True
    assert not (home / ".ray" / "auth_token").exists()


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


def _cluster(config: Config, data: Dataset, seeds: list[int] | None = None, **kwargs: Any
             ) -> tuple[RayCluster, HeldOutLoss, float]:  # fmt: skip
    model = build_model(config.model, data.dim, seed=config.train.seed, shape=data.shape)
    initial = flat_copy(model)
    held_out = HeldOutLoss(config, data)
    cluster = RayCluster(config, data.train.clone(), initial, worker_seeds=seeds or [11, 12], t0=time.time(),
                         shape=data.shape, address=os.environ.get("DOWNPOUR_RAY_ADDRESS", ""), **kwargs)  # fmt: skip
    return cluster, held_out, held_out(initial)


def _train(cluster: RayCluster, *, seconds: float, tick: Callable[[float], None] | None = None,
           records: list[tuple] | None = None) -> list[Any]:  # fmt: skip
    """Start, poll until the workers stop or ``seconds`` pass (calling ``tick(elapsed)``), stop; the push records
    go into ``records``, the events are returned."""
    records = records if records is not None else []
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
    records += more
    return events + more_events


def _checkpoint(cluster: RayCluster, held_out: HeldOutLoss, out: Path, run_state: RunState | None = None) -> Taken:
    """What the driver does every train.checkpoint_every seconds (:func:`downpour.watch.checkpoint_now`): snapshot,
    measure, save into ``out`` unless diverged, and hand a snapshot that did not diverge to the shards as their
    restore point."""
    config = cluster.config
    return checkpoint_now(out, cluster, config, run_state or RunState(), cluster.worker_seeds,  # type: ignore[arg-type]
                           model_signature(held_out.model), held_out, final=False)  # fmt: skip


def _final_loss(cluster: RayCluster, held_out: HeldOutLoss) -> tuple[float, list[dict[str, Any]]]:
    snapshots = cluster.snapshots()
    return held_out(torch.cat([s["values"] for s in snapshots])), snapshots


def test_two_workers_two_shards_train_digits_across_the_nodes(ray_cluster: str, digits: Dataset) -> None:
    """Two worker actors and two shard actors: the held-out loss falls, every push is recorded with its staleness;
    with two nodes, shard i lands on node i mod 2 and the workers on both nodes (one shard mapped, one called)."""
    nodes = sorted(node["NodeID"] for node in ray.nodes() if node["Alive"])
    cluster, held_out, initial_loss = _cluster(_config(400), digits)
    try:
        records: list[tuple] = []
        events = _train(cluster, seconds=300, records=records)
        final_loss, snapshots = _final_loss(cluster, held_out)
        placement = cluster.placement()
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
    assert set(placement["shards"]) <= set(nodes)
    if len(nodes) >= 2:
        assert len(set(placement["shards"])) == 2 and len(set(placement["workers"])) == 2


def test_killed_worker_and_killed_shard_are_restarted_and_training_goes_on(ray_cluster: str, digits: Dataset,
                                                                           tmp_path: Path) -> None:  # fmt: skip
    """SIGKILL a worker actor's process: Ray restarts it and it goes on from the current parameters. Then kill a
    shard actor half-way between two checkpoints: it comes back at the last checkpoint, and the updates lost are
    those applied since (never more than about one interval's). The loss still falls."""
    interval = 0.5  # seconds between checkpoints (train.checkpoint_every)
    cluster, held_out, initial_loss = _cluster(_config(0), digits)  # no step budget: the test says when to stop
    checkpoints: list[tuple[float, list[int]]] = []  # (time.monotonic(), per-shard versions) of each snapshot
    killed: dict[str, Any] = {}
    records: list[tuple] = []
    last_checkpoint = [0.0]

    def tick(elapsed: float) -> None:
        now = time.monotonic()
        if cluster.examples_done() and now - last_checkpoint[0] >= interval:
            checkpoints.append((now, [s["version"] for s in _checkpoint(cluster, held_out, tmp_path).snapshots]))
            last_checkpoint[0] = now
        if "worker_pid" not in killed and cluster.steps() >= 200:
            killed["worker_pid"] = pid = cluster.pids()[1]
            os.kill(pid, signal.SIGKILL)  # a real process, on this machine in every test cluster
            killed["worker_t"] = time.time() - cluster.t0
            return
        after = [r for r in records if r[1] == 1 and r[0] > killed.get("worker_t", math.inf)]
        half_way = now - last_checkpoint[0] >= interval / 2  # between two checkpoints
        if "shard_t" not in killed and len(after) >= 40 and len(checkpoints) >= 2 and half_way:
            killed["shard_t"] = now
            cluster.kill_shard(0)
        if "shard_t" in killed and cluster.restores() and now - killed["shard_t"] > 2.0:
            cluster.request_stop()

    try:
        events = _train(cluster, seconds=300, tick=tick, records=records)
        final_loss, _ = _final_loss(cluster, held_out)
        faults = cluster.faults()
        restores = cluster.restores()
        pids_after = cluster.pids()
    finally:
        cluster.close()
    assert "shard_t" in killed, (killed, len(records), faults)
    # The worker: a new process, which trained again from the current parameters.
    assert faults["worker_restarts"] == 1
    assert [e.worker for e in events if e.kind == "restarted"] == [1]
    assert pids_after[1] != killed["worker_pid"]
    after = [r for r in records if r[1] == 1 and r[0] > killed["worker_t"]]  # (t, worker, shard, version, ...)
    assert min(r[3] for r in after) > 200  # its first push after the restart landed on a fresh version
    # The shard: restored once, at the version of the last checkpoint before its death.
    assert faults["shard_restores"] == 1 and [r[:2] for r in restores] == [(0, 1)]  # (shard, incarnation, ...)
    before = [versions[0] for when, versions in checkpoints if when < killed["shard_t"]]
    assert restores[0][2] == before[-1] > 0
    per_interval = [b - a for a, b in itertools.pairwise(before)]
    assert 0 < faults["lost_updates"] <= 1.5 * max(per_interval)
    assert any(e.kind == "shard_restored" for e in events)
    assert final_loss < 0.25 * initial_loss


def test_a_worker_whose_restarted_process_dies_before_it_answers_counts_two_restarts(
    ray_cluster: str, digits: Dataset
) -> None:
    """SIGKILL a worker's process, then its restarted process as soon as that one answers (``pids()``): the driver
    has polled meanwhile, but the second process died before its ``run`` answered, and counting restarts by failed
    calls saw one (in 4 of 5 tries so; with the second kill 0.3 s or more later, two). The coordinator counts the
    processes each worker's actor started: two restarts. The worker then trains on."""
    cluster, _, _ = _cluster(_config(0), digits)
    killed: dict[str, Any] = {}
    records: list[tuple] = []

    def tick(elapsed: float) -> None:
        if "first" not in killed and cluster.steps() >= 100:
            killed["first"] = first = cluster.pids()[1]
            os.kill(first, signal.SIGKILL)
        elif "first" in killed and "second" not in killed:
            second = cluster.pids()[1]  # -1 while Ray restarts it; a new pid once its new process has started
            if second not in (-1, killed["first"]):
                os.kill(second, signal.SIGKILL)
                killed["second"], killed["t"] = second, time.time() - cluster.t0
        elif "t" in killed and len([r for r in records if r[1] == 1 and r[0] > killed["t"]]) >= 20:  # trains on
            cluster.request_stop()

    try:
        events = _train(cluster, seconds=240, tick=tick, records=records)
        faults = cluster.faults()
        pids_after = cluster.pids()
        snapshots = cluster.snapshots()
        step = cluster.steps()
    finally:
        cluster.close()
    assert "t" in killed, (killed, faults)
    # Every push that reached a shard is counted (the shards' stamps), and at most one more per death (a process
    # counts a push before it sends it)
    made = max(s["version"] + s["rejected"] for s in snapshots)
    assert made <= step <= made + 2
    assert [r for r in records if r[1] == 1 and r[0] > killed["t"]], "worker 1 did not train after its restarts"
    assert faults["worker_restarts"] == 2
    assert [e.worker for e in events if e.kind == "restarted"] == [1, 1]
    assert pids_after[1] not in (killed["first"], killed["second"])


def _pushes_on_unpolled(cluster: RayCluster, worker: int, rows: int = 5, timeout: float = 30.0) -> None:
    """Let ``worker`` push on, unpolled, for 0.2 s and until it has written at least ``rows`` more rows into its push
    log (a busy machine can starve it for that long): rows its driver has not had when the test then kills it."""
    path = push_log_path(cluster._name, worker, cluster._workers[worker].incarnation)
    enough = rows_written(path) + rows
    time.sleep(0.2)
    deadline = time.monotonic() + timeout
    while rows_written(path) < enough and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.parametrize("restarts", [True, False])
def test_a_budgeted_run_with_a_killed_worker_makes_and_counts_exactly_its_steps(ray_cluster: str, digits: Dataset,
                                                                                 restarts: bool) -> None:  # fmt: skip
    """SIGKILL worker 1 a tenth into the run, between polls, so that it dies with pushes the driver has not heard
    of, holding steps of the budget it claimed and had not used: the run still makes ``train.steps`` pushes and
    counts them all. Before the shards kept push stamps, the killed run's unused lease (up to 32 steps) was never
    given back and its unpolled pushes never counted: the shards ended 9 and 19 pushes short of 4,000 in two runs,
    and without the stamps' count the step was 337 short. Without restarts (``max_restarts = 0``) the worker is
    dead for good: the driver reads its stamps and settles its lease, and worker 0 spends the budget.

    The push rows of the pushes the killed process made since its last poll come from its push log: read by its
    restarted process, or by the driver when it is dead for good (both nodes of the test cluster share this
    machine's /dev/shm). Without the logs, shard 0 lacked 99 and 101 rows of 4,000 in two runs."""
    steps = 4000
    cluster, _, _ = _cluster(_config(steps), digits, **({} if restarts else {"max_restarts": 0}))
    killed: dict[str, Any] = {}
    records: list[tuple] = []

    def tick(elapsed: float) -> None:
        if "pid" not in killed and cluster.steps() >= 400:
            killed["pid"] = pid = cluster.pids()[1]
            _pushes_on_unpolled(cluster, 1)
            os.kill(pid, signal.SIGKILL)

    try:
        events = _train(cluster, seconds=300, tick=tick, records=records)
        snapshots = cluster.snapshots()  # as the final checkpoint: the shards' stamps count every push they hold
        step, faults = cluster.steps(), cluster.faults()
    finally:
        cluster.close()
    assert "pid" in killed
    assert faults["worker_restarts"] == int(restarts), faults
    assert [e.worker for e in events if e.kind == "restarted"] == ([1] if restarts else [])
    if not restarts:
        (died,) = [e for e in events if e.kind == "died"]
        assert died.worker == 1 and "did not answer" not in died.detail
    made = [s["version"] + s["rejected"] for s in snapshots]  # every push to a shard is applied or refused
    assert max(made) == steps  # the killed run's unused steps came back to the budget and were pushed
    # the kill can cut off the push in progress between the two shards, and pushes still in flight to the shard on
    # the other node (sent, not yet delivered): those reached only one shard
    assert min(made) >= steps - 1 - PIPELINE_DEPTH
    assert step == steps
    (taken,) = [e for e in events if e.kind == "push_rows"]
    assert taken.worker == 1 and taken.said and int(taken.detail.split()[0]) > 0, taken
    _assert_a_row_per_push(records, snapshots)


def test_a_worker_killed_with_the_only_shard_has_its_pushes_counted_from_its_log(ray_cluster: str,
                                                                               digits: Dataset) -> None:  # fmt: skip
    """Worker 1 and the only shard killed at once, after 0.2 s of unpolled pushes: the shard comes back at its start
    (no checkpoint yet), without the stamps of worker 1's pushes. The restarted process reads in its dead run's
    push log how many pushes that run made at least (a row a push, with one shard), so the step counts them and
    only the unused part of the run's last lease comes back: the run makes ``train.steps`` pushes, each with its
    row, and counts them. With the logs' count switched off (stamps alone, as before), this run ended at step
    1,648 of 2,000: the unpolled pushes were missing from the step, and the whole last lease came back."""
    steps = 2000
    config = _config(steps)
    config.ps.shards = 1
    cluster, _, _ = _cluster(config, digits)
    killed: dict[str, Any] = {}
    records: list[tuple] = []

    def tick(elapsed: float) -> None:
        if "pid" not in killed and cluster.steps() >= 400:
            killed["pid"] = pid = cluster.pids()[1]
            _, shard_pid = ray.get(cluster.shards[0].handle.where.remote())
            _pushes_on_unpolled(cluster, 1)
            os.kill(shard_pid, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)

    try:
        events = _train(cluster, seconds=300, tick=tick, records=records)
        step, faults = cluster.steps(), cluster.faults()
        _, _, settled = ray.get(cluster.coordinator.restores_and_starts.remote())
    finally:
        cluster.close()
    assert "pid" in killed
    assert faults["worker_restarts"] >= 1 and faults["shard_restores"] == 1, faults
    # the restarted process settled the dead run with the pushes its log counted (the stamps were gone): the
    # budget then ends on train.steps (with the stamps alone, the whole last lease came back: up to 32 more)
    assert settled.get((1, 0), 0) > 0, settled
    (taken,) = [e for e in events if e.kind == "push_rows" and e.worker == 1]
    assert taken.said and int(taken.detail.split()[0]) > 0, taken
    assert step == steps
    # every push has its row (one shard), but those a kill cut off before their rows: worker 1's push in progress,
    # and worker 0's pushes in flight to the shard (worker 0 is on the other node) when it died
    assert steps - 1 - PIPELINE_DEPTH <= len(records) <= steps, len(records)


def _fault_then_stop(digits: Dataset, fault: Callable[[RayCluster, int], None], *, stop_timeout: float = 30.0,
                     config: Config | None = None) -> tuple[Collected, list[dict[str, Any]], int]:  # fmt: skip
    """Train with no budget (``config``, else 2 workers and 2 shards) to step 400, let worker 1 push 0.2 s unpolled,
    do ``fault(cluster, its pid)``, then stop: what the driver got, the shards' snapshots (as the final checkpoint:
    the stamps they hold count) and the step after them."""
    cluster, _, _ = _cluster(config or _config(0), digits)
    got = Collected()
    try:
        cluster.start()
        got.poll_until(cluster, lambda: cluster.steps() >= 400, deadline=time.monotonic() + 120)
        pid = cluster.pids()[1]
        _pushes_on_unpolled(cluster, 1)
        fault(cluster, pid)
        got.add(cluster.stop(timeout=stop_timeout))
        snapshots = cluster.snapshots()
        step = cluster.steps()
    finally:
        cluster.close()
    return got, snapshots, step


def test_a_worker_killed_with_the_only_shard_as_the_run_stops_has_its_logged_pushes_counted(
        ray_cluster: str, digits: Dataset) -> None:  # fmt: skip
    """Worker 1 and the only shard killed at once after 0.2 s of unpolled pushes, and the run stopped at once: the
    restarted process never runs, so no settle counts the dead run's pushes, and the restored shard lost their
    stamps. The rows of those pushes still come from the dead run's log (one a push, with one shard), and the step
    counts at least a push a row."""

    def kill_both(cluster: RayCluster, pid: int) -> None:
        _, shard_pid = ray.get(cluster.shards[0].handle.where.remote())
        os.kill(shard_pid, signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)

    config = _config(0)
    config.ps.shards = 1
    got, _, step = _fault_then_stop(digits, kill_both, config=config)
    records = got.records
    assert [e for e in got.events if e.kind == "push_rows" and e.worker == 1], got.events
    assert len(set(records)) == len(records)  # no row twice
    rows = [sum(1 for r in records if r[1] == worker) for worker in (0, 1)]
    assert step >= sum(rows), (step, rows)  # a row a push (one shard); before, the step missed worker 1's unpolled


def _assert_a_row_per_push(records: list[tuple], snapshots: list[dict[str, Any]]) -> None:
    """Every push a shard applied or refused has its row, but those a kill cut off before their rows: the one being
    pushed, and those still in flight to a shard on the other node (a row is written when the push's reply is
    taken)."""
    for index, snapshot in enumerate(snapshots):
        made = snapshot["version"] + snapshot["rejected"]
        rows = sum(1 for record in records if record[2] == index)
        assert made - 1 - PIPELINE_DEPTH <= rows <= made, (index, rows, made)


def test_a_worker_killed_as_the_run_stops_loses_no_push_row(ray_cluster: str, digits: Dataset) -> None:
    """SIGKILL worker 1 after 0.2 s unpolled and stop at once: the stopping driver never has its restarted process
    run, so its dead run's log is not read when a run starts; the restarted process takes it when it starts, and
    the stopping driver reads what is on its machine. Before, its unpolled rows were lost (only a restarted run or
    a death for good read a log)."""
    got, snapshots, _ = _fault_then_stop(digits, lambda cluster, pid: os.kill(pid, signal.SIGKILL))
    assert [e for e in got.events if e.kind == "push_rows" and e.worker == 1], got.events
    _assert_a_row_per_push(got.records, snapshots)


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="finds the lock's holder in Linux's /proc/locks")
def test_a_worker_that_does_not_stop_in_time_is_killed_and_named_and_its_rows_kept(ray_cluster: str,
                                                                                  digits: Dataset) -> None:  # fmt: skip
    """The local backend's test on Ray: a worker actor whose process hangs (here Ctrl-Z'd, after 0.2 s of unpolled
    pushes) is killed when ``stop``'s wait runs out and said to be (``stuck``), and the rows it had not sent come
    from its push log once it is gone (Ray ends a hung process about 5 s after ``ray.kill``; ``stop`` waits for
    that). Before, nothing was said and those rows were lost. It is stopped at a moment it holds no shard's lock
    (the other worker would then wait for it, and not stop in time either)."""

    def hang(cluster: RayCluster, pid: int) -> None:
        locks = [ray.get(shard.handle.attach_info.remote())[1] + ".lock" for shard in cluster.shards]
        deadline = time.monotonic() + 60
        while True:
            stop_process(pid)
            if not any(holds_flock(pid, lock) for lock in locks) or time.monotonic() > deadline:
                break
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.001)

    got, snapshots, _ = _fault_then_stop(digits, hang, stop_timeout=4.0)  # (worker 0 must stop within it)
    events = got.events
    assert [(e.kind, e.worker) for e in events if e.kind in ("stuck", "died", "restarted")] == [("stuck", 1)], events
    assert [e.worker for e in events if e.kind == "push_rows"] == [1], events
    _assert_a_row_per_push(got.records, snapshots)


def test_a_checkpoint_counts_every_push_its_snapshots_hold_and_a_restore_not_yet_polled(
        ray_cluster: str, digits: Dataset, tmp_path: Path) -> None:  # fmt: skip
    """Checkpoints taken while the workers push: each one's step is at least every shard's version (each push goes
    to both shards, so a version above the step would be a push the step misses; the polls report counts up to a
    poll late). Then one taken at once after a shard actor is killed, before any poll has reported its restore,
    still counts the restore and the updates it lost, in the run state and in the saved state.json."""
    cluster, held_out, _ = _cluster(_config(0), digits)
    run_state = RunState()
    taken: list[Taken] = []
    after_kill: list[Taken] = []

    def tick(elapsed: float) -> None:
        if cluster.steps() == 0 or after_kill:  # (not examples_done: a step's examples are reported before its push)
            return
        if len(taken) < 6:
            taken.append(_checkpoint(cluster, held_out, tmp_path, run_state))
            time.sleep(0.1)
            return
        (pid,) = cluster.actor_pids()["shards"][:1]
        cluster.kill_shard(0)
        deadline = time.monotonic() + 30
        while not process_gone(pid) and time.monotonic() < deadline:  # its snapshot then comes from the restored actor
            time.sleep(0.01)
        after_kill.append(_checkpoint(cluster, held_out, tmp_path, run_state))
        cluster.request_stop()

    try:
        _train(cluster, seconds=300, tick=tick)
    finally:
        cluster.close()
    assert len(taken) == 6 and after_kill, (len(taken), len(after_kill))
    for checkpoint in taken:
        versions = [snap["version"] for snap in checkpoint.snapshots]
        assert checkpoint.step >= max(versions) > 0, (checkpoint.step, versions)
    assert taken[-1].step > taken[0].step
    assert run_state.shard_restores == 1 and run_state.lost_updates > 0, run_state
    saved = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert saved["shard_restores"] == 1 and saved["lost_updates"] == run_state.lost_updates
    assert saved["step"] == after_kill[0].step


def _snapshot_while_locked(cluster: RayCluster, *, queue_fetch: bool, timeout: float) -> dict[str, Any]:
    """Hold shard 1's file lock in this process (as a worker on its node stopped mid-push would) and take
    ``cluster.snapshots(wait=0.5)`` in a thread, waiting up to ``timeout`` s for it; with ``queue_fetch``, first
    send the shard actor a fetch (what a worker on another node does), which waits for the lock in the actor. The
    lock is let go before this returns: ``busy`` (the ShardBusy message) or ``snapshots``, ``hung`` (the snapshot
    had not returned by then), ``waited`` (s) and ``fetch`` (its reference, or None)."""
    from downpour.ps.locks import FileLock
    from downpour.ps.shard import ShardBusy

    _, path, _ = ray.get(cluster.shards[1].handle.attach_info.remote())
    lock = FileLock(path + ".lock")
    assert lock.acquire_within(10)
    fetch = cluster.shards[1].handle.fetch.remote() if queue_fetch else None
    outcome: dict[str, Any] = {"fetch": fetch}

    def snapshot() -> None:
        try:
            outcome["snapshots"] = cluster.snapshots(wait=0.5)
        except ShardBusy as exc:
            outcome["busy"] = str(exc)

    started = time.monotonic()
    waiting = threading.Thread(target=snapshot, daemon=True)  # a snapshot that waits for ever must fail the test
    waiting.start()
    waiting.join(timeout=timeout)
    outcome["waited"] = time.monotonic() - started
    outcome["hung"] = waiting.is_alive()
    lock.release()
    return outcome


def test_a_snapshot_gives_up_on_a_shard_whose_lock_a_process_on_its_node_holds(ray_cluster: str,
                                                                                digits: Dataset) -> None:  # fmt: skip
    """A worker on a shard's node pushes into the shard's file under its lock; stopped (Ctrl-Z'd) while it held
    it, it hung the shard actor's snapshot, and the driver's next checkpoint with it. Here this process holds that
    lock: a snapshot with ``wait`` gives up with ShardBusy naming the shard (the local backend's words), and once
    the lock is let go the shard reads again."""
    config = _config(0)
    config.cluster.workers = 1
    cluster, _, _ = _cluster(config, digits, seeds=[11])
    try:
        outcome = _snapshot_while_locked(cluster, queue_fetch=False, timeout=60)
        assert not outcome["hung"], "the snapshot waited for the lock for over a minute"
        assert outcome.get("busy", "").startswith("shard 1 stayed locked for 0.5 s: a worker holds it"), outcome
        assert 0.5 <= outcome["waited"] < 30, outcome["waited"]
        assert [snap["version"] for snap in cluster.snapshots(wait=0.5)] == [0, 0]
    finally:
        cluster.close()


def test_a_snapshot_is_not_held_up_behind_a_call_that_waits_for_the_lock(ray_cluster: str,
                                                                          digits: Dataset) -> None:  # fmt: skip
    """A worker on another node fetches and pushes through the shard actor, under the same lock: while a stopped
    worker on the shard's node held it, that call hung in the actor's only thread, and a snapshot queued behind it
    never started, so its ``wait`` never began and the driver's checkpoint hung after all. The snapshot runs beside
    such a call and gives up on time; the call goes on once the lock is let go."""
    config = _config(0)
    config.cluster.workers = 1
    cluster, _, _ = _cluster(config, digits, seeds=[11])
    try:
        outcome = _snapshot_while_locked(cluster, queue_fetch=True, timeout=30)
        assert not outcome["hung"], "the snapshot waited behind a call that waits for the lock"
        assert outcome.get("busy", "").startswith("shard 1 stayed locked for 0.5 s: a worker holds it"), outcome
        assert ray.get(outcome["fetch"], timeout=30)[0] == 0
        assert [snap["version"] for snap in cluster.snapshots(wait=0.5)] == [0, 0]
    finally:
        cluster.close()


def test_a_diverged_checkpoint_never_becomes_a_shards_restore_point(ray_cluster: str, digits: Dataset,
                                                                     tmp_path: Path) -> None:  # fmt: skip
    """ps.lr = 1e30: the first pushes make the held-out loss non-finite (the shards accept the huge finite values).
    The driver's checkpoint of the diverged shards is neither saved nor handed to the shards: a shard actor that
    dies then comes back at the last good checkpoint (here the one taken before training), its values and version,
    and the updates lost are exactly the diverged ones."""
    config = _config(0)  # no step budget: the test says when to stop
    config.ps.lr = 1e30
    cluster, held_out, _ = _cluster(config, digits)
    run_state = RunState()
    try:
        good = _checkpoint(cluster, held_out, tmp_path, run_state)
        assert not good.diverged and good.saved and run_state.checkpoint_step == 0

        def tick(elapsed: float) -> None:
            if cluster.steps() >= 20:
                cluster.request_stop()

        _train(cluster, seconds=300, tick=tick)
        bad = _checkpoint(cluster, held_out, tmp_path, run_state)
        assert bad.diverged and not bad.saved and run_state.checkpoint_step == 0, bad
        assert min(s["version"] for s in bad.snapshots) > 0  # the first pushes were applied
        cluster.kill_shard(0)
        deadline = time.monotonic() + 120  # the restarted actor imports torch again
        while not cluster.restores() and time.monotonic() < deadline:
            cluster.poll()
            time.sleep(0.1)
        restores = cluster.restores()
        (restored,) = cluster.snapshots([0])
        lost = cluster.lost_updates
    finally:
        cluster.close()
    assert [r[:3] for r in restores] == [(0, 1, 0)]  # (shard, incarnation, restored version): the good checkpoint
    assert restored["version"] == 0 and torch.equal(restored["values"], good.snapshots[0]["values"])
    assert lost == bad.snapshots[0]["version"]


def test_the_coordinators_clocks_retire_workers_as_the_local_backends_do() -> None:
    """The coordinator's SSP clocks retire workers with the local backend's value (the chaos schedule's parser, which
    needs no Ray, is tested in test_config)."""
    from downpour.backends.ray_coordinator import RETIRED
    from downpour.ps.clocks import RETIRED as LOCAL_RETIRED

    assert RETIRED == LOCAL_RETIRED


@pytest.mark.parametrize("policy", ["ssp", "easgd"])
def test_policies_with_their_own_worker_loop_train_on_ray(ray_cluster: str, digits: Dataset, policy: str) -> None:
    """SSP (its clocks in the coordinator actor) and EASGD (the elastic exchange with each shard) on Ray: the loss
    falls and the budget is exact; under SSP no push is staler than the bound allows, ``(2·bound + 1)·(workers −
    1)``. (DC-ASGD runs in the CLI test below; staleness-lr is a rule of the shard alone, as downpour's; sync has
    tests of its own below.)"""
    config = _config(200)
    config.ps.policy = policy
    config.ps.staleness_bound = 1
    if policy == "easgd":
        config.ps.lr = 0.005  # its local steps are plain SGD, which diverges on digits at the default 0.02
    cluster, held_out, initial_loss = _cluster(config, digits)
    try:
        records: list[tuple] = []
        events = _train(cluster, seconds=300, records=records)
        final_loss, snapshots = _final_loss(cluster, held_out)
    finally:
        cluster.close()
    assert not events
    assert [s["version"] for s in snapshots] == [200, 200]
    assert final_loss < 0.5 * initial_loss
    staleness = [r[4] for r in records if r[6]]  # (t, worker, shard, version, staleness, loss, applied)
    assert len(staleness) == 400 and min(staleness) >= 0  # every push (exchange) applied
    if policy == "ssp":
        assert max(staleness) <= 3


def test_ray_config_keys_and_policies_are_checked() -> None:
    """cluster.address and cluster.chaos are checked when the config is read (every policy runs on Ray)."""
    from downpour.config import load

    config = load(None, ["cluster.backend=ray", "cluster.address=127.0.0.1:6379", "cluster.chaos=kill-shard:2s"])
    assert (config.cluster.address, config.cluster.chaos) == ("127.0.0.1:6379", "kill-shard:2s")
    assert load(None, ["cluster.backend=ray", "cluster.address=auto"]).cluster.address == "auto"
    assert load(None, ["cluster.backend=ray", "ps.policy=sync", "ps.backup_workers=1"]).ps.policy == "sync"
    for overrides, words in [
        (["cluster.backend=ray", "cluster.address=127.0.0.1"], ["cluster.address", "'127.0.0.1'", "host:port"]),
        (["cluster.backend=ray", "cluster.address=host:99999"], ["cluster.address", "'host:99999'"]),
        (["cluster.address=auto"], ["cluster.address", "only the ray backend"]),
    ]:  # cluster.chaos's refusals: test_config (they need no Ray)
        with pytest.raises(ConfigError) as error:
            load(None, overrides)
        for word in words:
            assert word in str(error.value), (overrides, str(error.value))


def test_an_address_where_nothing_answers_is_one_line_at_once(tmp_path: Path) -> None:
    """``ray.init`` retries an unreachable head for minutes; the run checks the port first and says so in one line
    (exit 2, in seconds), and the directory it made can then be trained again with ``--resume``."""
    import socket

    from downpour.backends.ray import unreachable

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        assert unreachable(f"127.0.0.1:{listening.getsockname()[1]}") is None
    assert "nothing accepts connections at 127.0.0.1" in unreachable(f"127.0.0.1:{closed}")
    assert unreachable(f"ray://127.0.0.1:{closed}") is None  # a Ray client address: Ray's to check
    started = time.monotonic()
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "downpour", "train", "--backend", "ray", "--set",
                           f"cluster.address=127.0.0.1:{closed}", "--steps", "5", "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and time.monotonic() - started < 60, done.stderr[-2000:]
    assert f"cannot reach Ray at cluster.address = '127.0.0.1:{closed}': nothing accepts connections" in done.stderr
    assert "Traceback" not in done.stderr


def _orphan_shard_files() -> list[str]:
    """Shard files under /dev/shm whose owning actor process is gone."""
    from downpour.backends import shm

    orphans = []
    for path in glob.glob(os.path.join(shm.shm_dir(), "downpour-*-shard*-*")):
        if path.endswith(".lock"):
            continue
        with contextlib.suppress(FileNotFoundError):
            pid = int(np.fromfile(path, dtype=np.int64, count=1)[0])
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                orphans.append(path)
    return orphans


def test_cli_run_with_chaos_survives_a_killed_driver_and_resumes(ray_cluster: str, tmp_path: Path) -> None:
    """``downpour train --backend ray`` (DC-ASGD: pushes carry the values they were computed at) with
    ``cluster.chaos`` killing a worker: the restart is logged and counted in the checkpoint; the driver is then
    SIGKILLed, and ``--resume`` continues from its last checkpoint with the fault counters carried over and a
    falling loss."""
    run = tmp_path / "run"
    args = ["--backend", "ray", "--set", f"cluster.address={ray_cluster}", "--set", "cluster.chaos=kill-worker:1s",
            "--set", "train.checkpoint_every=0.5", "--set", "data.source=digits", "--set", "model.features=64",
            "--set", "cluster.threads_per_worker=1", "--set", "ps.policy=dc-asgd", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "downpour", "train", "--out", str(run), "--seconds", "300", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    deadline = time.monotonic() + 240  # (a cap: it ends once the restart is logged)
    state: dict[str, Any] = {}
    while time.monotonic() < deadline and proc.poll() is None:
        state_path = run / "checkpoint" / "state.json"
        if state_path.exists():
            with contextlib.suppress(ValueError):  # mid-replace
                state = json.loads(state_path.read_text())
            metrics = (run / "metrics.jsonl").read_text()
            if state.get("worker_restarts", 0) >= 1 and '"worker_restarted"' in metrics:  # logged, and flushed
                break
        time.sleep(0.2)
    proc.kill()
    _, stderr = proc.communicate(timeout=30)
    assert state.get("worker_restarts", 0) >= 1, stderr[-3000:]
    events = [json.loads(line)["event"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "chaos" in events and "worker_restarted" in events
    assert "end" not in events  # killed mid-run
    resumed = subprocess.run(
        [sys.executable, "-m", "downpour", "train", "--resume", str(run), "--steps", str(state["step"] + 200),
         "--set", "cluster.chaos=", "--no-progress", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout)
    assert summary["backend"] == "ray" and summary["sessions"] == 2
    assert summary["steps"] == state["step"] + 200
    assert summary["worker_restarts"] == state["worker_restarts"]  # no chaos this time: carried over
    assert summary["shard_restores"] == summary["lost_updates"] == 0
    assert summary["final_loss"] < 0.25 * summary["initial_loss"]
    assert not _orphan_shard_files()  # the killed run's files were collected by the next run's shard actors


def _rejoined_rounds(records: list[tuple], since: float) -> set[tuple[int, int]]:
    """``(shard, version)`` of the rounds closed after ``since`` with an applied push of each of workers 0 and 1."""
    applied = [r for r in records if r[6] and r[0] > since]  # (t, worker, shard, version, staleness, loss, applied)
    return {(r[2], r[3]) for r in applied if r[1] == 0} & {(r[2], r[3]) for r in applied if r[1] == 1}


def test_sync_on_ray_is_synchronous_sgd_and_survives_a_killed_worker_and_a_restored_shard(
    ray_cluster: str, digits: Dataset, tmp_path: Path
) -> None:
    """``ps.policy = "sync"`` on Ray, two workers, two shard actors (on both nodes). First, exactness: a snapshot
    of each shard at version ``k`` equals ``k`` rounds of synchronous SGD replayed on the workers' own batches (the
    local backend's helper). Then SIGKILL a worker's process and, at the same moment, a shard actor's: the
    survivor's rounds close without the dead worker while Ray restarts both, the new worker process joins the
    rounds again, and the shard comes back at the snapshot with its rounds going on. No deadlock: rounds with both
    workers close again, the workers stop within a round when asked, and the loss falls."""
    config = _config(0)  # no step budget: the test stops the run once the restarted worker has rejoined
    config.ps.policy, config.ps.rule, config.ps.lr = "sync", "sgd", 0.005  # plain SGD: the replay's rule
    seeds = _worker_seeds(config.train.seed, 0, config.cluster.workers)  # what the replay draws batches with
    cluster, held_out, initial_loss = _cluster(config, digits, seeds=seeds)
    killed: dict[str, Any] = {}
    records: list[tuple] = []  # (t, worker, shard, version, staleness, loss, applied)

    def tick(elapsed: float) -> None:
        if "worker_pid" not in killed and cluster.steps() >= 60:
            killed["snapshots"] = _checkpoint(cluster, held_out, tmp_path).snapshots  # shard 0's restore point
            killed["worker_pid"] = pid = cluster.pids()[1]
            os.kill(pid, signal.SIGKILL)
            cluster.kill_shard(0)
            killed["worker_t"] = killed["shard_t"] = time.time() - cluster.t0
        if "worker_t" in killed and "stop" not in killed and len(_rejoined_rounds(records, killed["worker_t"])) >= 20:
            killed["stop"] = time.monotonic()
            cluster.request_stop()

    try:
        events = _train(cluster, seconds=300, tick=tick, records=records)
        stopping = time.monotonic() - killed.get("stop", math.inf)
        final_loss, _ = _final_loss(cluster, held_out)
        faults = cluster.faults()
        restores = cluster.restores()
    finally:
        cluster.close()
    assert "stop" in killed, (killed, len(records), faults)  # rounds with both workers closed after the faults
    assert stopping < 30  # every worker left its round and ended when asked (stop's own wait is 30 s)
    assert faults["worker_restarts"] == 1 and [e.worker for e in events if e.kind == "restarted"] == [1], faults
    snapshots = killed["snapshots"]
    assert all(snapshot["applied"] == 2 * snapshot["version"] for snapshot in snapshots)  # pushes: 2 per round
    for shard, snapshot in enumerate(snapshots):  # (size,) slices of the flat parameters
        replayed = _synchronous_sgd(config, snapshot["version"])[cluster.bounds[shard][0] : cluster.bounds[shard][1]]
        torch.testing.assert_close(snapshot["values"], replayed, rtol=1e-5, atol=1e-6)
    assert faults["shard_restores"] == 1 and restores[0][:3] == (0, 1, snapshots[0]["version"])
    assert faults["lost_updates"] % 2 == 0  # whole rounds of 2 pushes (it counted rounds: a half of the pushes)
    applied = [r for r in records if r[6]]
    assert all(r[4] == 0 for r in applied)  # sync: every applied push was computed on the version it closed
    after_restore = [r for r in applied if r[2] == 0 and r[0] > killed["shard_t"]]
    assert {r[1] for r in after_restore} == {0, 1}  # the restored shard's rounds went on with both workers
    assert final_loss < 0.5 * initial_loss  # (plain SGD at a small rate: slower than the other tests' adagrad)


def test_a_sync_shards_lost_updates_count_pushes_not_rounds() -> None:
    """A sync shard's version counts rounds: a restore that undid 318 rounds of 2 pushes lost 636 updates, the unit
    of updates_applied (the hunt's run reported 317). The pushes per round come from the restore point."""
    cluster = RayCluster.__new__(RayCluster)  # the counting alone, without a cluster
    cluster._restores = [(1, 1, 753, 0.0)]  # shard 1 came back at version 753 ...
    cluster._seen = {(1, 0): 1071}  # ... after its dead incarnation had reached 1071
    cluster._pushes_per_round = {0: 2.0, 1: 1506 / 753}  # its restore point: 1,506 pushes in 753 rounds
    assert cluster.lost_updates == 636
    cluster._pushes_per_round = {0: 1.0, 1: 1.0}  # any other policy: a version is one update
    assert cluster.lost_updates == 318


def test_sync_roster_keeps_each_workers_latest_incarnation_and_snapshots_carry_dropped_pushes() -> None:
    """The roster of a sync round takes events in any order: a late "died" of an old process never retires the
    restarted one, and copies merge. A sync shard's count of dropped late pushes survives the wire format (its
    checkpoint and restore point)."""
    from downpour.backends.ray_actors import snapshot_from_wire, snapshot_to_wire
    from downpour.backends.ray_coordinator import Roster

    roster = Roster(3)
    assert roster.live() == 3
    assert roster.update(1, 0, False) and roster.live() == 2  # worker 1's first process died
    assert roster.update(1, 1, True) and roster.live() == 3  # its restarted process joined
    assert not roster.update(1, 0, False) and roster.live() == 3  # the old death, reported late, changes nothing
    assert not roster.update(1, 0, True)  # nor does the old join
    assert roster.update(2, 0, False) and roster.live() == 2  # worker 2 ended
    restored = Roster(3)  # a restarted shard actor's, merged with the coordinator's copy
    restored.update(0, 0, False)
    restored.merge(roster.keys)
    assert restored.live() == 1 and restored.keys == [1, 2, 1]

    snapshot = {"values": torch.arange(4.0), "state": {}, "version": 7, "rejected": 1, "dropped": 5}
    back = snapshot_from_wire(snapshot_to_wire(snapshot))
    assert (back["version"], back["rejected"], back["dropped"]) == (7, 1, 5)
    assert torch.equal(back["values"], snapshot["values"])
    plain = {key: value for key, value in snapshot.items() if key != "dropped"}  # a shard of another policy
    assert "dropped" not in snapshot_from_wire(snapshot_to_wire(plain))
