"""``python -m ptlab.cli``: the ``ptlab`` console script."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
