"""Held-out answer loss: the batched, left-padded, last-positions-only computation equals the plain per-record
causal-LM loss over the answer tokens."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_tiny_llama
from peft import get_peft_model

from dense_lora import DenseLoraConfig
from dense_lora.data import IGNORE_INDEX, tokenize_example
from dense_lora.heldout import answer_loss
from dense_lora.models import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return load_tokenizer(smollm2_dir)


def reference(model, tokenizer, records) -> tuple[float, int]:
    """One record at a time through the model's own loss: mean over answer tokens, times their count."""
    total, count = 0.0, 0
    for record in records:
        example = tokenize_example(tokenizer, record, 512, train_on_inputs=False)
        labels = torch.tensor([example["labels"]])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([example["input_ids"]]), labels=labels).loss
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())
        total, count = total + float(loss) * n, count + n
    return total, count


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batched_answer_loss_equals_per_record_loss(tokenizer, real_data, batch_size):
    records = json.loads(real_data("dataset/ARC-Challenge/test.json").read_text())[:7]
    records += json.loads(real_data("ft-training_set/math_data.json").read_text())[:3]  # long answers
    model = get_peft_model(
        make_tiny_llama(vocab_size=len(tokenizer)), DenseLoraConfig(r=8, init_weights=False, init_seed=0)
    ).eval()
    result = answer_loss(model, tokenizer, records, batch_size=batch_size)
    total, count = reference(model, tokenizer, records)
    assert result.tokens == count > 10 * 7
    assert result.records == 10
    assert result.nll == pytest.approx(total, rel=1e-5)
    assert result.mean == pytest.approx(total / count, rel=1e-5)
