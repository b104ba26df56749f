"""The argument type of every path the ``downpour`` command takes."""

from __future__ import annotations

import argparse
from pathlib import Path


def path_argument(text: str) -> Path:
    """``text`` as a :class:`~pathlib.Path`, refusing an empty one: ``Path("")`` is the current directory, so
    ``--out ""`` (an unset shell variable) would otherwise write a run or a report there."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (name a file or directory)")
    return Path(text)
