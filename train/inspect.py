"""``python -m train.inspect``: model inspection; lives in ``train.reports.model_inspect``."""

import sys

from train.reports.model_inspect import main

if __name__ == "__main__":
    sys.exit(main())
