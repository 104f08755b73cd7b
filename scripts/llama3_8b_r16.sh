#!/usr/bin/env bash
# Paper Table 1: DenseLoRA on llama3-8b, commonsense_170k, r=16, alpha=32.
#   bash scripts/llama3_8b_r16.sh [OUTPUT_DIR] [GPUS]     (defaults: runs/llama3-8b-r16, GPU 0)
source "$(dirname "$0")/_common.sh"
run_experiment "$COMMONSENSE_DATA" llama3-8b 16 32 "$(default_output "${1:-}" llama3-8b-r16)" "${2:-0}" "${@:3}"
