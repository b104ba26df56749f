"""How local workers start (downpour.backends.processes): from the fork server on Linux, with Ctrl-C left to the
driver, told of their driver's death, in the driver's environment; spawned where the fork server cannot start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from downpour.backends.processes import (
    adopt_environment,
    become_worker,
    driver_alive,
    fork_server_available,
    worker_context,
)
from downpour.signals import routed

TIMEOUT_S = 60.0
TESTS = Path(__file__).parent
needs_fork_server = pytest.mark.skipif(not fork_server_available(), reason="the fork server is for Linux")


def _report_start(environment: dict[str, str] | None, answers: Any) -> None:
    """Child: send back how it started: SIGINT's handler, a variable of the environment, whether the worker's module
    (with torch, the models and the parameter server) was imported before this test module asked for anything, and
    its parent's pid."""
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    preloaded = "downpour.backends.local" in sys.modules  # this test module does not import it
    if environment is not None:
        adopt_environment(environment)
    answers.send((ignored, os.environ.get("DOWNPOUR_TEST_PROBE"), preloaded, os.getppid()))
    answers.close()


def _wait_for_driver_to_go(marker: str) -> None:
    """Child (without the parent-death signal): poll :func:`driver_alive` until it says no, then write ``marker``."""
    deadline = time.monotonic() + TIMEOUT_S
    while driver_alive():
        if time.monotonic() > deadline:
            raise SystemExit(3)
        time.sleep(0.02)
    Path(marker).write_text("gone")


# A driver in its own process, with Python's own Ctrl-C handler: it starts the fork server and two children, says
# how the first one started, and waits to be killed.
_DRIVER = """
import json, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever the test process does with Ctrl-C
from downpour.backends.processes import worker_context
from test_processes import _report_start, _wait_for_driver_to_go
if __name__ == "__main__":
    context = worker_context()
    reader, writer = context.Pipe(duplex=False)
    reporter = context.Process(target=_report_start, args=(None, writer))
    reporter.start()
    ignored, _, preloaded, parent = reader.recv()
    waiter = context.Process(target=_wait_for_driver_to_go, args=(sys.argv[1],))
    waiter.start()
    print(json.dumps({"ignored": ignored, "preloaded": preloaded, "parent": parent, "waiter": waiter.pid}), flush=True)
    reporter.join()
    import time
    time.sleep(600)
"""


@needs_fork_server
def test_workers_fork_with_torch_imported_ctrl_c_ignored_and_see_their_driver_die(tmp_path: Path) -> None:
    """In a driver that handles Ctrl-C itself: a worker process is forked from the fork server with the worker's
    modules (torch among them) imported already, not spawned to import them for seconds; it starts with Ctrl-C
    ignored until it sets its own handlers; and one without the parent-death signal still sees the driver die,
    though its parent is the fork server."""
    marker = tmp_path / "driver-gone"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, str(marker)], stdout=subprocess.PIPE, text=True,
                              env=env, start_new_session=True)  # fmt: skip
    try:
        line = driver.stdout.readline() if driver.stdout else ""
        assert line, "the driver reported nothing"
        started = json.loads(line)
        assert started["preloaded"]
        assert started["parent"] != driver.pid  # the fork server's child, not the driver's
        assert started["ignored"]
        assert not marker.exists()  # the waiter sees its driver alive
        driver.kill()
        driver.wait(timeout=TIMEOUT_S)
        deadline = time.monotonic() + TIMEOUT_S
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the worker never saw its driver die"
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()


@needs_fork_server
def test_a_worker_runs_in_the_drivers_environment_of_the_moment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fork server keeps the environment it started with; a worker adopts the driver's as it is now."""
    context = worker_context()  # the fork server is running, started before the variable below exists
    monkeypatch.setenv("DOWNPOUR_TEST_PROBE", "set after the fork server started")
    seen = []
    for environment in (None, dict(os.environ)):
        reader, writer = context.Pipe(duplex=False)
        proc = context.Process(target=_report_start, args=(environment, writer))
        proc.start()
        writer.close()
        seen.append(reader.recv()[1])
        proc.join(timeout=TIMEOUT_S)
        assert proc.exitcode == 0
    assert seen == [None, "set after the fork server started"]  # why workers adopt it


@needs_fork_server
def test_workers_are_spawned_where_the_fork_server_cannot_listen(tmp_path: Path) -> None:
    """Under a temporary directory too long for a Unix socket's path, the fork server cannot start: workers are
    spawned instead of the run failing."""
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    probe = "from downpour.backends.processes import worker_context; print(worker_context().get_start_method())"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=TIMEOUT_S,
                            env={**os.environ, "TMPDIR": str(deep)})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "spawn"


