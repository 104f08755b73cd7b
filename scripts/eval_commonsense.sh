#!/usr/bin/env bash
# Evaluate one training run on the commonsense benchmarks, then the report (see scripts/eval_run.sh).
#   bash scripts/eval_commonsense.sh RUN_DIR BASE_MODEL [extra flags for commonsense_evaluate.py]
exec bash "$(dirname "$0")/eval_run.sh" commonsense "$@"
