"""Backends: transport only — how shards and workers run and talk. The shard, rule and worker code is shared."""
