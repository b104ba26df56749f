"""How downpour starts the processes of one machine: forked from a fork server that has imported torch already.

A freshly spawned Python process spends about two seconds of CPU importing torch and downpour before it can do
anything, and a local run pays that once per worker (and a test suite once per run). On Linux, downpour's workers
are instead forked from ``multiprocessing``'s fork server, started once per driver with
:data:`PRELOADED_MODULES` imported: a worker then costs a fork, and shares torch's pages with its siblings.

The fork server is a clean process (it never runs a torch operation, so no OpenMP thread pool is forked), it
talks to the driver through a Unix socket in a private temporary directory (no network port), and it exits when
the driver does. Because a worker's parent is then the fork server, a worker learns of its driver's death from a
pipe (:class:`DriverLink`), not from its parent's pid. Elsewhere (macOS, Windows, Python 3.11.0 whose fork server
listened on an abstract socket), workers are spawned as before.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import signal
import sys
from typing import Any

import torch.multiprocessing as mp

from downpour.signals import routed

PRELOADED_MODULES = ["downpour.backends.local"]
"""Imported by the fork server before it forks anyone: torch, the models, the parameter server and the worker."""


def fork_server_available() -> bool:
    """Whether workers start from the fork server here: Linux, on a Python whose fork server uses a socket file."""
    return sys.platform == "linux" and sys.version_info >= (3, 11, 1)


def worker_context() -> Any:
    """The ``multiprocessing`` context to start worker processes with: the fork server with torch preloaded where
    :func:`fork_server_available`, else ``spawn``. Either way the target and its arguments are pickled (tensors
    in shared memory travel as file descriptors), and nothing of the caller's own state is inherited.

    The fork server is started here if it is not running yet, so that it imports torch while the caller goes on,
    and with Ctrl-C ignored, which its children inherit until a worker sets its own handlers (Ctrl-C is the
    driver's to handle)."""
    if not fork_server_available():
        return mp.get_context("spawn")
    server = multiprocessing.forkserver._forkserver
    preload = list(getattr(server, "_preload_modules", []))  # keep what the caller asked for, if anything
    multiprocessing.forkserver.set_forkserver_preload(preload + [m for m in PRELOADED_MODULES if m not in preload])
    with routed(signal.SIG_IGN, [signal.SIGINT]):
        multiprocessing.forkserver.ensure_running()
    return mp.get_context("forkserver")


class DriverLink:
    """A pipe whose only write end the driver holds: a worker reads end-of-file once the driver is gone, whoever
    the worker's parent is. ``reader`` goes to the workers; :meth:`release` is the driver letting them go."""

    def __init__(self, context: Any) -> None:
        self.reader, self._writer = context.Pipe(duplex=False)

    def close_reader(self) -> None:
        """Close the driver's copy of the read end, once every worker has its own."""
        self.reader.close()

    def release(self) -> None:
        """Close both ends: every worker still reading sees the driver gone."""
        self.reader.close()
        self._writer.close()


def driver_gone(reader: Any) -> bool:
    """In a worker: whether the driver has closed its end of a :class:`DriverLink` (or died). Nothing is ever sent
    on the link, so a readable end is an end-of-file."""
    try:
        return bool(reader.poll())
    except (OSError, EOFError):
        return True


def adopt_environment(environment: dict[str, str]) -> None:
    """In a worker: take the driver's environment as it was when the worker was started. A forked worker
    inherits the fork server's, which is the driver's as it was when the server started; a spawned one inherits
    the driver's already, so this changes nothing there."""
    if dict(os.environ) != environment:
        os.environ.clear()
        os.environ.update(environment)
