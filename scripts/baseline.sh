#!/usr/bin/env bash
# LoRA / DoRA baselines (paper Tables 1-2) with real peft, in the same harness and recipe as DenseLoRA.
#   bash scripts/baseline.sh lora|dora MODEL RANK ALPHA OUTPUT_DIR GPUS [flags]
# Learning rate, as in DoRA's released scripts: 1e-4 on LLaMA-3-8B, 2e-4 on LLaMA-2-7B (LR overrides).
# DATA=math selects Math10K instead of commonsense_170k.
source "$(dirname "$0")/_common.sh"
if [ $# -lt 6 ] || { [ "$1" != lora ] && [ "$1" != dora ]; }; then
  echo "usage: $(basename "$0") lora|dora MODEL RANK ALPHA OUTPUT_DIR GPUS [flags]" >&2
  exit 2
fi
method=$1 model=$2
shift
case "$model" in
  *llama3* | *Llama-3*) LR=${LR:-1e-4} ;;
  *llama2* | *Llama-2*) LR=${LR:-2e-4} ;;
esac
data=$COMMONSENSE_DATA
[ "${DATA:-commonsense}" = math ] && data=$MATH_DATA
run_experiment "$data" "$@" --adapter_name "$method"
