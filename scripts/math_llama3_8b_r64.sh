#!/usr/bin/env bash
# Paper Table 2: DenseLoRA on llama3-8b, Math10K, r=64, alpha=128.
#   bash scripts/math_llama3_8b_r64.sh [OUTPUT_DIR] [GPUS]     (defaults: runs/math-llama3-8b-r64, GPU 0)
source "$(dirname "$0")/_common.sh"
run_experiment "$MATH_DATA" llama3-8b 64 128 "$(default_output "${1:-}" math-llama3-8b-r64)" "${2:-0}" "${@:3}"
