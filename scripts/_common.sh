# shellcheck shell=bash
# Sourced by the experiment scripts: the paper's training recipe and the launcher, in one place.
# Every value can be overridden from the environment, e.g. EPOCHS=2 MICRO_BATCH_SIZE=16 bash scripts/...
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
COMMONSENSE_DATA=${COMMONSENSE_DATA:-ft-training_set/commonsense_170k.json}
MATH_DATA=${MATH_DATA:-ft-training_set/math_10k.json}

# The LLM-Adapters / DenseLoRA recipe (docs/training.md explains each choice, e.g. 3 epochs vs the authors' 2),
# into the global array RECIPE (a function, not a subshell, so a bad setting stops the script).
set_recipe() {
  RECIPE=(
    --batch_size "${BATCH_SIZE:-16}" --micro_batch_size "${MICRO_BATCH_SIZE:-4}" --num_epochs "${EPOCHS:-3}"
    --learning_rate "${LR:-3e-4}" --cutoff_len "${CUTOFF_LEN:-256}" --val_set_size "${VAL_SET_SIZE:-120}"
    --eval_step "${EVAL_STEP:-80}" --save_step "${SAVE_STEP:-80}" --lora_dropout "${DROPOUT:-0.05}"
    --target_modules "${TARGET_MODULES:-q_proj,k_proj,v_proj,up_proj,down_proj}" --seed "${SEED:-42}"
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
  echo "+ ${launcher[*]} finetune.py --output_dir $output_dir ${RECIPE[*]} $*" >&2
  "${launcher[@]}" "$REPO_ROOT/finetune.py" --output_dir "$output_dir" "${RECIPE[@]}" "$@"
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
  run_finetune "$gpus" "$output_dir" --base_model "$model" --data_path "$data" --lora_r "$rank" --lora_alpha "$alpha" "$@"
}

# default_output GIVEN NAME: the output folder of a fixed-setting script, runs/NAME unless one was given.
default_output() { echo "${1:-runs/$2}"; }
