"""q/k/v computed in one call (``InputGroup``, ``fused_group_add``): same values and gradients as one call per layer,
used only where it is exact (no dropout, one input), and safe under checkpointing, deepcopy and pickling."""

from __future__ import annotations

import contextlib
import copy
import pickle

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from helpers import make_tiny_llama
from peft import get_peft_model
from torch import nn

import dense_lora.fused as fused
from dense_lora import DEFAULT_TARGET_MODULES, DenseLoraConfig
from dense_lora.layer import Linear, one_call_per_layer, reference_implementation


def config(**overrides) -> DenseLoraConfig:
    values = dict(
        r=4, lora_alpha=8, target_modules=list(DEFAULT_TARGET_MODULES), init_weights=False, init_seed=0
    )
    values.update(overrides)
    return DenseLoraConfig(**values)


@pytest.fixture
def group_calls(monkeypatch) -> list[int]:
    """Counts the grouped computations (one per attention block and forward when q/k/v are grouped)."""
    calls: list[int] = []
    original = fused._group_forward

    def counting(*args, **kwargs):
        calls.append(len(args[1]))  # the number of members
        return original(*args, **kwargs)

    monkeypatch.setattr(fused, "_group_forward", counting)
    return calls


def ungrouped(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, Linear):
            object.__setattr__(module, "input_group", None)
    return model


