#!/usr/bin/env bash
# DenseLoRA on commonsense_170k (paper Table 1).  Extra flags go to finetune.py.
#   bash scripts/commonsense.sh MODEL RANK ALPHA OUTPUT_DIR GPUS [flags]
#   e.g. bash scripts/commonsense.sh llama3-8b 32 64 runs/llama3-8b-r32 0,1
source "$(dirname "$0")/_common.sh"
run_experiment "$COMMONSENSE_DATA" "$@"
