"""The fast DenseLoRA update: same function and gradients as ``layer.dense_delta``, far less memory for backward.

Autograd through the plain formula keeps, per module and token, the dropped-out input, the out-dim decoder output
and its activation, and dropout masks of in- and out-dim: several in/out-dim tensors per module. Here backward
gets only what it cannot cheaply recompute:

- ``x`` itself (no copy: q/k/v read the same tensor, so it is stored once for the three of them),
- the two r-dim intermediates ``a = W_e x'`` and ``u = M h``,
- one integer seed: the three dropout masks are regenerated from it in backward instead of being stored.

Backward recomputes the decoder product ``z = W_d u`` (an r x out GEMM, as cheap as the forward one) to get the
activation's derivative. The residual add is part of the function: forward writes ``base + s * y`` in one pass and
backward hands the incoming gradient to the base output untouched, applying ``s`` to r-dim tensors only; the out-dim
work left is the activation and its derivative. Everything runs in the input's dtype (bf16 GEMMs on bf16 models);
weight gradients are returned in the weights' dtype.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

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


class SeededDropout:
    """Dropout whose masks come from a private generator: the same seed replays the same masks, in order.

    The fused path draws masks for x, the encoder output and the decoder output in forward, and draws them again
    in backward from the same seed instead of storing them.
    """

    def __init__(self, seed: int, p: float, device: torch.device) -> None:
        self.p = p
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def mask(self, like: torch.Tensor) -> torch.Tensor:
        keep = torch.empty_like(like).bernoulli_(1.0 - self.p, generator=self.generator)
        return keep.div_(1.0 - self.p)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor * self.mask(tensor)


class _DenseLoraFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base, x, encoder, middle, decoder, activation, scaling, p, seed):
        dtype = x.dtype
        enc, mid, dec = encoder.to(dtype), middle.to(dtype), decoder.to(dtype)
        flat = x.reshape(-1, x.shape[-1])
        dropout = SeededDropout(seed, p, x.device) if p > 0 else None
        a = (dropout(flat) if dropout else flat) @ enc.t()
        act = ACTIVATION_FUNCTIONS[activation]
        h = act(a) if act else a
        if dropout:
            h = dropout(h)
        u = h @ mid.t()
        y = u @ dec.t()
        act_ = _ACTIVATION_INPLACE[activation]
        if act_:
            y = act_(y)
        if dropout:
            y = dropout(y)
        ctx.save_for_backward(x, a, u, encoder, middle, decoder)
        ctx.activation, ctx.scaling, ctx.p, ctx.seed = activation, scaling, p, seed
        return torch.add(base, y.reshape(*base.shape).to(base.dtype), alpha=scaling)

    @staticmethod
    def backward(ctx, grad_output):
        # loss.backward() may be called inside an autocast region: keep backward in forward's dtypes
        with _autocast_disabled(grad_output.device.type):
            return (grad_output, *_DenseLoraFunction._adapter_backward(ctx, grad_output))

    @staticmethod
    def _adapter_backward(ctx, grad_output):
        x, a, u, encoder, middle, decoder = ctx.saved_tensors
        activation, p, scaling = ctx.activation, ctx.p, ctx.scaling
        dtype = x.dtype
        enc, mid, dec = encoder.to(dtype), middle.to(dtype), decoder.to(dtype)
        need_x, need_enc, need_mid, need_dec = ctx.needs_input_grad[1:5]
        flat = x.reshape(-1, x.shape[-1])
        grad = grad_output.reshape(-1, grad_output.shape[-1]).to(dtype)  # d loss / d y, times 1/s
        act = ACTIVATION_FUNCTIONS[activation]
        if p > 0:
            # replay forward's masks in forward's order: x, then hidden, then output
            dropout = SeededDropout(ctx.seed, p, x.device)
            mask_x, mask_h = dropout.mask(flat), dropout.mask(a)
            grad = grad * dropout.mask(grad)
        if act:
            grad = _activation_backward(activation, grad, u @ dec.t())
        grad_dec = (grad.t() @ u).mul_(scaling) if need_dec else None
        grad_u = (grad @ dec).mul_(scaling)
        h = act(a) if act else a
        if p > 0:
            h = h * mask_h
        grad_mid = grad_u.t() @ h if need_mid else None
        grad_a = grad_u @ mid
        if p > 0:
            grad_a = grad_a * mask_h
        grad_a = _activation_backward(activation, grad_a, a)
        grad_enc = None
        if need_enc:
            grad_enc = grad_a.t() @ (flat * mask_x if p > 0 else flat)
        grad_x = None
        if need_x:
            grad_x = grad_a @ enc
            if p > 0:
                grad_x = grad_x * mask_x
            grad_x = grad_x.reshape(x.shape)
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        return (
            grad_x,
            cast(grad_enc, encoder),
            cast(grad_mid, middle),
            cast(grad_dec, decoder),
            None,
            None,
            None,
            None,
        )


def _autocast_disabled(device_type: str):
    """Autocast off for this device type (a no-op where autocast does not exist, e.g. the meta device)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


def fused_dense_add(
    base: torch.Tensor,
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

    ``base`` is the frozen layer's output; the result has its dtype. ``p`` is the dropout probability in effect
    (0 in eval mode). The dropout seed comes from torch's CPU RNG when not given, so ``torch.manual_seed`` makes
    runs reproducible without a device synchronisation.
    """
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        x = x.to(torch.get_autocast_dtype(device_type))
    if p > 0 and seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    with _autocast_disabled(device_type):
        return _DenseLoraFunction.apply(base, x, encoder, middle, decoder, activation, scaling, p, seed or 0)
