"""``python -m kronix_data``: the ``kronix`` command line, for when the script is not on PATH."""

import sys

from .cli import main

if __name__ == "__main__":  # not when imported (spawned worker processes do not re-run it either)
    sys.exit(main())
