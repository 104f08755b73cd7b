#!/usr/bin/env bash
# Paper Table 1: DenseLoRA on llama2-7b, commonsense_170k, r=16, alpha=32.
#   bash scripts/llama2_7b_r16.sh [OUTPUT_DIR] [GPUS]     (defaults: runs/llama2-7b-r16, GPU 0)
source "$(dirname "$0")/_common.sh"
run_experiment "$COMMONSENSE_DATA" llama2-7b 16 32 "$(default_output "${1:-}" llama2-7b-r16)" "${2:-0}" "${@:3}"
