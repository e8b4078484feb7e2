"""``python -m train.serve``: the OpenAI-compatible completion server; lives in ``train.inference.server``."""

import sys

from train.inference.server import main

if __name__ == "__main__":
    sys.exit(main())
