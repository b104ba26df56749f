"""Benchmarks behind ``downpour bench``: each measures side by side in one run and prints a table or ``--json``."""
