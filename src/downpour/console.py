"""What the commands tell the user on the rich console (stderr), besides their results."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape


def warn(console: Console, text: str) -> None:
    """``warning: TEXT`` in yellow on one line, however long (a narrow terminal or a pipe does not break it, so it
    can be grepped), and ``TEXT`` as it is: a ``[`` in a path or a list is not taken for rich markup."""
    console.print(f"[yellow]warning: {escape(text)}[/]", soft_wrap=True)
