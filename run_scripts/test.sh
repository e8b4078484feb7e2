#!/usr/bin/env bash
# Install (once) and run the whole test suite plus the linter. Extra args go to pytest,
# e.g. `bash run_scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
source run_scripts/setup_env.sh
ruff check .
# Two workers: much of the suite is XLA compilation, which is mostly single-threaded.
python -m pytest -q -n 2 --durations=15 "$@"
