"""``cluster.chaos``: a schedule of injected faults, e.g. ``"kill-worker:30s,kill-shard:60s"``.

Each comma-separated item is ``KIND:TIME``; ``KIND`` is ``kill-worker`` or ``kill-shard``, ``TIME`` is seconds after
the cluster started, written ``30``, ``30s``, ``1.5s`` or ``2m``. Parsing needs neither torch nor Ray, so that
:mod:`downpour.config` can validate the key when it reads a config.
"""

from __future__ import annotations

import math
import re

from downpour.errors import ConfigError

CHAOS_KINDS = ("kill-worker", "kill-shard")
_TIME = re.compile(r"^(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>s|m)?$")


def parse_chaos(text: str, *, key: str = "cluster.chaos") -> list[tuple[str, float]]:
    """``(kind, seconds)`` pairs of a chaos schedule, sorted by time; ``""`` is no faults.

    Raises :class:`ConfigError` naming ``key``, the whole value and the item at fault.
    """
    if not isinstance(text, str):
        raise ConfigError(f'invalid {key}: {text!r} (must be a string like "kill-worker:30s,kill-shard:60s")')
    events: list[tuple[str, float]] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            if text.strip():
                raise ConfigError(f"invalid {key}: {text!r} (empty item; separate KIND:TIME items with one comma)")
            continue
        kind, sep, when = item.partition(":")
        kind, when = kind.strip(), when.strip()
        if not sep or not when:
            raise ConfigError(f"invalid {key}: {text!r} (item {item!r} must be KIND:TIME, e.g. kill-worker:30s)")
        if kind not in CHAOS_KINDS:
            raise ConfigError(
                f"invalid {key}: {text!r} (unknown fault {kind!r}; choose one of {', '.join(CHAOS_KINDS)})"
            )
        match = _TIME.match(when)
        if match is None:
            raise ConfigError(
                f"invalid {key}: {text!r} (time {when!r} of {kind} must be a number of seconds >= 0: 30, 30s, 1.5s, 2m)"
            )
        seconds = float(match["number"]) * (60.0 if match["unit"] == "m" else 1.0)
        if not math.isfinite(seconds):
            raise ConfigError(f"invalid {key}: {text!r} (time {when!r} of {kind} is not finite)")
        events.append((kind, seconds))
    return sorted(events, key=lambda event: event[1])
