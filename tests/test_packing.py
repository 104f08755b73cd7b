"""Padding-free batches train exactly what padded batches train: same losses, same gradients, same adapters.

Dropout is 0 wherever two paths are compared: masks are drawn per element, and a flattened row has other
elements than a padded batch, so with dropout the two paths would draw different (equally valid) masks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    adapter,
    assert_same_adapter,
    finetune_succeeds,
    make_tiny_llama,
    read_metrics,
    small_run,
    torchrun,
)
from helpers import tiny_run_flags as cli_flags
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from dense_lora import DEFAULT_TARGET_MODULES, DenseLoraConfig
from dense_lora.data import IGNORE_INDEX, load_records, make_collator, tokenize_example
from dense_lora.packing import (
    PACKED_SDPA,
    PackedCollator,
    choose_collator,
    enable_packed_attention,
    packing_unsupported_reason,
)
from dense_lora.train import TrainConfig, TrainError, check_output_dir, run


def test_collator_flattens_records_with_their_own_positions() -> None:
    features = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
        {"input_ids": [8, 9], "attention_mask": [1, 1], "labels": [8, 9]},
        {"input_ids": [], "attention_mask": [], "labels": []},
    ]
    batch = PackedCollator()(features)
    assert set(batch) == {
        "input_ids",
        "labels",
        "position_ids",
    }  # no attention mask: see dense_lora/packing.py
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # each record's first label is -100: the previous record's last token must not learn to predict it
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert batch["input_ids"].dtype == torch.long
    with pytest.raises(ValueError, match="every record"):
        PackedCollator()([{"input_ids": [], "labels": []}])


def test_collator_counts_the_padded_paths_targets(smollm2_dir: Path) -> None:
    """Trainer normalises the loss by labels[..., 1:] != -100: the same count for both collators."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    records = load_records("dataset/ARC-Easy/train.json")[:5]
    for train_on_inputs in (True, False):
        features = [tokenize_example(tokenizer, r, 256, train_on_inputs) for r in records]
        padded = make_collator(tokenizer)([dict(f) for f in features])
        packed = PackedCollator()(features)
        count = lambda labels: int((labels[..., 1:] != IGNORE_INDEX).sum())  # noqa: E731
        assert count(padded["labels"]) == count(packed["labels"])
        assert packed["input_ids"].numel() == int(padded["attention_mask"].sum())  # no padding left


def loss_and_gradients(model: torch.nn.Module, batch: dict[str, torch.Tensor], items: int):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, num_items_in_batch=torch.tensor(items)).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def compare_paths(
    model,
    tokenizer_pad: int,
    features: list[dict[str, list[int]]],
    implementations: tuple[str, ...] = ("sdpa", PACKED_SDPA, "eager"),
    **tolerance: float,
) -> None:
    """Padded (sdpa with the padding mask) against packed: transformers' block-diagonal sdpa mask, per-record sdpa
    (``sdpa_packed``) and eager; loss and every adapter gradient within ``tolerance``."""
    width = max(len(f["input_ids"]) for f in features)
    pad = lambda values, fill: [v + [fill] * (width - len(v)) for v in values]  # noqa: E731
    padded = {
        "input_ids": torch.tensor(pad([f["input_ids"] for f in features], tokenizer_pad)),
        "attention_mask": torch.tensor(pad([[1] * len(f["input_ids"]) for f in features], 0)),
        "labels": torch.tensor(pad([f["labels"] for f in features], IGNORE_INDEX)),
    }
    items = int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())
    packed = PackedCollator()(features)
    base = model.get_base_model()
    base.set_attn_implementation("sdpa")
    want_loss, want = loss_and_gradients(model, padded, items)
    assert len(want) > 0 and all(g.abs().sum() > 0 for g in want.values())
    for implementation in implementations:
        if implementation == PACKED_SDPA:
            assert enable_packed_attention(model)
        else:
            base.set_attn_implementation(implementation)
        loss, grads = loss_and_gradients(model, packed, items)
        torch.testing.assert_close(loss, want_loss, **tolerance)
        for name in want:
            torch.testing.assert_close(
                grads[name],
                want[name],
                **tolerance,
                msg=lambda m, tag=f"{implementation} {name}": f"{tag}: {m}",
            )


