"""Push logs (:mod:`downpour.backends.push_log`): a worker's rows kept in a file, read back once the worker is dead.

The writers here are real processes: a log is read only once the process that wrote it is gone (its ``flock`` is
free), and the local backend's driver takes a killed worker's unsent rows from it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from conftest import Collected, unsent_rows
from downpour import config as config_mod
from downpour.backends import push_log
from downpour.data import load_dataset
from downpour.models import build_model
from downpour.ps.flat import flat_copy
from downpour.ps.worker import PushRecord


def _row(n: int) -> PushRecord:
    return PushRecord(t=0.5 * n, worker=3, shard=n % 2, version=n + 1, staleness=n % 5 - 1, loss=1.0 / (n + 1),
                      applied=n % 3 != 0)  # fmt: skip


class _Writer:
    """A forked process that writes ``rows`` rows into a new log at ``path``, then exits (``then="exit"``) or waits
    to be killed. Forked, not started afresh: a new interpreter would import torch first (about 3 s a writer)."""

    def __init__(self, path: Path, rows: int, capacity: int, *, then: str = "exit") -> None:
        ready, written = os.pipe()
        pid = os.fork()
        if pid == 0:  # the writer: a log, its rows, word to the test, then nothing of the test's machinery
            code = 1
            try:
                log = push_log.PushLog(str(path), capacity=capacity)
                for n in range(rows):
                    log.append(_row(n))
                os.write(written, b"w")
                if then == "wait":
                    time.sleep(600)
                code = 0
            finally:
                os._exit(code)
        os.close(written)
        said = os.read(ready, 1)
        os.close(ready)
        assert said == b"w", "the writer failed"
        self.pid = pid

    def wait(self, timeout: float = 60.0) -> int:
        """Wait for the writer to end; its exit status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        raise TimeoutError(f"writer {self.pid} still runs")

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)


def test_a_dead_writers_rows_come_back_in_order_as_records(tmp_path: Path) -> None:
    path = tmp_path / "w.rows"
    _Writer(path, 5, 16).wait(timeout=60)
    first, rows = push_log.recover(str(path))  # type: ignore[misc]
    assert first == 0
    assert rows == [tuple(_row(n)) for n in range(5)]
    assert [type(value) for value in rows[1]] == [float, int, int, int, int, float, bool]
    assert not path.exists()  # read once: removed


def test_a_ring_that_wrapped_keeps_its_latest_rows_but_the_slot_a_kill_could_have_torn(tmp_path: Path) -> None:
    """Capacity 8, 21 rows: rows 13..20 sit in the ring, but row 13's slot is the one row 21 would have been
    written into next: a process killed mid-write would have left half of it there, so row 13 is never read."""
    path = tmp_path / "w.rows"
    _Writer(path, 21, 8).wait(timeout=60)
    first, rows = push_log.recover(str(path), remove=False)  # type: ignore[misc]
    assert first == 14
    assert rows == [tuple(_row(n)) for n in range(14, 21)]
    assert path.exists()


def test_a_live_writers_log_is_not_read_and_a_killed_ones_is(tmp_path: Path) -> None:
    path = tmp_path / "w.rows"
    proc = _Writer(path, 3, 16, then="wait")
    try:
        assert push_log.recover(str(path)) is None  # it may still write
        assert path.exists()
    finally:
        proc.kill()
        proc.wait(timeout=60)
    first, rows = push_log.recover(str(path))  # type: ignore[misc]
    assert (first, len(rows)) == (0, 3)


def test_a_log_is_being_written_while_its_writer_lives_and_a_file_that_is_no_log_never_is(tmp_path: Path) -> None:
    path = tmp_path / "w.rows"
    proc = _Writer(path, 1, 16, then="wait")
    try:
        assert push_log.writer_lives(str(path))
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert not push_log.writer_lives(str(path))
    empty = tmp_path / "empty.rows"  # a process killed between making the file and sizing it
    empty.write_bytes(b"")
    assert not push_log.writer_lives(str(empty)) and not push_log.writer_lives(str(tmp_path / "missing.rows"))


