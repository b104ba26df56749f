"""The parameter server as an algorithm: shards, update rules and the Downpour worker loop, no transport."""
