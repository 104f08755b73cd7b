"""The DenseLoRA adapter through the public peft API, on tiny real LLaMAs with GQA (all dims distinct from r)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import make_tiny_llama
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from dense_lora import DEFAULT_TARGET_MODULES, DenseLoraConfig, DenseLoraLayer
from dense_lora.layer import SharedWeights, reference_implementation

R = 8
# tiny_llama_config: hidden 64, q 64->64, k/v 64->32 (GQA), up 64->96, down 96->64, 3 layers
DIMS = {
    "q_proj": (64, 64),
    "k_proj": (64, 32),
    "v_proj": (64, 32),
    "up_proj": (64, 96),
    "down_proj": (96, 64),
}
LAYERS = 3


def dense_config(**overrides) -> DenseLoraConfig:
    values = dict(r=R, lora_alpha=16, target_modules=list(DEFAULT_TARGET_MODULES), init_seed=0)
    values.update(overrides)
    return DenseLoraConfig(**values)


def adapted(seed: int = 0, **overrides) -> PeftModel:
    return get_peft_model(make_tiny_llama(seed), dense_config(**overrides))


def dense_layers(model: torch.nn.Module) -> dict[str, DenseLoraLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, DenseLoraLayer)}


def test_trainable_count_matches_formula(tiny_inputs):
    model = adapted()
    expected = sum((i + o + LAYERS * R) * R for i, o in DIMS.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected == 6080
    # each shared tensor is one parameter, owned by the model, not by the layers
    layer_params = {id(p) for layer in dense_layers(model).values() for p in layer.parameters()}
    shared = list(model.base_model.denselora_encoder["default"].values())
    assert all(id(p) not in layer_params for p in shared)
    assert len(shared) == 5
    # every counter agrees, peft's and transformers' (which alone would not see the shared weights)
    assert model.get_nb_trainable_parameters()[0] == model.num_parameters(only_trainable=True) == expected
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("base_dtype", "autocast", "adapter_dtype"),
    [
        (torch.float64, True, torch.float64),  # kept, as LoRA's are: only half precision is upcast
        (torch.float16, True, torch.float32),
        (torch.bfloat16, True, torch.float32),
        (torch.bfloat16, False, torch.bfloat16),
    ],
)
def test_adapter_dtype_follows_peft(tmp_path, base_dtype, autocast, adapter_dtype):
    """Adapter weights, the shared pair included, take the base's dtype, half precision upcast to float32 unless
    autocast_adapter_dtype=False; a float64 adapter saves and reloads bit for bit."""
    model = get_peft_model(
        make_tiny_llama().to(base_dtype), dense_config(init_weights=False), autocast_adapter_dtype=autocast
    )
    assert {p.dtype for n, p in model.named_parameters() if "denselora" in n} == {adapter_dtype}
    if base_dtype is not torch.float64:
        return
    ids = torch.tensor([[1, 5, 7, 9]])
    model.eval()
    logits = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_tiny_llama().to(base_dtype), tmp_path).eval()
    assert {p.dtype for n, p in loaded.named_parameters() if "denselora" in n} == {torch.float64}
    torch.testing.assert_close(loaded(ids).logits, logits, rtol=0, atol=0)


@pytest.mark.parametrize("activation", ["gelu", "identity", "relu", "silu", "tanh"])
def test_layer_equals_independent_formula(activation):
    model = adapted(activation=activation, init_weights=False)  # random decoder: a non-trivial update
    layer = model.base_model.model.model.layers[1].mlp.up_proj
    x = torch.randn(2, 5, 64)
    encoder = model.base_model.denselora_encoder["default"]["up_proj"]
    decoder = model.base_model.denselora_decoder["default"]["up_proj"]
    middle = layer.denselora_M["default"]
    act = {"gelu": F.gelu, "identity": lambda t: t, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh}[
        activation
    ]
    expected = x @ layer.base_layer.weight.T + (16 / R) * act(act(x @ encoder.T) @ middle.T @ decoder.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_dropout_positions_with_fixed_seed():
    """Dropout on x, after the encoder activation and after the decoder activation (three independent masks).

    The reference path uses nn.Dropout; the fused path replays seeded masks in the same positions (test_fused.py).
    """
    model = adapted(init_weights=False, lora_dropout=0.3)
    model.train()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    encoder = model.base_model.denselora_encoder["default"]["q_proj"]
    decoder = model.base_model.denselora_decoder["default"]["q_proj"]
    x = torch.randn(3, 64)
    torch.manual_seed(7)
    with reference_implementation():
        got = layer(x)
    torch.manual_seed(7)
    drop = lambda t: F.dropout(t, 0.3, training=True)  # noqa: E731
    hidden = drop(F.gelu(drop(x) @ encoder.T))
    expected = x @ layer.base_layer.weight.T + 2.0 * drop(
        F.gelu(hidden @ layer.denselora_M["default"].T @ decoder.T)
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_equals_base_at_init_and_one_step_changes_output(tiny_inputs):
    base_logits = make_tiny_llama()(**tiny_inputs).logits
    model = adapted()
    assert torch.equal(model(**tiny_inputs).logits, base_logits)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(**tiny_inputs, labels=tiny_inputs["input_ids"]).loss
    loss.backward()
    optimizer.step()
    assert not torch.allclose(model(**tiny_inputs).logits, base_logits)
    # the base stayed frozen
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and "denselora_" not in n]
    assert frozen == []


def test_shared_weights_get_gradient_from_every_layer(tiny_inputs):
    """grad(W_e) and grad(W_d) are exactly the sum of what each layer's use contributes, and every layer contributes."""
    model = adapted(init_weights=False)
    labels = tiny_inputs["input_ids"]
    model(**tiny_inputs, labels=labels).loss.backward()
    tuner = model.base_model
    shared_grads = {
        kind: {t: p.grad.clone() for t, p in container["default"].items()}
        for kind, container in (("encoder", tuner.denselora_encoder), ("decoder", tuner.denselora_decoder))
    }
    model.zero_grad()
    # give every layer its own leaf copy of the shared weights: their gradients are the per-layer contributions
    copies = {}
    for name, layer in dense_layers(model).items():
        encoders = torch.nn.ModuleDict({"default": torch.nn.ParameterDict()})
        decoders = torch.nn.ModuleDict({"default": torch.nn.ParameterDict()})
        enc, dec = tuner.shared_weights.get("default", layer.module_type)
        encoders["default"][layer.module_type] = torch.nn.Parameter(enc.detach().clone())
        decoders["default"][layer.module_type] = torch.nn.Parameter(dec.detach().clone())
        object.__setattr__(layer, "shared", SharedWeights(encoders, decoders))
        copies[name] = (
            layer.module_type,
            encoders["default"][layer.module_type],
            decoders["default"][layer.module_type],
        )
    model(**tiny_inputs, labels=labels).loss.backward()
    for module_type in DIMS:
        per_layer = [(enc.grad, dec.grad) for t, enc, dec in copies.values() if t == module_type]
        assert len(per_layer) == LAYERS
        assert all(e.abs().sum() > 0 and d.abs().sum() > 0 for e, d in per_layer)
        torch.testing.assert_close(sum(e for e, _ in per_layer), shared_grads["encoder"][module_type])
        torch.testing.assert_close(sum(d for _, d in per_layer), shared_grads["decoder"][module_type])


