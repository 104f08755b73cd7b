"""Fine-tune DenseLoRA (or the LoRA / DoRA / VeRA baselines) with the LLM-Adapters recipe.

    python finetune.py --base_model smollm2 --data_path dataset/boolq/train.json --output_dir out/boolq
    torchrun --nproc_per_node 2 finetune.py ...     # DDP: --batch_size stays the global batch

Flags mirror LLM-Adapters' finetune.py; every field of dense_lora.train.TrainConfig is a flag (``--help`` and
docs/training.md). Exit status: 0 done, 2 bad input (one line on stderr, nothing written),
75 stopped by SIGTERM after saving a checkpoint (rerun the same command to resume). The work is done by
dense_lora.cli.finetune, also installed as the ``denselora-finetune`` command.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType


def strict_cli() -> ModuleType:
    """dense_lora/cli.py loaded by path, so the arguments are checked before torch is imported.

    ``import dense_lora.cli`` would first run dense_lora/__init__ (torch, peft: over 10 s of CPU); a typo
    should fail in a fraction of a second. The module needs only the standard library until it has parsed.
    """
    path = Path(__file__).resolve().parent / "dense_lora" / "cli.py"
    spec = importlib.util.spec_from_file_location("dense_lora_cli_by_path", path)
    assert spec is not None and spec.loader is not None
    module = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    if not hasattr(module, "finetune"):
        spec.loader.exec_module(module)
    return module


def main(argv: Sequence[str] | None = None) -> int:
    """Run one fine-tuning job from the command line (default: sys.argv); returns the exit status."""
    return strict_cli().finetune(argv, prog="finetune.py")


if __name__ == "__main__":
    sys.exit(main())
