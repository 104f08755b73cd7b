"""The fast DenseLoRA update: same function and gradients as ``layer.dense_delta``, far less memory for backward.

Autograd through the plain formula keeps, per module and token, the dropped-out input, the out-dim decoder output
and its activation, and dropout masks of in- and out-dim: several in/out-dim tensors per module. Here backward
gets only what it cannot cheaply recompute:

- ``x`` itself (no copy: q/k/v read the same tensor, so it is stored once for the three of them),
- the r-dim intermediate ``a = W_e x'``; backward forms ``h = drop(act(a))`` (unscaled: see below) from it again,
  one r-wide activation call, rather than keeping a second r-wide tensor per module,
- the three dropout masks, one bit per element (a sixteenth of the bf16 tensor each one masks), where autograd
  through the formula keeps each mask and each dropped tensor in the compute dtype. They come from 16 random bits
  per element held against a threshold (``SeededDropout``, about 0.5 ns per element where ``bernoulli_`` costs
  ~14 on CPU); backward unpacks them instead of drawing them again. Masks are 0/1 and the ``1 / (1 - p)`` factors
  live in the weight-sized encoder and decoder product and the output scale. (Under ``torch.compile`` the masks
  are drawn in the graph and kept as booleans: ``StoredDropout``.)

``W_d M`` is formed once per call in the weights' float32 (a weight-sized product), so the token-sized work is two
GEMMs forward, like LoRA's; backward recomputes ``z = h (W_d M)^T`` to get the activation's derivative. The
residual add is part of the function, and for a frozen ``nn.Linear`` so is the base product: forward writes
``W0 x + s * y`` into one buffer, and backward accumulates the adapter's input gradient into the layer's in place
rather than leaving autograd to add two input-sized tensors. ``s`` is applied to r-dim tensors only; the out-dim
work left is the activation and its derivative. Everything runs in the input's dtype (bf16 GEMMs on bf16 models);
weight gradients are returned in the weights' dtype.

Sibling layers that read one tensor (an attention block's q, k and v) go through ``fused_group_add`` instead: the
same function and gradients per member, with one encoder GEMM, the decoder GEMMs writing into one buffer, one
activation call of each kind and one mask draw for all of them (``layer.InputGroup`` decides when).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

# The activations DenseLoRA offers (None: identity, the paper's "Only Matrix"); config and layer read this table.
ACTIVATION_FUNCTIONS = {"gelu": F.gelu, "identity": None, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh}
_ACTIVATION_INPLACE = {
    "gelu": torch.ops.aten.gelu_,
    "identity": None,
    "relu": torch.relu_,
    "silu": lambda t: F.silu(t, inplace=True),
    "tanh": torch.tanh_,
}


def _activation_backward(activation: str, grad: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """grad * act'(pre), with the native fused backward kernels."""
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad, pre)
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, pre, 0)
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, pre)
    if activation == "tanh":
        return torch.ops.aten.tanh_backward(grad, torch.tanh(pre))
    return grad


def on_host(device: torch.device) -> bool:
    """Whether numpy can work on this device's memory (the CPU): masks there come from numpy, elsewhere from torch
    ops on the device. One predicate for both, so the tests can run the device path on CPU."""
    return device.type == "cpu"


