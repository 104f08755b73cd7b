"""The fused fast path computes the reference formula's values and gradients, and keeps only r-dim tensors."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_llama
from peft import get_peft_model

from dense_lora import DEFAULT_TARGET_MODULES, DenseLoraConfig
from dense_lora.config import ACTIVATIONS
from dense_lora.fused import SeededDropout, fused_dense_add, fused_group_add
from dense_lora.layer import dense_delta, reference_implementation

N, IN, OUT, R = 10, 48, 40, 6


def weights(requires_grad: tuple[bool, bool, bool] = (True, True, True), dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    shapes = ((R, IN), (R, R), (OUT, R))
    return [
        (torch.randn(shape, generator=generator) / 3).to(dtype).requires_grad_(grad)
        for shape, grad in zip(shapes, requires_grad, strict=True)
    ]


def fused_update(activation, scaling, p, seed=None):
    """The fused update as a delta: added to a zero base output whose gradient must be the upstream gradient."""

    def delta(x, encoder, middle, decoder):
        base = torch.zeros(*x.shape[:-1], decoder.shape[0], dtype=x.dtype, requires_grad=True)
        out = fused_dense_add(base, x, encoder, middle, decoder, activation, scaling, p, seed)
        out.register_hook(lambda grad: setattr(delta, "upstream", grad))
        base.register_hook(lambda grad: setattr(delta, "base_grad", grad))
        return out

    return delta


def run(fn, x, params):
    x = x.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    out = fn(x, *params)
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
    if hasattr(fn, "base_grad"):
        assert torch.equal(fn.base_grad, fn.upstream)  # the base output's gradient passes through untouched
    return out, x.grad, [p.grad for p in params]


def assert_same(fused, reference, **tolerance):
    torch.testing.assert_close(fused[0], reference[0], **tolerance)
    torch.testing.assert_close(fused[1], reference[1], **tolerance)
    for got, want in zip(fused[2], reference[2], strict=True):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, **tolerance)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("train_shared", [True, False])
def test_fused_equals_reference_values_and_gradients(activation, train_shared):
    # float64: the two paths associate the products differently, so only rounding-free arithmetic is bit-tight
    x = torch.randn(2, N // 2, IN, dtype=torch.float64)
    params = weights((train_shared, True, train_shared), dtype=torch.float64)
    fused = run(fused_update(activation, 1.5, 0.0), x, params)
    reference = run(
        lambda x, e, m, d: dense_delta(x, e, m, d, activation, torch.nn.Identity(), 1.5), x, params
    )
    assert_same(fused, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("activation", ["gelu", "identity"])
def test_fused_dropout_with_fixed_seed_equals_reference(activation):
    """The fused path's masks are the reference's masks when both draw them from the same seed, in the same order."""
    x = torch.randn(N, IN, dtype=torch.float64)
    params = weights(dtype=torch.float64)
    fused = run(fused_update(activation, 2.0, 0.25, seed=11), x, params)
    reference = run(
        lambda x, e, m, d: dense_delta(x, e, m, d, activation, SeededDropout(11, 0.25, x.device), 2.0),
        x,
        params,
    )
    assert_same(fused, reference, rtol=1e-10, atol=1e-12)
    # and the masks really drop: about a quarter of x's entries get no gradient
    dropped = (fused[1] == 0).float().mean().item()
    assert 0.1 < dropped < 0.4


def test_fused_bf16_is_as_accurate_as_the_formula_in_bf16():
    """float32 weights, bf16 compute: against float64 truth the fused path's output and gradients are within bf16
    rounding (2.5 ulps of the largest entry), as is the plain formula run in bf16; weight gradients are float32."""
    torch.manual_seed(0)
    x = torch.randn(N, IN, dtype=torch.bfloat16)
    params = weights()
    fused = run(fused_update("gelu", 2.0, 0.0), x, params)
    formula = lambda x, e, m, d: dense_delta(x, e, m, d, "gelu", torch.nn.Identity(), 2.0)  # noqa: E731
    bf16 = run(formula, x, [p.detach().to(torch.bfloat16).requires_grad_() for p in params])
    truth = run(formula, x.double(), [p.detach().double().requires_grad_() for p in params])
    assert fused[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in fused[2])
    for got, plain, want in zip(
        [fused[0], fused[1], *fused[2]],
        [bf16[0], bf16[1], *bf16[2]],
        [truth[0], truth[1], *truth[2]],
        strict=True,
    ):
        bound = 2e-2 * want.abs().max()
        assert (got.double() - want).abs().max() <= bound
        assert (plain.double() - want).abs().max() <= bound


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("trainable_base", [False, True])
def test_fused_runs_the_frozen_linear_itself(p, trainable_base):
    """Given the frozen nn.Linear, the function computes its output and one input gradient for both; a trainable
    base falls back to the layer's own autograd, so its weight still gets a gradient."""
    linear = torch.nn.Linear(IN, OUT, dtype=torch.float64).requires_grad_(trainable_base)
    x = torch.randn(N, IN, dtype=torch.float64)
    params = weights(dtype=torch.float64)

    def fused(x, e, m, d):
        return fused_dense_add(linear, x, e, m, d, "gelu", 2.0, p, seed=5)

    def reference(x, e, m, d):
        dropout = SeededDropout(5, p, x.device) if p else torch.nn.Identity()
        return linear(x) + dense_delta(x, e, m, d, "gelu", dropout, 2.0)

    got = run(fused, x, params)
    base_grad = linear.weight.grad
    linear.zero_grad()
    assert_same(got, run(reference, x, params), rtol=1e-10, atol=1e-12)
    if trainable_base:
        torch.testing.assert_close(base_grad, linear.weight.grad, rtol=1e-10, atol=1e-12)


