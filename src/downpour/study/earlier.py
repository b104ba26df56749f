"""A study writes its report over an earlier one in ``--out`` only when that one had the same settings."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from downpour.errors import DownpourError
from downpour.rundir import read_json_object


def as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples as lists, other objects as their text), for comparisons."""
    return json.loads(json.dumps(value, default=str))


def check_earlier(path: Path, same: Callable[[dict[str, Any]], bool]) -> None:
    """Refuse, before any run, to replace the results at ``path`` (``results.json``, ``optima.json``) unless
    ``same`` says they were made with these settings (rerunning a study is then repeating it); a file that is not
    a study's results is refused too. Nothing else in its folder is read."""
    if not path.exists():
        return
    earlier = read_results(path)
    if earlier is None or not same(earlier):
        raise DownpourError(f"{path.parent} holds the results of another study or of other settings ({path.name}): "
                            "use another --out (a study replaces only its own results, made with the same "
                            "settings)")  # fmt: skip


def read_results(path: Path) -> dict[str, Any] | None:
    """The study results at ``path`` (``results.json``, ``optima.json``), or None where there are none readable."""
    return read_json_object(path)


def complete_results(path: Path) -> bool:
    """Whether ``path`` holds a whole study's results (those written before ``complete`` was recorded did): a
    repeat cut short by Ctrl-C leaves them as they are."""
    results = read_results(path)
    return results is not None and bool(results.get("complete", True))