def logits_and_grads(model, inputs, **kwargs):
    model.zero_grad()
    logits = model(**inputs, **kwargs).logits
    (logits.float() * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_groups_are_formed_from_q_k_v_only():
    model = get_peft_model(make_tiny_llama(), config())
    attention = model.base_model.model.model.layers[0].self_attn
    group = attention.q_proj.input_group
    assert group is not None and group.members == [attention.q_proj, attention.k_proj, attention.v_proj]
    assert attention.k_proj.input_group is group and attention.o_proj is not None
    mlp = model.base_model.model.model.layers[0].mlp
    assert mlp.up_proj.input_group is None and mlp.down_proj.input_group is None  # gate_proj is not adapted
    other_layer = model.base_model.model.model.layers[1].self_attn.q_proj.input_group
    assert other_layer is not group


@pytest.mark.parametrize("activation", ["gelu", "identity"])
@pytest.mark.parametrize("train_shared", [True, False])
def test_grouped_equals_one_call_per_layer_and_the_formula(
    activation, train_shared, tiny_inputs, group_calls
):
    base = make_tiny_llama()
    grouped = get_peft_model(copy.deepcopy(base), config(activation=activation, train_shared=train_shared))
    solo = ungrouped(
        get_peft_model(copy.deepcopy(base), config(activation=activation, train_shared=train_shared))
    )
    got = logits_and_grads(grouped, tiny_inputs)
    layers = base.config.num_hidden_layers
    assert group_calls == [3] * layers  # one call per attention block, for q, k and v
    want = logits_and_grads(solo, tiny_inputs)
    with reference_implementation():
        formula = logits_and_grads(solo, tiny_inputs)
    assert len(group_calls) == layers  # neither the ungrouped nor the reference model grouped
    for other in (want, formula):
        torch.testing.assert_close(got[0], other[0], rtol=1e-5, atol=1e-5)
        assert got[1].keys() == other[1].keys() and len(got[1]) > 0
        for name in got[1]:
            torch.testing.assert_close(got[1][name], other[1][name], rtol=1e-4, atol=1e-5)


def test_grouped_bf16_is_as_close_to_fp32_as_one_call_per_layer(tiny_inputs):
    base = make_tiny_llama()
    exact = get_peft_model(copy.deepcopy(base), config())
    grouped = get_peft_model(copy.deepcopy(base).to(torch.bfloat16), config())
    solo = ungrouped(get_peft_model(copy.deepcopy(base).to(torch.bfloat16), config()))
    want = logits_and_grads(exact, tiny_inputs)
    errors = {}
    for name, model in (("grouped", grouped), ("solo", solo)):
        got = logits_and_grads(model, tiny_inputs)
        errors[name] = max(
            (got[1][k].float() - want[1][k]).norm() / want[1][k].norm() for k in want[1]
        ).item()
    assert errors["grouped"] < 1.5 * errors["solo"] + 1e-3, errors


def test_gradcheck_of_three_members_with_biases_and_own_scalings():
    bases, encoders, middles, decoders = three_members()
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    scalings = [2.0, 0.5, 1.5]

    def grouped(x, *weights):
        return tuple(
            fused.fused_group_add(bases, x, weights[:3], weights[3:6], weights[6:], "gelu", scalings)
        )

    assert torch.autograd.gradcheck(grouped, (x, *encoders, *middles, *decoders))
    for i, base in enumerate(bases):  # and each output is that member's own fused update
        alone = fused.fused_dense_add(base, x, encoders[i], middles[i], decoders[i], "gelu", scalings[i], 0.0)
        torch.testing.assert_close(grouped(x, *encoders, *middles, *decoders)[i], alone)


def test_an_unused_member_output_gets_no_gradient_and_breaks_nothing():
    torch.manual_seed(0)
    bases = [nn.Linear(6, 4, bias=False).requires_grad_(False) for _ in range(3)]
    x = torch.randn(5, 6, requires_grad=True)
    weights = [torch.randn(2, 6), torch.randn(2, 2), torch.randn(4, 2)]
    params = [[w.clone().requires_grad_(True) for w in weights] for _ in bases]
    outs = fused.fused_group_add(bases, x, *zip(*params, strict=True), "gelu", [2.0] * 3)
    (outs[0].sum() + outs[2].sum()).backward()  # the second member's output is never used
    assert all(p.grad is None for p in params[1])  # as when it runs alone: weight decay leaves it alone too
    assert all(p.grad is not None and p.grad.any() for p in params[0] + params[2])
    # the used members' gradients and x's are those of the two run alone (the unused one's columns add nothing)
    alone = [[w.clone().requires_grad_(True) for w in weights] for _ in bases]
    x_alone = x.detach().clone().requires_grad_(True)
    sum(
        fused.fused_dense_add(bases[i], x_alone, *alone[i], "gelu", 2.0, 0.0).sum() for i in (0, 2)
    ).backward()
    for i in (0, 2):
        for got, want in zip(params[i], alone[i], strict=True):
            torch.testing.assert_close(got.grad, want.grad)
    torch.testing.assert_close(x.grad, x_alone.grad)


def three_members(dtype=torch.float64):
    """Three frozen bases of one input width (one without a bias) and their adapter weights, requiring grad."""
    torch.manual_seed(0)
    outs, r, width = (5, 3, 4), 2, 6
    bases = [nn.Linear(width, out, bias=i != 1).to(dtype).requires_grad_(False) for i, out in enumerate(outs)]
    encoders = [torch.randn(r, width, dtype=dtype, requires_grad=True) for _ in outs]
    middles = [torch.randn(r, r, dtype=dtype, requires_grad=True) for _ in outs]
    decoders = [torch.randn(out, r, dtype=dtype, requires_grad=True) for out in outs]
    return bases, encoders, middles, decoders


@pytest.mark.parametrize("activation", ["gelu", "identity"])
def test_with_dropout_each_member_is_the_formula_with_its_own_replayed_masks(activation, mask_path):
    bases, encoders, middles, decoders = three_members()
    p, seed, scalings = 0.3, 1234, [2.0, 0.5, 1.5]
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    outs = fused.fused_group_add(bases, x, encoders, middles, decoders, activation, scalings, p, seed)
    torch.autograd.backward(
        outs, [torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view(o.shape) for o in outs]
    )
    got = [x.grad, *(t.grad for t in (*encoders, *middles, *decoders))]

    # the masks one draw from the seed gives: x per member, then the stacked hidden, then the stacked output
    dropout = fused.SeededDropout(seed, p, torch.device("cpu"))
    rows, n, r = 8, 3, 2
    widths = [base.out_features for base in bases]
    keep_x, keep_h, keep_y = dropout.keep_many(
        (n, rows, 6), (rows, n * r), (rows, sum(widths)), dtype=x.dtype
    )
    c = dropout.scale
    act = fused.ACTIVATION_FUNCTIONS[activation] or (lambda t: t)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, *encoders, *middles, *decoders)]
    flat, start, want_outs = leaves[0].reshape(rows, 6), 0, []
    for i, base in enumerate(bases):
        end = start + widths[i]
        hidden = act((flat * keep_x[i] * c) @ leaves[1 + i].t()) * keep_h[:, i * r : (i + 1) * r] * c
        update = act(hidden @ leaves[4 + i].t() @ leaves[7 + i].t()) * keep_y[:, start:end] * c
        want_outs.append((base(flat) + scalings[i] * update).view(2, 4, -1))
        start = end
    for got_out, want_out in zip(outs, want_outs, strict=True):
        torch.testing.assert_close(got_out, want_out)
    assert not torch.equal(keep_x[0], keep_x[1])  # the members' masks are their own
    torch.autograd.backward(
        want_outs, [torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view(o.shape) for o in want_outs]
    )
    for got_grad, leaf in zip(got, leaves, strict=True):
        torch.testing.assert_close(got_grad, leaf.grad)


