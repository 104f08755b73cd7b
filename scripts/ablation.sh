#!/usr/bin/env bash
# Paper Table 4, component ablations, one run per variant in OUTPUT_ROOT/<variant>:
#   full         DenseLoRA as trained everywhere else (rank RANK)
#   freeze       shared encoder/decoder frozen (--train_shared False), at rank FREEZE_RANK (default 128, the
#                paper's: only the M matrices train, 0.03% of LLaMA-3-8B), alpha = 2 * FREEZE_RANK
#   only_matrix  no activation around the dense matrix M (--activation identity), rank RANK
#   bash scripts/ablation.sh MODEL RANK ALPHA OUTPUT_ROOT GPUS [flags]     (VARIANTS picks a subset)
#   e.g. bash scripts/ablation.sh llama3-8b 32 64 runs/ablation 0,1,2,3
source "$(dirname "$0")/_common.sh"
need_args 5 "MODEL RANK ALPHA OUTPUT_ROOT GPUS [flags]" "$@"
model=$1 rank=$2 alpha=$3 root=$4 gpus=$5
shift 5
freeze_rank=${FREEZE_RANK:-128}
[ "$freeze_rank" = 128 ] || echo "note: FREEZE_RANK=$freeze_rank departs from the paper's 128 (Table 4)" >&2
for variant in ${VARIANTS:-full freeze only_matrix}; do
  case "$variant" in
    full) run_experiment "$COMMONSENSE_DATA" "$model" "$rank" "$alpha" "$root/$variant" "$gpus" "$@" ;;
    freeze)
      run_experiment "$COMMONSENSE_DATA" "$model" "$freeze_rank" $((2 * freeze_rank)) "$root/$variant" "$gpus" \
        --train_shared False "$@"
      ;;
    only_matrix)
      run_experiment "$COMMONSENSE_DATA" "$model" "$rank" "$alpha" "$root/$variant" "$gpus" --activation identity "$@"
      ;;
    *) echo "error: unknown variant $variant (full, freeze, only_matrix)" >&2; exit 2 ;;
  esac
done
