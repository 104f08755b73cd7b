#!/usr/bin/env bash
# LoRA / DoRA baselines (paper Tables 1-2) with real peft, in the same harness and recipe as DenseLoRA.
#   bash scripts/baseline.sh lora|dora MODEL RANK ALPHA OUTPUT_DIR GPUS [flags]
# The paper quotes its LoRA/DoRA rows from DoRA (Liu et al., 2024), whose released scripts train at 1e-4 on
# LLaMA-3-8B and 2e-4 on LLaMA-2-7B: those are this script's defaults (LR overrides). DATA=math selects
# Math10K instead of commonsense_170k.
source "$(dirname "$0")/_common.sh"
if [ $# -lt 6 ] || { [ "$1" != lora ] && [ "$1" != dora ]; }; then
  echo "usage: $(basename "$0") lora|dora MODEL RANK ALPHA OUTPUT_DIR GPUS [flags]" >&2
  exit 2
fi
method=$1 model=$2
shift
case "$model" in
  *llama3* | *Llama-3*) RECIPE_LR=1e-4 ;;
  *llama2* | *Llama-2*) RECIPE_LR=2e-4 ;;
  *) RECIPE_LR=$PAPER_LR ;;
esac
LR=${LR:-$RECIPE_LR}
data=$COMMONSENSE_DATA
[ "${DATA:-commonsense}" = math ] && data=$MATH_DATA
run_experiment "$data" "$@" --method "$method"
