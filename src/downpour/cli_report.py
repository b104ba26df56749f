"""``downpour report RUN_DIR [--out FILE]``: write the run's self-contained HTML page."""

from __future__ import annotations

import argparse

from rich.console import Console

from downpour.cli_paths import path_argument


def add_report(sub: argparse._SubParsersAction) -> None:
    """The ``report`` command."""
    p = sub.add_parser("report", help="one self-contained HTML page about a run", description=__doc__)
    p.add_argument("run_dir", type=path_argument, metavar="RUN_DIR", help="a run directory written by downpour train")
    p.add_argument("--out", type=path_argument, help="where to write the page (default: RUN_DIR/report.html)")


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    """Write the report and print its path."""
    from downpour.report.html import write_report

    path = write_report(args.run_dir, args.out)
    print(f"report written to {path}")
    return 0
