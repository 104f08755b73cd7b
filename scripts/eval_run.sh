#!/usr/bin/env bash
# Evaluate one training run on every benchmark of a family, then print/write the report.
#   bash scripts/eval_run.sh {commonsense|math} RUN_DIR BASE_MODEL [extra flags for the evaluate CLI]
# (scripts/eval_commonsense.sh and scripts/eval_math.sh call this.)
# Environment: DATASETS (default "all"; or a comma list), BATCH_SIZE (default 32 commonsense, 16 math),
#              NPROC (default 1; >1 launches torchrun), REPORT_RUNS (more run folders for the table),
#              DRY_RUN=1 (print the two commands, run nothing).
# Results go to RUN_DIR/eval/<dataset>.json(l); a rerun resumes. The report lands in RUN_DIR/eval/report.*.
source "$(dirname "$0")/_common.sh"
if [ $# -lt 3 ] || { [ "$1" != commonsense ] && [ "$1" != math ]; }; then
  echo "usage: $(basename "$0") {commonsense|math} RUN_DIR BASE_MODEL [extra flags]" >&2
  exit 2
fi
kind=$1 run_dir=$2 base_model=$3
shift 3
cd "$REPO_ROOT"
default_batch=32
[ "$kind" = math ] && default_batch=16
launcher=(python)
if [ "${NPROC:-1}" -gt 1 ]; then
  launcher=(torchrun --nproc_per_node "$NPROC")
fi
launch "${launcher[@]}" "${kind}_evaluate.py" --dataset "${DATASETS:-all}" --base_model "$base_model" \
  --lora_weights "$run_dir" --batch_size "${BATCH_SIZE:-$default_batch}" "$@"
# shellcheck disable=SC2086  # REPORT_RUNS is a list of folders
launch python -m dense_lora.report "$run_dir" ${REPORT_RUNS:-} --out "$run_dir/eval/report"
