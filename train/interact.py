"""``python -m train.interact``: interactive completion in the terminal; lives in ``train.inference.interact``."""

import sys

from train.inference.interact import main

if __name__ == "__main__":
    sys.exit(main())
