"""Evaluate a base model, optionally with a peft adapter, on the arithmetic reasoning benchmarks.

    python math_evaluate.py --dataset gsm8k --base_model smollm2 --lora_weights runs/smollm2-math --batch_size 16
    torchrun --nproc_per_node 2 math_evaluate.py --dataset all --base_model ... --lora_weights ...

All flags and the protocol are documented in docs/evaluation.md; the work is done by dense_lora.evaluate.
"""

import fire

from dense_lora.evaluate import cli

if __name__ == "__main__":
    fire.Fire(cli("math"))
