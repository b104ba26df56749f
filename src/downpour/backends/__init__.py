"""Backends: transport only — how shards and workers run and talk. The shard, rule and worker code is shared."""

from __future__ import annotations

import importlib.util

from downpour.errors import DownpourError


def ray_missing(what: str = 'cluster.backend = "ray"') -> DownpourError:
    """The error for ``what`` when Ray is not installed: it names the extra to install."""
    return DownpourError(f"{what} needs Ray: pip install 'downpour-sgd[ray]'")


def require_ray(what: str = 'cluster.backend = "ray"') -> None:
    """Raise :func:`ray_missing` unless Ray is installed; checked without importing it (about 2 s), so that a command
    can refuse before it writes anything."""
    if importlib.util.find_spec("ray") is None:
        raise ray_missing(what)
