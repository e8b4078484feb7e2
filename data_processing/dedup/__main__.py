"""``python -m data_processing.dedup``: see ``data_processing/dedup/__init__.py``."""

import sys

from data_processing.dedup.cli import main

if __name__ == "__main__":
    sys.exit(main())