def test_files_that_are_not_logs_are_not_read(tmp_path: Path) -> None:
    assert push_log.recover(str(tmp_path / "missing.rows")) is None
    short = tmp_path / "short.rows"
    short.write_bytes(b"\0" * 10)
    assert push_log.recover(str(short)) is None
    wrong_size = tmp_path / "size.rows"
    _Writer(wrong_size, 2, 16).wait(timeout=60)
    with open(wrong_size, "ab") as handle:
        handle.write(b"\0" * 8)
    assert push_log.recover(str(wrong_size)) is None and wrong_size.exists()


def test_take_new_keeps_only_rows_the_driver_lacks_and_counts_overwritten_ones() -> None:
    rows = [("r", n) for n in range(10, 15)]  # rows 10..14
    assert push_log.take_new(12, 10, rows) == (rows[2:], 15, 0)  # 10 and 11 came through the pipe
    assert push_log.take_new(15, 10, rows) == ([], 15, 0)  # all came: nothing twice
    assert push_log.take_new(20, 10, rows) == ([], 20, 0)  # a count never goes back
    assert push_log.take_new(7, 10, rows) == (rows, 15, 3)  # 7, 8 and 9 were overwritten in the ring


def test_a_writer_that_closes_removes_its_log_and_its_lock_goes(tmp_path: Path) -> None:
    path = tmp_path / "w.rows"
    log = push_log.PushLog(str(path), capacity=4)
    log.append(_row(0))
    with pytest.raises(FileExistsError):  # one writer a file
        push_log.PushLog(str(path))
    log.close()
    assert not path.exists()
    log.close()  # twice is harmless


def test_orphans_are_logs_of_dead_writers_silent_for_long(tmp_path: Path) -> None:
    dead = tmp_path / "run-worker0-run0.rows"
    _Writer(dead, 2, 4).wait(timeout=60)
    live = push_log.PushLog(str(tmp_path / "run-worker1-run0.rows"), capacity=4)
    try:
        pattern = str(tmp_path / "*-worker*-run*.rows")
        assert push_log.remove_orphans(pattern) == 0  # the dead one wrote just now: a restarted worker may read it
        assert push_log.remove_orphans(pattern, max_age_s=-1.0) == 1  # once old, it goes; the live one stays
        assert not dead.exists() and Path(live.path).exists()
    finally:
        live.close()


def test_a_local_worker_killed_between_batches_loses_no_push_row() -> None:
    """SIGKILL a local worker while it trains: the rows of the pushes it made since its last batch reach the driver
    from its push log. Every push a shard applied or refused then has its row, but for at most one per shard and
    kill: a push the kill cut off between the shard's commit and the row (rows are written after the push)."""
    from downpour.backends.local import LocalCluster

    config = config_mod.load(None, [
        "data.source=natural-patches", "data.patch_size=8", "data.examples=2000", "data.held_out=64",
        "model.features=32", "train.batch_size=16", "train.steps=1000000", "ps.rule=sgd", "ps.lr=0.01",
        "ps.shards=2", "cluster.workers=2", "cluster.threads_per_worker=1",
    ])  # fmt: skip
    data = load_dataset(config.data, seed=config.train.seed)
    model = build_model(config.model, data.dim, seed=config.train.seed, shape=data.shape)
    cluster = LocalCluster(config, data.train.clone(), flat_copy(model), worker_seeds=[1, 2], t0=time.time(),
                           shape=data.shape)  # fmt: skip
    got = Collected()
    try:
        cluster.start()
        deadline = time.monotonic() + 60
        got.poll_until(cluster, lambda: cluster.steps() >= 300, deadline=deadline, pause=0.01)
        # killed while its log holds rows the driver has not received (a batch is 0.2 s or 256 rows)
        victim = cluster.pids()[1]
        while True:
            os.kill(victim, signal.SIGSTOP)
            got.add(cluster.poll())  # every row it has sent
            unsent = unsent_rows(cluster, 1)
            if unsent > 0 or time.monotonic() > deadline:
                break
            os.kill(victim, signal.SIGCONT)
            time.sleep(0.003)
        os.kill(victim, signal.SIGKILL)
        got.poll_until(cluster, lambda: any(event.kind == "died" for event in got.events), deadline=deadline,
                       pause=0.01)  # fmt: skip
        got.add(cluster.stop(timeout=10.0))
        snapshots = cluster.snapshots()
    finally:
        cluster.close()
    records, events = got.records, got.events
    assert [event.kind for event in events] == ["died", "push_rows"], events
    (taken,) = [event for event in events if event.kind == "push_rows"]
    assert taken.worker == 1 and taken.said and "lost" not in taken.detail
    recovered = int(taken.detail.split()[0])
    assert recovered == unsent > 0
    for index, snapshot in enumerate(snapshots):
        rows = sum(1 for record in records if record[2] == index)
        made = snapshot["version"] + snapshot["rejected"]
        assert made - 1 <= rows <= made, (index, rows, made, recovered)