def test_lock_folders_of_dead_drivers_are_removed_and_others_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A driver killed with SIGKILL leaves its shard-lock folder in the temporary directory (a hunt found 46); the
    next driver removes those whose driver is gone, and keeps a live driver's and one named without a pid. (In a
    temporary directory of the test's own, where no other run removes anything first.)"""
    import tempfile

    from downpour.backends.local import LOCK_DIR_PREFIX, remove_dead_lock_dirs
    from downpour.backends.processes import ALIVE_FILE, hold_while_alive

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    dead = Path(tempfile.mkdtemp(prefix=f"{LOCK_DIR_PREFIX}{dead_pid}-"))  # as an earlier version made them:
    (dead / "shard0").write_text("")  # judged by the pid in the name
    alive = Path(tempfile.mkdtemp(prefix=f"{LOCK_DIR_PREFIX}{os.getppid()}-"))
    unnamed = Path(tempfile.mkdtemp(prefix=LOCK_DIR_PREFIX))  # as named before the pid was in the name
    # made by a live driver in another pid namespace, where its pid names no process here: its lock says alive
    elsewhere = Path(tempfile.mkdtemp(prefix=f"{LOCK_DIR_PREFIX}{dead_pid}-"))
    held = hold_while_alive(str(elsewhere))
    # a driver gone whose pid another process has now: its lock is free
    reused = Path(tempfile.mkdtemp(prefix=f"{LOCK_DIR_PREFIX}{os.getppid()}-"))
    (reused / ALIVE_FILE).write_text("")
    try:
        assert remove_dead_lock_dirs() == 2
        assert not dead.exists() and alive.exists() and unnamed.exists()
        assert elsewhere.exists() and not reused.exists()
    finally:
        os.close(held)


def test_a_drivers_lock_folder_is_locked_from_the_moment_it_has_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder is made under a name no cleanup reads, locked, then renamed: once named with the driver's pid it
    holds a locked owner.alive, which a driver's exit (closing the descriptor) frees. (In a folder of its own: once
    unlocked, a driver that a test beside it starts would remove it.)"""
    import shutil

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    from downpour.backends.local import LOCK_DIR_PREFIX, make_lock_dir
    from downpour.backends.processes import ALIVE_FILE, owner_gone

    folder, alive = make_lock_dir()
    try:
        assert Path(folder).name.startswith(f"{LOCK_DIR_PREFIX}{os.getpid()}-")
        assert (Path(folder) / ALIVE_FILE).is_file()
        assert not list(Path(folder).parent.glob(f"{LOCK_DIR_PREFIX}new-{Path(folder).name.rsplit('-', 1)[1]}"))
        assert not owner_gone(folder, os.getpid())
        os.close(alive)
        alive = -1
        assert owner_gone(folder, os.getpid())  # the lock decides, not the pid (which is alive)
    finally:
        if alive >= 0:
            os.close(alive)
        shutil.rmtree(folder, ignore_errors=True)


def test_fork_server_folders_of_killed_drivers_are_removed_and_no_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``multiprocessing``'s ``pymp-*`` folder (the fork server's socket) outlives a driver killed with SIGKILL; a
    later driver removes those a driver marked and is gone from, and keeps a live one's and any it did not mark."""
    import tempfile

    from downpour.backends.processes import ALIVE_FILE, hold_while_alive, remove_dead_temp_dirs

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = Path(tempfile.mkdtemp(prefix="pymp-"))
    (gone / ALIVE_FILE).write_text("")
    (gone / "listener-x").write_text("")
    live = Path(tempfile.mkdtemp(prefix="pymp-"))
    held = hold_while_alive(str(live))
    unmarked = Path(tempfile.mkdtemp(prefix="pymp-"))  # another program's: its owner may well be alive
    try:
        assert remove_dead_temp_dirs() == 1
        assert not gone.exists() and live.exists() and unmarked.exists()
    finally:
        os.close(held)


