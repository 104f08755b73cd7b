"""Count trainable parameters of DenseLoRA and LoRA without any weights: the model is built on the meta device.

    python -m dense_lora.params --model llama3-8b            # r = 16, 32, 64
    python -m dense_lora.params --model llama2-7b --r 16
    python -m dense_lora.params --model path/to/config.json --r 8,16 --target_modules q_proj,v_proj

Shares are relative to the base model's parameter count (the convention of the paper's tables).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from peft import LoraConfig, get_peft_model
from transformers import PretrainedConfig

from .config import DEFAULT_TARGET_MODULES, DenseLoraConfig
from .published import build_model_on_meta, published_config


@dataclass(frozen=True)
class ParameterCount:
    method: str
    r: int
    trainable: int
    base: int

    @property
    def share(self) -> float:
        """Trainable parameters as a percentage of the base model."""
        return 100.0 * self.trainable / self.base


def count_trainable(
    config: PretrainedConfig, method: str, r: int, target_modules: Sequence[str], train_shared: bool = True
) -> ParameterCount:
    """Attach a DenseLoRA or LoRA adapter to a meta-device model and count what would train.

    ``train_shared=False`` counts the paper's "Freeze" (Table 4): its frozen W_e/W_d are buffers, so only the M
    matrices are counted, as only they reach an optimizer.
    """
    model = build_model_on_meta(config)
    base = sum(p.numel() for p in model.parameters())
    if method == "denselora":
        adapter = DenseLoraConfig(
            r=r, lora_alpha=2 * r, target_modules=list(target_modules), train_shared=train_shared
        )
    elif method == "lora":
        adapter = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(target_modules))
    else:
        raise ValueError(f"unknown method {method!r}; choose 'denselora' or 'lora'")
    peft_model = get_peft_model(model, adapter)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return ParameterCount(method, r, trainable, base)


def _as_list(value: int | str | Sequence) -> list:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, int):
        return [value]
    return list(value)


def main(
    model: str = "llama3-8b",
    r: int | str | Sequence[int] = (16, 32, 64),
    target_modules: str | Sequence[str] = tuple(DEFAULT_TARGET_MODULES),
) -> None:
    """Print DenseLoRA vs LoRA trainable counts and shares for each rank (its parameters are the CLI's flags).

    Raises ValueError with a one-line message for an unknown architecture or a rank that is not positive.
    """
    config = published_config(model)
    ranks = [int(value) for value in _as_list(r)]
    if any(rank < 1 for rank in ranks):
        raise ValueError(f"--r must list positive ranks, got {','.join(map(str, ranks))}")
    targets = _as_list(target_modules)
    rows = [
        (count_trainable(config, "denselora", rank, targets), count_trainable(config, "lora", rank, targets))
        for rank in ranks
    ]
    base = rows[0][0].base
    print(f"{model}: {base:,} base parameters; targets {', '.join(targets)}")
    print(f"{'r':>4} | {'DenseLoRA':>12} | {'share':>8} | {'LoRA':>12} | {'share':>7} | LoRA / DenseLoRA")
    for dense, lora in rows:
        print(
            f"{dense.r:>4} | {dense.trainable:>12,} | {dense.share:>7.4f}% | {lora.trainable:>12,} | "
            f"{lora.share:>6.3f}% | {lora.trainable / dense.trainable:.1f}x"
        )


if __name__ == "__main__":
    from .cli import params, run_main

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices, not ours
    run_main(params)
