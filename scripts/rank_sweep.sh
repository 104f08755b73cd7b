#!/usr/bin/env bash
# Paper Figure 4, accuracy against rank: DenseLoRA at each rank in RANKS, alpha = 2r, one run per rank in
# OUTPUT_ROOT/r<rank>. RANKS default: 16 32 64 128 256 512, the span of the paper's figure.
#   bash scripts/rank_sweep.sh MODEL OUTPUT_ROOT GPUS [flags]
source "$(dirname "$0")/_common.sh"
need_args 3 "MODEL OUTPUT_ROOT GPUS [flags]" "$@"
model=$1 root=$2 gpus=$3
shift 3
for rank in ${RANKS:-16 32 64 128 256 512}; do
  run_experiment "$COMMONSENSE_DATA" "$model" "$rank" $((2 * rank)) "$root/r$rank" "$gpus" "$@"
done
