#!/usr/bin/env bash
# Evaluate one training run on the math benchmarks, then print/write the report.
#   bash scripts/eval_math.sh RUN_DIR BASE_MODEL [extra flags for math_evaluate.py]
# Environment: DATASETS (default "all"; or a comma list), BATCH_SIZE (default 16),
#              NPROC (default 1; >1 launches torchrun), REPORT_RUNS (more run folders for the table).
# Results go to RUN_DIR/eval/<dataset>.json(l); a rerun resumes. The report lands in RUN_DIR/eval/report.*.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 RUN_DIR BASE_MODEL [extra flags]" >&2
  exit 2
fi
run_dir=$1 base_model=$2
shift 2
cd "$(dirname "$0")/.."
launcher=(python)
if [ "${NPROC:-1}" -gt 1 ]; then
  launcher=(torchrun --nproc_per_node "$NPROC")
fi
"${launcher[@]}" math_evaluate.py --dataset "${DATASETS:-all}" --base_model "$base_model" \
  --lora_weights "$run_dir" --batch_size "${BATCH_SIZE:-16}" "$@"
# shellcheck disable=SC2086  # REPORT_RUNS is a list of folders
python -m dense_lora.report "$run_dir" ${REPORT_RUNS:-} --out "$run_dir/eval/report"