def _report_become_worker(answers: Any) -> None:
    """Child: call :func:`become_worker` and send back what it set: SIGINT ignored, SIGTERM's default, the
    parent-death signal (Linux's ``prctl(PR_GET_PDEATHSIG)``), and whether the fork server's alive pipe it had
    inherited is still open."""
    import ctypes
    import multiprocessing.forkserver

    inherited = multiprocessing.forkserver._forkserver._forkserver_alive_fd  # type: ignore[attr-defined]
    become_worker()
    death = ctypes.c_int(0)
    ctypes.CDLL(None, use_errno=True).prctl(2, ctypes.byref(death))  # PR_GET_PDEATHSIG = 2
    try:
        os.fstat(inherited)
        still_open = True
    except (OSError, TypeError):
        still_open = False
    sigint, sigterm = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    answers.send((sigint == signal.SIG_IGN, sigterm == signal.SIG_DFL, death.value, inherited is not None, still_open))
    answers.close()


@needs_fork_server
def test_a_worker_leaves_ctrl_c_to_the_driver_and_dies_with_its_parent() -> None:
    """A forked worker, once it has called become_worker: Ctrl-C ignored, SIGTERM back to its default (the fork
    server it came from ignores it), SIGKILL when its parent dies, and the fork server's alive pipe closed (held by a
    worker, it kept the fork server, and so the workers, alive after the driver's death)."""
    context = worker_context()
    reader, writer = context.Pipe(duplex=False)
    proc = context.Process(target=_report_become_worker, args=(writer,))
    proc.start()
    writer.close()
    ignored, default_term, death, inherited, still_open = reader.recv()
    proc.join(timeout=TIMEOUT_S)
    assert proc.exitcode == 0
    assert ignored and default_term
    assert death == signal.SIGKILL
    assert inherited and not still_open
    before = signal.getsignal(signal.SIGINT)
    become_worker()  # in this process, which no one started: nothing changes
    assert signal.getsignal(signal.SIGINT) is before
    assert driver_alive()  # nor has it a driver to lose


