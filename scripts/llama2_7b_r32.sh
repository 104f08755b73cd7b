#!/usr/bin/env bash
# Paper Table 1: DenseLoRA on llama2-7b, commonsense_170k, r=32, alpha=64.
#   bash scripts/llama2_7b_r32.sh [OUTPUT_DIR] [GPUS]     (defaults: runs/llama2-7b-r32, GPU 0)
source "$(dirname "$0")/_common.sh"
run_experiment "$COMMONSENSE_DATA" llama2-7b 32 64 "$(default_output "${1:-}" llama2-7b-r32)" "${2:-0}" "${@:3}"
