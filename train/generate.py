"""``python -m train.generate``: sample from a run or a Hugging Face folder; lives in ``train.inference.decoding``."""

import sys

from train.inference.decoding import main

if __name__ == "__main__":
    sys.exit(main())
