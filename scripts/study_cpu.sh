#!/usr/bin/env bash
# The replication study on this machine: SmolLM2-135M-Instruct on the CPU, about two hours on 2 cores, resumable.
# The commonsense grid that fits the budget: the matched pair (DenseLoRA r=32, LoRA r=2) with three seeds, LoRA r=32,
# DenseLoRA r=8, DoRA, VeRA, and the paper's Freeze and Only-Matrix variants; on the arithmetic set (math_data.json)
# DenseLoRA r=32, LoRA r=2 and LoRA r=32, one seed each.
# Results: results/study-smollm2-cpu/ (REPORT.md, CSV tables, PNG plots, analysis/, commands.log, environment.json).
#   bash scripts/study_cpu.sh [flags for python -m dense_lora.study, e.g. --methods all]
methods=denselora-r32,lora-r2,lora-r32,denselora-r8,dora-r2,vera-r256,freeze-r128,onlymatrix-r32
exec bash "$(dirname "$0")/study.sh" smollm2 cpu cpu --families commonsense,math --methods "$methods" "$@"
