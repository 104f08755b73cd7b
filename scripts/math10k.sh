#!/usr/bin/env bash
# DenseLoRA on Math10K (paper Table 2).  Extra flags go to finetune.py.
#   bash scripts/math10k.sh MODEL RANK ALPHA OUTPUT_DIR GPUS [flags]
source "$(dirname "$0")/_common.sh"
run_experiment "$MATH_DATA" "$@"
