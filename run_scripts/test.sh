#!/usr/bin/env bash
# Install (once) and run the whole test suite plus the linter. Extra args go to pytest,
# e.g. `bash run_scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
source run_scripts/setup_env.sh
ruff check .
# Import rules (pyproject.toml [tool.importlinter], docs/architecture.md): layers, no JAX under
# data_processing/ and tokenizer/, no cycles, no private names across modules.
lint-imports
# Two workers: much of the suite is XLA compilation, which is mostly single-threaded.
python -m pytest -q -n 2 --durations=15 "$@"