def test_tiny_llama_packed_equals_padded() -> None:
    torch.manual_seed(0)
    model = make_tiny_llama(use_cache=False)
    config = DenseLoraConfig(
        r=4, target_modules=list(DEFAULT_TARGET_MODULES), init_weights=False, init_seed=0
    )
    model = get_peft_model(model, config).train()
    generator = torch.Generator().manual_seed(1)
    features = []
    for length in (7, 12, 3, 9):
        ids = torch.randint(3, 250, (length,), generator=generator).tolist()
        features.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 2 + ids[2:]})
    compare_paths(model, 0, features, rtol=1e-5, atol=1e-6)


def test_smollm2_real_records_packed_equals_padded(smollm2_dir: Path) -> None:
    """The real model (float32) on three real training records of different lengths; transformers' mask-based
    sdpa and the per-record sdpa training uses (eager is covered on the tiny LLaMA)."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    records = load_records("dataset/boolq/train.json")[:1] + load_records("dataset/openbookqa/train.json")[:2]
    features = [tokenize_example(tokenizer, record, 256, False) for record in records]
    assert len({len(f["input_ids"]) for f in features}) > 1
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    base.config.use_cache = False
    config = DenseLoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False)
    model = get_peft_model(base, config).train()
    compare_paths(model, tokenizer.pad_token_id, features, ("sdpa", PACKED_SDPA), rtol=2e-4, atol=2e-6)


def test_compiled_packed_attention_stays_in_one_graph() -> None:
    """Under torch.compile the per-record attention would need the record lengths on the host: a graph break in
    every layer and a recompilation for every new set of lengths (``finetune.py --torch_compile`` with packing,
    the default, then ran mostly eagerly). Compiled, two packed batches of different record lengths run without a
    graph break, and their losses and gradients are the eager per-record path's."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    config = DenseLoraConfig(
        r=4, target_modules=list(DEFAULT_TARGET_MODULES), init_weights=False, init_seed=0
    )
    model = get_peft_model(make_tiny_llama(use_cache=False), config).train()
    assert enable_packed_attention(model)
    generator = torch.Generator().manual_seed(1)
    batches = []
    for lengths in ((7, 12, 3), (5, 9, 9, 4)):
        features = []
        for length in lengths:
            ids = torch.randint(3, 250, (length,), generator=generator).tolist()
            features.append({"input_ids": ids, "labels": ids})
        batches.append(PackedCollator()(features))
    eager = [loss_and_gradients(model, batch, 1) for batch in batches]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    for batch, (want_loss, want) in zip(batches, eager, strict=True):
        loss = loss_and_gradients(compiled, batch, 1)[0]
        grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        for name in want:  # atol: the compiled graph sums in another order (1.9e-6 on an AVX2 CPU)
            torch.testing.assert_close(grads[name], want[name], rtol=1e-4, atol=1e-5)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1


