"""``python -m train.metrics``: a run's metrics, as the run scripts check them; lives in ``train.core.metrics``."""

import sys

from train.core.metrics import main

if __name__ == "__main__":
    sys.exit(main())