def saved_bytes(fn, x, params) -> int:
    """Bytes autograd keeps for backward, each storage once, parameters excluded."""
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x, *params)
    return sum(storages.values())


def packed_mask_bytes(*counts: int) -> int:
    """Bytes of masks kept one bit per element, each padded to whole 64-bit words of the 16-bit-per-element
    stream (4 elements), all in one packed buffer."""
    return -(-sum(4 * -(-count // 4) for count in counts) // 8)


@pytest.mark.parametrize("activation", ["gelu", "identity"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_fused_keeps_only_x_and_one_rank_dim_tensor(p, activation):
    x = torch.randn(N, IN, dtype=torch.bfloat16, requires_grad=True)
    params = weights()
    with torch.random.fork_rng():
        kept = saved_bytes(fused_update(activation, 2.0, p, seed=3), x, params)
    # x (bf16, not copied) + a (bf16), no weights: backward forms h = drop(act(a)) again; with dropout the masks
    # of x, h and y packed one bit per element
    masks = packed_mask_bytes(x.numel(), N * R, N * OUT) if p else 0
    assert kept == x.numel() * 2 + N * R * 2 + masks
    dropout = SeededDropout(3, p, x.device) if p else torch.nn.Identity()
    reference = saved_bytes(
        lambda x, e, m, d: dense_delta(x, e.bfloat16(), m.bfloat16(), d.bfloat16(), "gelu", dropout, 2.0),
        x,
        params,
    )
    assert kept < reference


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_fused_group_keeps_only_x_and_one_rank_dim_tensor(p):
    """q/k/v in one call keep x once and one r-wide tensor per member (plus the packed masks). Their gradients,
    with h formed again in backward, are the formula's: test_input_groups.py's replayed-mask test."""
    generator = torch.Generator().manual_seed(1)
    outs = (OUT, OUT // 2, OUT // 2)
    bases = [torch.nn.Linear(IN, out, bias=False).requires_grad_(False) for out in outs]
    adapters = [
        [
            (torch.randn(shape, generator=generator) / 3).requires_grad_()
            for shape in ((R, IN), (R, R), (out, R))
        ]
        for out in outs
    ]
    params = [b.weight for b in bases] + [t for member in adapters for t in member]
    x = torch.randn(N, IN, requires_grad=True)

    def group(x, *_):
        encoders, middles, decoders = zip(*adapters, strict=True)
        return torch.cat(fused_group_add(bases, x, encoders, middles, decoders, "gelu", [2.0] * 3, p, 3), -1)

    kept = saved_bytes(group, x, params)
    masks = packed_mask_bytes(3 * x.numel(), N * 3 * R, N * sum(outs)) if p else 0
    assert kept == x.numel() * 4 + N * 3 * R * 4 + masks


@pytest.mark.parametrize(
    "overrides", [{}, {"train_shared": False}, {"activation": "identity"}, {"lora_modules": ["v_proj"]}]
)
def test_model_gradients_fused_equal_reference(overrides, tiny_inputs):
    config = dict(
        r=8, lora_alpha=16, target_modules=list(DEFAULT_TARGET_MODULES), init_weights=False, init_seed=0
    )
    model = get_peft_model(make_tiny_llama(), DenseLoraConfig(**config, **overrides))
    grads = []
    for reference in (False, True):
        model.zero_grad()
        with reference_implementation(reference):
            loss = model(**tiny_inputs, labels=tiny_inputs["input_ids"]).loss
            loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_fused_under_autocast_and_backward_inside_autocast(tiny_inputs):
    model = get_peft_model(
        make_tiny_llama(), DenseLoraConfig(r=8, target_modules=["q_proj", "down_proj"], init_weights=False)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**tiny_inputs, labels=tiny_inputs["input_ids"]).loss
        loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_bf16_base_under_autocast_stays_on_the_fused_path(tiny_inputs, monkeypatch):
    """``finetune.py --bf16`` loads the base in bfloat16 and trains under bfloat16 autocast. There the fused path
    still runs the frozen products itself, q, k and v in one call (no base layer's forward runs), and the loss and
    gradients equal the plain formula's under the same autocast, to bfloat16 precision."""
    base_names: dict[int, str] = {}
    called: list[str] = []
    linear_forward = torch.nn.Linear.forward

    def counting_forward(module, x):  # not a hook: a hooked base layer is called by design
        if id(module) in base_names:
            called.append(base_names[id(module)])
        return linear_forward(module, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", counting_forward)

    def step(reference: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[str]]:
        config = DenseLoraConfig(r=8, init_weights=False, init_seed=0)
        model = get_peft_model(make_tiny_llama(dtype=torch.bfloat16), config).train()
        called.clear()
        base_names.clear()
        for name, module in model.named_modules():
            if name.endswith("_proj.base_layer"):
                base_names[id(module)] = name
        with reference_implementation(reference), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**tiny_inputs, labels=tiny_inputs["input_ids"]).loss
            loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach().float(), grads, list(called)

    fused_loss, fused_grads, fused_called = step(reference=False)
    plain_loss, plain_grads, plain_called = step(reference=True)
    assert (
        fused_called == [] and len(plain_called) == 3 * 5
    )  # the 5 adapted Linears of 3 layers, in the reference
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-2, atol=0)
    assert fused_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        assert fused_grads[name].dtype == torch.float32 and grad.abs().sum() > 0, name
        scale = grad.abs().max()
        torch.testing.assert_close(fused_grads[name], grad, rtol=0, atol=0.05 * scale, msg=name)


@pytest.mark.parametrize("base_is_module", [False, True])
def test_fused_without_autograd_gives_the_same_output(base_is_module):
    """Generation runs under no_grad/inference_mode, where the function skips autograd's bookkeeping."""
    linear = torch.nn.Linear(IN, OUT).requires_grad_(False)
    x = torch.randn(N, IN)
    params = weights()

    def output():
        base = linear if base_is_module else linear(x)
        return fused_dense_add(base, x, *params, "gelu", 2.0, 0.0)

    with_grad = output()
    with torch.inference_mode():
        without = output()
    assert with_grad.requires_grad and not without.requires_grad
    assert torch.equal(with_grad.detach(), without)


def test_a_hooked_frozen_layer_is_called_not_bypassed(tiny_inputs):
    """The fused path computes a frozen Linear's product itself only when calling it would run nothing more. A
    forward pre-hook on k_proj's base (a q/k/v group member) and accelerate's CPU offload of v_proj's base (its
    weight waits on the meta device until accelerate's hook loads it) both run, as in the plain formula."""
    from accelerate import cpu_offload

    torch.manual_seed(0)
    config = DenseLoraConfig(
        r=4, target_modules=list(DEFAULT_TARGET_MODULES), init_weights=False, init_seed=0
    )
    model = get_peft_model(make_tiny_llama(), config).eval()
    attention = model.base_model.model.model.layers[0].self_attn
    with torch.no_grad():
        before = model(**tiny_inputs).logits
    attention.k_proj.base_layer.register_forward_pre_hook(lambda module, args: (args[0] * 0.5,))
    cpu_offload(attention.v_proj.base_layer, execution_device=torch.device("cpu"))
    assert attention.v_proj.base_layer.weight.device.type == "meta"
    with torch.no_grad():
        fused_logits = model(**tiny_inputs).logits
        with reference_implementation():
            plain_logits = model(**tiny_inputs).logits
    torch.testing.assert_close(fused_logits, plain_logits, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(fused_logits, before)  # the hook changed k_proj's input
