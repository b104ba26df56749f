"""How the flat parameter vector is cut into shards (a replaceable function, as key slicing is in ps-lite)."""

from __future__ import annotations

from downpour.errors import ConfigError


def contiguous_bounds(num_params: int, num_shards: int) -> list[tuple[int, int]]:
    """Split ``range(num_params)`` into ``num_shards`` contiguous ``(start, stop)`` ranges of near-equal size.

    The first ``num_params % num_shards`` shards are one element longer. Every shard holds at least one parameter.
    """
    if num_shards < 1:
        raise ConfigError(f"invalid ps.shards: {num_shards!r} (must be at least 1)")
    if num_shards > num_params:
        raise ConfigError(f"invalid ps.shards: {num_shards!r} (more shards than the model's {num_params} parameters)")
    base, extra = divmod(num_params, num_shards)
    bounds, start = [], 0
    for index in range(num_shards):
        stop = start + base + (1 if index < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds
