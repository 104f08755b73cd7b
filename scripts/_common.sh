# shellcheck shell=bash
# Sourced by the experiment scripts: the paper's training recipe and the launcher, in one place.
#
# Defaults are the published settings (paper Tables 5-6, Appendix A.2): 2 epochs, AdamW at 3e-4 with a linear
# schedule after 100 warm-up steps, global batch 16, dropout 0.05, Q/K/V/Up/Down, alpha = 2r. Any value can be
# overridden from the environment (EPOCHS=3 LR=1e-4 ...); an override that departs from the paper is reported on
# stderr, so a log always says whether a run was the published recipe.
#
# DRY_RUN=1: print each resolved finetune.py command (one per line, shell-quoted) and exit 0 without loading
# anything, to check a plan before spending GPU hours.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
COMMONSENSE_DATA=${COMMONSENSE_DATA:-ft-training_set/commonsense_170k.json}
MATH_DATA=${MATH_DATA:-ft-training_set/math_10k.json}

# The published values (dense_lora/paper/results.json "hyperparameters"; tests/test_recipes.py checks both agree).
PAPER_EPOCHS=2
PAPER_LR=3e-4
PAPER_BATCH_SIZE=16
PAPER_WARMUP=100
PAPER_DROPOUT=0.05
PAPER_TARGETS=q_proj,k_proj,v_proj,up_proj,down_proj

# note_deviation NAME VALUE PAPER_VALUE: one stderr line when an override departs from the published value.
note_deviation() {
  if [ "$2" != "$3" ]; then
    echo "note: $1=$2 departs from the paper's $3 (Tables 5-6)" >&2
  fi
}

# set_recipe: the recipe into the global array RECIPE (a function, not a subshell, so a bad setting stops the script).
set_recipe() {
  local epochs=${EPOCHS:-$PAPER_EPOCHS} lr=${LR:-$PAPER_LR} batch=${BATCH_SIZE:-$PAPER_BATCH_SIZE}
  local warmup=${WARMUP:-$PAPER_WARMUP} dropout=${DROPOUT:-$PAPER_DROPOUT} targets=${TARGET_MODULES:-$PAPER_TARGETS}
  note_deviation EPOCHS "$epochs" "$PAPER_EPOCHS"
  note_deviation LR "$lr" "${RECIPE_LR:-$PAPER_LR}"
  note_deviation BATCH_SIZE "$batch" "$PAPER_BATCH_SIZE"
  note_deviation WARMUP "$warmup" "$PAPER_WARMUP"
  note_deviation DROPOUT "$dropout" "$PAPER_DROPOUT"
  # Target subsets are the point of the granularity sweep (Table 3), which sets RECIPE_TARGETS to say so.
  note_deviation TARGET_MODULES "$targets" "${RECIPE_TARGETS:-$PAPER_TARGETS}"
  RECIPE=(
    --batch_size "$batch" --micro_batch_size "${MICRO_BATCH_SIZE:-4}" --num_epochs "$epochs"
    --learning_rate "$lr" --warmup_steps "$warmup" --cutoff_len "${CUTOFF_LEN:-256}"
    --val_set_size "${VAL_SET_SIZE:-120}" --eval_step "${EVAL_STEP:-80}" --save_step "${SAVE_STEP:-80}"
    --lora_dropout "$dropout" --target_modules "$targets" --seed "${SEED:-42}"
  )
  if [ "${GRADIENT_CHECKPOINTING:-1}" = 1 ]; then
    RECIPE+=(--use_gradient_checkpointing)
  fi
  case "${PRECISION:-bf16}" in
    bf16) RECIPE+=(--bf16) ;;
    fp16) RECIPE+=(--fp16) ;;
    fp32) ;;
    *) echo "error: PRECISION must be bf16, fp16 or fp32, got ${PRECISION}" >&2; exit 2 ;;
  esac
}

# quote_args ARGS...: the arguments as one shell line, quoting only those that need it.
quote_args() {
  local arg out=()
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./,:=@+%-]+$ ]]; then out+=("$arg"); else out+=("$(printf '%q' "$arg")"); fi
  done
  echo "${out[*]}"
}

# launch COMMAND...: run it, or with DRY_RUN=1 print it (with the CUDA devices it would see) on one stdout line.
launch() {
  if [ "${DRY_RUN:-0}" = 1 ]; then
    quote_args ${CUDA_VISIBLE_DEVICES+"CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"} "$@"
    return 0
  fi
  echo "+ $(quote_args "$@")" >&2
  "$@"
}

# run_finetune GPUS OUTPUT_DIR [finetune.py flags...]
# GPUS is a CUDA device list like "0" or "0,1"; several devices launch one DDP process per device with torchrun.
# "cpu" runs one process without CUDA. The global batch stays BATCH_SIZE whatever the number of processes.
run_finetune() {
  local gpus=$1 output_dir=$2
  shift 2
  local launcher=(python)
  if [ "$gpus" = cpu ]; then
    export CUDA_VISIBLE_DEVICES=""
  else
    export CUDA_VISIBLE_DEVICES=$gpus
    local devices
    IFS=, read -ra devices <<< "$gpus"
    if [ "${#devices[@]}" -gt 1 ]; then
      launcher=(torchrun --nproc_per_node "${#devices[@]}" --master_port "${MASTER_PORT:-29500}")
    fi
  fi
  set_recipe
  launch "${launcher[@]}" "$REPO_ROOT/finetune.py" --output_dir "$output_dir" "${RECIPE[@]}" "$@"
}

# need_args COUNT USAGE "$@": stop with "usage: <script> USAGE" (exit 2) unless at least COUNT arguments were given.
need_args() {
  local count=$1 usage=$2
  shift 2
  if [ $# -lt "$count" ]; then
    echo "usage: $(basename "$0") $usage" >&2
    exit 2
  fi
}

# run_experiment DATA MODEL RANK ALPHA OUTPUT_DIR GPUS [finetune.py flags...]
run_experiment() {
  need_args 6 "MODEL RANK ALPHA OUTPUT_DIR GPUS [finetune.py flags]" "$@"
  local data=$1 model=$2 rank=$3 alpha=$4 output_dir=$5 gpus=$6
  shift 6
  if [ "$alpha" != $((2 * rank)) ]; then
    echo "note: alpha=$alpha departs from the paper's alpha = 2r = $((2 * rank))" >&2
  fi
  run_finetune "$gpus" "$output_dir" --base_model "$model" --data_path "$data" --lora_r "$rank" --lora_alpha "$alpha" "$@"
}

# default_output GIVEN NAME: the output folder of a fixed-setting script, runs/NAME unless one was given.
default_output() { echo "${1:-runs/$2}"; }
