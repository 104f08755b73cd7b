#!/usr/bin/env bash
# Paper Table 7, low-resource training: DenseLoRA on a seeded fraction of commonsense_170k (the same seed gives
# nested subsets), one run per fraction in OUTPUT_ROOT/frac<fraction>.
# FRACTIONS default: 0.1 0.2 0.4 0.6 0.8, the paper's Table 7 rows.
#   bash scripts/low_resource.sh MODEL RANK ALPHA OUTPUT_ROOT GPUS [flags]
source "$(dirname "$0")/_common.sh"
need_args 5 "MODEL RANK ALPHA OUTPUT_ROOT GPUS [flags]" "$@"
model=$1 rank=$2 alpha=$3 root=$4 gpus=$5
shift 5
for fraction in ${FRACTIONS:-0.1 0.2 0.4 0.6 0.8}; do
  run_experiment "$COMMONSENSE_DATA" "$model" "$rank" "$alpha" "$root/frac$fraction" "$gpus" --data_fraction "$fraction" "$@"
done
