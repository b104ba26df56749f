"""``downpour report RUN_DIR [--out FILE]``: write the run's self-contained HTML page."""

from __future__ import annotations

import argparse

from rich.console import Console

from downpour.cli_paths import path_argument
from downpour.errors import NESTS_TOO_DEEPLY, DownpourError, nests_too_deeply


def add_report(sub: argparse._SubParsersAction) -> None:
    """The ``report`` command."""
    p = sub.add_parser("report", help="one self-contained HTML page about a run", description=__doc__)
    p.add_argument("run_dir", type=path_argument, metavar="RUN_DIR", help="a run directory written by downpour train")
    p.add_argument("--out", type=path_argument, help="where to write the page (default: RUN_DIR/report.html)")


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    """Write the report and print its path."""
    from downpour.report.html import write_report

    try:
        path = write_report(args.run_dir, args.out)
    except RecursionError as exc:  # the report's readers take other unreadable JSON for a note on the page
        if not nests_too_deeply(exc):
            raise
        raise DownpourError(f"cannot write the report of {args.run_dir}: one of its JSON files (summary.json, "
                            f"metrics.jsonl, eval/*.json) {NESTS_TOO_DEEPLY}") from None  # fmt: skip
    print(f"report written to {path}")
    return 0
