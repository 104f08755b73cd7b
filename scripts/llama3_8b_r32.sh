#!/usr/bin/env bash
# Paper Table 1: DenseLoRA on llama3-8b, commonsense_170k, r=32, alpha=64.
#   bash scripts/llama3_8b_r32.sh [OUTPUT_DIR] [GPUS]     (defaults: runs/llama3-8b-r32, GPU 0)
source "$(dirname "$0")/_common.sh"
run_experiment "$COMMONSENSE_DATA" llama3-8b 32 64 "$(default_output "${1:-}" llama3-8b-r32)" "${2:-0}" "${@:3}"
