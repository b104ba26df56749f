"""A parameter-server shard: pushes, versions, rejection, snapshots, and pushes from several processes."""

from __future__ import annotations

import fcntl
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from downpour.backends.processes import worker_context
from downpour.backends.push_log import PushLog
from downpour.ps.locks import FileLock
from downpour.ps.rules import SGD, Adagrad
from downpour.ps.shard import PushResult, Shard

TIMEOUT_S = 60.0  # generous bound for a step of a child process, so that a broken test fails, never hangs
# Children may import torch before they reach the barrier (where they are spawned, not forked from the fork server):
# seconds when idle, but it once took over a minute on this 2-core machine while other test runs loaded it. A broken
# child still fails the test, after this long.
START_TIMEOUT_S = 300.0


def _sgd_shard(values: list[float], lr: float = 1.0, **kwargs: Any) -> Shard:
    return Shard(0, 0, torch.tensor(values), SGD(lr=lr), **kwargs)


def _values(shard: Shard) -> torch.Tensor:
    out = torch.empty(shard.size)
    shard.fetch_into(out)
    return out


# ---------------------------------------------------------------------------------------------- single process


def test_new_shard_holds_initial_values_at_version_zero() -> None:
    """A new shard serves its initial values (copied, not aliased) at version 0."""
    initial = torch.tensor([1.0, 2.0, 3.0])
    shard = Shard(2, 10, initial, SGD(lr=1.0))
    initial.fill_(99.0)
    out = torch.empty(3)
    assert shard.fetch_into(out) == 0
    assert out.tolist() == [1.0, 2.0, 3.0]
    assert (shard.index, shard.start, shard.size, shard.stop) == (2, 10, 3, 13)
    assert shard.version == 0 and shard.rejected == 0


def test_push_applies_rule_and_bumps_version() -> None:
    """Each push applies w - lr·g and adds one to the version."""
    shard = _sgd_shard([1.0, 2.0, 3.0], lr=0.5)
    result = shard.push(torch.tensor([2.0, 2.0, -2.0]), fetched_version=0)
    assert result == PushResult(applied=True, staleness=0, version=1)
    assert _values(shard).tolist() == [0.0, 1.0, 4.0]
    result = shard.push(torch.tensor([0.0, 4.0, 0.0]), fetched_version=1)
    assert result == PushResult(True, 0, 2)
    assert _values(shard).tolist() == [0.0, -1.0, 4.0]
    assert shard.version == 2


def test_staleness_is_version_at_apply_minus_fetched() -> None:
    """A push made against an old version reports how many pushes were applied since."""
    shard = _sgd_shard([0.0, 0.0])
    for _ in range(5):
        shard.push(torch.ones(2), fetched_version=shard.version)
    assert shard.push(torch.ones(2), fetched_version=2) == PushResult(True, 3, 6)
    assert shard.push(torch.ones(2), fetched_version=0) == PushResult(True, 6, 7)
    assert shard.push(torch.ones(2), fetched_version=7).staleness == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_push_is_rejected(bad: float) -> None:
    """A push holding NaN or ±Inf is not applied, does not bump the version, and is counted."""
    shard = _sgd_shard([1.0, 2.0, 3.0])
    shard.push(torch.ones(3), fetched_version=0)
    result = shard.push(torch.tensor([0.5, bad, 0.5]), fetched_version=1)
    assert result == PushResult(applied=False, staleness=-1, version=1)
    assert shard.rejected == 1
    assert shard.version == 1
    assert _values(shard).tolist() == [0.0, 1.0, 2.0]
    shard.push(torch.tensor([bad, bad, bad]), fetched_version=1)
    assert shard.rejected == 2
    assert shard.push(torch.ones(3), fetched_version=1) == PushResult(True, 0, 2)  # still serving


def test_nan_and_inf_that_cancel_are_rejected() -> None:
    """+Inf and -Inf in one update (their sum is NaN) is still rejected."""
    shard = _sgd_shard([1.0, 2.0])
    assert not shard.push(torch.tensor([float("inf"), float("-inf")]), 0).applied
    assert _values(shard).tolist() == [1.0, 2.0]


def test_large_finite_push_is_applied() -> None:
    """A finite update whose float32 sum overflows is still finite and should be applied."""
    shard = _sgd_shard([0.0, 0.0], lr=1e-38)
    result = shard.push(torch.tensor([3e38, 3e38]), fetched_version=0)
    assert result.applied
    assert shard.rejected == 0


def test_rejected_push_pull_still_fetches() -> None:
    """A rejected push with ``fetch_into`` still returns the current values and version."""
    shard = _sgd_shard([1.0, 2.0])
    shard.push(torch.tensor([1.0, 1.0]), 0)
    out = torch.full((2,), -7.0)
    result = shard.push(torch.tensor([float("nan"), 0.0]), 0, fetch_into=out)
    assert result == PushResult(False, -1, 1)
    assert out.tolist() == [0.0, 1.0]


