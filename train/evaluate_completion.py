"""``python -m train.evaluate_completion``: keystrokes saved; lives in ``train.evaluation.completion``."""

import sys

from train.evaluation.completion import main

if __name__ == "__main__":
    sys.exit(main())
