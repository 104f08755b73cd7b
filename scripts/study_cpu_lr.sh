#!/usr/bin/env bash
# The CPU study's learning-rate check: DenseLoRA r=32 and parameter-matched LoRA r=2 on the same data as
# scripts/study_cpu.sh, each swept over learning rates 2e-3 (the study's), 6e-3, 1.8e-2 and 5.4e-2 on seed 42; the
# rate with the lowest validation answer loss of each trains seeds 42-44, scored on the test slices. About an hour
# and a half on 2 cores; resumable.
# Results: results/study-smollm2-cpu-lr/ (REPORT.md with the sweep table).
#   bash scripts/study_cpu_lr.sh [flags for python -m dense_lora.study]
exec bash "$(dirname "$0")/study.sh" smollm2 cpu cpu-lr --families commonsense --methods denselora-r32,lora-r2 "$@"
