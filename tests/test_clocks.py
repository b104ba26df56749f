"""SharedClocks: the SSP gate of the local backend."""

from __future__ import annotations

import threading
import time

import pytest

from downpour.ps.clocks import SharedClocks


def test_a_worker_ahead_by_more_than_the_bound_waits_for_the_slowest() -> None:
    clocks = SharedClocks(2, bound=1)
    clocks.tick(0)
    assert clocks.wait_turn(0, lambda: False)  # 1 ahead: allowed with bound 1
    clocks.tick(0)
    released = threading.Event()

    def ahead() -> None:
        clocks.wait_turn(0, lambda: False)  # 2 ahead: must wait until worker 1 advances
        released.set()

    thread = threading.Thread(target=ahead)
    thread.start()
    time.sleep(0.05)
    assert not released.is_set()
    clocks.tick(1)
    thread.join(timeout=2)
    assert released.is_set()


def test_waiting_ends_when_asked_to_stop_and_a_retired_worker_holds_no_one_back() -> None:
    clocks = SharedClocks(3, bound=0)
    clocks.tick(0)
    assert clocks.wait_turn(0, lambda: True) is False  # blocked, then asked to stop
    clocks.retire(1)
    clocks.retire(2)
    assert clocks.wait_turn(0, lambda: False)  # the others are gone: nobody to wait for


def test_a_negative_bound_is_refused() -> None:
    with pytest.raises(ValueError, match="Invalid staleness bound: -1"):
        SharedClocks(2, bound=-1)
