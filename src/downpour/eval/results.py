"""Where evaluation results live (``RUN_DIR/eval/``) and how they are written and shown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from downpour import rundir
from downpour.errors import DownpourError

# Why viz's gradient ascent may not raise a unit's response, as its warning and the report's note both say it
ASCENT_FAILURE_CAUSES = ("a diverged or broken network, a unit without a gradient, or one already saturated at its "
                         "random start")  # fmt: skip

EVAL_DIR = "eval"


def eval_dir(run_dir: Path) -> Path:
    """``RUN_DIR/eval``, created if needed (a file of that name is refused, naming it: mkdir said only "File
    exists")."""
    path = Path(run_dir) / EVAL_DIR
    if path.exists() and not path.is_dir():
        raise DownpourError(f"{path} is not a folder: evaluation results are written into RUN_DIR/{EVAL_DIR}/ (move "
                            "that file away)")  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_result(run_dir: Path, name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as ``RUN_DIR/eval/<name>.json`` (the file the report reads); return its path."""
    path = eval_dir(run_dir) / f"{name}.json"
    rundir.write_json(path, payload)
    return path


def read_result(run_dir: Path, name: str) -> dict[str, Any] | None:
    """``RUN_DIR/eval/<name>.json`` if it exists and is valid JSON, else None."""
    return rundir.read_json_object(Path(run_dir) / EVAL_DIR / f"{name}.json")


def print_rows(title: str, columns: list[str], rows: list[list[str]], console: Console) -> None:
    """A rich table: first column left-aligned, the others right-aligned. Every string is shown as it is: a run
    directory ``runs/[v2]`` in the title is not taken for rich markup."""
    table = Table(title=escape(title))
    for index, column in enumerate(columns):
        table.add_column(escape(column), justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*map(escape, row))
    console.print(table)
