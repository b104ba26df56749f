"""``python -m downpour`` is the ``downpour`` command."""

from downpour.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