def test_gradcheck_with_dropout_replayed_from_the_seed():
    bases, encoders, middles, decoders = three_members()
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)

    def grouped(x, *weights):
        return tuple(
            fused.fused_group_add(
                bases, x, weights[:3], weights[3:6], weights[6:], "gelu", [2.0] * 3, 0.25, 7
            )
        )

    assert torch.autograd.gradcheck(grouped, (x, *encoders, *middles, *decoders))


def test_dropout_training_groups_and_keeps_the_drop_rate(tiny_inputs, group_calls):
    model = get_peft_model(make_tiny_llama(), config(lora_dropout=0.05)).train()
    logits_and_grads(model, tiny_inputs)
    assert group_calls == [3] * model.config.num_hidden_layers
    torch.manual_seed(0)
    with torch.no_grad():
        first = model(**tiny_inputs).logits
        second = model(**tiny_inputs).logits
    assert not torch.equal(first, second)  # fresh masks every call


@pytest.mark.parametrize("lora_dropout", [0.0, 0.1])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_with_groups_gives_the_same_gradients(
    lora_dropout, reentrant, tiny_inputs, group_calls
):
    base = make_tiny_llama()
    plain = get_peft_model(copy.deepcopy(base), config(lora_dropout=lora_dropout)).train()
    checkpointed_base = copy.deepcopy(base)
    checkpointed_base.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": reentrant}
    )
    checkpointed = get_peft_model(checkpointed_base, config(lora_dropout=lora_dropout)).train()
    torch.manual_seed(3)
    want = logits_and_grads(plain, tiny_inputs)
    torch.manual_seed(3)  # the same dropout seeds, drawn again in the recomputation
    got = logits_and_grads(checkpointed, tiny_inputs, use_cache=False)
    torch.testing.assert_close(got[0], want[0])
    layers = base.config.num_hidden_layers
    assert len(group_calls) == 3 * layers  # plain forward, checkpointed forward, its recomputation
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_cross_attention_has_the_gradients_of_its_own_forward(reentrant):
    """An encoder-decoder's cross-attention q reads another tensor than k and v, so the q/k/v group finds out in
    the first forward that it must stand down. It must not do so inside a forward that checkpointing replays:
    the replay would compute q alone, with other dropout masks, and backward would differentiate another
    function. The checkpointed step equals the plain step that takes the same path (saved-tensor hooks keep a
    plain forward from standing down too, as they do a non-reentrant checkpointed one)."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    sizes = dict(d_model=16, encoder_attention_heads=2, decoder_attention_heads=2, max_position_embeddings=32)
    bart = BartForConditionalGeneration(
        BartConfig(
            vocab_size=64, encoder_layers=1, decoder_layers=1, **sizes, dropout=0.0, attention_dropout=0.0
        )
    )
    ids = torch.randint(4, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    adapter = DenseLoraConfig(
        r=4, target_modules=["q_proj", "k_proj", "v_proj"], lora_dropout=0.1, init_weights=False, init_seed=0
    )

    def step(checkpointing: bool):
        base = copy.deepcopy(bart)
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model = get_peft_model(base, copy.deepcopy(adapter)).train()
        torch.manual_seed(3)
        with contextlib.ExitStack() as stack:
            if not checkpointing:
                stack.enter_context(torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t))
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    (got_loss, got), (want_loss, want) = step(True), step(False)
    torch.testing.assert_close(got_loss, want_loss)
    assert got.keys() == want.keys()
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)


class CrossAttention(nn.Module):
    """q reads one tensor, k and v another: a q/k/v group whose members do not share their input."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(8, 8, bias=False) for _ in range(3))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x) + self.k_proj(memory) * self.v_proj(memory)