def test_adopting_the_drivers_environment_drops_what_it_no_longer_has(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forked worker starts with the fork server's environment: a variable the driver has removed since is
    removed, one it has set is set."""
    monkeypatch.setenv("DOWNPOUR_TEST_STALE", "the fork server's")
    monkeypatch.delenv("DOWNPOUR_TEST_PROBE", raising=False)
    drivers = {key: value for key, value in os.environ.items() if key != "DOWNPOUR_TEST_STALE"}
    drivers["DOWNPOUR_TEST_PROBE"] = "the driver's"
    saved = dict(os.environ)
    try:
        adopt_environment(drivers)
        assert dict(os.environ) == drivers
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_routed_signals_go_to_the_handler_in_the_block_and_back_after_it() -> None:
    """Inside the block a signal reaches the given handler; after it the previous handler is back; outside the main
    thread, where Python cannot set handlers, the block still runs, with the handlers as they were."""
    before = signal.getsignal(signal.SIGUSR1)
    seen: list[int] = []
    with routed(lambda signum, frame: seen.append(signum), [signal.SIGUSR1]):
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + TIMEOUT_S
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
    assert seen == [signal.SIGUSR1]
    assert signal.getsignal(signal.SIGUSR1) is before
    ran: list[Any] = []

    def in_a_thread() -> None:
        with routed(signal.SIG_IGN, [signal.SIGUSR1]):
            ran.append(signal.getsignal(signal.SIGUSR1))

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join(timeout=TIMEOUT_S)
    assert ran == [before]


def test_a_process_that_exists_is_not_gone_whoever_it_belongs_to() -> None:
    """``process_gone`` judges leftovers of killed drivers: a finished process is gone; this one, and init (pid 1,
    another user's process unless this is root, which signal 0 cannot reach), are not."""
    from downpour.backends.processes import process_gone

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert process_gone(int(finished.stdout))
    assert not process_gone(os.getpid())
    assert not process_gone(1)


def test_a_fork_server_is_gone_once_it_has_exited_whether_reaped_or_not() -> None:
    """``fork_server_gone`` tells a driver why its workers exited with 255: a process that exited and was reaped
    (no /proc entry), or exited and waits to be reaped (a zombie), is gone; a running one is not, nor is None (no
    fork server: spawned workers)."""
    from downpour.backends.processes import fork_server_gone, process_state

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert fork_server_gone(int(finished.stdout))  # reaped by subprocess.run
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while process_state(zombie.pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.02)  # until it has exited, not yet waited for
        assert fork_server_gone(zombie.pid)
    finally:
        zombie.wait()
    assert not fork_server_gone(os.getpid())
    assert not fork_server_gone(None)


def test_a_stop_request_only_records_the_signal_and_as_interrupt_raises_keyboard_interrupt() -> None:
    """The two handlers a run routes SIGINT and SIGTERM to: StopRequest records the signal and lets the work go on
    (a simulation then stops between pushes); as_interrupt stops the block as Ctrl-C does."""
    from downpour.signals import StopRequest, as_interrupt

    stop = StopRequest()
    assert not stop.requested() and stop.signal is None
    with routed(stop, [signal.SIGUSR1]):
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + TIMEOUT_S
        while not stop.requested() and time.monotonic() < deadline:
            time.sleep(0.01)
    assert stop.requested() and stop.signal == signal.SIGUSR1
    with pytest.raises(KeyboardInterrupt), routed(as_interrupt, [signal.SIGUSR1]):
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(5.0)  # the handler raises within it: a signal reaches Python's main thread at once


def test_an_interrupt_inside_a_held_block_is_raised_when_the_block_ends() -> None:
    """Ctrl-C while the driver logs push records it has received must not stop it half done (the records would be
    lost): inside ``interrupts_held`` as_interrupt only notes the signal, and the block's end raises it, once;
    nested blocks raise it at the outermost end; a block without a signal raises nothing."""
    from downpour.signals import as_interrupt, interrupts_held

    done = []
    with pytest.raises(KeyboardInterrupt), routed(as_interrupt, [signal.SIGUSR1]):
        with interrupts_held():
            with interrupts_held():
                os.kill(os.getpid(), signal.SIGUSR1)
                time.sleep(0.2)  # the handler has run (a signal reaches Python's main thread at once)
                done.append("inner")
            done.append("outer")  # still held: the outer block has not ended
        done.append("not reached")
    assert done == ["inner", "outer"]
    with routed(as_interrupt, [signal.SIGUSR1]), interrupts_held():
        done.append("quiet")  # nothing pending from before: no KeyboardInterrupt
    assert done[-1] == "quiet"
    with pytest.raises(KeyboardInterrupt), routed(as_interrupt, [signal.SIGUSR1]):
        os.kill(os.getpid(), signal.SIGUSR1)  # outside a held block: at once, as before
        time.sleep(5.0)


def test_a_cleanup_while_a_driver_marks_its_folder_leaves_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another driver cleaning up between the moment owner.alive is made and the moment it is locked finds no
    unlocked owner.alive there: it leaves the live driver's fork-server folder (and its socket) alone."""
    import fcntl
    import tempfile

    from downpour.backends import processes

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = tmp_path / "pymp-live"
    folder.mkdir()
    (folder / "listener-x").write_text("")  # stands for the fork server's socket
    removed_meanwhile = []
    real_flock = fcntl.flock

    def flock_after_a_cleanup(fd: int, operation: int) -> None:
        if operation == fcntl.LOCK_EX:  # the marking driver's lock: another driver cleans up just before it
            removed_meanwhile.append(processes.remove_dead_temp_dirs())
        real_flock(fd, operation)

    monkeypatch.setattr(processes.fcntl, "flock", flock_after_a_cleanup)
    held = processes.hold_while_alive(str(folder))
    try:
        assert removed_meanwhile == [0]
        assert (folder / "listener-x").exists() and (folder / processes.ALIVE_FILE).is_file()
        assert sorted(path.name for path in folder.iterdir()) == ["listener-x", processes.ALIVE_FILE]
        monkeypatch.setattr(processes.fcntl, "flock", real_flock)
        assert processes.alive_lock_free(folder) is False
    finally:
        os.close(held)
    assert processes.remove_dead_temp_dirs() == 1 and not folder.exists()  # once its owner is gone


def test_a_file_system_without_locks_still_runs_and_its_folders_are_judged_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where flock fails (NFS without its lock daemon: ENOLCK), a driver still gets its lock folder, judged by the
    pid in its name as earlier versions' were, and its fork-server folder stays unmarked (left alone)."""
    import errno
    import fcntl
    import tempfile

    from downpour.backends import local, processes

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(processes.fcntl, "flock", no_locks)
    folder, alive = local.make_lock_dir()
    assert alive == -1
    assert Path(folder).name.startswith(f"{local.LOCK_DIR_PREFIX}{os.getpid()}-")
    assert list(Path(folder).iterdir()) == []  # no owner.alive (nor its staging file) that nothing holds
    pymp = tmp_path / "pymp-x"
    pymp.mkdir()
    assert processes.hold_while_alive(str(pymp)) == -1 and list(pymp.iterdir()) == []
    monkeypatch.setattr(processes.fcntl, "flock", fcntl.flock)
    assert local.remove_dead_lock_dirs() == 0 and processes.remove_dead_temp_dirs() == 0  # this pid is alive
    assert Path(folder).exists() and pymp.exists()
