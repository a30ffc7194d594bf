#!/usr/bin/env bash
# Set up (if needed) and run the test suite: real LIBERO simulator, state mode, tiny models; two pytest-xdist
# workers (TEST_WORKERS; 0 runs the tests in this process), one a core, a test file each at a time (module fixtures
# stay shared).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
