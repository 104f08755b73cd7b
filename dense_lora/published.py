"""Published architectures without their weights: configs and meta-device models for counting and shapes.

Why: parameter counts (``python -m dense_lora.params``, the report) and benchmark shapes of LLaMA-2-7B /
LLaMA-3-8B must never require downloading weights, nor executing a checkpoint's code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PreTrainedConfig, PreTrainedModel

# Values of the published config.json files (architecture fields and special token ids), for counting
# parameters and building shape-only benchmark models without the weights.
PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=128000,
        eos_token_id=128001,
        tie_word_embeddings=False,
        dtype="bfloat16",
    ),
    "llama2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        dtype="float16",
    ),
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        initializer_range=0.041666666666666664,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
        dtype="bfloat16",
    ),
}


# The model aliases of finetune.py and the evaluators (dense_lora.models.MODEL_ALIASES) that name a published
# architecture under another name, so every CLI that takes --model accepts the same words.
PUBLISHED_ALIASES = {"smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m"}


def published_config(name: str | os.PathLike[str]) -> PreTrainedConfig:
    """A fresh config for a published architecture name, or read from a local config.json / its folder.

    Local configs are read with ``trust_remote_code=False``: counting parameters must never execute code.
    """
    key = os.fspath(name)
    known = PUBLISHED_ALIASES.get(key.lower(), key.lower())
    if known in PUBLISHED_CONFIGS:
        return LlamaConfig(**PUBLISHED_CONFIGS[known])
    path = Path(key).expanduser()
    if path.is_file() or (path / "config.json").is_file():
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    raise ValueError(
        f"unknown architecture {key!r}: use one of {', '.join(PUBLISHED_CONFIGS)} or a config.json / folder with one"
    )


def build_model_on_meta(config: PreTrainedConfig) -> PreTrainedModel:
    """Instantiate the model on the meta device: real shapes and parameter counts, no memory, no weights."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