def test_members_reading_different_tensors_run_alone_and_the_group_stands_down(group_calls):
    torch.manual_seed(0)
    base = CrossAttention()
    grouped = get_peft_model(copy.deepcopy(base), config(target_modules=["q_proj", "k_proj", "v_proj"], r=2))
    solo = ungrouped(
        get_peft_model(copy.deepcopy(base), config(target_modules=["q_proj", "k_proj", "v_proj"], r=2))
    )
    x, memory = torch.randn(3, 8), torch.randn(3, 8)
    for _ in range(2):
        torch.testing.assert_close(grouped(x, memory), solo(x, memory))
    assert len(group_calls) == 1  # q's first call computed k and v for the wrong tensor; none after that
    assert grouped.base_model.model.q_proj.input_group.enabled is False


def test_in_place_change_of_the_input_is_not_served_stale_outputs():
    torch.manual_seed(0)
    model = get_peft_model(
        CrossAttention(), config(target_modules=["q_proj", "k_proj", "v_proj"], r=2)
    ).eval()
    layers = model.base_model.model
    x = torch.randn(3, 8)
    with torch.no_grad():
        layers.q_proj(x)  # computes and keeps k's and v's outputs for x
        x.mul_(2)
        got = layers.k_proj(x)
        with reference_implementation():
            want = layers.k_proj(x)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "change",
    ["own middle", "shared encoder", "base weight", "base weight swapped", "other adapter", "LoRA adapter"],
)
def test_a_member_whose_state_changed_after_the_group_call_is_not_served_stale_outputs(change):
    """q's call computes k's output and keeps it; when k is called with the same x after its weights were updated
    in place (an optimizer step) or another adapter was set, k must compute its output afresh."""
    torch.manual_seed(0)
    model = get_peft_model(
        CrossAttention(), config(target_modules=["q_proj", "k_proj", "v_proj"], r=2), adapter_name="alpha"
    ).eval()
    lora_modules = ["k_proj"] if change == "LoRA adapter" else None  # beta adapts k with a plain LoRA pair
    beta = config(target_modules=["q_proj", "k_proj", "v_proj"], r=2, init_seed=5, lora_modules=lora_modules)
    model.add_adapter("beta", beta)
    model.set_adapter("alpha")
    layers = model.base_model.model
    k_proj = layers.k_proj
    x = torch.randn(3, 8)
    with torch.no_grad():
        layers.q_proj(x)  # computes and keeps k's and v's outputs for x
        if change == "own middle":
            k_proj.denselora_M["alpha"].add_(1.0)
        elif change == "shared encoder":
            model.base_model.denselora_encoder["alpha"]["k_proj"].mul_(2.0)
        elif change == "base weight":
            k_proj.get_base_layer().weight.mul_(2.0)
        elif change == "base weight swapped":  # as nn.Module.to() does: same Parameter and version
            weight = k_proj.get_base_layer().weight
            weight.data = weight.data * 2.0
        else:
            model.set_adapter("beta")
        got = k_proj(x)
        with reference_implementation():
            want = k_proj(x)
    torch.testing.assert_close(got, want)
    assert k_proj.input_group.enabled  # the group goes on serving later calls


def test_deepcopy_and_pickle_keep_each_copy_grouped_with_its_own_layers(tiny_inputs):
    model = get_peft_model(make_tiny_llama(), config()).eval()
    with torch.no_grad():
        want = model(**tiny_inputs).logits
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        attention = clone.base_model.model.model.layers[0].self_attn
        assert attention.q_proj.input_group.members == [attention.q_proj, attention.k_proj, attention.v_proj]
        with torch.no_grad():
            torch.testing.assert_close(clone(**tiny_inputs).logits, want)


@pytest.mark.parametrize("change", ["other adapter", "disabled", "merged"])
def test_a_member_in_another_adapter_state_is_not_computed_with_the_group(change, tiny_inputs, group_calls):
    model = get_peft_model(make_tiny_llama(), config(activation="identity"), adapter_name="alpha").eval()
    model.add_adapter("beta", config(activation="identity", init_seed=5))
    model.set_adapter("alpha")
    k_proj = model.base_model.model.model.layers[0].self_attn.k_proj
    if change == "other adapter":
        k_proj.set_adapter("beta")
    elif change == "disabled":
        k_proj.enable_adapters(False)
    else:
        k_proj.merge(adapter_names=["alpha"])
    with torch.no_grad():
        got = model(**tiny_inputs).logits
        with one_call_per_layer():
            want = model(**tiny_inputs).logits
    assert len(group_calls) == model.config.num_hidden_layers  # layer 0 groups q and v only
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert k_proj.input_group.enabled  # k ran alone, and the group still serves q and v


