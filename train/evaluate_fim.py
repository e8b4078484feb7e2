"""``python -m train.evaluate_fim``: fill-in-the-middle on HumanEval; lives in ``train.evaluation.fim``."""

import sys

from train.evaluation.fim import main

if __name__ == "__main__":
    sys.exit(main())
