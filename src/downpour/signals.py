"""Routing process signals for the length of a block, for the driver and the local backend alike."""

from __future__ import annotations

import contextlib
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


def as_interrupt(signum: int, frame: Any) -> None:
    """A handler for :func:`routed` that raises ``KeyboardInterrupt``: the signal stops a run as Ctrl-C does."""
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