def test_save_load_round_trip_is_bit_exact_and_stores_shared_once(tmp_path, tiny_inputs):
    model = adapted(init_weights=False)
    expected = model(**tiny_inputs).logits
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(t.numel() for t in tensors.values()) == trainable
    assert sorted(k for k in tensors if "denselora_encoder" in k) == sorted(
        f"base_model.denselora_encoder.{t}" for t in DIMS
    )
    assert len(tensors) == 2 * len(DIMS) + LAYERS * len(DIMS)
    file_size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert 4 * trainable <= file_size < 4 * trainable + 8192
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "DENSELORA"

    reloaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    assert torch.equal(reloaded(**tiny_inputs).logits, expected)
    assert not any(p.requires_grad for p in reloaded.parameters())
    trainable_again = PeftModel.from_pretrained(make_tiny_llama(), tmp_path, is_trainable=True)
    assert sum(p.numel() for p in trainable_again.parameters() if p.requires_grad) == trainable


def test_disable_adapter_gives_base_outputs(tiny_inputs):
    base_logits = make_tiny_llama()(**tiny_inputs).logits
    model = adapted(init_weights=False)
    assert not torch.allclose(model(**tiny_inputs).logits, base_logits)
    with model.disable_adapter():
        assert torch.equal(model(**tiny_inputs).logits, base_logits)
    assert not torch.allclose(model(**tiny_inputs).logits, base_logits)


