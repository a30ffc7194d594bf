#!/usr/bin/env bash
# Set up (if needed) and run the main job, examples/train_grpo.py, with defaults sized for a 2-core CPU
# (~6 minutes: expert demos -> SFT warm start -> GRPO with offline regularization -> before/after evaluation;
# `bash scripts/train.sh --obs-mode rgb` is the same from pixels).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python examples/train_grpo.py "$@"