class SeededDropout:
    """Dropout whose masks come from a private generator: the same seed gives the same masks, in order.

    The fused path draws the masks of x, the encoder output and the decoder output in forward and keeps them for
    backward packed one bit per element (``saved``: a sixteenth of the bf16 tensor each one masks), so backward
    unpacks them instead of drawing them again; under checkpointing the recomputed forward draws them again from
    the same seed. Each element gets 16 random bits as a uniform int16 ``u`` and is kept when ``u >= threshold``;
    the realised probability is therefore ``p`` rounded to a multiple of 2^-16 (0.05 -> 0.0500031), and
    ``scale`` is ``1 / (1 - realised p)``, which keeps the expectation exact. Masks are deterministic for a seed on
    a device type, whatever the thread count.

    Why this generator and this arithmetic (CPU costs per mask element, two threads): ``bernoulli_`` costs ~14 ns;
    torch's CPU generator (mt19937) fills 16 bits in ~1 ns, numpy's SFC64 in ~0.5 ns, so CPU masks come from
    SFC64 (other devices keep torch's generator, Philox on CUDA). numpy compares the bits with the threshold
    (~0.08 ns) and packs the result (~0.05 ns), and a 0/1 byte becomes a 2-byte float mask as the int16 ``0`` or
    ``1.0``'s bit pattern (~0.08 ns) rather than through a float conversion (~0.12-0.6 ns); unpacking in backward
    costs ~0.06 ns, against ~0.7 for drawing and comparing again.
    """

    def __init__(self, seed: int, p: float, device: torch.device, saved: Sequence[torch.Tensor] = ()) -> None:
        # P(int16 u < threshold) = realised p; at most 1 - 2^-16, so a p just under 1 keeps a finite scale
        self.threshold = min(round(p * 2**16), 2**16 - 1) - 2**15
        self.p = (self.threshold + 2**15) / 2**16
        self.scale = 1.0 / (1.0 - self.p)
        self.device = torch.device(device)
        self.saved = list(saved)  # the packed masks of the last draw; given: what keep_many hands out again
        self.from_saved = bool(saved)
        if self.from_saved or self.device.type == "meta":
            pass  # nothing is drawn (the meta device has shapes only)
        elif on_host(self.device):
            self.bits = np.random.SFC64(seed)
        else:
            self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def keep(self, like: torch.Tensor) -> torch.Tensor:
        """The next mask: 1 where an element is kept, 0 where dropped, in ``like``'s shape and dtype (unscaled)."""
        return self.keep_many(like.shape, dtype=like.dtype)[0]

    def random_words(self, count: int) -> torch.Tensor:
        """The next ``count`` 64-bit words of the stream (every bit uniform), as int64 on the device."""
        if count == 0:  # numpy's empty draw has stride 0, which no dtype view accepts
            return torch.empty(0, dtype=torch.int64, device=self.device)
        if on_host(self.device):
            return torch.from_numpy(self.bits.random_raw(count).view(np.int64))
        drawn = torch.empty(count, dtype=torch.int64, device=self.device)
        if self.device.type == "meta":
            return drawn
        return drawn.random_(-(2**63), None, generator=self.generator)  # the full range: all 64 bits

    def keep_many(self, *shapes: torch.Size, dtype: torch.dtype) -> list[torch.Tensor]:
        """The next masks for several shapes, the same as ``keep`` called once per shape in order, from one draw.

        Each mask starts on a fresh 64-bit word, as a separate ``keep`` would, so the stream is cut up
        identically; one draw, one comparison and one conversion serve every mask (the fused path needs three per
        call, and on a few hundred tokens each small kernel costs its fixed overhead, not its elements). The
        draw is kept packed in ``saved``; built with ``saved``, the object hands out those masks instead.
        """
        counts = [math.prod(shape) for shape in shapes]
        padded = [4 * ((count + 3) // 4) for count in counts]
        if self.from_saved:
            keep = unpack_bits(self.saved[0], sum(padded))
        else:
            uniform = self.random_words(sum(padded) // 4).view(torch.int16)
            keep = _at_least(uniform, self.threshold)
            self.saved = [pack_bits(keep)]
        masks = _zero_one_as(keep, dtype)
        out, start = [], 0
        for shape, count, used in zip(shapes, counts, padded, strict=True):
            out.append(masks[start : start + count].view(shape))
            start += used
        return out

    def mask(self, like: torch.Tensor) -> torch.Tensor:
        """The next mask scaled as dropout scales it: 0 or ``1 / (1 - p)``."""
        return self.keep(like).mul_(self.scale)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor * self.mask(tensor)


def _at_least(values: torch.Tensor, threshold: int) -> torch.Tensor:
    """``values >= threshold`` as a uint8 0/1 tensor (numpy's comparison on CPU: a quarter of torch's time)."""
    if on_host(values.device):
        return torch.from_numpy(np.greater_equal(values.numpy(), threshold).view(np.uint8))
    return (values >= threshold).to(torch.uint8)


def pack_bits(zero_one: torch.Tensor) -> torch.Tensor:
    """A flat uint8 0/1 tensor packed 8 elements a byte, first element in the lowest bit (numpy's
    ``packbits(bitorder="little")``), zero-padded to whole bytes."""
    if on_host(zero_one.device):
        return torch.from_numpy(np.packbits(zero_one.numpy(), bitorder="little"))
    return _pack_bits_portable(zero_one)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` elements that ``pack_bits`` packed, as a flat uint8 0/1 tensor."""
    if on_host(packed.device):
        return torch.from_numpy(np.unpackbits(packed.numpy(), count=count, bitorder="little"))
    return _unpack_bits_portable(packed, count)


def _pack_bits_portable(zero_one: torch.Tensor) -> torch.Tensor:
    """``pack_bits`` in torch ops, for devices numpy cannot reach."""
    padded = F.pad(zero_one, (0, -zero_one.numel() % 8)).view(-1, 8)
    return (padded << _bit_positions(padded.device)).sum(-1, dtype=torch.uint8)


def _unpack_bits_portable(packed: torch.Tensor, count: int) -> torch.Tensor:
    """``unpack_bits`` in torch ops, for devices numpy cannot reach."""
    return ((packed.unsqueeze(-1) >> _bit_positions(packed.device)) & 1).view(-1)[:count]


def _bit_positions(device: torch.device) -> torch.Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)


# A 2-byte float's 1.0 as an int16 bit pattern: a 0/1 int16 tensor times this, viewed as the float, is its mask.
_ONE_BITS = {torch.bfloat16: 0x3F80, torch.float16: 0x3C00}


def _zero_one_as(zero_one: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A uint8 0/1 tensor as 0.0/1.0 in ``dtype`` (for 2-byte floats through the int16 bit pattern, which is
    several times cheaper on CPU than a float conversion)."""
    if dtype in _ONE_BITS:
        return zero_one.to(torch.int16).mul_(_ONE_BITS[dtype]).view(dtype)
    return zero_one.to(dtype)


class StoredDropout:
    """Dropout for traced runs (``torch.compile``): masks from torch's RNG inside the graph, kept for backward.

    ``SeededDropout`` reads its seed on the host and draws from a host generator, which a compiler cannot trace
    (one graph break per adapted module). Here the three masks are ``torch.rand(shape) >= p`` drawn in the graph
    and saved as booleans for backward (``saved``), so the whole step compiles; they cost one byte per element
    of x, h and y. ``scale`` is the exact ``1 / (1 - p)``.
    """

    def __init__(self, p: float, device: torch.device, saved: Sequence[torch.Tensor] = ()) -> None:
        self.p, self.device, self.saved = p, device, list(saved)
        self.scale = 1.0 / (1.0 - p)

    def keep_many(self, *shapes: torch.Size, dtype: torch.dtype) -> list[torch.Tensor]:
        """The masks of ``shapes`` (drawn on the first call, the stored ones after), 0/1 in ``dtype``."""
        if not self.saved:
            self.saved = [torch.rand(shape, device=self.device) >= self.p for shape in shapes]
        return [mask.to(dtype) for mask in self.saved]


def _dropout(
    p: float, seed: int | None, device: torch.device, saved: Sequence[torch.Tensor] = ()
) -> SeededDropout | StoredDropout | None:
    """The call's dropout: none at p = 0, seeded, or drawn in the graph when there is no seed (``torch.compile``).
    Given ``saved`` (what a forward's dropout kept), it hands out that forward's masks again."""
    if p == 0:
        return None
    return StoredDropout(p, device, saved) if seed is None else SeededDropout(seed, p, device, saved)


def _hidden(a: torch.Tensor, activation: str, keep: torch.Tensor | None) -> torch.Tensor:
    """``h = act(a) * keep`` (``keep``: the hidden's 0/1 mask, None without dropout), ``a`` left intact.

    Forward computes it, and backward computes it again from ``a`` rather than keeping it: one r-wide activation
    call per module instead of a second r-wide tensor kept per module and token."""
    act = ACTIVATION_FUNCTIONS[activation]
    h = act(a) if act else a
    if keep is not None:
        h = h.mul_(keep) if act else h * keep  # act(a) is a new tensor; a itself must stay intact
    return h


def _dense_forward(base, weight, bias, x, encoder, middle, decoder, activation, scaling, p, seed):
    """The forward computation; returns the output and what backward needs (``a``, the dropout).

    ``base`` is the frozen layer's output, or None when its weight (and bias) are given and the product is done
    here. With dropout, masks are 0/1 and the three ``1 / (1 - p)`` factors are folded where they cost nothing:
    into the encoder and the decoder product (weight-sized) and into the output scale, so the token-sized work
    per mask is one multiply (for the output's mask, part of the residual add) and ``h`` stays unscaled.
    """
    dtype = x.dtype
    flat = x.reshape(-1, x.shape[-1])
    dropout = _dropout(p, seed, x.device)
    c = dropout.scale if dropout else 1.0
    product = _decoder_product(decoder, middle, dtype, c)
    encoder = _scaled(encoder, c, dtype)  # weight-sized, formed again in backward rather than kept
    keep_h = keep_y = None
    dropped = flat  # flat stays x: the frozen product reads it undropped
    if dropout:  # the masks of x, h and y, in that order, from one draw
        rows = flat.shape[0]
        shapes = (flat.shape, (rows, encoder.shape[0]), (rows, product.shape[0]))
        keep_x, keep_h, keep_y = dropout.keep_many(*shapes, dtype=dtype)
        dropped = flat * keep_x
    a = dropped @ encoder.t()
    z = _hidden(a, activation, keep_h) @ product.t()
    act_ = _ACTIVATION_INPLACE[activation]
    y = act_(z) if act_ else z
    if base is None:
        out = F.linear(flat, weight, bias)
        if keep_y is None:
            out = _add_scaled(out, y, scaling * c)
        else:  # out += s c (y * k_y) in one pass
            out.addcmul_(y, keep_y, value=scaling * c)
        return _whole(out, (*x.shape[:-1], out.shape[-1])), a, dropout
    if keep_y is not None:
        y.mul_(keep_y)
    return _add_scaled(base, y.reshape(*base.shape).to(base.dtype), scaling * c, inplace=False), a, dropout


def _whole(out: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``out`` in ``shape`` as a tensor of its own rather than a view (``aten._unsafe_view``, as ``matmul``
    returns its folded products): autograd refuses in-place changes to a custom Function's outputs that are views
    made inside it, and models do change projection outputs in place (e.g. ``query /= sqrt(d)``)."""
    return torch.ops.aten._unsafe_view(out, shape)


def _add_scaled(out: torch.Tensor, y: torch.Tensor, scale: float, inplace: bool = True) -> torch.Tensor:
    """``out + scale * y``: one kernel in eager mode (``add`` with ``alpha``). Under ``torch.compile`` the
    product is written out instead: Inductor (torch 2.13, CPU) folds a matrix product followed by an ``add`` with
    ``alpha`` into one ``addmm`` and gets the result wrong (``tests/test_fused_dropout.py`` compares a compiled
    step's loss and gradients with the eager ones); it fuses the multiply into the add, so this costs nothing."""
    if torch.compiler.is_compiling():
        return out + y * scale
    return out.add_(y, alpha=scale) if inplace else torch.add(out, y, alpha=scale)


class _DenseLoraFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base, weight, bias, x, encoder, middle, decoder, activation, scaling, p, seed):
        out, a, dropout = _dense_forward(
            base, weight, bias, x, encoder, middle, decoder, activation, scaling, p, seed
        )
        ctx.save_for_backward(x, a, encoder, middle, decoder, weight, *(dropout.saved if dropout else ()))
        ctx.activation, ctx.scaling, ctx.p, ctx.seed = activation, scaling, p, seed
        return out

    @staticmethod
    @once_differentiable  # backward is written out, not traced: a second derivative through it would be wrong
    def backward(ctx, grad_output):
        # loss.backward() may be called inside an autocast region: keep backward in forward's dtypes
        with _autocast_disabled(grad_output.device.type):
            grad_x, *grad_weights = _DenseLoraFunction._adapter_backward(ctx, grad_output)
        grad_base = grad_output if ctx.needs_input_grad[0] else None
        return grad_base, None, None, grad_x, *grad_weights, None, None, None, None

    @staticmethod
    def _adapter_backward(ctx, grad_output):
        """Gradients of ``out = base + s c (act(z) * k_y)``, ``z = h (c W_d M)^T``, ``h = act(a) * k_h``,
        ``a = (x * k_x)(c W_e)^T`` with 0/1 masks ``k`` unpacked from forward's and ``c = 1 / (1 - p)``. The
        weight-sized ``c W_e`` and ``c W_d M`` are formed again rather than kept from forward: kept, they would
        add about 13 MiB on SmolLM2, 0.1x LoRA's activation memory at 256 tokens. So is ``h``, from ``a``."""
        x, a, encoder, middle, decoder, weight, *stored = ctx.saved_tensors
        activation, p = ctx.activation, ctx.p
        dtype = x.dtype
        need_x, need_enc, need_mid, need_dec = ctx.needs_input_grad[3:7]
        flat = x.reshape(-1, x.shape[-1])
        grad = grad_output.reshape(-1, grad_output.shape[-1]).to(dtype)  # d loss / d y, times 1/(s c)
        dropout = _dropout(p, ctx.seed, x.device, stored)
        c = dropout.scale if dropout else 1.0
        scaling = ctx.scaling * c
        keep_h = None
        if dropout:  # forward's masks (x, hidden, output), unpacked from what forward kept
            keep_x, keep_h, keep_y = dropout.keep_many(flat.shape, a.shape, grad.shape, dtype=dtype)
            grad = grad * keep_y
        h = _hidden(a, activation, keep_h)
        product = _decoder_product(decoder, middle, dtype, c)
        if ACTIVATION_FUNCTIONS[activation]:
            grad = _activation_backward(activation, grad, h @ product.t())
        grad_dec = grad_mid = None
        if need_dec or need_mid:
            # z = c h M^T W_d^T: both weight gradients come from one token-sized product P = s c^2 g^T h
            outer = _scaled(grad.t() @ h, scaling * c, middle.dtype)
            grad_dec = outer @ middle.t() if need_dec else None
            grad_mid = decoder.t() @ outer if need_mid else None
        grad_a = (grad @ product).mul_(scaling)
        if keep_h is not None:
            grad_a.mul_(keep_h)
        grad_a = _activation_backward(activation, grad_a, a)
        grad_enc = None
        if need_enc:
            dropped = flat * keep_x if dropout else flat
            grad_enc = _scaled(grad_a.t() @ dropped, c, encoder.dtype)
        grad_x = None
        if need_x:
            scaled_encoder = _scaled(encoder, c, dtype)
            if weight is None:
                grad_x = grad_a @ scaled_encoder
                if dropout:
                    grad_x.mul_(keep_x)
            else:  # the frozen layer's input gradient, with the adapter's accumulated into it in place
                grad_x = grad_output.reshape(-1, weight.shape[0]) @ weight
                if dropout:
                    grad_x.addcmul_(grad_a @ scaled_encoder, keep_x)
                else:
                    grad_x.addmm_(grad_a, scaled_encoder)
            grad_x = grad_x.reshape(x.shape)
        return grad_x, grad_enc, grad_mid, grad_dec


def _group_forward(x, weights, biases, encoders, middles, decoders, activation, scalings, p, seed):
    """The forward computation of sibling layers that read one ``x``; returns the outputs, ``a`` and what the
    dropout keeps for backward (its packed masks; nothing without dropout).

    The encoders are stacked into one ``(n r) x in`` GEMM (a batched one with dropout: each member drops its own
    elements of x); each member's decoder product writes its columns of one ``rows x (sum out)`` buffer
    (``_decode_per_member``), so the n members cost one encoder GEMM, two activation calls and one mask draw
    instead of n of each, and no FLOP more than n separate calls. Each frozen product and its scaled update are
    one ``addmm``. ``a`` (and the hidden ``h``) is ``rows x (n r)``, members side by side.
    """
    dtype = x.dtype
    flat = x.reshape(-1, x.shape[-1])
    dropout = _dropout(p, seed, x.device)
    c = dropout.scale if dropout else 1.0
    encoder = _scaled(torch.cat(encoders), c, dtype)
    products = _decoder_products(decoders, middles, dtype, c)
    slices = _member_slices(products)
    act_ = _ACTIVATION_INPLACE[activation]
    keep_h = None
    if dropout:
        keep_x, keep_h, keep_y = _group_masks(dropout, flat, encoder, slices)
        a = _encode_per_member(flat * keep_x, encoder, len(weights))
    else:
        a = flat @ encoder.t()
    z = _decode_per_member(_hidden(a, activation, keep_h), products, slices)
    y = act_(z) if act_ else z
    if dropout:
        y.mul_(keep_y)
    outs = []
    for weight, bias, scaling, (_, columns) in zip(weights, biases, scalings, slices, strict=True):
        out = torch.addmm(y[:, columns], flat, weight.t(), beta=scaling * c)
        if bias is not None:
            out.add_(bias)
        outs.append(_whole(out, (*x.shape[:-1], weight.shape[0])))
    return outs, a, (dropout.saved if dropout else [])


def _group_masks(dropout, flat, encoder, slices):
    """The masks of one group call: x per member (``n x rows x in``), then the hidden and the output
    (``slices``: ``_member_slices``, whose last output block ends at the buffer's width)."""
    rows, n = flat.shape[0], len(slices)
    shapes = ((n, *flat.shape), (rows, encoder.shape[0]), (rows, slices[-1][1].stop))
    return dropout.keep_many(*shapes, dtype=flat.dtype)


def _encode_per_member(dropped: torch.Tensor, encoder: torch.Tensor, n: int) -> torch.Tensor:
    """Member i's ``dropped[i] @ W_e,i^T`` for every i in one batched GEMM, laid out ``rows x (n r)``."""
    a = torch.bmm(dropped, encoder.view(n, -1, encoder.shape[1]).transpose(1, 2))  # n x rows x r
    return a.transpose(0, 1).reshape(dropped.shape[1], encoder.shape[0])  # no -1: rows may be 0


def _decoder_products(
    decoders: Sequence[torch.Tensor], middles: Sequence[torch.Tensor], dtype: torch.dtype, c: float = 1.0
) -> list[torch.Tensor]:
    """Each member's ``c W_d M`` (``out_i x r``), in ``dtype``."""
    return [_decoder_product(d, m, dtype, c) for d, m in zip(decoders, middles, strict=True)]


def _member_slices(products: Sequence[torch.Tensor]) -> list[tuple[slice, slice]]:
    """Member i's (columns of ``h``, columns of the output buffer): its r hidden units and its out_i outputs."""
    slices, start = [], 0
    for i, product in enumerate(products):
        out, r = product.shape
        slices.append((slice(i * r, (i + 1) * r), slice(start, start + out)))
        start += out
    return slices


def _decode_per_member(
    h: torch.Tensor,
    products: Sequence[torch.Tensor],
    slices: Sequence[tuple[slice, slice]],
    used: Sequence[bool] | None = None,
) -> torch.Tensor:
    """``z``, ``rows x (sum out)``: member i's ``h_i (c W_d,i M_i)^T`` written straight into its columns
    (``slices``: ``_member_slices(products)``).

    One GEMM per member, each into a column block of one buffer (BLAS takes the buffer's row stride as the
    output's leading dimension: no copy), rather than one GEMM against the block-diagonal of the products,
    whose zero blocks cost n times the FLOPs: on a 2-core AVX2 CPU in float32 (256 rows, SmolLM2's q/k/v) the
    three GEMMs take 0.25-0.3 ms against 0.66 ms for the block-diagonal one. The activation and the output
    mask still run once over the whole buffer. ``used`` (backward): members left out get zeros, not a GEMM.
    Under ``torch.func`` transforms or forward-mode AD the blocks are concatenated instead: ``out=`` ops have
    no batching rule and no forward derivative.
    """
    used = [True] * len(products) if used is None else used
    if any(_seen_by_a_transform(t) for t in (h, *products)):
        blocks = [
            h[:, hidden] @ product.t() if use else h.new_zeros(h.shape[0], product.shape[0])
            for (hidden, _), product, use in zip(slices, products, used, strict=True)
        ]
        return torch.cat(blocks, dim=1)
    width = slices[-1][1].stop
    z = (torch.empty if all(used) else torch.zeros)(h.shape[0], width, dtype=h.dtype, device=h.device)
    for (hidden, out), product, use in zip(slices, products, used, strict=True):
        if use:
            torch.mm(h[:, hidden], product.t(), out=z[:, out])
    return z


def _seen_by_a_transform(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is wrapped by a ``torch.func`` transform (vmap, jvp, grad) or carries a forward-AD
    tangent."""
    return (
        torch._C._functorch.is_functorch_wrapped_tensor(tensor)
        or fwAD.unpack_dual(tensor).tangent is not None
    )


class _DenseLoraGroupFunction(torch.autograd.Function):
    """``out_i = W_i x + b_i + s_i drop(act(W_d,i M_i drop(act(W_e,i drop(x)))))`` for n siblings sharing ``x``."""

    @staticmethod
    def forward(ctx, x, activation, scalings, biases, p, seed, *tensors):
        n = len(scalings)
        weights, encoders, middles, decoders = (tensors[i * n : (i + 1) * n] for i in range(4))
        outs, a, masks = _group_forward(
            x, weights, biases, encoders, middles, decoders, activation, scalings, p, seed
        )
        ctx.save_for_backward(x, a, *masks, *tensors)
        ctx.set_materialize_grads(False)  # an unused member's output gets None, and so do its weights
        ctx.mask_count = len(masks)
        ctx.activation, ctx.scalings, ctx.p, ctx.seed = activation, scalings, p, seed
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs):
        if all(g is None for g in grad_outputs):
            return (None,) * (6 + len(ctx.needs_input_grad[6:]))
        device = next(g for g in grad_outputs if g is not None).device
        with _autocast_disabled(device.type):
            return _DenseLoraGroupFunction._backward(ctx, grad_outputs)

    @staticmethod
    def _backward(ctx, grad_outputs):
        """Member i's gradients are ``_DenseLoraFunction``'s with its own masks; the stacked encoder and the
        per-member decoder products (into column blocks of shared buffers) give them all, and every input
        gradient lands in one buffer."""
        x, a, *tensors = ctx.saved_tensors
        masks, tensors = tensors[: ctx.mask_count], tensors[ctx.mask_count :]
        activation, scalings = ctx.activation, ctx.scalings
        n = len(scalings)
        weights, encoders, middles, decoders = (tensors[i * n : (i + 1) * n] for i in range(4))
        # a member whose output went unused gets no weight gradients (None, as when it runs alone)
        used = [g is not None for g in grad_outputs]
        needs = [need and used[i % n] for i, need in enumerate(ctx.needs_input_grad[6:])]
        need_enc, need_mid, need_dec = (any(needs[i * n : (i + 1) * n]) for i in (1, 2, 3))
        dtype = x.dtype
        flat = x.reshape(-1, x.shape[-1])
        rows, r = flat.shape[0], encoders[0].shape[0]
        grads = [
            None if g is None else g.reshape(rows, w.shape[0]).to(dtype)
            for g, w in zip(grad_outputs, weights, strict=True)
        ]
        grad = torch.cat(
            [
                torch.zeros(rows, w.shape[0], dtype=dtype, device=x.device) if g is None else g
                for g, w in zip(grads, weights, strict=True)
            ],
            dim=1,
        )  # a member whose output went unused contributes zeros
        dropout = _dropout(ctx.p, ctx.seed, x.device, masks)
        c = dropout.scale if dropout else 1.0
        encoder = _scaled(torch.cat(encoders), c, dtype)
        products = _decoder_products(decoders, middles, dtype, c)
        slices = _member_slices(products)
        keep_h = None
        if dropout:  # forward's masks, unpacked from what forward kept
            keep_x, keep_h, keep_y = _group_masks(dropout, flat, encoder, slices)
            grad.mul_(keep_y)
        h = _hidden(a, activation, keep_h)
        if ACTIVATION_FUNCTIONS[activation]:
            grad = _activation_backward(activation, grad, _decode_per_member(h, products, slices, used))
        # member i's output scale s_i c over its r columns: one scalar when they share s (one adapter: always)
        scales = [s * c for s in scalings]
        if all(s == scales[0] for s in scales):
            column_scale = scales[0]
        else:
            column_scale = torch.tensor(scales, dtype=dtype, device=x.device).repeat_interleave(r)
        grad_encs = grad_mids = grad_decs = (None,) * n
        if need_dec or need_mid:
            # member i's g_i^T h_i times s_i c^2 gives both its weight gradients (as in _DenseLoraFunction)
            outers = [
                _scaled(grad[:, out].t() @ h[:, hidden], scales[i] * c, middles[i].dtype) if used[i] else None
                for i, (hidden, out) in enumerate(slices)
            ]
            grad_decs = tuple(
                o @ m.t() if needs[3 * n + i] else None
                for i, (o, m) in enumerate(zip(outers, middles, strict=True))
            )
            grad_mids = tuple(
                d.t() @ o if needs[2 * n + i] else None
                for i, (o, d) in enumerate(zip(outers, decoders, strict=True))
            )
        # each used member's g_i (c W_d,i M_i) into its r columns; an unused member's stay zero
        grad_a = (torch.empty if all(used) else torch.zeros)(rows, n * r, dtype=dtype, device=x.device)
        for i, ((hidden, out), product) in enumerate(zip(slices, products, strict=True)):
            if used[i]:
                torch.mm(grad[:, out], product, out=grad_a[:, hidden])
        grad_a.mul_(column_scale)
        if keep_h is not None:
            grad_a.mul_(keep_h)
        grad_a = _activation_backward(activation, grad_a, a)
        per_member = grad_a.view(rows, n, r).transpose(0, 1) if dropout else None  # n x rows x r
        if need_enc:
            if dropout:
                stacked = torch.bmm(per_member.transpose(1, 2), flat * keep_x).view(n * r, -1)
            else:
                stacked = grad_a.t() @ flat
            grad_encs = tuple(
                _scaled(stacked[i * r : (i + 1) * r], c, e.dtype) if needs[n + i] else None
                for i, e in enumerate(encoders)
            )
        grad_x = None
        if ctx.needs_input_grad[0]:
            if dropout:
                grad_x = torch.bmm(per_member, encoder.view(n, r, -1)).mul_(keep_x).sum(0)
            else:
                grad_x = grad_a @ encoder
            for g, weight in zip(grads, weights, strict=True):
                if g is not None:
                    grad_x.addmm_(g, weight)
            grad_x = grad_x.view(x.shape)
        return grad_x, None, None, None, None, None, *(None,) * n, *grad_encs, *grad_mids, *grad_decs


def fused_group_add(
    bases: Sequence[nn.Linear],
    x: torch.Tensor,
    encoders: Sequence[torch.Tensor],
    middles: Sequence[torch.Tensor],
    decoders: Sequence[torch.Tensor],
    activation: str,
    scalings: Sequence[float],
    p: float = 0.0,
    seed: int | None = None,
) -> list[torch.Tensor]:
    """``[W_i x + b_i + s_i drop(act(W_d,i M_i drop(act(W_e,i drop(x))))) for each base i]``: sibling layers that
    read one ``x`` (q, k and v), computed in one call.

    Each base is a frozen ``nn.Linear`` in the dtype the products run in (``runs_base_itself``: the caller
    checks); under autocast ``x`` is cast to autocast's dtype and the call runs with autocast off, which computes
    what autocast would. Per member, the same function and gradients as ``fused_dense_add``; with dropout each
    member has its own masks, all drawn from one seed (taken from torch's CPU RNG when not given) and kept packed
    for backward. Backward writes every member's input gradient into one buffer.
    """
    device_type = x.device.type
    if autocast_enabled(device_type):
        cast = x.to(compute_dtype(x))
        with torch.autocast(device_type, enabled=False):
            return fused_group_add(bases, cast, encoders, middles, decoders, activation, scalings, p, seed)
    weights = [base.weight for base in bases]
    biases = tuple(base.bias for base in bases)
    if seed is None:
        seed = _call_seed(p)
    args = (weights, biases, encoders, middles, decoders, activation, scalings, p, seed)
    if not torch.is_grad_enabled():
        return _group_forward(x, *args)[0]
    tensors = (*weights, *encoders, *middles, *decoders)
    return list(_DenseLoraGroupFunction.apply(x, activation, tuple(scalings), biases, p, seed, *tensors))


def _call_seed(p: float) -> int | None:
    """A fresh dropout seed for one call, from torch's CPU RNG (``torch.manual_seed`` makes runs reproducible, no
    device synchronisation); None without dropout, or under ``torch.compile``, where masks are drawn in the graph."""
    if p == 0 or torch.compiler.is_compiling():
        return None
    return int(torch.randint(0, 2**62, (1,)).item())


def _scaled(weight: torch.Tensor, c: float, dtype: torch.dtype) -> torch.Tensor:
    """``c * weight`` in ``dtype``, computed in the wider of the two dtypes; one kernel when narrowing (fp32
    weights to a bf16 compute dtype), none at all when c is 1 and the dtype matches."""
    if c == 1.0:
        return weight.to(dtype)
    if weight.dtype.itemsize < dtype.itemsize:
        return weight.to(dtype).mul_(c)  # widen first: an ``out=`` multiply computes in the input's dtype
    return torch.mul(weight, c, out=torch.empty(weight.shape, dtype=dtype, device=weight.device))


def _decoder_product(
    decoder: torch.Tensor, middle: torch.Tensor, dtype: torch.dtype, c: float = 1.0
) -> torch.Tensor:
    """c W_d M (out x r) in the weights' precision, cast once to the compute dtype (c: the hidden dropout's scale).

    One weight-sized product replaces a token-sized r x r GEMM in forward and two in backward; on small r these
    GEMMs cost their fixed overhead, not their FLOPs.
    """
    return _scaled(decoder @ middle, c, dtype)


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for this device type (never on the meta device, which has no autocast)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _autocast_disabled(device_type: str):
    """Autocast off for this device type; no context at all when it is already off (entering one costs more than
    the small GEMMs it would guard)."""
    if autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a layer's products run in for input ``x``: autocast's for x's device when autocast is on, else x's."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if autocast_enabled(device_type) else x.dtype


def runs_base_itself(base: nn.Module, x: torch.Tensor) -> bool:
    """Whether the fused path computes ``base``'s product itself (and adds the input gradients in place): a frozen
    torch ``nn.Linear`` whose weight (and bias) is already in the dtype its product runs in (``compute_dtype``).
    Under autocast that is a base loaded in autocast's dtype (``finetune.py --bf16`` loads the base in bfloat16 and
    trains under bfloat16 autocast): its product computed inside is the one autocast would compute. Other bases
    hand the fused path their output, and so does a base with forward hooks (its ``forward`` must run for them:
    accelerate's offloading, for one, loads the weight in a hook) or with its weight on another device than x."""
    weight, bias = base.weight, base.bias
    frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    dtype = compute_dtype(x)
    in_dtype = weight.dtype == dtype and (bias is None or bias.dtype == dtype)
    plain = type(base) is nn.Linear and not _has_forward_hooks(base) and weight.device == x.device
    return plain and frozen and in_dtype


def _has_forward_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs more than its ``forward``: hooks registered on it, or accelerate's
    (``_hf_hook``, which replaces ``forward``). Global module hooks are not counted: they observe every module
    (torch's ``ModuleTracker``, ``FlopCounterMode``), and counting them would make an observed step another step."""
    return bool(
        module._forward_hooks or module._forward_pre_hooks or getattr(module, "_hf_hook", None) is not None
    )


def fused_dense_add(
    base: torch.Tensor | nn.Linear,
    x: torch.Tensor,
    encoder: torch.Tensor,
    middle: torch.Tensor,
    decoder: torch.Tensor,
    activation: str,
    scaling: float,
    p: float,
    seed: int | None = None,
) -> torch.Tensor:
    """``base + s * drop(act(W_d M drop(act(W_e drop(x)))))``, computed in the dtype autocast or x asks for.

    ``base`` is the frozen layer's output, or the frozen ``nn.Linear`` itself: then its product is computed inside
    the function and backward writes the adapter's input gradient into the layer's in place, instead of autograd
    adding two input-sized gradients (used when the weight is frozen and already in the compute dtype). The result
    has the base output's dtype. ``p`` is the dropout probability in effect (0 in eval mode). The dropout seed
    comes from torch's CPU RNG when not given, so ``torch.manual_seed`` makes runs reproducible without a device
    synchronisation; under ``torch.compile`` there is no seed and the masks are drawn in the graph and kept for
    backward (``StoredDropout``), so the step compiles without graph breaks.
    """
    device_type = x.device.type
    autocast = autocast_enabled(device_type)
    weight = bias = None
    if isinstance(base, nn.Module):
        if runs_base_itself(base, x):
            base, weight, bias = None, base.weight, base.bias
        else:
            base = base(x)
    if seed is None:
        seed = _call_seed(p)
    # without autograd (generation), skip the Function's bookkeeping: it costs as much as the adapter's small GEMMs
    run = _DenseLoraFunction.apply if torch.is_grad_enabled() else lambda *args: _dense_forward(*args)[0]
    args = (base, weight, bias, x, encoder, middle, decoder, activation, scaling, p, seed)
    if not autocast:
        return run(*args)
    with torch.autocast(device_type, enabled=False):
        return run(*args[:3], x.to(torch.get_autocast_dtype(device_type)), *args[4:])
