#!/usr/bin/env bash
# The GPU measurements of the performance targets, as one prepared run for a lent device (estimated at about 8
# minutes on one H200-class card, not yet timed; each command is meant to stay under a 10-minute limit):
#
#   1. bench/train_step.py at the LLaMA-3-8B shape (random bf16 weights: timing and memory need no checkpoint),
#      micro-batch 4 × 256, checkpointing off and on, DenseLoRA vs LoRA vs DoRA vs the frozen base, at the
#      recipe's dropout 0.05 and at 0: step time, tokens/s, MFU, peak CUDA memory per method. The peak without
#      checkpointing answers whether the paper's 24 GB card fits the recipe (bf16 weights ~15 GiB; AdamW states
#      of the adapter add under 0.1 GiB).
#   2. bench/packing.py on the GPU: packed vs padded useful tokens/s of finetune's own run (SmolLM2, real mix).
#
# Results: JSON under $OUT (default bench/out/gpu-<time>), never appended to bench/RESULTS.md automatically;
# render the blocks with `python bench/train_step.py --render FILE` and `python bench/packing.py --render FILE`
# once checked.
#
#   bash bench/gpu.sh                                # everything
#   PACKING=0 REPEATS=5 bash bench/gpu.sh            # step benchmark only, fewer repeats
#   DRY_RUN=1 bash bench/gpu.sh                      # print the commands and exit
#   PEAK_TFLOPS=989 (H100/H200 dense bf16, the default), 312 (A100), 71 (RTX 3090); MODEL=llama2-7b-shape
#
# Memory: the step benchmark keeps one copy of the 8B weights per method (~15 GiB each, so ~75 GiB for the
# four methods and the base); on an 80 GB card run the methods in two calls, e.g. METHODS=denselora,lora then
# METHODS=dora,frozen (ratios are then across processes, less exact).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT=${OUT:-bench/out/gpu-$(date -u +%Y%m%dT%H%M%SZ)}
MODEL=${MODEL:-llama3-8b-shape}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
REPEATS=${REPEATS:-8}
WARMUP=${WARMUP:-3}
PACKING=${PACKING:-1}
METHODS=${METHODS:-denselora,lora,dora,frozen}

commands=()
for dropout in 0.05 0; do
  # Peak memory (one fresh process per method and mode) at the recipe's dropout only: it is the run that matters.
  memory=$([ "$dropout" = 0 ] && echo " --no_memory" || true)
  commands+=("python bench/train_step.py --model $MODEL --batch 4 --seq 256 --checkpointing both \
--methods $METHODS --dropout $dropout --repeats $REPEATS --warmup $WARMUP \
--peak_tflops $PEAK_TFLOPS --no_results$memory --out $OUT/step-4x256-d$dropout.json")
done
if [ "$PACKING" = 1 ]; then
  commands+=("python bench/packing.py --rounds 2 --steps 10 --no_results --out $OUT/packing.json")
fi

if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%s\n' "${commands[@]}"
  exit 0
fi
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: bench/gpu.sh needs a CUDA device (torch.cuda.is_available() is False); DRY_RUN=1 prints the plan" >&2
  exit 2
fi
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
for command in "${commands[@]}"; do
  echo "+ $command" >&2
  $command
done
echo "results in $OUT" >&2
