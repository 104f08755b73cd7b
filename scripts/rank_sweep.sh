#!/usr/bin/env bash
# Paper Figure 4, accuracy against rank: DenseLoRA at each rank in RANKS (default "4 8 16 32 64"), alpha = 2r,
# one run per rank in OUTPUT_ROOT/r<rank>.
#   bash scripts/rank_sweep.sh MODEL OUTPUT_ROOT GPUS [flags]
source "$(dirname "$0")/_common.sh"
need_args 3 "MODEL OUTPUT_ROOT GPUS [flags]" "$@"
model=$1 root=$2 gpus=$3
shift 3
for rank in ${RANKS:-4 8 16 32 64}; do
  run_experiment "$COMMONSENSE_DATA" "$model" "$rank" $((2 * rank)) "$root/r$rank" "$gpus" "$@"
done
