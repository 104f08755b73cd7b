"""Held-out loss on the answer tokens: how well a model (with or without an adapter) predicts the reference outputs
of records it was not trained on.

At small scale (SmolLM2-135M) generation accuracy on a few hundred test questions moves by a few points and is
noisy; the teacher-forced loss on the answer tokens moves continuously and separates methods with far fewer
examples. It is computed with the training prompt and tokenization (``dense_lora.data.tokenize_example`` with
``train_on_inputs=False``), so it is exactly the part of the training loss that scores the answer, on other records.

Efficiency: rows are left-padded so that every answer ends at the last position, and the LM head runs only on the
last ``K + 1`` positions (``logits_to_keep``), K being the longest answer of the batch; positions are counted from
the attention mask, so padding changes nothing.

    python -m dense_lora.heldout --base_model smollm2 --lora_weights runs/x \\
        --records boolq=dataset/boolq/test.json --limit 200 --out runs/x/heldout.json
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, tokenize_example


@dataclass(frozen=True)
class AnswerLoss:
    """Summed negative log-likelihood (nats) of a set's answer tokens and how many tokens there were."""

    nll: float
    tokens: int
    records: int

    @property
    def mean(self) -> float:
        """Mean NLL per answer token (the number reported as "held-out loss")."""
        return self.nll / self.tokens if self.tokens else math.nan

    def as_dict(self) -> dict[str, Any]:
        return {"loss": self.mean, "nll_sum": self.nll, "answer_tokens": self.tokens, "records": self.records}


def _batch(examples: Sequence[Mapping[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad a batch; labels padded with IGNORE_INDEX; positions counted over real tokens only."""
    width = max(len(example["input_ids"]) for example in examples)
    ids, mask, labels = [], [], []
    for example in examples:
        pad = width - len(example["input_ids"])
        ids.append([pad_id] * pad + example["input_ids"])
        mask.append([0] * pad + [1] * len(example["input_ids"]))
        labels.append([IGNORE_INDEX] * pad + example["labels"])
    attention = torch.tensor(mask)
    return {
        "input_ids": torch.tensor(ids),
        "attention_mask": attention,
        "position_ids": (attention.cumsum(-1) - 1).clamp(min=0),
        "labels": torch.tensor(labels),
    }


def _answer_span(labels: torch.Tensor) -> int:
    """Positions from the first answer label of any row to the end (answers end the sequence)."""
    trainable = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    return int(labels.shape[1] - trainable[0]) if len(trainable) else 0


@torch.no_grad()
def answer_loss(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    cutoff_len: int = 512,
    batch_size: int = 16,
) -> AnswerLoss:
    """Teacher-forced NLL of the reference outputs of `records` under `model`, over the answer tokens only."""
    examples = [tokenize_example(tokenizer, record, cutoff_len, train_on_inputs=False) for record in records]
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = _batch([examples[i] for i in order[start : start + batch_size]], tokenizer.pad_token_id)
        span = _answer_span(batch["labels"])
        if span == 0:
            continue
        inputs = {key: value.to(device) for key, value in batch.items() if key != "labels"}
        logits = model(**inputs, logits_to_keep=span + 1).logits[:, :-1].float()
        targets = batch["labels"][:, -span:].to(device)
        nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="sum")
        total += float(nll)
        count += int((targets != IGNORE_INDEX).sum())
    return AnswerLoss(total, count, len(records))
