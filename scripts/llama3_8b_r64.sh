#!/usr/bin/env bash
# Paper Table 1: DenseLoRA on llama3-8b, commonsense_170k, r=64, alpha=128.
#   bash scripts/llama3_8b_r64.sh [OUTPUT_DIR] [GPUS]     (defaults: runs/llama3-8b-r64, GPU 0)
source "$(dirname "$0")/_common.sh"
run_experiment "$COMMONSENSE_DATA" llama3-8b 64 128 "$(default_output "${1:-}" llama3-8b-r64)" "${2:-0}" "${@:3}"
