#!/usr/bin/env bash
# Paper Table 2: DenseLoRA on llama3-8b, Math10K, r=32, alpha=64.
#   bash scripts/math_llama3_8b_r32.sh [OUTPUT_DIR] [GPUS]     (defaults: runs/math-llama3-8b-r32, GPU 0)
source "$(dirname "$0")/_common.sh"
run_experiment "$MATH_DATA" llama3-8b 32 64 "$(default_output "${1:-}" math-llama3-8b-r32)" "${2:-0}" "${@:3}"
