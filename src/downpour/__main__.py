"""``python -m downpour`` is the ``downpour`` command."""

from downpour.cli import entry

if __name__ == "__main__":
    entry()