class _Handle:
    """A stand-in for a Ray actor handle: ``handle.method.remote(...)`` calls ``methods[method]`` (with ``ray.get``
    patched to give back what it is handed)."""

    def __init__(self, **methods: Any) -> None:
        self._methods = methods

    def __getattr__(self, name: str) -> Any:
        return SimpleNamespace(remote=self._methods[name])


def test_a_ray_workers_dead_run_keeps_its_log_until_a_settle_has_its_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restarted Ray worker process takes its dead run's log when it starts and sends the rows with its polls; the
    log also tells how many pushes that run made at least (``logged_pushes``), which the settle of its first run
    gives the coordinator (the shards' stamps are gone where every shard was restored). Should the process die
    before that settle, the next one must still find the log: it stays until the run is settled, however many
    polls came first. Before, the second poll removed it, and the next process settled the dead run as if it had
    made no push (its whole last lease back to the budget)."""
    pytest.importorskip("ray")  # ray_workers needs Ray (the [ray] extra)
    from downpour.backends import ray_workers, shm
    from downpour.config import Config

    monkeypatch.setattr(shm, "shm_dir", lambda: str(tmp_path))
    settled: list[tuple[int, int, dict[int, int]]] = []
    coordinator = _Handle(worker_started=lambda worker: None, examples=lambda worker: ["examples"],
                          settle=lambda worker, run, used: settled.append((worker, run, dict(used))) or 0)  # fmt: skip
    shard = _Handle(push_stamps=lambda: [0, 0])  # restored: no stamp left
    handles = {"coordinator": coordinator, "shard0": shard, "shard1": shard}
    monkeypatch.setattr(ray_workers.ray, "get", lambda value, timeout=None: np.zeros((4, 3)) if value == "examples"
                        else value)  # fmt: skip
    monkeypatch.setattr(ray_workers.ray, "get_actor", lambda name: handles[name])

    def process() -> Any:  # a process of worker 1's actor, on two shards
        return ray_workers.WorkerActor(1, Config(), 3, None, 0, [(0, 2, "shard0"), (2, 2, "shard1")], "coordinator",
                                       0.0, torch.get_num_threads(), False, True, "c")  # fmt: skip

    path = Path(ray_workers.push_log_path("c", 1, 0))
    _Writer(path, 5, 16).wait(timeout=60)  # run 0 died after 5 rows: 3 pushes at least
    first = process()
    assert [len(chunk[2]) for chunk in first.poll()["chunks"] if chunk[3]] == [5]
    first.poll()
    first.poll()  # the driver has the rows; the run is not settled yet
    assert path.exists()
    second = process()  # the first died before its run settled run 0: this one reads the count again
    assert second._logged == {0: 3}
    second._settle_earlier(1, dict(second._logged))
    assert settled == [(1, 1, {0: 3})]
    second.poll()
    second.poll()
    assert not path.exists()  # settled and sent: gone
