"""SharedClocks: the SSP gate of the local backend, and the roster of live workers under sync."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from downpour.ps.clocks import SharedClocks

WAIT_S = 2.0  # how long a wait that should return at once may take before the test calls it blocked


def _give_up_after(seconds: float) -> Callable[[], bool]:
    """A ``should_stop`` that comes true ``seconds`` from now: a wait_turn that wrongly blocks returns False then,
    so the test fails instead of hanging."""
    deadline = time.monotonic() + seconds
    return lambda: time.monotonic() > deadline


def test_a_worker_ahead_by_more_than_the_bound_waits_for_the_slowest() -> None:
    """Bound 1: a worker 1 clock ahead may start (1 − 0 ≤ 1); 2 ahead it waits until the slowest one ticks."""
    clocks = SharedClocks(2, bound=1)
    clocks.tick(0)
    assert clocks.wait_turn(0, _give_up_after(WAIT_S))  # 1 ahead: allowed with bound 1
    clocks.tick(0)
    released, results = threading.Event(), []

    def ahead() -> None:
        results.append(clocks.wait_turn(0, _give_up_after(10 * WAIT_S)))  # 2 ahead: waits for worker 1
        released.set()

    thread = threading.Thread(target=ahead, daemon=True)
    thread.start()
    time.sleep(0.05)
    assert not released.is_set()
    clocks.tick(1)
    thread.join(timeout=WAIT_S)
    assert released.is_set() and results == [True]


def test_waiting_ends_when_asked_to_stop_and_a_retired_worker_holds_no_one_back() -> None:
    """Bound 0: a worker 1 ahead is blocked, and returns False once asked to stop; once the others retire, nobody
    holds it back (its clock is the minimum) and it may start at once."""
    clocks = SharedClocks(3, bound=0)
    clocks.tick(0)
    assert clocks.wait_turn(0, lambda: True) is False  # blocked, then asked to stop
    clocks.retire(1)
    clocks.retire(2)
    assert clocks.wait_turn(0, _give_up_after(WAIT_S))  # the others are gone: nobody to wait for


def test_a_worker_level_with_the_slowest_never_waits() -> None:
    """c − min(clocks) ≤ bound lets a worker start: at bound 0 a worker level with the slowest starts at once, and
    at bound 2 one exactly 2 ahead does too (a wait only from 3 ahead). Each wait is told to give up after a while,
    so a gate that blocks one clock too early fails here rather than hanging the suite."""
    clocks = SharedClocks(2, bound=0)
    assert clocks.wait_turn(0, _give_up_after(WAIT_S))  # both at clock 0
    clocks.tick(0)
    clocks.tick(1)
    assert clocks.wait_turn(1, _give_up_after(WAIT_S))  # both at clock 1
    wide = SharedClocks(2, bound=2)
    wide.tick(0)
    wide.tick(0)
    assert wide.wait_turn(0, _give_up_after(WAIT_S))  # 2 ahead, bound 2
    wide.tick(0)
    assert wide.wait_turn(0, lambda: True) is False  # 3 ahead: it would wait


def test_live_counts_the_workers_not_retired() -> None:
    """Under sync a round waits for min(N − b, live workers): live() counts the workers whose clock is not the
    retired mark, whatever their clocks. Three workers, one retired → 2; all retired → 0."""
    clocks = SharedClocks(3, bound=0)
    assert clocks.live() == 3
    clocks.tick(0)
    clocks.retire(1)
    assert clocks.live() == 2
    clocks.retire(0)
    clocks.retire(2)
    assert clocks.live() == 0


def test_a_negative_bound_is_refused() -> None:
    """A staleness bound below 0 could never let any worker start: refused at construction."""
    with pytest.raises(ValueError, match="Invalid staleness bound: -1"):
        SharedClocks(2, bound=-1)
