#!/usr/bin/env bash
# Evaluate one training run on the math benchmarks, then the report (see scripts/eval_run.sh).
#   bash scripts/eval_math.sh RUN_DIR BASE_MODEL [extra flags for math_evaluate.py]
exec bash "$(dirname "$0")/eval_run.sh" math "$@"
