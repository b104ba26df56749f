"""How local workers start (downpour.backends.processes): from the fork server on Linux, told of their driver's
death by a pipe, in the driver's environment, with Ctrl-C left to the driver."""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import pytest

from downpour.backends.processes import (
    DriverLink,
    adopt_environment,
    driver_gone,
    fork_server_available,
    worker_context,
)
from downpour.signals import routed

TIMEOUT_S = 60.0


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


def _wait_for_driver_gone(link: Any, answers: Any) -> None:
    """Child: say it is waiting, then wait until the driver's link reads as gone; exit 0 then, 3 after a minute."""
    answers.send(driver_gone(link))
    deadline = time.monotonic() + TIMEOUT_S
    while not driver_gone(link):
        if time.monotonic() > deadline:
            raise SystemExit(3)
        time.sleep(0.01)


def _start(target: Any, *args: Any) -> tuple[Any, Any]:
    """Start ``target(*args, answers)`` as local workers start; return the process and the read end of answers."""
    context = worker_context()
    reader, writer = context.Pipe(duplex=False)
    proc = context.Process(target=target, args=(*args, writer))
    proc.start()
    writer.close()
    return proc, reader


def _finish(proc: Any) -> int:
    proc.join(timeout=TIMEOUT_S)
    if proc.is_alive():
        proc.kill()
        proc.join()
    return proc.exitcode


@pytest.mark.skipif(not fork_server_available(), reason="the fork server is for Linux")
def test_workers_start_from_a_fork_server_with_torch_imported_and_ctrl_c_ignored() -> None:
    """A worker's process is forked from the fork server with the worker's modules (torch among them) imported
    already, not spawned to import them for seconds, and starts with Ctrl-C ignored until it sets its own
    handlers, though the driver itself handles Ctrl-C."""
    with routed(signal.default_int_handler, [signal.SIGINT]):  # the driver (this process) handles Ctrl-C
        proc, answers = _start(_report_start, None)
    ignored, _, preloaded, parent = answers.recv()
    assert _finish(proc) == 0
    assert preloaded
    assert parent != os.getpid()  # the fork server's child, not the driver's
    assert ignored


@pytest.mark.skipif(not fork_server_available(), reason="the fork server is for Linux")
def test_a_worker_runs_in_the_drivers_environment_of_the_moment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fork server keeps the environment it started with; a worker adopts the driver's as it is now."""
    worker_context()  # the fork server is running, started before the variable below exists
    monkeypatch.setenv("DOWNPOUR_TEST_PROBE", "set after the fork server started")
    as_forked, answers = _start(_report_start, None)
    seen_as_forked = answers.recv()[1]
    adopted, answers = _start(_report_start, dict(os.environ))
    seen_adopted = answers.recv()[1]
    assert _finish(as_forked) == 0 and _finish(adopted) == 0
    assert seen_as_forked is None  # why workers must adopt it
    assert seen_adopted == "set after the fork server started"


def test_a_worker_sees_its_driver_go_whoever_its_parent_is() -> None:
    """The driver link reads as open while the driver holds it, and as gone once the driver lets go (what its
    death does too), though the worker's parent (the fork server) lives on."""
    link = DriverLink(worker_context())
    proc, answers = _start(_wait_for_driver_gone, link.reader)
    link.close_reader()
    assert answers.recv() is False  # the child saw the driver there
    time.sleep(0.3)
    assert proc.is_alive()  # and keeps waiting while it is
    link.release()
    assert _finish(proc) == 0
