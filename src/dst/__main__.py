"""``python -m dst``: the same as the ``dst`` command."""

import sys

from dst.cli import main

if __name__ == "__main__":
    sys.exit(main())
