"""The paper's "Freeze" (train_shared=False): frozen random W_e/W_d as buffers, M from zero, and it learns.

Freezing the default init (W_d = 0) would give a variant whose update and M-gradient are zero forever, so Table 4's
Freeze row would report the base model; these tests pin the design that replaces it (see DenseLoraConfig).
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_llama
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from dense_lora import DEFAULT_TARGET_MODULES, DenseLoraConfig, DenseLoraLayer

R = 8
LAYERS = 3  # tiny_llama_config: 3 layers; 5 module types adapted


def freeze_config(**overrides) -> DenseLoraConfig:
    values = dict(
        r=R, lora_alpha=16, target_modules=list(DEFAULT_TARGET_MODULES), init_seed=0, train_shared=False
    )
    values.update(overrides)
    return DenseLoraConfig(**values)


def shared_tensors(model: PeftModel, adapter: str = "default") -> dict[str, torch.Tensor]:
    tuner = model.base_model
    encoders, decoders = tuner.denselora_encoder[adapter], tuner.denselora_decoder[adapter]
    return {
        **{f"enc.{t}": encoders[t].detach().clone() for t in encoders},
        **{f"dec.{t}": decoders[t].detach().clone() for t in decoders},
    }


def middles(model: PeftModel) -> list[torch.Tensor]:
    return [m.denselora_M["default"] for m in model.modules() if isinstance(m, DenseLoraLayer)]


def test_shared_weights_are_random_buffers_and_m_starts_at_zero():
    model = get_peft_model(make_tiny_llama(), freeze_config())
    tuner = model.base_model
    buffer_names = {name for name, _ in model.named_buffers()}
    param_names = {name for name, _ in model.named_parameters()}
    for kind in ("encoder", "decoder"):
        for module_type in DEFAULT_TARGET_MODULES:
            key = f"base_model.denselora_{kind}.default.{module_type}"
            assert key in buffer_names and key not in param_names
    # random, not zero: a zero frozen W_d would make the update and M's gradient zero for ever
    for name, tensor in shared_tensors(model).items():
        assert torch.count_nonzero(tensor) == tensor.numel(), name
    assert all(torch.count_nonzero(m) == 0 for m in middles(model))
    assert len(middles(model)) == LAYERS * len(DEFAULT_TARGET_MODULES)
    # Kaiming-uniform bound 1/sqrt(fan_in): W_d (out x r) within 1/sqrt(r)
    decoder = tuner.denselora_decoder["default"]["up_proj"]
    assert decoder.abs().max() <= 1 / R**0.5


def test_only_m_is_trainable():
    model = get_peft_model(make_tiny_llama(), freeze_config())
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all(".denselora_M." in n for n in trainable)
    assert sum(trainable.values()) == LAYERS * len(DEFAULT_TARGET_MODULES) * R * R == 960
    trainable_count, _ = model.get_nb_trainable_parameters()
    assert trainable_count == 960
    # the shared pair is a buffer here, counted nowhere
    assert model.num_parameters(only_trainable=True) == 960


@pytest.mark.parametrize("activation", ["gelu", "identity"])
def test_starts_as_the_base_then_learns_with_shared_weights_fixed(activation, tiny_inputs):
    base = make_tiny_llama()
    with torch.no_grad():
        base_logits = base(**tiny_inputs).logits
    model = get_peft_model(make_tiny_llama(), freeze_config(activation=activation))
    initial_shared = shared_tensors(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**tiny_inputs).logits, base_logits, rtol=0, atol=1e-6)

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = tiny_inputs["input_ids"]
    losses = []
    for step in range(4):
        loss = model(**tiny_inputs, labels=labels).loss
        loss.backward()
        if step == 0:
            # dL/dM = s W_d^T g act(W_e x)^T: non-zero although M is zero
            assert all(m.grad is not None and m.grad.abs().max() > 0 for m in middles(model))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()

    assert losses[-1] < losses[0]
    with torch.no_grad():
        change = (model(**tiny_inputs).logits - base_logits).abs().max()
    assert change > 1e-3
    for name, tensor in shared_tensors(model).items():
        assert torch.equal(tensor, initial_shared[name]), name
    assert all(torch.count_nonzero(m) > 0 for m in middles(model))


def test_reproducible_from_the_seed():
    first = shared_tensors(get_peft_model(make_tiny_llama(), freeze_config(init_seed=3)))
    torch.manual_seed(99)  # the private generator, not the global RNG, decides the init
    second = shared_tensors(get_peft_model(make_tiny_llama(), freeze_config(init_seed=3)))
    other = shared_tensors(get_peft_model(make_tiny_llama(), freeze_config(init_seed=4)))
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["enc.q_proj"], other["enc.q_proj"])


def test_save_load_round_trip_is_exact(tmp_path, tiny_inputs):
    model = get_peft_model(
        make_tiny_llama(), freeze_config(init_weights=False)
    )  # random M: non-trivial update
    model.eval()
    # move every adapter tensor off its seeded init, so only a reload that reads the file can reproduce them
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if "denselora_" in name:
                tensor.mul_(1.5)
    with torch.no_grad():
        logits = model(**tiny_inputs).logits
        assert (logits - make_tiny_llama()(**tiny_inputs).logits).abs().max() > 1e-3
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    for kind in ("encoder", "decoder"):
        for module_type in DEFAULT_TARGET_MODULES:
            key = f"base_model.denselora_{kind}.{module_type}"
            expected = getattr(model.base_model, f"denselora_{kind}")["default"][module_type]
            assert torch.equal(saved[key], expected), key
    assert sum(".denselora_M" in key for key in saved) == LAYERS * len(DEFAULT_TARGET_MODULES)

    # a different seed for the fresh base and adapter init: everything must come from the file
    torch.manual_seed(123)
    loaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path, is_trainable=True)
    with torch.no_grad():
        assert torch.equal(loaded(**tiny_inputs).logits, logits)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all(".denselora_M." in n for n in trainable)
    original, reloaded = shared_tensors(model), shared_tensors(loaded)
    assert all(torch.equal(original[name], reloaded[name]) for name in original)
