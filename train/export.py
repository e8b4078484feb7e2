"""``python -m train.export``: export a run as a Hugging Face folder; lives in ``train.interop.export``."""

import sys

from train.interop.export import main

if __name__ == "__main__":
    sys.exit(main())
