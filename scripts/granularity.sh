#!/usr/bin/env bash
# Paper Table 3, tuning granularity: which modules DenseLoRA adapts, and mixed DenseLoRA + per-layer LoRA.
#   bash scripts/granularity.sh MODEL RANK ALPHA OUTPUT_ROOT GPUS [flags]
# One run per variant in OUTPUT_ROOT/<variant>; VARIANTS picks a subset (default: all five):
#   qkv          DenseLoRA on q,k,v
#   ud           DenseLoRA on up,down
#   qkvud        DenseLoRA on q,k,v,up,down (the paper's default)
#   qkv+lora_ud  DenseLoRA on q,k,v; plain LoRA (rank r) on up,down, in the same adapter
#   lora_qkv+ud  plain LoRA on q,k,v; DenseLoRA on up,down
source "$(dirname "$0")/_common.sh"
need_args 5 "MODEL RANK ALPHA OUTPUT_ROOT GPUS [flags]" "$@"
model=$1 rank=$2 alpha=$3 root=$4 gpus=$5
shift 5
for variant in ${VARIANTS:-qkv ud qkvud qkv+lora_ud lora_qkv+ud}; do
  case "$variant" in
    qkv) flags=(--target_modules q_proj,k_proj,v_proj) ;;
    ud) flags=(--target_modules up_proj,down_proj) ;;
    qkvud) flags=() ;;
    qkv+lora_ud) flags=(--lora_modules up_proj,down_proj) ;;
    lora_qkv+ud) flags=(--lora_modules q_proj,k_proj,v_proj) ;;
    *) echo "error: unknown variant $variant" >&2; exit 2 ;;
  esac
  # A later --target_modules would repeat the recipe's flag; pass the variant's through the environment instead.
  if [ "${flags[0]:-}" = --target_modules ]; then
    TARGET_MODULES=${flags[1]} RECIPE_TARGETS=${flags[1]} run_experiment "$COMMONSENSE_DATA" "$model" "$rank" "$alpha" "$root/$variant" "$gpus" "$@"
  else
    run_experiment "$COMMONSENSE_DATA" "$model" "$rank" "$alpha" "$root/$variant" "$gpus" "${flags[@]}" "$@"
  fi
done
