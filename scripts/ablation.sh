#!/usr/bin/env bash
# Paper Table 4, component ablations, one run per variant in OUTPUT_ROOT/<variant>:
#   full         DenseLoRA as trained everywhere else
#   freeze       shared encoder/decoder frozen at their initialisation (--train_shared False)
#   only_matrix  no activation around the dense matrix M (--activation identity)
#   bash scripts/ablation.sh MODEL RANK ALPHA OUTPUT_ROOT GPUS [flags]     (VARIANTS picks a subset)
source "$(dirname "$0")/_common.sh"
need_args 5 "MODEL RANK ALPHA OUTPUT_ROOT GPUS [flags]" "$@"
model=$1 rank=$2 alpha=$3 root=$4 gpus=$5
shift 5
for variant in ${VARIANTS:-full freeze only_matrix}; do
  case "$variant" in
    full) flags=() ;;
    freeze) flags=(--train_shared False) ;;
    only_matrix) flags=(--activation identity) ;;
    *) echo "error: unknown variant $variant" >&2; exit 2 ;;
  esac
  run_experiment "$COMMONSENSE_DATA" "$model" "$rank" "$alpha" "$root/$variant" "$gpus" "${flags[@]}" "$@"
done
