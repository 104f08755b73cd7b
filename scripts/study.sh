#!/usr/bin/env bash
# The replication study (dense_lora/study): DenseLoRA at several ranks against LoRA (including LoRA at the same
# trainable-parameter count), DoRA, VeRA, and the Freeze and Only Matrix variants; seeds for the headline
# comparisons; held-out answer loss and accuracy beside chance and majority baselines; the increments analysis.
# Resumable: rerun the same command after a kill and finished runs are skipped.
#   bash scripts/study.sh MODEL DEVICES [PROFILE] [flags for python -m dense_lora.study]
#   bash scripts/study.sh smollm2 cpu cpu            # what scripts/study_cpu.sh runs: about two hours on 2 cores
#   bash scripts/study.sh llama3-8b 0,1,2,3 paper    # paper scale: full training files and test sets
# PROFILE: cpu (default), cpu-lr (its learning-rate check), cpu-long, paper or smoke (dense_lora/study/plan.py). DRY_RUN=1 prints every command, runs nothing.
# Run folders go to runs/study-MODEL-PROFILE; tables, plots and REPORT.md to results/study-MODEL-PROFILE.
source "$(dirname "$0")/_common.sh"
need_args 2 "MODEL DEVICES [PROFILE] [flags]" "$@"
model=$1 devices=$2 profile=${3:-cpu}
shift $(($# < 3 ? $# : 3))
dry=()
[ "${DRY_RUN:-0}" = 1 ] && dry=(--dry_run)
cd "$REPO_ROOT"
exec python -m dense_lora.study --model "$model" --devices "$devices" --profile "$profile" "${dry[@]}" "$@"
