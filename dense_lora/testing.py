"""Fixtures shared by the tests and the benchmarks: small random-weight models built in code.

Why a package module: ``bench/train_step.py`` and ``tests/`` both build the same tiny LLaMA, and the
benchmarks cannot import from the test folder.
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig


def tiny_llama_config(**overrides: Any) -> LlamaConfig:
    """A small random-weight LLaMA for tests and smoke benchmarks: GQA, and hidden (64), intermediate (96) and kv
    (32) widths that all differ (and differ from r=8), so shape mix-ups between module types cannot pass."""
    values: dict[str, Any] = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)