@pytest.mark.parametrize("shape", [(4,), (2,), (1, 3), (3, 1), ()])
def test_wrong_shape_update_raises(shape: tuple[int, ...]) -> None:
    """An update that is not exactly ``(size,)`` raises ValueError naming the shard; nothing changes."""
    shard = _sgd_shard([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"shard 0 expects an update of shape \(3,\)"):
        shard.push(torch.zeros(shape), 0)
    assert shard.version == 0 and shard.rejected == 0
    assert _values(shard).tolist() == [1.0, 2.0, 3.0]


def test_non_1d_initial_values_raise() -> None:
    """A shard is a 1-D slice."""
    with pytest.raises(ValueError, match="1-D"):
        Shard(0, 0, torch.zeros(2, 2), SGD(lr=1.0))


def test_push_pull_returns_new_values_and_version() -> None:
    """``push(..., fetch_into=out)`` copies the values after this push into ``out`` with their version."""
    shard = _sgd_shard([10.0, 20.0, 30.0])
    out = torch.zeros(3)
    result = shard.push(torch.tensor([1.0, 2.0, 3.0]), 0, fetch_into=out)
    assert result == PushResult(True, 0, 1)
    assert out.tolist() == [9.0, 18.0, 27.0]
    result = shard.push(torch.tensor([1.0, 1.0, 1.0]), 0, fetch_into=out)
    assert result == PushResult(True, 1, 2)
    assert out.tolist() == [8.0, 17.0, 26.0]
    assert _values(shard).tolist() == out.tolist()


def test_fetch_into_copies_not_aliases() -> None:
    """The fetched tensor is the worker's own: a later push does not change it."""
    shard = _sgd_shard([1.0, 1.0])
    out = torch.zeros(2)
    shard.fetch_into(out)
    shard.push(torch.ones(2), 0)
    assert out.tolist() == [1.0, 1.0]


def test_snapshot_restore_round_trip() -> None:
    """A snapshot of an Adagrad shard restores into a fresh shard that then behaves identically."""
    generator = torch.Generator().manual_seed(1)
    source = Shard(1, 4, torch.randn(6, generator=generator), Adagrad(lr=0.1))
    for _ in range(3):
        source.push(torch.randn(6, generator=generator), source.version)
    source.push(torch.full((6,), float("nan")), 0)
    snap = source.snapshot()
    assert snap["version"] == 3 and snap["rejected"] == 1
    assert snap["state"]["sum_sq"].gt(0).all()

    target = Shard(1, 4, torch.zeros(6), Adagrad(lr=0.1))
    target.restore(snap)
    again = target.snapshot()
    assert again["version"] == 3 and again["rejected"] == 1
    assert torch.equal(again["values"], snap["values"])
    assert torch.equal(again["state"]["sum_sq"], snap["state"]["sum_sq"])

    update = torch.randn(6, generator=generator)
    assert source.push(update, 3) == target.push(update, 3) == PushResult(True, 0, 4)
    assert torch.equal(_values(source), _values(target))
    assert torch.equal(source.snapshot()["state"]["sum_sq"], target.snapshot()["state"]["sum_sq"])


def test_snapshot_is_a_copy() -> None:
    """Changing a snapshot's tensors, or pushing after it, changes neither the shard nor the snapshot."""
    shard = Shard(0, 0, torch.ones(3), Adagrad(lr=0.1))
    snap = shard.snapshot()
    snap["values"].fill_(5.0)
    snap["state"]["sum_sq"].fill_(5.0)
    assert _values(shard).tolist() == [1.0, 1.0, 1.0]
    snap = shard.snapshot()
    shard.push(torch.ones(3), 0)
    assert snap["values"].tolist() == [1.0, 1.0, 1.0] and snap["version"] == 0


def test_restore_after_pushes_sets_live_buffer() -> None:
    """Restoring into a shard whose live buffer is the second one still serves the snapshot."""
    shard = _sgd_shard([0.0, 0.0])
    shard.push(torch.ones(2), 0)  # the live buffer is now buffer 1
    shard.restore({"values": torch.tensor([5.0, 6.0]), "state": {}, "version": 40, "rejected": 2})
    out = torch.empty(2)
    assert shard.fetch_into(out) == 40
    assert out.tolist() == [5.0, 6.0] and shard.rejected == 2
    assert shard.push(torch.ones(2), 40) == PushResult(True, 0, 41)
    assert _values(shard).tolist() == [4.0, 5.0]


def test_restore_wrong_size_raises() -> None:
    """A snapshot for another shard size is refused and the shard is unchanged."""
    shard = _sgd_shard([1.0, 2.0])
    with pytest.raises(ValueError, match="shard 0 holds 2 values"):
        shard.restore({"values": torch.zeros(3), "state": {}, "version": 9, "rejected": 0})
    assert shard.version == 0 and _values(shard).tolist() == [1.0, 2.0]


def test_shared_shard_sent_to_a_worker_shares_memory(tmp_path: Path) -> None:
    """Pickled as multiprocessing sends it to a worker, a shared shard is the same memory: a push on the copy is
    seen by the original, and per-process views are rebuilt rather than pickled."""
    shard = Shard(0, 0, torch.zeros(3), SGD(lr=1.0), lock=FileLock(tmp_path / "lock"), shared=True)
    shard.fetch_into(torch.empty(3))  # builds per-process views, which must not be pickled
    copy = pickle.loads(ForkingPickler.dumps(shard))
    assert copy._meta_np is None and copy._buffers is None
    assert isinstance(copy.lock, FileLock) and copy.lock.path == str(tmp_path / "lock")
    copy.push(torch.ones(3), fetched_version=0)
    assert shard.version == 1
    assert _values(shard).tolist() == [-1.0, -1.0, -1.0]


# ---------------------------------------------------------------------------------------------- file lock


def test_file_lock_excludes_other_descriptors(tmp_path: Path) -> None:
    """While a FileLock is held, another open of the same file cannot take it; after release it can."""
    path = tmp_path / "lock"
    lock = FileLock(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        with lock, pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def test_file_lock_pickles_as_its_path(tmp_path: Path) -> None:
    """A pickled FileLock carries only its path; the copy opens its own descriptor."""
    lock = FileLock(tmp_path / "lock")
    with lock:
        pass
    copy = pickle.loads(pickle.dumps(lock))
    assert copy.path == lock.path and copy._fd is None
    with copy:
        assert copy._fd is not None and copy._fd != lock._fd


# ---------------------------------------------------------------------------------------------- several processes

WORKERS = 3  # pushing processes: this test process (worker 0) and two spawned children (workers 1 and 2)
PUSHES = 400


def _push_worker(shards: list[Shard], worker: int, pushes: int, barrier: Any, results: Any) -> None:
    """Child: wait for the others, then push a vector of ``worker + 1`` to every shard ``pushes`` times.

    Every fetch must see one consistent version: all elements equal (each push moves all of them by the same
    amount), else the child fails with a non-zero exit code. Sends back the version each push produced.
    """
    barrier.wait(timeout=START_TIMEOUT_S)
    versions: dict[int, list[int]] = {shard.index: [] for shard in shards}
    out = [torch.empty(shard.size) for shard in shards]
    for _ in range(pushes):
        for shard, buf in zip(shards, out, strict=True):
            fetched = shard.fetch_into(buf)
            if not bool((buf == buf[0]).all()):
                raise AssertionError(f"torn read on shard {shard.index} at version {fetched}: {buf.tolist()}")
            result = shard.push(torch.full((shard.size,), float(worker + 1)), fetched, worker)
            if not result.applied or result.staleness < 0:
                raise AssertionError(f"bad push result {result}")
            versions[shard.index].append(result.version)
    results.put((worker, versions))


def test_pushes_from_several_processes_are_all_applied_exactly(tmp_path: Path) -> None:
    """Three processes push into shared shards under FileLocks at once: no push is lost or applied twice.

    Two children are started as local workers are (:func:`worker_context`); the test process itself is the third
    pusher, released by the same barrier.
    """
    ctx = worker_context()
    shards = [
        Shard(i, 5 * i, torch.full((5,), 1000.0), SGD(lr=1.0), lock=FileLock(tmp_path / f"shard{i}.lock"), shared=True)
        for i in range(2)
    ]
    barrier = ctx.Barrier(WORKERS)
    results = ctx.Queue()
    procs = [ctx.Process(target=_push_worker, args=(shards, k, PUSHES, barrier, results)) for k in range(1, WORKERS)]
    for proc in procs:
        proc.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while barrier.n_waiting < len(procs) and time.monotonic() < deadline:  # children importing torch
            assert all(proc.exitcode is None for proc in procs), f"a child died: {[p.exitcode for p in procs]}"
            time.sleep(0.05)
        _push_worker(shards, 0, PUSHES, barrier, results)
        collected = dict(results.get(timeout=START_TIMEOUT_S) for _ in range(WORKERS))
    finally:
        for proc in procs:
            proc.join(timeout=TIMEOUT_S)
            if proc.is_alive():
                proc.kill()
    assert [proc.exitcode for proc in procs] == [0] * len(procs)
    assert sorted(collected) == list(range(WORKERS))

    total = WORKERS * PUSHES
    expected = 1000.0 - PUSHES * sum(k + 1 for k in range(WORKERS))  # 1000 - 400·(1+2+3) = -1400, exact in fp32
    for shard in shards:
        assert shard.version == total
        assert shard.rejected == 0
        assert _values(shard).tolist() == [expected] * shard.size
        versions = sorted(v for worker in collected.values() for v in worker[shard.index])
        assert versions == list(range(1, total + 1))  # every version was produced by exactly one push


# The lock holder is a plain Python child (no torch import, so it starts in milliseconds) using FileLock itself.
_HOLDER = """
import sys, time
from downpour.ps.locks import FileLock
lock = FileLock(sys.argv[1])
lock.__enter__()
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_file_lock_held_by_killed_process_is_released(tmp_path: Path) -> None:
    """SIGKILL of the lock holder frees the lock (the kernel drops its flock), so others go on."""
    path = tmp_path / "shard.lock"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path), str(TIMEOUT_S)], stdout=subprocess.PIPE, text=True
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT_S)
        assert ready and proc.stdout.readline().strip() == "locked", "child never took the lock"
        fd = os.open(path, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # really held by the child
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=TIMEOUT_S) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()

    acquired = threading.Event()
    release = threading.Event()
    lock = FileLock(path)

    def take() -> None:
        with lock:
            acquired.set()
            release.wait(timeout=TIMEOUT_S)

    thread = threading.Thread(target=take, daemon=True)  # daemon: a stuck flock cannot hang the test run
    thread.start()
    try:
        assert acquired.wait(timeout=10.0), "lock still held after its holder was killed"
    finally:
        release.set()
        thread.join(timeout=10.0)


def test_finite_push_that_would_overflow_the_parameters_is_rejected() -> None:
    """w − lr·g beyond float32's range would turn a parameter into Inf: refused, counted, values kept."""
    shard = _sgd_shard([3e38, 1.0])
    result = shard.push(torch.tensor([-3e38, 0.0]), fetched_version=0)
    assert not result.applied
    assert shard.rejected == 1 and shard.version == 0
    assert _values(shard).tolist() == [pytest.approx(3e38), 1.0]
    out = torch.zeros(2)
    shard.push(torch.tensor([-3e38, 0.0]), fetched_version=0, fetch_into=out)  # a rejected push-pull still pulls
    assert out.tolist() == [pytest.approx(3e38), 1.0]


@pytest.mark.parametrize("last", [3, 100, -1])
def test_exchange_refuses_a_last_version_the_shard_never_had(last: int) -> None:
    """easgd's ``last_version`` ahead of the shard (staleness < 0) or negative is a ValueError naming both, as a
    push's fetched version is; neither the center nor the worker's values move."""
    shard = _sgd_shard([1.0, 2.0, 3.0])
    for version in range(2):
        shard.exchange(torch.zeros(3), alpha=0.5, last_version=version)
    center = _values(shard)
    local = torch.tensor([4.0, 4.0, 4.0])
    with pytest.raises(ValueError, match=rf"^shard 0: an exchange with last_version {last}, but the shard is at "
                                         r"version 2 \(must be 0 to 2\)$"):  # fmt: skip
        shard.exchange(local, alpha=0.5, last_version=last)
    assert local.tolist() == [4.0, 4.0, 4.0]
    assert torch.equal(_values(shard), center) and shard.version == 2 and shard.rejected == 0
    result = shard.exchange(local, alpha=0.5, last_version=1)  # a version it has had is fine
    assert result == PushResult(True, 1, 3)


class _TwoLive:
    """A roster of two workers, both live: what a sync shard asks for its quorum."""

    def live(self) -> int:
        return 2


def sync_shard_of_two(values: torch.Tensor, *, lr: float = 1.0, backup_workers: int = 0) -> Any:
    """Shard 0 holding ``values`` under ``ps.policy = "sync"`` with two live workers, plain SGD at ``lr``."""
    from downpour.ps.policies import Sync
    from downpour.ps.sync_shard import SyncShard

    return SyncShard(0, 0, values, SGD(lr=lr), policy=Sync(workers=2, backup_workers=backup_workers),
                     roster=_TwoLive())  # fmt: skip


@pytest.mark.parametrize("fetched", [1, 100, -1])
def test_sync_push_refuses_a_version_the_shard_never_had(fetched: int) -> None:
    """A sync shard checks the fetched version as :meth:`Shard.push` does, before counting anything: a negative one
    was counted as a late (dropped) push with a made-up staleness, and one from the future was added to the round's
    count of refused pushes before the aggregator raised."""
    shard = sync_shard_of_two(torch.zeros(3))
    with pytest.raises(ValueError, match=rf"^shard 0: a push fetched at version {fetched}, but the shard is at "
                                         r"version 0 \(must be 0 to 0\)$"):  # fmt: skip
        shard.push(torch.tensor([float("nan"), 0.0, 0.0]), fetched_version=fetched, worker=0)
    assert (shard.version, shard.rejected, shard.dropped, shard.aggregator.pending) == (0, 0, 0, 0)
    assert shard.push(torch.ones(3), fetched_version=0, worker=0) == PushResult(True, 0, 1)  # version 0 is fine


@pytest.mark.parametrize("fetched", [1, 100, -1])
def test_sync_close_round_refuses_a_version_the_shard_never_had(fetched: int) -> None:
    """Closing the round of a version the shard never had raises instead of answering: a negative version read as
    already closed, and one from the future closed the current round early (one push of a quorum of two)."""
    shard = sync_shard_of_two(torch.zeros(3))
    shard.push(torch.ones(3), fetched_version=0, worker=0)
    with pytest.raises(ValueError, match=rf"^shard 0: a round closed for version {fetched}, but the shard is at "
                                         r"version 0 \(must be 0 to 0\)$"):  # fmt: skip
        shard.close_round(fetched, force=True)
    assert (shard.version, shard.aggregator.pending) == (0, 1)
    assert not shard.close_round(0)  # one of two pushes: the round stays open
    shard.push(torch.ones(3), fetched_version=0, worker=1)
    assert shard.close_round(0) and shard.version == 1 and shard.close_round(0)


def test_sync_counts_pushes_applied_and_rejects_every_push_of_a_refused_round() -> None:
    """A sync round's outcome is per push, as on other shards: a round whose mean the rule refuses (lr 1e38 makes
    the values overflow) rejects both its pushes and applies none (it was counted 1 rejected, 1 applied, and its
    pushes said applied); a round whose pushes were all NaN rejects them once; an applied round counts its pushes.
    round_applied tells the worker which, and a restored snapshot keeps the count."""
    huge = sync_shard_of_two(torch.zeros(3), lr=1e38)
    for worker in (0, 1):
        assert huge.push(torch.full((3,), 10.0), 0, worker).applied  # accepted into the round
    assert (huge.version, huge.rejected, huge.applied, huge.round_applied(0)) == (1, 2, 0, False)
    assert huge.snapshot()["values"].tolist() == [0.0, 0.0, 0.0]
    plain = sync_shard_of_two(torch.zeros(3), lr=0.5)
    for worker in (0, 1):
        plain.push(torch.full((3,), float("nan")), 0, worker)  # both refused on arrival
    for worker in (0, 1):
        plain.push(torch.full((3,), 2.0), 1, worker)
    assert (plain.round_applied(0), plain.round_applied(1), plain.round_applied(2)) == (False, True, None)  # 2: open
    snapshot = plain.snapshot()
    assert (snapshot["version"], snapshot["rejected"], snapshot["applied"]) == (2, 2, 2)
    assert snapshot["values"].tolist() == [-1.0, -1.0, -1.0]
    again = sync_shard_of_two(torch.zeros(3), lr=0.5)
    again.restore(snapshot)
    assert (again.version, again.rejected, again.applied) == (2, 2, 2)
    assert again.round_applied(1) is None  # the outcomes before a restore are not known
    again.restore({key: value for key, value in snapshot.items() if key != "applied"})  # a checkpoint of before
    assert again.applied == 2 * 2  # 2 rounds of a quorum of 2: the estimate for a snapshot that did not count


def test_an_exchange_holding_nan_resets_the_worker_to_the_center() -> None:
    """easgd: a worker whose values diverged (NaN or Inf) sends them to the exchange; the shard refuses them
    (counted, the center unchanged, no version) and writes the center into the worker's copy, so it starts again
    from there instead of exchanging NaN forever."""
    shard = _sgd_shard([1.0, 2.0, 3.0])
    shard.exchange(torch.tensor([5.0, 2.0, 3.0]), alpha=0.25)  # d = 0.25·[4, 0, 0]: center [2, 2, 3], version 1
    center = _values(shard)
    assert center.tolist() == [2.0, 2.0, 3.0]
    local = torch.tensor([float("nan"), 7.0, float("inf")])
    assert shard.exchange(local, alpha=0.25, last_version=1) == PushResult(False, -1, 1)
    assert torch.equal(local, center)
    assert torch.equal(_values(shard), center) and shard.version == 1 and shard.rejected == 1


def test_a_sync_round_closes_without_a_retired_worker() -> None:
    """Sync, two workers, no backup: once worker 1 has retired (ended or died) in the shared clocks, the quorum is
    min(N − b, live) = min(2, 1) = 1, so worker 0's push alone closes the round and its mean (the push itself) is
    applied: w = 1 − 1·0.5 = 0.5 at version 1. Before the retirement the same push waits for the other one."""
    from downpour.ps.clocks import SharedClocks
    from downpour.ps.policies import Sync
    from downpour.ps.sync_shard import SyncShard

    clocks = SharedClocks(2, bound=0)
    shard = SyncShard(0, 0, torch.ones(2), SGD(lr=1.0), policy=Sync(workers=2), roster=clocks)
    assert shard.quorum() == 2
    shard.push(torch.full((2,), 0.5), fetched_version=0, worker=0)
    assert shard.version == 0 and not shard.close_round(0)  # waiting for worker 1
    clocks.retire(1)
    assert shard.quorum() == 1
    assert shard.close_round(0) and shard.version == 1  # the waiting worker closes its round alone
    assert _values(shard).tolist() == [0.5, 0.5]
    assert shard.push(torch.full((2,), 0.25), fetched_version=1, worker=0) == PushResult(True, 0, 2)
    assert shard.version == 2 and _values(shard).tolist() == [0.25, 0.25]  # one push closes each later round


def test_a_sync_shard_with_every_worker_gone_closes_no_empty_round() -> None:
    """With every worker retired the quorum is 0; a round with no push must still not close (it would publish a
    version no worker computed for, and count a round that applied nothing)."""
    from downpour.ps.clocks import SharedClocks
    from downpour.ps.policies import Sync
    from downpour.ps.sync_shard import SyncShard

    clocks = SharedClocks(2, bound=0)
    shard = SyncShard(0, 0, torch.ones(2), SGD(lr=1.0), policy=Sync(workers=2), roster=clocks)
    clocks.retire(0)
    clocks.retire(1)
    assert shard.quorum() == 0
    assert not shard.close_round(0) and not shard.close_round(0, force=True)
    assert shard.version == 0 and shard.round_applied(0) is None


def test_a_sync_shards_late_push_count_survives_a_snapshot_and_restore() -> None:
    """Sync, two workers, one backup (quorum 1): worker 0 closes round 0 alone, then worker 1's five pushes computed
    on version 0 are late: dropped and counted, 5. A snapshot holds dropped = 5, and a fresh shard restored from it
    counts on from 5 (a resumed run's report of late pushes would otherwise restart at 0)."""
    first = sync_shard_of_two(torch.zeros(2), backup_workers=1)
    assert first.push(torch.ones(2), fetched_version=0, worker=0) == PushResult(True, 0, 1)
    for _ in range(5):
        assert first.push(torch.ones(2), fetched_version=0, worker=1) == PushResult(False, 1, 1)
    snapshot = first.snapshot()
    assert (snapshot["version"], snapshot["dropped"], snapshot["applied"]) == (1, 5, 1)
    again = sync_shard_of_two(torch.zeros(2), backup_workers=1)
    again.restore(snapshot)
    assert (again.version, again.dropped, again.applied) == (1, 5, 1)
    again.push(torch.ones(2), fetched_version=0, worker=1)  # one more late push
    assert again.dropped == 6


class _KillsOtherProcesses(SGD):
    """Server SGD that SIGKILLs any process but ``owner`` that applies it: a worker killed while it applies the
    round its push closed, after the round's pushes were taken and before the shard's commit (the rule's arithmetic
    is most of that window, so it is where such a kill lands)."""

    def __init__(self, *, lr: float, owner: int) -> None:
        super().__init__(lr=lr)
        self.owner = owner

    def __call__(self, meta: Any, update: torch.Tensor, current: Any, out: Any) -> None:
        if os.getpid() != self.owner:
            os.kill(os.getpid(), signal.SIGKILL)
        super().__call__(meta, update, current, out)


def _push_threes(shard: Any, worker: int) -> None:
    """Child: push a vector of 3s computed on version 0."""
    shard.push(torch.full((shard.size,), 3.0), 0, worker)


def test_a_sync_round_whose_closer_is_killed_while_applying_it_is_closed_by_the_survivor(tmp_path: Path) -> None:
    """Sync, two worker processes: worker 1's push completes the round, and worker 1 is killed (SIGKILL) while it
    applies the mean. Its push had arrived whole, so the round still holds both pushes: once the driver retires
    worker 1, worker 0 closes the round itself with their mean, (1 + 3) / 2 = 2, so w = 1 − 0.5·2 = 0 at version 1,
    and goes on alone. The aggregator used to start the next round before the shard committed this one: the shard
    stayed at version 0 with no push pending, and worker 0 waited for its round forever (seen once in the killed
    sync worker test of test_local_policies.py)."""
    from downpour.ps.clocks import SharedClocks
    from downpour.ps.policies import Sync
    from downpour.ps.sync_shard import SyncShard

    clocks = SharedClocks(2, bound=0)
    rule = _KillsOtherProcesses(lr=0.5, owner=os.getpid())
    shard = SyncShard(0, 0, torch.ones(2), rule, policy=Sync(workers=2), roster=clocks,
                      lock=FileLock(tmp_path / "lock"), shared=True)  # fmt: skip
    assert shard.push(torch.ones(2), fetched_version=0, worker=0) == PushResult(True, 0, 1)
    proc = worker_context().Process(target=_push_threes, args=(shard, 1))
    proc.start()
    proc.join(START_TIMEOUT_S)
    assert proc.exitcode == -signal.SIGKILL  # killed inside the rule, as it applied the round
    clocks.retire(1)  # what the driver does once it sees the death
    deadline = time.monotonic() + TIMEOUT_S
    while not shard.close_round(0) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert shard.version == 1, "the round worker 1 was closing never closed"
    assert _values(shard).tolist() == [0.0, 0.0]
    assert (shard.applied, shard.round_applied(0), shard.rejected) == (2, True, 0)
    assert shard.push(torch.full((2,), 2.0), fetched_version=1, worker=0) == PushResult(True, 0, 2)  # alone now
    assert shard.version == 2 and _values(shard).tolist() == [-1.0, -1.0]


def test_a_sync_round_committed_by_a_process_that_died_before_starting_the_next_is_caught_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The other side of the window: the closer dies after the shard committed the round but before the aggregator
    started the next one (here the start raises, which leaves the same state). The shard is at version 1 with the
    round's outcome written; the next push, computed on version 1, catches the aggregator up instead of failing
    with 'push for version 1 while collecting version 0', and the next round closes as usual."""
    shard = sync_shard_of_two(torch.zeros(2), lr=0.5)
    shard.push(torch.full((2,), 2.0), fetched_version=0, worker=0)
    with monkeypatch.context() as patch:
        patch.setattr(shard.aggregator, "start_next", _dies)
        with pytest.raises(_Died):
            shard.push(torch.full((2,), 4.0), fetched_version=0, worker=1)  # closes the round, "dies" after it
    assert (shard.version, shard.aggregator.version_, shard.round_applied(0), shard.applied) == (1, 0, True, 2)
    assert _values(shard).tolist() == [-1.5, -1.5]  # 0 − 0.5·(2 + 4)/2
    assert shard.close_round(0)
    assert shard.push(torch.full((2,), 1.0), fetched_version=1, worker=1) == PushResult(True, 0, 2)
    assert not shard.close_round(1)  # round 1 holds worker 1's push only, nothing left over from round 0
    assert shard.push(torch.full((2,), 3.0), fetched_version=1, worker=0) == PushResult(True, 0, 2)
    assert shard.version == 2 and _values(shard).tolist() == [-2.5, -2.5]  # − 0.5·(1 + 3)/2


class _Died(Exception):
    """Stands for a process killed at the point that raises it."""


def _dies() -> None:
    raise _Died


# ---------------------------------------------------------------------------------------------- shard files (shm)


def test_a_shard_file_holds_both_buffers_of_values_and_state_and_an_opener_sees_the_pushes(tmp_path: Path) -> None:
    """A shard in a file (the Ray backend's fast path): the file is the header, meta and push stamps (192 bytes for
    one worker) and two float32 buffers each of values and of the rule's state; a second process-style mapping of it
    sees the creator's pushes, its version and incarnation, and an Adagrad push keeps the sum of squares apart from
    the values."""
    from downpour.backends.shm import SharedShard

    path = str(tmp_path / "c-shard0-3")
    rule = Adagrad(lr=1.0, eps=1e-8)
    owner = SharedShard(path, 0, 0, 3, rule, create=True, incarnation=3)
    assert os.path.getsize(path) == 192 + 4 * (1 + 1) * 2 * 3  # header, meta, stamps, then (values, sum_sq) x 2
    owner.shard.restore({"values": torch.tensor([1.0, 2.0, 3.0]), "state": {"sum_sq": torch.zeros(3)},
                         "version": 0, "rejected": 0})  # fmt: skip
    worker = SharedShard(path, 0, 0, 3, rule, create=False)
    assert worker.incarnation == 3 and worker.alive()
    worker.shard.push(torch.tensor([1.0, -2.0, 0.5]), fetched_version=0)
    # Adagrad by hand: G = g²; w - lr g / (√G + eps) = w - sign(g)
    snap = owner.shard.snapshot()
    assert snap["version"] == 1
    assert torch.allclose(snap["values"], torch.tensor([0.0, 3.0, 2.0]))
    assert torch.allclose(snap["state"]["sum_sq"], torch.tensor([1.0, 4.0, 0.25]))
    assert owner.incarnation == 3 and owner.alive()  # the shard's counters did not overwrite the header
    worker.close()
    owner.close()


def test_a_shard_file_of_another_size_is_refused(tmp_path: Path) -> None:
    """Opening a shard file with the wrong size (another shard, or a rule with other state) is a ValueError,
    whether the file is shorter or longer than the shard asked for."""
    from downpour.backends.shm import SharedShard

    path = str(tmp_path / "c-shard0-0")
    owner = SharedShard(path, 0, 0, 4, SGD(lr=1.0), create=True)
    for size in (3, 5):
        with pytest.raises(ValueError, match="not a shard of"):
            SharedShard(path, 0, 0, size, SGD(lr=1.0), create=False)
    with pytest.raises(ValueError, match="not a shard of"):
        SharedShard(path, 0, 0, 4, Adagrad(lr=1.0), create=False)  # a sum of squares the file does not hold
    owner.close()


def test_a_retired_shard_file_reads_as_gone_and_only_the_others_are_removed(monkeypatch: pytest.MonkeyPatch,
                                                                              tmp_path: Path) -> None:  # fmt: skip
    """A new incarnation of a shard retires and removes every other incarnation's file (and its lock file): a worker
    still mapping an old one sees it gone; the new one stays, alive."""
    from downpour.backends import shm

    monkeypatch.setattr(shm, "shm_dir", lambda: str(tmp_path))
    old_path, new_path = shm.segment_path("c", 0, 0), shm.segment_path("c", 0, 1)
    other_shard = shm.segment_path("c", 1, 0)
    old = shm.SharedShard(old_path, 0, 0, 2, SGD(lr=1.0), create=True)
    old.shard.push(torch.ones(2), fetched_version=0)  # takes the lock: makes the lock file
    assert os.path.exists(old_path + ".lock")
    reader = shm.SharedShard(old_path, 0, 0, 2, SGD(lr=1.0), create=False)
    new = shm.SharedShard(new_path, 0, 0, 2, SGD(lr=1.0), create=True, incarnation=1)
    other = shm.SharedShard(other_shard, 1, 2, 2, SGD(lr=1.0), create=True)
    shm.retire_others("c", 0, new_path)
    assert not reader.alive()  # retired: its owner process (this one) is still alive
    assert not os.path.exists(old_path) and not os.path.exists(old_path + ".lock")
    assert os.path.exists(new_path) and new.alive() and new.incarnation == 1
    assert os.path.exists(other_shard) and other.alive()  # another shard's file is not this shard's incarnation
    for mapped in (reader, old, new, other):
        mapped.close()


def test_shard_files_of_dead_owners_are_collected_and_live_ones_kept(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:  # fmt: skip
    """A driver killed before it cleaned up leaves shard files behind: the next shard actor removes those whose
    owner process is gone (and their lock files), keeps those of live owners, and the driver's clean-up removes
    its own cluster's files. An owner holds a lock on its file while it lives, so pids do not decide: a live owner
    whose pid looks gone (another pid namespace sharing /dev/shm) keeps its file, and a dead owner whose pid was
    reused loses it. A file of an earlier version (no owner lock) is judged by its pid."""
    from downpour.backends import shm

    monkeypatch.setattr(shm, "shm_dir", lambda: str(tmp_path))
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    made_by_a_dead_process = (  # a real owner that exits: the kernel frees its lock
        "import sys, torch\nfrom downpour.backends.shm import SharedShard\nfrom downpour.ps.rules import SGD\n"
        "owner = SharedShard(sys.argv[1], 0, 0, 2, SGD(lr=1.0), create=True)\n"
        "owner.shard.push(torch.ones(2), fetched_version=0)\n"  # makes its lock file
        "owner.header[0] = int(sys.argv[2])\n"  # its pid reused: a live process's now
    )  # fmt: skip
    dead_path = shm.segment_path("downpour-dead", 0, 0)
    done = subprocess.run([sys.executable, "-c", made_by_a_dead_process, dead_path, str(os.getpid())],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert os.path.exists(dead_path + ".lock")
    live = shm.SharedShard(shm.segment_path("downpour-live", 0, 0), 0, 0, 2, SGD(lr=1.0), create=True)
    live.header[0] = dead_pid  # as seen from another pid namespace: its pid is nobody's here
    old_dead = shm.SharedShard(shm.segment_path("downpour-old", 0, 0), 0, 0, 2, SGD(lr=1.0), create=True)
    old_dead.header[4], old_dead.header[0] = 0, dead_pid  # an earlier version's file: no owner lock, pid gone
    old_live = shm.SharedShard(shm.segment_path("downpour-older", 0, 0), 0, 0, 2, SGD(lr=1.0), create=True)
    old_live.header[4] = 0  # pid: this process's
    # workers' push logs: a dead writer's silent for long goes too, a live one's stays for its driver's clean-up
    dead_log = str(tmp_path / "downpour-dead-worker0-run0.rows")
    done = subprocess.run([sys.executable, "-c", "import sys; from downpour.backends.push_log import PushLog; "
                           "PushLog(sys.argv[1])", dead_log], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    np.memmap(dead_log, dtype=np.float64, mode="r+", shape=(8,))[4] = 0.0  # its last heartbeat: long ago
    live_log = PushLog(str(tmp_path / "downpour-live-worker0-run0.rows"))
    assert shm.collect_orphans() == 3
    assert sorted(os.listdir(tmp_path)) == [
        "downpour-live-shard0-0", "downpour-live-worker0-run0.rows", "downpour-older-shard0-0"
    ]  # fmt: skip
    shm.unlink_cluster("downpour-live")
    assert os.listdir(tmp_path) == ["downpour-older-shard0-0"]
    for mapped in (live, old_dead, old_live):
        mapped.close()
    live_log.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may signal every process: no process is another user's to it")
def test_a_shard_file_whose_owner_pid_is_another_users_process_reads_as_gone(tmp_path: Path) -> None:
    """The owner's pid, reused by another user's process (here init's, pid 1), means the owner is gone."""
    from downpour.backends.shm import SharedShard

    shard = SharedShard(str(tmp_path / "c-shard0-0"), 0, 0, 2, SGD(lr=1.0), create=True)
    assert shard.alive()
    shard.header[0] = 1
    assert not shard.alive()
    shard.close()


def test_a_view_of_a_shared_shard_takes_the_lock_apart_from_the_shard(tmp_path: Path) -> None:
    """A Ray shard actor snapshots in a thread of its own while its main thread may hold the shard's lock (a push):
    flock excludes descriptors, not threads, so the snapshot's view must take the lock through a descriptor of its
    own, or it would read a half-made push (and its release would let go of the pusher's lock)."""
    from downpour.backends import shm
    from downpour.ps.shard import ShardBusy

    owner = shm.SharedShard(str(tmp_path / "downpour-view-shard0-0"), 0, 0, 2, SGD(lr=1.0), create=True)
    view = owner.view()
    try:
        with owner.shard.lock, pytest.raises(ShardBusy, match=r"shard 0 stayed locked for 0\.2 s"):
            view.snapshot(wait=0.2)
        owner.shard.push(torch.ones(2), fetched_version=0)
        assert view.snapshot(wait=1)["version"] == 1
    finally:
        view = None
        owner.close()
