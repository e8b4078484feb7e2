"""``python -m train.report``: the run report (figures + HTML); lives in ``train.reports.run_report``."""

import sys

from train.reports.run_report import main

if __name__ == "__main__":
    sys.exit(main())
