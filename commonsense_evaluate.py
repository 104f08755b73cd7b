"""Evaluate a base model, optionally with a peft adapter, on the eight commonsense benchmarks.

    python commonsense_evaluate.py --dataset boolq --base_model smollm2 --lora_weights runs/smollm2-r16
    torchrun --nproc_per_node 2 commonsense_evaluate.py --dataset all --base_model ... --lora_weights ...

All flags and the protocol are documented in ``--help`` and docs/evaluation.md; the arguments are checked by
dense_lora.cli before anything loads, the work is done by dense_lora.evaluate. Also installed as the
``denselora-eval-commonsense`` command.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from finetune import strict_cli


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate from the command line (default: sys.argv); returns the exit status."""
    return strict_cli().evaluate_commonsense(argv, prog="commonsense_evaluate.py")


if __name__ == "__main__":
    sys.exit(main())