def test_gate_and_up_are_grouped_when_both_are_adapted(tiny_inputs, group_calls):
    base = make_tiny_llama()
    targets = [*DEFAULT_TARGET_MODULES, "gate_proj"]
    model = get_peft_model(copy.deepcopy(base), config(target_modules=targets)).eval()
    with torch.no_grad():
        got = model(**tiny_inputs).logits
        with one_call_per_layer():
            want = model(**tiny_inputs).logits
    assert sorted(group_calls) == sorted([3, 2] * base.config.num_hidden_layers)  # q/k/v, then gate/up
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class SelfAttention(nn.Module):
    """q, k and v read one x."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(8, 8, bias=False) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x) + self.k_proj(x) * self.v_proj(x)


@pytest.mark.parametrize("grad_mode", [False, True])
@pytest.mark.parametrize("transform", ["jvp", "vmap", "grad", "jacrev", "forward_ad"])
def test_func_transforms_and_forward_ad_run_the_plain_formula(transform, grad_mode, group_calls):
    """The fused autograd functions have no setup_context, vmap or jvp rule, so under torch.func transforms and
    forward-mode AD every layer computes through the plain formula, with or without autograd: same values and
    derivatives as reference_implementation() (with grad mode on they raised torch's "must override the
    setup_context" error, or "must implement the jvp function")."""
    torch.manual_seed(0)
    model = get_peft_model(SelfAttention(), config(target_modules=["q_proj", "k_proj", "v_proj"], r=2)).eval()
    x, tangent = torch.randn(3, 8), torch.randn(3, 8)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def run():
        if transform == "jvp":
            return torch.func.jvp(model, (x,), (tangent,))
        if transform == "vmap":
            return torch.func.vmap(model)(torch.stack([x, tangent]))
        if transform == "grad":
            return torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).pow(2).sum())(params)
        if transform == "jacrev":
            return torch.func.jacrev(model)(x)
        with fwAD.dual_level():
            return fwAD.unpack_dual(model(fwAD.make_dual(x, tangent))).tangent.clone()

    with torch.set_grad_enabled(grad_mode):
        with reference_implementation():
            want = run()
        got = run()
    assert group_calls == []
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_jvp_of_a_dropout_model_in_training_mode_runs():
    """Dropout masks drawn under a transform come from the plain formula's nn.Dropout (the fused path's bit-packed
    masks read the generator's words through numpy, which a transform's wrapped tensors do not allow)."""
    torch.manual_seed(0)
    model = get_peft_model(
        SelfAttention(), config(target_modules=["q_proj", "k_proj", "v_proj"], r=2, lora_dropout=0.2)
    )
    x = torch.randn(3, 8)
    with torch.no_grad():
        out, derivative = torch.func.jvp(model.train(), (x,), (x,))
    assert out.shape == derivative.shape == (3, 8) and torch.isfinite(derivative).all()


class CallsQTwice(nn.Module):
    """An attention-like block that calls q again after k and v, on the same x (weight re-use)."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x) + self.k_proj(x) * self.v_proj(x) + self.q_proj(x)


def q_twice_model(**overrides) -> nn.Module:
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj"]
    return get_peft_model(
        CallsQTwice(), DenseLoraConfig(r=2, target_modules=targets, init_weights=False, **overrides)
    )


def adapter_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


@pytest.mark.parametrize("checkpointed", [False, True])
def test_outputs_kept_for_one_round_are_not_served_to_the_next(checkpointed):
    """q computes k's and v's outputs with its own; a second q call on the same x, the next step on the same x and a
    non-reentrant checkpoint's replay each start a new round. Serving the last round's outputs broke backward
    ("backward through the graph a second time") and made the replay save other tensors than the forward."""
    model = q_twice_model()
    x = torch.randn(3, 8, requires_grad=True)

    def step():
        out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False) if checkpointed else model(x)
        out.sum().backward()
        return adapter_grads(model) | {"x": x.grad.clone()}

    with reference_implementation():
        x.grad = None
        want = step()
    for _ in range(2):
        x.grad = None
        got = step()
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], msg=name)
    single = model.base_model.model.q_proj  # only q in the region: k's and v's outputs are left kept
    x.grad = None
    torch.utils.checkpoint.checkpoint(single, x, use_reentrant=False).sum().backward()
    assert x.grad is not None


def test_a_seeded_dropout_forward_repeats_on_the_same_x():
    model = q_twice_model(lora_dropout=0.1).train()
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.manual_seed(0)
        first = model(x)
        torch.manual_seed(0)
        assert torch.equal(model(x), first)
