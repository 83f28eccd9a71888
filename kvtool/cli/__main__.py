"""``python -m kvtool.cli``: the ``kvtool`` command."""

from kvtool.cli import main

if __name__ == "__main__":  # pragma: no cover
    main()
