"""DenseLoRA on real parts: bitsandbytes 8-bit and 4-bit bases, and the pretrained SmolLM2-135M-Instruct."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_llama
from peft import PeftModel, get_peft_model

from dense_lora import DenseLoraConfig, DenseLoraLayer
from dense_lora.data import generate_train_prompt, load_records
from dense_lora.models import load_base_model, load_tokenizer


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_base_runs_forward_and_backward(tiny_llama_dir, tiny_inputs, bits):
    base = load_base_model(tiny_llama_dir, load_8bit=bits == 8, load_4bit=bits == 4)
    model = get_peft_model(base, DenseLoraConfig(r=8, init_weights=False, init_seed=0))
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    assert isinstance(layer, DenseLoraLayer)
    assert type(layer.base_layer).__name__ == ("Linear8bitLt" if bits == 8 else "Linear4bit")
    model.train()
    out = model(**tiny_inputs, labels=tiny_inputs["input_ids"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    tuner = model.base_model
    for container in (tuner.denselora_encoder, tuner.denselora_decoder):
        for name, weight in container["default"].items():
            assert weight.grad is not None and weight.grad.abs().sum() > 0, name
    assert layer.denselora_M["default"].grad.abs().sum() > 0
    with pytest.raises(ValueError, match="cannot merge"):
        layer.merge()


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("quantized", [{"load_8bit": True}, {"load_4bit": True, "dtype": "bfloat16"}])
def test_adapter_dtype_on_a_quantized_base_is_lora_s(tiny_llama_dir, quantized, autocast):
    """On a bitsandbytes base the adapter weights (the shared pair included) take the dtype peft gives LoRA's: float32,
    or without autocast_adapter_dtype a 4-bit layer's compute dtype (bfloat16 here)."""
    from peft import LoraConfig

    def adapter_dtypes(config, marker):
        model = get_peft_model(
            load_base_model(tiny_llama_dir, **quantized), config, autocast_adapter_dtype=autocast
        )
        return {p.dtype for name, p in model.named_parameters() if marker in name}

    lora = adapter_dtypes(LoraConfig(r=8, target_modules=["q_proj", "down_proj"]), "lora_")
    assert adapter_dtypes(DenseLoraConfig(r=8), "denselora") == lora
    assert lora == {torch.bfloat16 if "load_4bit" in quantized and not autocast else torch.float32}


@pytest.mark.parametrize("merge", ["merge_adapter", "merge_and_unload"])
def test_merge_into_a_partly_quantized_base_is_refused_untouched(tiny_llama_dir, tiny_inputs, merge):
    """q_proj kept in float (bitsandbytes' llm_int8_skip_modules), the rest 4-bit: merging the Only Matrix variant
    is refused before any layer changes, so q_proj is neither merged nor unwrapped and the adapter still saves whole."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["lm_head", "q_proj"])
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=quantization)
    model = get_peft_model(base, DenseLoraConfig(r=8, activation="identity", init_weights=False, init_seed=0))
    model.eval()
    with torch.no_grad():
        before = model(**tiny_inputs).logits
    with pytest.raises(ValueError, match="cannot merge into a Linear4bit base layer"):
        getattr(model, merge)()
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, DenseLoraLayer) and not q_proj.merged
    with torch.no_grad():
        torch.testing.assert_close(model(**tiny_inputs).logits, before, rtol=0, atol=0)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_tokenizer(smollm2_dir), smollm2_dir


@pytest.mark.slow
def test_smollm2_default_targets_count_and_identity_at_init(smollm2, real_data):
    tokenizer, folder = smollm2
    base = load_base_model(folder)
    records = load_records(real_data("dataset/ARC-Easy/train.json"))[:4]
    batch = tokenizer([generate_train_prompt(r) for r in records], return_tensors="pt", padding=True)
    with torch.no_grad():
        base_logits = base(**batch).logits
    model = get_peft_model(base, DenseLoraConfig(r=16, lora_alpha=32, init_seed=0))  # LLaMA default: QKVUD
    # SmolLM2-135M: hidden 576, kv 192, intermediate 1536, 30 layers
    dims = [(576, 576), (576, 192), (576, 192), (576, 1536), (1536, 576)]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        (i + o + 30 * 16) * 16 for i, o in dims
    )
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base_logits)


@pytest.mark.slow
def test_smollm2_training_steps_lower_the_loss_and_reload(smollm2, real_data, tmp_path):
    tokenizer, folder = smollm2
    torch.manual_seed(0)
    model = get_peft_model(load_base_model(folder), DenseLoraConfig(r=16, lora_alpha=32, init_seed=0))
    records = load_records(real_data("dataset/boolq/train.json"))[:4]
    prompts = [generate_train_prompt(r) for r in records]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=128)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(load_base_model(folder), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)
