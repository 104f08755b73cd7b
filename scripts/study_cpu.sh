#!/usr/bin/env bash
# The replication study on this machine: SmolLM2-135M-Instruct on the CPU, about two hours on 2 cores, resumable.
# Results: results/study-smollm2-cpu/ (REPORT.md, CSV tables, PNG plots, analysis/, commands.log, environment.json).
#   bash scripts/study_cpu.sh [flags for python -m dense_lora.study]
exec bash "$(dirname "$0")/study.sh" smollm2 cpu cpu "$@"
