"""``python -m train.evaluate_humaneval``: HumanEval pass@k; lives in ``train.evaluation.humaneval``."""

import sys

from train.evaluation.humaneval import main

if __name__ == "__main__":
    sys.exit(main())
