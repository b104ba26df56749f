"""Push stamps and the step leases they settle, mostly without Ray: the encoding, a shard file's stamps, the
coordinator giving back what a killed run claimed and never used, and (with Ray installed, for its worker-side
client) where a same-node worker writes its stamp."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from downpour.backends import push_stamps, shm
from downpour.backends.ray_coordinator import Coordinator
from downpour.ps.rules import SGD, Adagrad


def test_a_later_runs_stamp_is_above_every_stamp_of_an_earlier_run() -> None:
    assert push_stamps.unstamp(push_stamps.stamp(3, 12345)) == (3, 12345)
    assert push_stamps.unstamp(0) == (0, 0)
    assert push_stamps.stamp(1, 1) > push_stamps.stamp(0, 2**40 - 1) > push_stamps.stamp(0, 7)
    stamps = np.zeros(2, dtype=np.int64)
    for value in (push_stamps.stamp(0, 5), push_stamps.stamp(0, 4), push_stamps.stamp(1, 1), push_stamps.stamp(0, 9)):
        push_stamps.note(stamps, 1, value)  # a late push of a dead run never lowers a later run's stamp
    assert stamps.tolist() == [0, push_stamps.stamp(1, 1)]


def test_counts_by_run_takes_the_highest_count_per_run_over_shards() -> None:
    values = [push_stamps.stamp(0, 40), push_stamps.stamp(0, 41), push_stamps.stamp(2, 3), 0, push_stamps.stamp(2, 1)]
    assert push_stamps.counts_by_run(values) == {0: 41, 2: 3}
    assert push_stamps.counts_by_run([0, 0]) == {}


def test_a_shard_files_stamps_are_shared_and_apart_from_its_values(tmp_path: Path) -> None:
    """Three workers' stamps between the meta and the floats: what one mapping writes the other reads, and writing
    values and rule state (Adagrad's too) leaves them alone; a file opened for another number of workers is refused
    by name."""
    path = str(tmp_path / "c-shard0-0")
    owner = shm.SharedShard(path, 0, 0, 5, Adagrad(lr=0.1), create=True, workers=3)
    worker = shm.SharedShard(path, 0, 0, 5, Adagrad(lr=0.1), create=False, workers=3)
    assert owner.stamps.tolist() == [0, 0, 0]
    push_stamps.note(worker.stamps, 2, push_stamps.stamp(1, 9))
    assert owner.stamps.tolist() == [0, 0, push_stamps.stamp(1, 9)]
    owner.shard.restore({"values": torch.full((5,), 7.0), "state": {"sum_sq": torch.full((5,), 3.0)},
                         "version": 4, "rejected": 1})  # fmt: skip
    snapshot = worker.shard.snapshot()
    assert snapshot["values"].tolist() == [7.0] * 5 and snapshot["version"] == 4
    assert worker.stamps.tolist() == [0, 0, push_stamps.stamp(1, 9)]
    with pytest.raises(ValueError, match="a shard for 3 workers, not 2"):  # of the same size
        shm.SharedShard(path, 0, 0, 5, Adagrad(lr=0.1), create=False, workers=2)
    assert shm.segment_bytes(5, ("sum_sq",), 3) == 192 + 4 * 2 * 2 * 5  # floats from byte 192 (128 + 24, up)
    assert shm.segment_bytes(5, (), 8) == 192 + 4 * 2 * 5 and shm.segment_bytes(5, (), 9) == 256 + 4 * 2 * 5


def test_a_killed_runs_unused_lease_comes_back_once_and_only_for_earlier_runs() -> None:
    coordinator = Coordinator(limit=100, workers=2, shards=1)
    assert coordinator.claim(32, 0, 0) == 25  # at most a quarter of what is left per claim (2 workers)
    assert coordinator.claim(32, 1, 0) == 18
    assert coordinator.claim(32, 1, 0) == 14
    assert coordinator.claimed == 57
    # worker 1's run 0 is killed after 20 pushes (it claimed again once it had used the first 18); its restarted
    # process (run 2: run 1 failed at once) settles
    assert coordinator.settle(1, 2, {0: 20}) == 32 - 20
    assert coordinator.claimed == 45
    assert coordinator.settle(1, 2, {0: 20}) == 0  # once
    assert coordinator.claim(32, 1, 0) == 0  # run 0's process, cut off but alive, claims no more: it stops
    assert coordinator.claimed == 45
    assert coordinator.claim(32, 1, 2) == 13
    coordinator.release(4, 1, 2)  # run 2 stops with 4 unused: settled, so no later settle gives them back again
    assert coordinator.claimed == 54
    assert coordinator.settle(1, 9, {2: 0}) == 0
    coordinator.release(12, 0, 0)  # worker 0 stops with 12 unused
    assert coordinator.claimed == 42
    coordinator.release(12, 0, 0)  # a repeated release is no second one
    assert coordinator.claimed == 42
    assert coordinator.settle(0, 9, {}) == 0  # nor does a settle after a release give back more
    assert coordinator.claim(100, 0, 1) == 14  # what came back is granted again: 58 left


def test_a_killed_run_whose_stamps_are_gone_gives_back_at_most_its_last_lease() -> None:
    """A run claims a lease only once it has used the one before, so only its last lease can hold unused steps:
    where the stamps that count its pushes are gone (every shard restored while it died), the settle gives back
    that lease, not every step the run claimed and pushed."""
    coordinator = Coordinator(limit=10_000, workers=1, shards=1)
    assert [coordinator.claim(32, 0, 0) for _ in range(8)] == [32] * 8
    assert coordinator.settle(0, 1, {}) == 32  # no stamp: the last lease, at most
    assert coordinator.claimed == 7 * 32
    assert coordinator.claim(32, 0, 1) == 32 and coordinator.claim(32, 0, 1) == 32
    assert coordinator.settle(0, 2, {1: 40}) == 24  # a stamp within the last lease counts as before


def test_the_coordinator_keeps_the_dead_runs_pushes_it_was_told_for_the_driver() -> None:
    """A restarted run reports its dead run's stamped pushes to the driver in its polls, but it may die too before
    one reaches the driver, and its own pushes then overwrite those stamps: the coordinator keeps what settle was
    told (the highest count per run), and the driver reads it with the restores."""
    coordinator = Coordinator(limit=0, workers=2, shards=1)
    coordinator.settle(1, 2, {0: 57})
    coordinator.settle(1, 3, {0: 50, 2: 4})  # a lower count never replaces a higher one
    coordinator.settle(0, 1, {})
    assert coordinator.restores_and_starts()[2] == {(1, 0): 57, (1, 2): 4}


def test_without_a_step_limit_nothing_is_leased_and_nothing_settled() -> None:
    coordinator = Coordinator(limit=0, workers=1, shards=1)
    assert coordinator.claim(32, 0, 0) == 32
    assert coordinator.settle(0, 1, {}) == 0


def _push_once(client: Any, exchange: bool) -> None:
    """In a forked process: one direct push (or EASGD exchange) of worker 1 into the mapped shard."""
    if exchange:
        client.exchange(torch.ones(4), alpha=0.5, worker=1)
    else:
        client.push_direct(torch.ones(4), 0, 1, fetch_into=None, fetched_values=None)


@pytest.mark.parametrize("exchange", [False, True])
def test_a_worker_killed_while_it_waits_for_the_shards_lock_has_not_stamped_that_push(
        tmp_path: Path, exchange: bool) -> None:  # fmt: skip
    """A same-node worker's stamp is written under the shard's lock with the push it counts: one killed while it
    waits for the lock (another worker is pushing) leaves no stamp of a push the shard never got, which would count
    a step no shard made and keep that step from the budget; a push that goes through is stamped."""
    pytest.importorskip("ray")  # RemoteShard's module needs Ray (the [ray] extra); the rest of this file does not
    from downpour.backends.ray_workers import RemoteShard

    path = str(tmp_path / "c-shard0-0")
    owner = shm.SharedShard(path, 0, 0, 4, SGD(lr=0.1), create=True, workers=2)
    owner.shard.restore({"values": torch.zeros(4), "state": {}, "version": 0, "rejected": 0})
    client = RemoteShard(0, 0, 4, None, rule=SGD(lr=0.1), send_fetched=False, workers=2,
                         stamp=lambda: push_stamps.stamp(0, 1))  # fmt: skip
    client.direct = shm.SharedShard(path, 0, 0, 4, SGD(lr=0.1), create=False, workers=2)
    child = multiprocessing.get_context("fork").Process(target=_push_once, args=(client, exchange))
    with owner.shard.lock:  # worker 0 mid-push
        child.start()
        time.sleep(0.5)  # worker 1 is blocked on the lock
        assert child.is_alive()
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join()
    assert owner.shard.version == 0 and owner.shard.snapshot()["rejected"] == 0
    assert push_stamps.counts_by_run(owner.stamps) == {}
    _push_once(client, exchange)  # now in this process, the lock free: pushed and stamped
    assert owner.shard.version == 1 and push_stamps.counts_by_run(owner.stamps) == {0: 1}
