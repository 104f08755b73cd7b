"""Fine-tune DenseLoRA (or the LoRA / DoRA baselines) with the LLM-Adapters recipe.

    python finetune.py --base_model smollm2 --data_path dataset/boolq/train.json --output_dir out/boolq
    torchrun --nproc_per_node 2 finetune.py ...     # DDP: --batch_size stays the global batch

Flags mirror LLM-Adapters' finetune.py; every field of dense_lora.train.TrainConfig is a flag (see
docs/training.md). Exit status: 0 done, 2 bad input (one line on stderr, nothing written),
75 stopped by SIGTERM after saving a checkpoint (rerun with --resume_from_checkpoint True).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import fire

# bitsandbytes warns at import, on every CPU with AVX512-BF16, that an optional kernel package is missing; that
# kernel serves a 4-bit inference path dense_lora.models turns off for training, so the warning is noise.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def main(**flags: Any) -> None:
    """Run one fine-tuning job; flags are the fields of dense_lora.train.TrainConfig."""
    from dense_lora.train import INTERRUPTED_EXIT_CODE, TrainError, config_from_flags, run

    try:
        summary = run(config_from_flags(flags))
    except TrainError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if summary["status"] == "interrupted":
        sys.exit(INTERRUPTED_EXIT_CODE)


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        from dense_lora.train import flags_help

        print(f"{__doc__}\n{flags_help()}")
    else:
        fire.Fire(main)
