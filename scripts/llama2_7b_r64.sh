#!/usr/bin/env bash
# Paper Table 1: DenseLoRA on llama2-7b, commonsense_170k, r=64, alpha=128.
#   bash scripts/llama2_7b_r64.sh [OUTPUT_DIR] [GPUS]     (defaults: runs/llama2-7b-r64, GPU 0)
source "$(dirname "$0")/_common.sh"
run_experiment "$COMMONSENSE_DATA" llama2-7b 64 128 "$(default_output "${1:-}" llama2-7b-r64)" "${2:-0}" "${@:3}"
