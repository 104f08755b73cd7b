"""The fused path's dropout masks: drawn from the seed, kept packed for backward, at the asked rate.

Forward draws the masks from the seed and keeps them one bit per element; backward unpacks them and draws
nothing (a checkpointed forward draws them again from the same seed). These tests pin what that scheme promises:
the same seed gives the same masks (whatever the thread count), the rate is p, forward and backward use the
same masks (an input element dropped in forward gets exactly zero adapter gradient), and values and gradients
equal the plain formula run with the same masks.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_llama
from peft import get_peft_model

from dense_lora import DenseLoraConfig, fused
from dense_lora.fused import SeededDropout, fused_dense_add
from dense_lora.layer import dense_delta

N, IN, OUT, R = 12, 40, 24, 6


def weights(dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(shape, generator=generator) / 3).to(dtype).requires_grad_()
        for shape in ((R, IN), (R, R), (OUT, R))
    ]


def test_same_seed_same_masks_other_seed_other_masks() -> None:
    like = torch.empty(64, 33)  # an odd element count: the last 64-bit word is half used
    first = [SeededDropout(7, 0.3, like.device).keep(like) for _ in range(2)]
    assert torch.equal(first[0], first[1])
    assert set(first[0].unique().tolist()) == {0.0, 1.0}
    other = SeededDropout(8, 0.3, like.device).keep(like)
    assert not torch.equal(first[0], other)
    # successive draws from one generator differ (x, hidden and output get independent masks)
    replay = SeededDropout(7, 0.3, like.device)
    assert not torch.equal(replay.keep(like), replay.keep(like))


def test_masks_do_not_depend_on_the_thread_count() -> None:
    like = torch.empty(512, 300, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = SeededDropout(3, 0.05, like.device).keep(like)
        torch.set_num_threads(max(2, threads))
        many = SeededDropout(3, 0.05, like.device).keep(like)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_drop_rate_is_p(p: float) -> None:
    """2^20 draws: the dropped share is within 6 standard deviations of p, and dropout keeps the mean."""
    like = torch.empty(1024, 1024)
    dropout = SeededDropout(11, p, like.device)
    dropped = 1.0 - dropout.keep(like).mean().item()
    sd = (p * (1 - p) / like.numel()) ** 0.5
    assert abs(dropped - p) < 6 * sd
    assert dropout.mask(like).mean().item() == pytest.approx(1.0, abs=6 * sd / (1 - p))


@pytest.mark.parametrize("activation", ["gelu", "identity", "silu"])
@pytest.mark.parametrize("fuse_base", [False, True])
def test_gradients_equal_the_formula_with_the_same_masks(
    activation: str, fuse_base: bool, mask_path: str
) -> None:
    """float64, p=0.2: output and every gradient equal the plain formula fed the replayed masks."""
    x = torch.randn(2, N // 2, IN, dtype=torch.float64)
    linear = torch.nn.Linear(IN, OUT, dtype=torch.float64).requires_grad_(False)
    upstream = torch.randn(2, N // 2, OUT, dtype=torch.float64)

    def run(update):
        xx = x.clone().requires_grad_()
        params = weights()
        (update(xx, *params) * upstream).sum().backward()
        return [xx.grad, *(p.grad for p in params)]

    fused = run(
        lambda xx, e, m, d: fused_dense_add(
            linear if fuse_base else linear(xx), xx, e, m, d, activation, 1.5, 0.2, seed=5
        )
    )
    plain = run(
        lambda xx, e, m, d: (
            linear(xx) + dense_delta(xx, e, m, d, activation, SeededDropout(5, 0.2, xx.device), 1.5)
        )
    )
    for got, want in zip(fused, plain, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_backward_replays_the_forward_masks_exactly(mask_path: str) -> None:
    """With the base detached, x's gradient comes from the adapter alone: it is exactly 0 on the elements forward
    dropped and non-zero elsewhere, and bf16 compute changes nothing about which."""
    x = torch.randn(N, IN, dtype=torch.bfloat16, requires_grad=True)
    encoder, middle, decoder = (w.detach().float().requires_grad_() for w in weights())
    base = torch.zeros(N, OUT, dtype=torch.bfloat16)
    out = fused_dense_add(base, x, encoder, middle, decoder, "identity", 2.0, 0.25, seed=9)
    out.sum().backward()
    keep_x = SeededDropout(9, 0.25, x.device).keep(x) != 0  # forward's first mask
    assert torch.equal(x.grad != 0, keep_x)
    assert 0.15 < 1 - keep_x.float().mean().item() < 0.35


def test_runs_are_reproducible_from_torch_seed(mask_path: str) -> None:
    """Without an explicit seed the mask seed comes from torch's RNG: torch.manual_seed replays a whole model step,
    and another torch seed gives other masks (so the step's loss differs)."""

    def step(torch_seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        config = DenseLoraConfig(r=4, lora_dropout=0.1, init_weights=False, init_seed=0)
        model = get_peft_model(make_tiny_llama(), config).train()
        ids = torch.arange(3, 23).view(2, 10)
        torch.manual_seed(torch_seed)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]

    (loss_a, grads_a), (loss_b, grads_b) = step(123), step(123)
    assert torch.equal(loss_a, loss_b)
    assert len(grads_a) > 0 and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    assert not torch.equal(step(124)[0], loss_a)


def test_one_draw_gives_the_masks_of_consecutive_draws() -> None:
    """keep_many (the fused path's single draw for x, hidden and output) cuts the stream as separate keeps do,
    for sizes that are and are not multiples of the four masks a 64-bit word holds."""
    shapes = [(3, 7), (3, 4), (5, 6), (2, 3)]
    separate_draws = SeededDropout(21, 0.3, torch.device("cpu"))
    separate = [separate_draws.keep(torch.empty(shape, dtype=torch.bfloat16)) for shape in shapes]
    together = SeededDropout(21, 0.3, torch.device("cpu")).keep_many(*shapes, dtype=torch.bfloat16)
    for one, many, shape in zip(separate, together, shapes, strict=True):
        assert many.shape == shape and many.dtype == torch.bfloat16
        assert torch.equal(one, many)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kept_masks_are_the_drawn_ones(dtype: torch.dtype) -> None:
    """What a draw keeps (``saved``) hands out the same masks again, exact 0/1 in every compute dtype."""
    shapes = [(3, 7), (5, 6), (1, 1)]
    drawn = SeededDropout(21, 0.3, torch.device("cpu"))
    masks = drawn.keep_many(*shapes, dtype=dtype)
    assert [bits.dtype for bits in drawn.saved] == [torch.uint8]
    assert drawn.saved[0].numel() == -(-(24 + 32 + 4) // 8)  # one bit per element, each mask on whole words
    kept = SeededDropout(0, 0.3, torch.device("cpu"), drawn.saved).keep_many(*shapes, dtype=dtype)
    for mask, again, shape in zip(masks, kept, shapes, strict=True):
        assert mask.shape == again.shape == shape and mask.dtype == again.dtype == dtype
        assert torch.equal(mask, again)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
    as_float = SeededDropout(21, 0.3, torch.device("cpu")).keep_many(*shapes, dtype=torch.float64)
    assert all(torch.equal(m.double(), f) for m, f in zip(masks, as_float, strict=True))


def test_device_masks_are_reproducible_at_rate_p_and_kept_packed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The masks other devices draw (torch's generator, ``on_host`` false): a stream of their own, the same for a
    seed, dropping p of 2^20 elements, and handed out again bit for bit from what the draw keeps packed."""
    shapes = [(1024, 1023), (3, 5)]
    host = SeededDropout(7, 0.05, torch.device("cpu")).keep_many(*shapes, dtype=torch.bfloat16)
    monkeypatch.setattr(fused, "on_host", lambda device: False)
    drawn = SeededDropout(7, 0.05, torch.device("cpu"))
    masks = drawn.keep_many(*shapes, dtype=torch.bfloat16)
    again = SeededDropout(7, 0.05, torch.device("cpu")).keep_many(*shapes, dtype=torch.bfloat16)
    assert all(torch.equal(m, a) for m, a in zip(masks, again, strict=True))
    assert not torch.equal(masks[0], host[0])  # torch's stream, not numpy's
    sd = (0.05 * 0.95 / masks[0].numel()) ** 0.5
    assert abs(1.0 - masks[0].float().mean().item() - drawn.p) < 6 * sd
    assert [bits.dtype for bits in drawn.saved] == [torch.uint8]
    kept = SeededDropout(0, 0.05, torch.device("cpu"), drawn.saved).keep_many(*shapes, dtype=torch.bfloat16)
    assert all(torch.equal(m, k) for m, k in zip(masks, kept, strict=True))


@pytest.mark.parametrize("count", [1, 7, 8, 9, 100, 1001])
def test_portable_bit_packing_matches_numpys(count: int) -> None:
    """Devices numpy cannot reach pack and unpack with torch ops, bit for bit as numpy does on CPU."""
    zero_one = torch.randint(
        0, 2, (count,), generator=torch.Generator().manual_seed(count), dtype=torch.uint8
    )
    packed = fused.pack_bits(zero_one)
    assert packed.numel() == -(-count // 8)
    assert torch.equal(fused._pack_bits_portable(zero_one), packed)
    assert torch.equal(fused.unpack_bits(packed, count), zero_one)
    assert torch.equal(fused._unpack_bits_portable(packed, count), zero_one)


def test_backward_draws_no_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    """One draw per forward call, none in backward, single layer and q/k/v group alike."""
    draws = []
    original = SeededDropout.random_words
    monkeypatch.setattr(SeededDropout, "random_words", lambda self, n: draws.append(n) or original(self, n))
    encoder, middle, decoder = weights(torch.float32)
    x = torch.randn(N, IN, requires_grad=True)
    fused_dense_add(
        torch.zeros(N, OUT), x, encoder, middle, decoder, "gelu", 2.0, 0.1, seed=4
    ).sum().backward()
    bases = [torch.nn.Linear(IN, OUT).requires_grad_(False) for _ in range(3)]
    outs = fused.fused_group_add(
        bases, x, [encoder] * 3, [middle] * 3, [decoder] * 3, "gelu", [2.0] * 3, 0.1, 4
    )
    assert len(draws) == 2
    sum(out.sum() for out in outs).backward()
    assert len(draws) == 2 and x.grad is not None and encoder.grad is not None


def test_dropout_runs_on_the_meta_device() -> None:
    """Shape-only models (the bench's LLaMA-3-8B shape on a machine without the memory) run the fused path with
    dropout on meta tensors: nothing is drawn, shapes and what backward keeps are the real ones."""
    meta = torch.device("meta")
    encoder, middle, decoder = (w.detach().to(meta).requires_grad_() for w in weights(torch.float32))
    x = torch.empty(N, IN, device=meta, requires_grad=True)
    out = fused_dense_add(
        torch.empty(N, OUT, device=meta), x, encoder, middle, decoder, "gelu", 2.0, 0.1, seed=1
    )
    assert out.shape == (N, OUT) and out.device == meta
    out.sum().backward()
    assert x.grad.shape == x.shape and decoder.grad.shape == decoder.shape


def test_traced_path_keeps_masks_and_matches_the_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torch.compile there is no host seed: masks come from torch.rand in the graph and are kept for
    backward. Run that path eagerly (is_compiling patched on): values and gradients equal the plain formula fed
    the same torch.rand draws, and what backward keeps now includes the three boolean masks."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x = torch.randn(2, N // 2, IN, dtype=torch.float64)
    linear = torch.nn.Linear(IN, OUT, dtype=torch.float64).requires_grad_(False)
    upstream = torch.randn(2, N // 2, OUT, dtype=torch.float64)
    p = 0.3

    def run(update):
        xx = x.clone().requires_grad_()
        params = weights()
        torch.manual_seed(17)
        (update(xx, *params) * upstream).sum().backward()
        return [xx.grad, *(q.grad for q in params)]

    def replayed_dropout():
        draws = iter([torch.rand(shape) >= p for shape in ((N, IN), (N, R), (N, OUT))])
        return lambda t: t * next(draws).view(t.shape).to(t.dtype) / (1 - p)

    fused = run(lambda xx, e, m, d: fused_dense_add(linear, xx, e, m, d, "gelu", 1.5, p))
    plain = run(lambda xx, e, m, d: linear(xx) + dense_delta(xx, e, m, d, "gelu", replayed_dropout(), 1.5))
    for got, want in zip(fused, plain, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_training_step_with_dropout_compiles_without_graph_breaks() -> None:
    """torch.compile traces a DenseLoRA training step with dropout in one graph (the seeded host-side masks would
    break it once per adapted module), and the compiled step trains every adapter tensor."""
    torch._dynamo.reset()
    config = DenseLoraConfig(r=4, lora_dropout=0.1, init_weights=False, init_seed=0)
    model = get_peft_model(make_tiny_llama(), config).train()
    ids = torch.arange(3, 23).view(2, 10)
    explanation = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="aot_eager")
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
    finally:
        torch._dynamo.reset()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_inductor_compiled_step_has_the_eager_gradients() -> None:
    """What ``finetune.py --torch_compile`` runs: the model compiled by Inductor (generated kernels, not only
    tracing). Without dropout (compiled runs draw their masks in the graph) its loss and every adapter gradient
    equal the eager step's, in float32, with all weights nonzero so every gradient flows."""
    config = DenseLoraConfig(r=4, lora_dropout=0.0, init_weights=False, init_seed=0)
    model = get_peft_model(make_tiny_llama(), config).train()
    ids = torch.arange(3, 23).view(2, 10)

    def step(module: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = module(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    eager_loss, eager = step(model)
    torch._dynamo.reset()
    try:
        compiled_loss, compiled = step(torch.compile(model))
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert compiled.keys() == eager.keys() and len(eager) == 3 * 5 + 2 * 5  # M per layer and module; W_e, W_d
    for name, grad in eager.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(compiled[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("base_inside", [True, False], ids=["base-computed-inside", "base-output-given"])
def test_inductor_compiles_the_residual_add_right(base_inside: bool) -> None:
    """The residual add after a matrix product, on 2-D input (a frozen product computed inside the function, or
    the base layer's output handed in): Inductor folds ``mm`` + ``add(alpha=s)`` into a wrong ``addmm``, so under
    compile the scaled update is written as a product. The compiled output equals the eager one."""
    linear = torch.nn.Linear(IN, OUT, bias=False).requires_grad_(False)
    encoder, middle, decoder = weights(torch.float32)
    x = torch.randn(N, IN)

    def update(xx: torch.Tensor) -> torch.Tensor:
        return fused_dense_add(
            linear if base_inside else linear(xx), xx, encoder, middle, decoder, "gelu", 2.0, 0.0
        )

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.testing.assert_close(torch.compile(update)(x), update(x), rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("shape", [(0, IN), (2, 0, IN)])
def test_an_empty_batch_runs_with_dropout(shape: tuple[int, ...]) -> None:
    """A layer handed no tokens (an empty micro-batch, an MoE expert no token was routed to) gives an empty
    output and zero weight gradients with dropout on, single layer and q/k/v group alike."""
    encoder, middle, decoder = weights(torch.float32)
    x = torch.randn(shape, requires_grad=True)
    out = fused_dense_add(torch.nn.Linear(IN, OUT), x, encoder, middle, decoder, "gelu", 2.0, 0.1, seed=3)
    bases = [torch.nn.Linear(IN, OUT).requires_grad_(False) for _ in range(3)]
    outs = fused.fused_group_add(
        bases, x, [encoder] * 3, [middle] * 3, [decoder] * 3, "gelu", [2.0] * 3, 0.1, 3
    )
    assert out.shape == outs[0].shape == (*shape[:-1], OUT)
    (out.sum() + sum(o.sum() for o in outs)).backward()
    assert x.grad.shape == shape and not encoder.grad.any() and not decoder.grad.any()


def test_a_second_derivative_is_refused_not_wrong() -> None:
    """Backward is written out rather than traced, so differentiating it again is an error (it used to give
    numbers that were not the second derivative)."""
    encoder, middle, decoder = weights()
    x = torch.randn(N, IN, dtype=torch.float64, requires_grad=True)
    out = fused_dense_add(
        torch.zeros(N, OUT, dtype=torch.float64), x, encoder, middle, decoder, "tanh", 1.0, 0.0
    )
    (grad_x,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(grad_x.sum(), encoder)


def test_a_rate_just_under_one_keeps_a_finite_scale() -> None:
    """p rounds to a multiple of 2^-16, but never up to 1: nn.Dropout accepts any p < 1, and so does this."""
    dropout = SeededDropout(0, 0.999995, torch.device("cpu"))
    assert dropout.p == 1 - 2**-16 and dropout.scale == 2**16
    assert dropout.keep(torch.empty(1000)).sum() <= 2


@pytest.mark.parametrize("group", [False, True])
def test_outputs_can_be_changed_in_place(group: bool) -> None:
    """Models change projection outputs in place (``query /= sqrt(d)``). The fused outputs allow it (they used to
    be views made inside the Function, which autograd refuses), with the gradients of the out-of-place change."""
    x = torch.randn(2, N // 2, IN, dtype=torch.float64)
    bases = [torch.nn.Linear(IN, OUT, dtype=torch.float64).requires_grad_(False) for _ in range(3)]

    def run(in_place: bool) -> list[torch.Tensor]:
        xx, params = x.clone().requires_grad_(), weights()
        if group:
            outs = fused.fused_group_add(bases, xx, *([p] * 3 for p in params), "gelu", [2.0] * 3, 0.2, 5)
        else:
            outs = [fused_dense_add(bases[0], xx, *params, "gelu", 2.0, 0.2, seed=5)]
        if in_place:
            for out in outs:
                out /= 3.0
        else:
            outs = [out / 3.0 for out in outs]
        sum((out * out).sum() for out in outs).backward()
        return [*(out.detach() for out in outs), xx.grad, *(p.grad for p in params)]

    for got, want in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
