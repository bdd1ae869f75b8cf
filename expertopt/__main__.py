"""``python -m expertopt``: see :mod:`expertopt.cli`."""

import sys

from expertopt.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