def test_several_named_adapters(tiny_inputs):
    model = adapted(init_weights=False)
    first = model(**tiny_inputs).logits
    model.add_adapter("second", dense_config(init_weights=False, init_seed=1, r=4))
    assert torch.equal(model(**tiny_inputs).logits, first)  # adding does not activate
    model.set_adapter("second")
    second = model(**tiny_inputs).logits
    assert not torch.allclose(second, first)
    tuner = model.base_model
    assert not any(p.requires_grad for p in tuner.denselora_encoder["default"].values())
    assert all(p.requires_grad for p in tuner.denselora_encoder["second"].values())
    assert tuner.denselora_encoder["second"]["k_proj"].shape == (4, 64)
    model.set_adapter("default")
    assert torch.equal(model(**tiny_inputs).logits, first)
    model.delete_adapter("second")
    assert "second" not in tuner.denselora_encoder and "second" not in tuner.denselora_decoder
    assert all("second" not in layer.denselora_M for layer in dense_layers(model).values())


def test_same_init_seed_gives_same_adapter_whatever_the_global_rng():
    torch.manual_seed(123)
    first = adapted(init_seed=5)
    torch.manual_seed(456)
    second = adapted(init_seed=5)
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_frozen_shared_variant_trains_only_m():
    model = adapted(train_shared=False)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all("denselora_M" in n for n in trainable)
    assert sum(trainable.values()) == LAYERS * len(DIMS) * R * R


def test_mixed_granularity_lora_on_some_modules(tmp_path, tiny_inputs):
    model = adapted(lora_modules=["up_proj", "down_proj"], init_weights=False)
    tuner = model.base_model
    assert sorted(tuner.denselora_encoder["default"]) == ["k_proj", "q_proj", "v_proj"]
    up = tuner.model.model.layers[0].mlp.up_proj
    assert "default" in up.denselora_A and "default" not in up.denselora_M
    dense = sum((i + o + LAYERS * R) * R for t, (i, o) in DIMS.items() if t in ("q_proj", "k_proj", "v_proj"))
    lora = LAYERS * sum((i + o) * R for t, (i, o) in DIMS.items() if t in ("up_proj", "down_proj"))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == dense + lora
    x = torch.randn(2, 64)
    expected = x @ up.base_layer.weight.T + 2.0 * (
        x @ up.denselora_A["default"].T @ up.denselora_B["default"].T
    )
    torch.testing.assert_close(up(x), expected)
    logits = model(**tiny_inputs).logits
    model.save_pretrained(tmp_path)
    assert torch.equal(PeftModel.from_pretrained(make_tiny_llama(), tmp_path)(**tiny_inputs).logits, logits)


def test_identity_variant_merges_exactly_and_nonlinear_refuses(tiny_inputs):
    model = adapted(activation="identity", init_weights=False)
    unmerged = model(**tiny_inputs).logits
    merged_model = model.merge_and_unload()
    assert not any(isinstance(m, DenseLoraLayer) for m in merged_model.modules())
    torch.testing.assert_close(merged_model(**tiny_inputs).logits, unmerged, rtol=1e-4, atol=1e-4)

    gelu = adapted(init_weights=False)
    before = gelu(**tiny_inputs).logits
    with pytest.raises(ValueError, match=r"activation 'gelu'.*only activation='identity'"):
        gelu.merge_and_unload()
    assert torch.equal(gelu(**tiny_inputs).logits, before)  # nothing half-merged
    with pytest.raises(ValueError, match="cannot merge"):
        gelu.base_model.model.model.layers[0].self_attn.q_proj.merge()


@pytest.mark.parametrize("merge", ["merge_and_unload", "merge_adapter"])
def test_merging_a_named_nonlinear_adapter_refuses_before_any_layer_changes(tiny_inputs, merge):
    """The adapter named in the call is checked, not only the active one: 'g' has plain-LoRA q_proj layers, which
    peft would merge before its first GELU layer refused."""
    model = adapted(activation="identity", init_weights=False)
    model.add_adapter("g", dense_config(lora_modules=["q_proj"], init_weights=False))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot merge DenseLoRA adapter 'g'"):
        getattr(model, merge)(adapter_names=["g"])
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    assert not any(layer.merged_adapters for layer in dense_layers(model).values())
    model.merge_adapter(adapter_names=["default"])  # the identity adapter still merges
    assert all(layer.merged_adapters == ["default"] for layer in dense_layers(model).values())


