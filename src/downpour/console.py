"""What the commands tell the user on the rich console (stderr), besides their results. Each function shows its text
as it is (as :func:`downpour.eval.results.print_rows` shows a table's): a ``[`` in a path, a list or an error message
is never taken for rich markup (``runs/[v2]`` shown as ``runs/``, or ``mk[/]x`` ending a command in a MarkupError)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape


def say(console: Console, text: str, style: str = "yellow") -> None:
    """``TEXT`` in ``style`` on one line, however long (a narrow terminal or a pipe does not break it, so it can be
    grepped), and as it is: a ``[`` in a path, a list or an error message is not taken for rich markup."""
    console.print(f"[{style}]{escape(text)}[/]", soft_wrap=True)


def warn(console: Console, text: str) -> None:
    """``warning: TEXT`` in yellow, as :func:`say` prints it."""
    say(console, f"warning: {text}")


def show(console: Console, text: str) -> None:
    """``TEXT`` unstyled, as :func:`say` prints it (on one line, and as it is)."""
    console.print(escape(text), soft_wrap=True)
