"""Routing process signals for the length of a block, for the driver and the local backend alike."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable, Iterator
from typing import Any


@contextlib.contextmanager
def routed(handler: Any, signals: Iterable[signal.Signals] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Send ``signals`` to ``handler`` (a function, ``SIG_IGN`` or ``SIG_DFL``) inside the block, then restore them.

    Outside the main thread Python cannot set handlers: the block then runs with the signals as they were.
    """
    try:
        previous = {sig: signal.signal(sig, handler) for sig in signals}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def process_gone(pid: int) -> bool:
    """Whether no process ``pid`` exists on this machine (one that signal 0 cannot reach, another user's, counts as
    existing): the test for leftovers of a killed driver that nobody else may still be using."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


_HELD = {"depth": 0, "pending": False}  # interrupts_held: how deep, and whether a signal came meanwhile


def as_interrupt(signum: int, frame: Any) -> None:
    """A handler for :func:`routed` that raises ``KeyboardInterrupt``: the signal stops a run as Ctrl-C does (at
    the end of an :func:`interrupts_held` block, when it arrives inside one)."""
    if _HELD["depth"]:
        _HELD["pending"] = True
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold :func:`as_interrupt`'s ``KeyboardInterrupt`` until the block ends: for short work that must not stop
    half done (push records received from the workers but not yet written would be lost). Main thread only, as
    signal handlers are."""
    _HELD["depth"] += 1
    try:
        yield
    finally:
        _HELD["depth"] -= 1
        if _HELD["depth"] == 0 and _HELD["pending"]:
            _HELD["pending"] = False
            raise KeyboardInterrupt


class StopRequest:
    """A handler for :func:`routed` that only records the signal: the work in progress finishes, and the caller,
    which asks :meth:`requested` between pieces of work, then stops and keeps what was done."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def requested(self) -> bool:
        """Whether a signal asked to stop."""
        return self.signal is not None