def test_all_linear_shorthand_adapts_every_linear_but_the_head():
    names = {key.rsplit(".", 1)[-1] for key in dense_layers(adapted(target_modules="all-linear"))}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_lora_modules_outside_the_targets_are_refused():
    """--lora_modules picks which targeted types train plain LoRA; an untargeted one would be silently ignored."""
    with pytest.raises(ValueError, match=r"lora_modules \['up_proj'\] match no module in target_modules"):
        adapted(target_modules=["q_proj", "v_proj"], lora_modules=["up_proj"])


def test_bf16_base_keeps_float32_adapter_and_bf16_output(tiny_inputs):
    model = get_peft_model(make_tiny_llama(dtype=torch.bfloat16), dense_config(init_weights=False))
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "denselora_" in n)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    x = torch.randn(2, 96, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    out = model(**tiny_inputs, labels=tiny_inputs["input_ids"])
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.base_model.denselora_decoder["default"]["q_proj"].grad.dtype == torch.float32
    fp32 = get_peft_model(make_tiny_llama(), dense_config(init_weights=False))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = fp32(**tiny_inputs, labels=tiny_inputs["input_ids"])
    auto.loss.backward()
    assert torch.isfinite(auto.loss)


def test_gradient_checkpointing_gives_same_gradients(tiny_inputs):
    grads = []
    for checkpointing in (False, True):
        model = adapted(init_weights=False)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model(**tiny_inputs, labels=tiny_inputs["input_ids"]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


# --- bad input: one clear error, nothing loaded silently -------------------------------------------------------------


def test_unknown_target_module_lists_linear_names():
    with pytest.raises(ValueError, match=r"unknown target modules \['up_prj'\].*'down_proj'.*'q_proj'"):
        adapted(target_modules=["q_proj", "up_prj"])
    with pytest.raises(ValueError, match="matches no module"):
        adapted(target_modules=r".*\.nothing_proj")


@pytest.mark.parametrize("r", [0, -1, 2.5])
def test_bad_rank(r):
    with pytest.raises(ValueError, match="r must be a positive integer"):
        DenseLoraConfig(r=r)


def test_rank_larger_than_a_target_dim():
    with pytest.raises(ValueError, match=r"r=40 is larger than '.*k_proj' \(64 -> 32\)"):
        adapted(r=40)


def test_unsupported_layer_type():
    with pytest.raises(TypeError, match=r"'model\.embed_tokens': Embedding is not supported"):
        adapted(target_modules=["embed_tokens"])


def test_bad_config_values():
    with pytest.raises(ValueError, match="activation must be one of"):
        DenseLoraConfig(activation="swish")
    with pytest.raises(ValueError, match="lora_dropout"):
        DenseLoraConfig(lora_dropout=1.0)


def test_adapter_for_other_dims_is_refused_naming_key_and_shapes(tmp_path):
    adapted().save_pretrained(tmp_path)
    other = make_tiny_llama(intermediate_size=80)
    with pytest.raises(
        ValueError,
        match=r"'base_model\.denselora_decoder\.default\.up_proj' has shape \(96, 8\) in the adapter but \(80, 8\)",
    ):
        PeftModel.from_pretrained(other, tmp_path)


def test_adapter_with_missing_or_extra_tensors_is_refused(tmp_path):
    adapted().save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    del tensors["base_model.model.model.layers.1.mlp.up_proj.denselora_M"]
    save_file(tensors, path)
    with pytest.raises(
        ValueError, match=r"1 missing \(e\.g\. '.*layers\.1\.mlp\.up_proj\.denselora_M\.default'\)"
    ):
        PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    fewer_layers = make_tiny_llama(num_hidden_layers=2)
    adapted().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unexpected"):
        PeftModel.from_pretrained(fewer_layers, tmp_path)


def test_config_file_with_missing_fields_is_refused_and_unknown_ones_are_named(tmp_path):
    """A missing method field is an error; an unknown one gets peft's forward-compatible warning and is ignored
    (peft's test_config holds every method to that), on both of peft's loading paths."""
    adapted().save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**saved, "rank": 8}))
    with pytest.warns(
        UserWarning, match=r"Unexpected keyword arguments \['rank'\] for class DenseLoraConfig"
    ):
        loaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    assert loaded.peft_config["default"].r == saved["r"]
    with pytest.warns(UserWarning, match=r"\['rank'\]"):
        assert isinstance(PeftConfig.from_pretrained(tmp_path), DenseLoraConfig)
    config_path.write_text(json.dumps({k: v for k, v in saved.items() if k != "activation"}))
    with pytest.raises(ValueError, match=r"missing required fields \['activation'\]"):
        PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