@pytest.mark.parametrize(
    "extra", [{"is_causal": False}, {"softcap": 30.0}, {"sliding_window": 4}, {"module_is_causal": False}]
)
def test_per_record_attention_hands_what_it_does_not_compute_to_sdpa(
    extra: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bidirectional spans, soft-capped logits and sliding windows are not the per-record causal kernel's
    function: those calls go to transformers' sdpa with everything they were given; plain causal calls do not."""
    import transformers.integrations.sdpa_attention as sdpa_module

    from dense_lora.packing import varlen_sdpa_attention

    handed: list[dict[str, Any]] = []
    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", lambda *args, **kwargs: handed.append(kwargs))
    plain, module = torch.nn.Module().eval(), torch.nn.Module().eval()
    extra = dict(extra)
    if "module_is_causal" in extra:
        module.is_causal = extra.pop("module_is_causal")
    query = key = value = torch.randn(1, 2, 7, 4)
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    output, _ = varlen_sdpa_attention(plain, query, key, value, None, position_ids=position_ids)
    assert handed == [] and output.shape == (1, 7, 2, 4)  # plain causal: per record
    varlen_sdpa_attention(module, query, key, value, None, position_ids=position_ids, **extra)
    assert len(handed) == 1 and handed[0]["position_ids"] is position_ids
    assert all(handed[0][name] == value for name, value in extra.items())


def test_packing_is_refused_where_boundaries_would_leak() -> None:
    model = make_tiny_llama(use_cache=False)
    assert packing_unsupported_reason(model) is None
    padded = object()
    model.config._attn_implementation = "paged|sdpa"
    collator, note = choose_collator(model, padded, packing=True)
    assert collator is padded and "does not read record boundaries" in note
    model.config._attn_implementation = "sdpa"
    model.config.use_cache = True  # a cache hides the boundaries from transformers' mask utilities
    collator, note = choose_collator(model, padded, packing=True)
    assert collator is padded and "KV cache" in note
    assert choose_collator(model, padded, packing=False) == (padded, None)


def test_trainer_runs_packed_and_padded_give_the_same_losses_and_adapter(
    tiny_base: Path, train_file: Path, tmp_path: Path
) -> None:
    """Through run() (Trainer, num_items_in_batch, gradient accumulation 2, validation): every logged training
    and validation loss and the trained adapter agree; the packed run counts only real tokens."""
    summaries: dict[bool, dict[str, Any]] = {}
    for packing in (True, False):
        flags = small_run(tiny_base, train_file, tmp_path / str(packing), lora_dropout=0.0, max_steps=4)
        summaries[packing] = run(TrainConfig(**flags, packing=packing))
        assert (
            summaries[packing]["packed"] is packing and summaries[packing]["gradient_accumulation_steps"] == 2
        )
    logs = {packing: read_metrics(tmp_path / str(packing)) for packing in (True, False)}
    for key in ("loss", "eval_loss"):
        got = [entry[key] for entry in logs[True] if key in entry]
        want = [entry[key] for entry in logs[False] if key in entry]
        assert len(got) == len(want) > 0
        assert got == pytest.approx(want, rel=1e-5)
    # Adam divides by the root of the squared gradients, so float32 summation-order differences between a packed
    # and a padded batch reach the weights at ~1e-6 after a few steps; a wrong mask or loss would be ~1e-3.
    assert_same_adapter(adapter(tmp_path / "True"), adapter(tmp_path / "False"), atol=1e-5)
    assert summaries[True]["tokens_seen"] == summaries[False]["tokens_seen"]  # real tokens, both ways


@pytest.mark.slow
def test_ddp_packed_equals_one_process_padded(tiny_base: Path, train_file: Path, tmp_path: Path) -> None:
    """Global batch 4: 2 gloo processes x packed micro-batches of 2 == 1 process x padded micro 2 x accumulation 2.

    One comparison covers DDP and gradient accumulation: the loss is normalised by the tokens of the whole global
    batch (gathered across processes) in both runs.
    """
    common = dict(max_steps=3, lora_dropout=0.0)
    finetune_succeeds(*cli_flags(tiny_base, train_file, tmp_path / "one", packing=False, **common))
    two = cli_flags(tiny_base, train_file, tmp_path / "two", packing=True, **common)
    finetune_succeeds(*two, launcher=torchrun(2, 29531))
    one, two = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two"))
    assert (one["packed"], one["world_size"], one["gradient_accumulation_steps"]) == (False, 1, 2)
    assert (two["packed"], two["world_size"], two["gradient_accumulation_steps"]) == (True, 2, 1)
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
    assert_same_adapter(adapter(tmp_path / "one"), adapter(tmp_path / "two"), atol=2e-5)


def test_a_run_from_before_packing_resumes_padded_only(tmp_path: Path) -> None:
    """A run_config.json without the field was a padded run: it resumes with --packing False, not True."""
    config = TrainConfig(base_model="smollm2", output_dir=str(tmp_path), packing=False)
    old = {key: value for key, value in config.fingerprint().items() if key != "packing"}
    (tmp_path / "run_config.json").write_text(json.dumps(old))
    (tmp_path / "adapter_config.json").write_text("{}")
    check_output_dir(config)
    with pytest.raises(TrainError, match="differs in packing"):
        check_output_dir(TrainConfig(base_model="smollm2", output_dir=str(tmp_path), packing=True))
