"""How downpour starts the processes of one machine: forked from a fork server that has imported torch already.

A freshly spawned Python process spends about two seconds of CPU importing torch and downpour before it can do
anything, and a local run pays that once per worker (and a test suite once per run). On Linux, downpour's workers
are instead forked from ``multiprocessing``'s fork server, started once per driver with
:data:`PRELOADED_MODULES` imported: a worker then costs a fork, and shares torch's pages with its siblings.

The fork server is a clean process (it never runs a torch operation, so no OpenMP thread pool is forked) and talks
to the driver through a Unix socket in a private temporary directory (no network port). A worker calls
:func:`become_worker` first: it then dies with the fork server (the kernel's parent-death signal), and the fork
server exits when the driver does, even while workers compute, sleep or are stopped. A worker also reads its
driver's death from the pipe that ``multiprocessing`` keeps to the driver (:func:`driver_alive`), since its parent
is the fork server. Elsewhere (macOS, Windows, Python 3.11.0 whose fork server listened on an abstract socket, a
temporary directory whose path is too long for a socket), workers are spawned, each importing torch itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.util
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from downpour.signals import process_gone, routed

PRELOADED_MODULES = ["downpour.backends.local"]
"""Imported by the fork server before it forks anyone: torch, the models, the parameter server and the worker."""


def fork_server_available() -> bool:
    """Whether workers can start from the fork server here: Linux, on a Python whose fork server uses a socket
    file (3.11.1 on)."""
    return sys.platform == "linux" and sys.version_info >= (3, 11, 1)


def worker_context() -> Any:
    """The ``multiprocessing`` context to start worker processes with: the fork server with torch preloaded where
    :func:`fork_server_available` and it starts, else ``spawn``. Either way the target and its arguments are
    pickled (tensors in shared memory travel as file descriptors), and nothing of the caller's state is inherited.

    The fork server is started here if it is not running yet, so that it imports torch while the caller goes on
    (its first fork waits for that), and with Ctrl-C and SIGTERM ignored: it follows its driver, not a signal to
    the process group, which the driver handles (its children ignore Ctrl-C until they set their own handlers)."""
    if not fork_server_available():
        return mp.get_context("spawn")
    server = multiprocessing.forkserver._forkserver
    preload = list(getattr(server, "_preload_modules", []))  # keep what the caller asked for, if anything
    multiprocessing.forkserver.set_forkserver_preload(preload + [m for m in PRELOADED_MODULES if m not in preload])
    try:
        with routed(signal.SIG_IGN, [signal.SIGINT, signal.SIGTERM]):
            multiprocessing.forkserver.ensure_running()
    except OSError:  # e.g. "AF_UNIX path too long" under a long TMPDIR: spawned workers need no socket
        return mp.get_context("spawn")
    _mark_temp_dir_alive()
    return mp.get_context("forkserver")


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``); elsewhere a no-op."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def become_worker() -> None:
    """In a worker, first thing: leave Ctrl-C to the driver (SIGTERM kills the worker, as by default), die with
    the parent, and let the fork server exit with the driver. Does nothing in a process that no one started.

    A forked child inherits a write end of the pipe by which the fork server learns that its driver is gone
    (``multiprocessing`` passes it on for children that fork servers of their own); as long as any worker held it,
    the server, and so the parent-death signal, would wait for the last worker."""
    if multiprocessing.parent_process() is None:  # the driver itself: its fork server is its own to keep
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the fork server ignores it; a worker need not
    _die_with_parent()
    server = multiprocessing.forkserver._forkserver
    alive = getattr(server, "_forkserver_alive_fd", None)  # None in a spawned worker
    if alive is not None:
        with contextlib.suppress(OSError):
            os.close(alive)
        server._forkserver_alive_fd = None


def fork_server_pid() -> int | None:
    """In the driver: the process id of the fork server now serving it, if one was started."""
    return getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)


def kill_fork_server(pid: int | None) -> None:
    """SIGKILL the fork server ``pid`` (its children die with it): for a driver that cannot wait for it."""
    if pid is not None:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def process_state(pid: int) -> str | None:
    """The state letter of process ``pid`` in Linux's ``/proc/PID/stat`` (``R`` running, ``S`` sleeping, ``T``
    stopped, ``Z`` a zombie, ...); None where there is none to read (no such process, or no ``/proc``)."""
    try:  # "pid (command) state ...": the command may hold spaces and parentheses, so split after the last ")"
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return None


def fork_server_gone(pid: int | None) -> bool:
    """In the driver: whether the fork server ``pid`` has exited or been killed (its children died with it, and
    their exit status is lost: ``multiprocessing`` reports 255). False for None."""
    if pid is None:
        return False
    state = process_state(pid)  # not os.waitpid: reaping the server is multiprocessing's to do
    return state is None or state in ("Z", "X")


ALIVE_FILE = "owner.alive"  # in a folder of leftovers-to-be: locked (flock) while the process that made it lives


def hold_while_alive(folder: str) -> int:
    """Put ``folder/owner.alive`` there locked (``flock``) for as long as this process lives: the kernel releases
    the lock however the process ends, SIGKILL included. Return its descriptor (closing it releases the lock).

    The file is made and locked under a name of its own, then renamed: a driver cleaning up meanwhile never finds
    it unlocked (it would remove a live folder, such as the fork server's). Where the file system refuses the lock
    (NFS without its lock daemon), the folder gets no ``owner.alive`` and the result is -1: it is then judged as
    an earlier version's folders are, by :func:`process_gone` (a lock folder) or not at all (unmarked)."""
    fd, staging = tempfile.mkstemp(prefix=f".{ALIVE_FILE}-", dir=folder)  # 0600, closed on exec
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        os.close(fd)
        os.unlink(staging)
        return -1
    os.rename(staging, os.path.join(folder, ALIVE_FILE))
    return fd


def owner_gone(folder: str | Path, pid: int) -> bool:
    """Whether the process that made ``folder`` (its pid ``pid``) is gone: nothing holds the lock on its
    ``owner.alive`` (:func:`hold_while_alive`). That holds across pid namespaces (containers sharing a temporary
    directory, where another's live pid looks gone) and after a pid is reused. A folder without the file, made by
    an earlier version, is judged by :func:`process_gone`."""
    free = alive_lock_free(folder)
    return process_gone(pid) if free is None else free


def alive_lock_free(folder: str | Path) -> bool | None:
    """Whether ``folder/owner.alive`` is there and unlocked (True: its owner is gone), locked or unreadable (False),
    or missing (None)."""
    return flock_free(os.path.join(folder, ALIVE_FILE))


def flock_free(path: str | Path) -> bool | None:
    """Whether nothing holds an ``flock`` on the file ``path`` (True: a process that kept it locked while it lived
    is gone), something does or it cannot be read (False), or it is missing (None)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        return False  # another user's, or unreadable: not ours to judge
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held (BlockingIOError), or a file system without flock: alive as far as we can tell
        return False
    finally:
        os.close(fd)
    return True


def file_owner_gone(path: str | Path, *, locked: bool, pid: int) -> bool:
    """Whether the process that made the file ``path`` is gone: by the ``flock`` it held on the file while it lived,
    where it took one (``locked``: free means gone; unreadable or removed meanwhile, not), else by its ``pid``
    (:func:`process_gone`; pid 0, a file still being made, is never gone)."""
    return flock_free(path) is True if locked else process_gone(pid)


_held_temp_dir: list[int] = []  # the descriptor that marks this process's multiprocessing folder alive


def _mark_temp_dir_alive() -> None:
    """Mark the folder ``multiprocessing`` keeps the fork server's socket in (``pymp-*`` in the temporary
    directory, removed at a normal exit) as this process's while it lives, so that a later driver can remove it
    after a SIGKILL (:func:`remove_dead_temp_dirs`)."""
    if not _held_temp_dir:
        _held_temp_dir.append(hold_while_alive(multiprocessing.util.get_temp_dir()))


def remove_dead_temp_dirs() -> int:
    """Remove the ``pymp-*`` folders that a downpour driver marked (:func:`_mark_temp_dir_alive`) and that outlived
    it (killed with SIGKILL, it could not remove its own); return how many. Unmarked ones are not ours."""
    removed = 0
    for marker in Path(tempfile.gettempdir()).glob(f"pymp-*/{ALIVE_FILE}"):
        if alive_lock_free(marker.parent):
            shutil.rmtree(marker.parent, ignore_errors=True)
            removed += not marker.parent.exists()
    return removed


def driver_alive() -> bool:
    """In a worker: whether the process that started it still holds the pipe ``multiprocessing`` keeps to each
    child (closed by the driver's death), whoever the worker's parent is. True outside a started child."""
    parent = multiprocessing.parent_process()
    return parent is None or parent.is_alive()


def adopt_environment(environment: dict[str, str]) -> None:
    """In a worker: take the driver's environment as it was when the worker was started. A forked worker
    inherits the fork server's, which is the driver's as it was when the server started; a spawned one inherits
    the driver's already, so this changes nothing there. Variables that libraries read once, when torch is
    imported (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``), keep the fork server's values; a worker sets its thread
    count itself (``cluster.threads_per_worker``)."""
    if dict(os.environ) != environment:
        os.environ.clear()
        os.environ.update(environment)
