"""peft's API contracts for DenseLoRA: mixed-adapter batches, trainability of the shared weights on every peft path,
autocast_adapter_dtype, and safe_merge's error wording."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_llama
from peft import PeftModel, get_peft_model

from dense_lora import DEFAULT_TARGET_MODULES, DenseLoraConfig, DenseLoraLayer


def config(**overrides) -> DenseLoraConfig:
    values = dict(r=8, lora_alpha=16, target_modules=list(DEFAULT_TARGET_MODULES), init_weights=False)
    values.update(overrides)
    return DenseLoraConfig(**values)


def two_adapters() -> PeftModel:
    model = get_peft_model(make_tiny_llama(), config(init_seed=1), adapter_name="alpha")
    model.add_adapter(
        "beta", config(init_seed=2, lora_modules=["up_proj", "down_proj"], activation="identity")
    )
    return model.eval()


# --- mixed-adapter batches ----------------------------------------------------------------------------------------
def test_each_row_gets_its_own_adapter_in_forward(tiny_inputs):
    model = two_adapters()
    inputs = {k: torch.cat([v, v[:1]]) for k, v in tiny_inputs.items()}  # 3 rows
    names = ["alpha", "__base__", "beta"]
    with torch.inference_mode():
        mixed = model(**inputs, adapter_names=names).logits
        with model.disable_adapter():
            base = model(**inputs).logits
        model.set_adapter("alpha")
        only_a = model(**inputs).logits
        model.set_adapter("beta")
        only_b = model(**inputs).logits
    assert (only_a - base).abs().max() > 1e-3 and (only_b - only_a).abs().max() > 1e-3
    torch.testing.assert_close(mixed[0], only_a[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], base[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[2], only_b[2], rtol=1e-5, atol=1e-5)


def test_each_row_gets_its_own_adapter_in_generate(tiny_inputs):
    model = two_adapters()
    inputs = {k: v[:1].repeat(2, 1) for k, v in tiny_inputs.items()}
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        mixed = model.generate(**inputs, adapter_names=["beta", "alpha"], **kwargs)
        model.set_adapter("alpha")
        only_a = model.generate(**inputs, **kwargs)
        model.set_adapter("beta")
        only_b = model.generate(**inputs, **kwargs)
    assert torch.equal(mixed[0], only_b[0]) and torch.equal(mixed[1], only_a[1])


def test_mixed_batch_refuses_unknown_names_and_training(tiny_inputs):
    model = two_adapters()
    with pytest.raises(ValueError, match=r"non-existing adapter.*: c"):
        model(**tiny_inputs, adapter_names=["alpha", "c"])
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(**tiny_inputs, adapter_names=["alpha", "beta"])


# --- trainability of the shared weights ---------------------------------------------------------------------------
def trainability(model: PeftModel, adapter: str) -> tuple[bool, bool]:
    """(any shared W_e/W_d of the adapter trainable, any M trainable)."""
    tuner = model.base_model
    shared = [
        p.requires_grad
        for c in (tuner.denselora_encoder, tuner.denselora_decoder)
        for p in c[adapter].values()
    ]
    middles = [
        m.denselora_M[adapter].requires_grad
        for m in model.modules()
        if isinstance(m, DenseLoraLayer) and adapter in m.denselora_M
    ]
    assert len(set(shared)) == 1 and len(set(middles)) == 1  # all or nothing within each kind
    return shared[0], middles[0]


def test_shared_weights_follow_m_through_load_adapter(tmp_path):
    get_peft_model(make_tiny_llama(), config(init_seed=1)).save_pretrained(tmp_path / "one")
    get_peft_model(make_tiny_llama(), config(init_seed=2)).save_pretrained(tmp_path / "two")
    model = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "one", is_trainable=True)
    assert trainability(model, "default") == (True, True)
    model.load_adapter(tmp_path / "two", adapter_name="other", is_trainable=False)
    assert trainability(model, "default") == (True, True)  # before the fix: (False, True)
    assert trainability(model, "other") == (False, False)
    model.load_adapter(tmp_path / "two", adapter_name="third", is_trainable=True)
    assert trainability(model, "third") == (True, True)

    frozen = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "one")  # inference mode
    assert trainability(frozen, "default") == (False, False)


def test_shared_weights_follow_m_through_the_adapter_api():
    model = get_peft_model(make_tiny_llama(), config(init_seed=1), adapter_name="alpha")
    model.add_adapter("beta", config(init_seed=2))
    assert trainability(model, "alpha") == (True, True) and trainability(model, "beta") == (False, False)
    model.set_adapter("beta")
    assert trainability(model, "alpha") == (False, False) and trainability(model, "beta") == (True, True)
    model.base_model.set_requires_grad("alpha", True)
    assert trainability(model, "alpha") == (True, True)
    model.base_model.set_requires_grad(["alpha", "beta"], False)
    assert trainability(model, "alpha") == (False, False) and trainability(model, "beta") == (False, False)
    model.set_adapter("alpha")
    with model.disable_adapter():
        assert trainability(model, "alpha") == (False, False)
    assert trainability(model, "alpha") == (True, True)
    model.base_model.set_adapter("alpha", inference_mode=True)
    assert trainability(model, "alpha") == (False, False)
    model.set_adapter("beta")
    model.delete_adapter("alpha")
    assert trainability(model, "beta") == (True, True)
    assert "alpha" not in model.base_model.denselora_encoder


# --- dtype ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("train_shared", [True, False])
def test_autocast_adapter_dtype(dtype, train_shared, tiny_inputs):
    def adapter_dtypes(model: PeftModel) -> set[torch.dtype]:
        return {t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()] if "denselora_" in n}

    kept = get_peft_model(make_tiny_llama(dtype=dtype), config(train_shared=train_shared))
    assert adapter_dtypes(kept) == {torch.float32}  # the default: float32 adapter weights
    own = get_peft_model(
        make_tiny_llama(dtype=dtype), config(train_shared=train_shared), autocast_adapter_dtype=False
    )
    assert adapter_dtypes(own) == {dtype}
    with torch.no_grad():
        logits = own(**tiny_inputs).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    own.add_adapter("second", config(init_seed=3), autocast_adapter_dtype=False)
    assert adapter_dtypes(own) == {dtype}


# --- safe_merge ---------------------------------------------------------------------------------------------------
def test_safe_merge_error_has_pefts_wording():
    model = get_peft_model(make_tiny_llama(), config(activation="identity"))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    before = layer.base_layer.weight.clone()
    with torch.no_grad():
        layer.denselora_M["default"][0, 0] = float("nan")
    with pytest.raises(
        ValueError, match=r"^NaNs detected in the merged weights\. The adapter default seems to be broken$"
    ):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before)
