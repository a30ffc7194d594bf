#!/usr/bin/env bash
# Set up (if needed) and run the main job with defaults sized for a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -f examples/train_grpo.py ]; then
  exec .venv/bin/python examples/train_grpo.py "$@"
fi
# Until the GRPO learner lands (issue #6), the main job is the env demo.
exec .venv/bin/python examples/env_demo.py "$@"
