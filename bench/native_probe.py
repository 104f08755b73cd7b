"""How much of DenseLoRA's step is Python: the fused layer against the same ATen ops in one C++ autograd Function.

A probe, not a feature. It compiles (``torch.utils.cpp_extension.load_inline``: a C++ compiler and ninja, about
a minute on 2 cores) a C++ twin of ``fused._DenseLoraFunction`` for the case it covers: dropout 0, GELU, a frozen
bias-free ``nn.Linear`` run inside the function. The twin issues the same ATen calls in the same order, so its
gradients are bit-identical (checked before timing) and any time it saves is the Python around the kernels: the
autograd Function's Python forward and backward and the fused module's helpers. The layer wrapper and
``InputGroup`` bookkeeping are the same in both arms.

Arms, interleaved one step each per repeat in a rotated order, paired ratios to LoRA's step:
``python`` (the fused path, one call per layer), ``native`` (the C++ twin, one call per layer), ``grouped``
(the fused path as shipped: q/k/v in one call) and ``lora`` (peft LoRA). SmolLM2-135M, float32, QKVUD, r = 32.

    python bench/native_probe.py --batch 1 --seq 8 --repeats 40
    python bench/native_probe.py --batch 2 --seq 128 --repeats 16
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # this checkout's dense_lora, from any working directory
sys.path.insert(0, str(REPO_ROOT / "bench"))  # the other bench scripts

from train_step import median_interval, paired_ratios, step_ratios  # noqa: E402

from dense_lora import DenseLoraConfig, layer  # noqa: E402
from dense_lora.cli import StrictArgumentParser, positive_int  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
ARMS = ("python", "native", "grouped", "lora")

CPP = r"""
#include <torch/extension.h>
using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// out = x W^T + s gelu(gelu(x We^T) (Wd M)^T), as fused._dense_forward at dropout 0 with the base inside.
struct DenseFn : public torch::autograd::Function<DenseFn> {
  static Tensor forward(AutogradContext* ctx, Tensor x, Tensor weight, Tensor encoder, Tensor middle,
                        Tensor decoder, double scaling) {
    auto flat = x.reshape({-1, x.size(-1)});
    auto product = at::mm(decoder, middle);
    auto a = at::mm(flat, encoder.t());
    auto z = at::mm(at::gelu(a), product.t());
    at::gelu_(z);
    auto out = at::mm(flat, weight.t());
    out.add_(z, scaling);
    ctx->save_for_backward({x, a, encoder, middle, decoder, weight});
    ctx->saved_data["s"] = scaling;
    auto shape = x.sizes().vec();
    shape.back() = weight.size(0);
    return at::_unsafe_view(out, shape);
  }
  // fused._DenseLoraFunction._adapter_backward at dropout 0, op for op
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto &x = saved[0], &a = saved[1], &encoder = saved[2], &middle = saved[3], &decoder = saved[4];
    auto &weight = saved[5];
    double s = ctx->saved_data["s"].toDouble();
    auto flat = x.reshape({-1, x.size(-1)});
    auto grad = grads[0].reshape({-1, grads[0].size(-1)});
    auto h = at::gelu(a);
    auto product = at::mm(decoder, middle);
    auto g = at::gelu_backward(grad, at::mm(h, product.t()));
    auto outer = at::mm(g.t(), h).mul_(s);
    auto grad_dec = at::mm(outer, middle.t());
    auto grad_mid = at::mm(decoder.t(), outer);
    auto grad_a = at::gelu_backward(at::mm(g, product).mul_(s), a);
    auto grad_enc = at::mm(grad_a.t(), flat);
    auto grad_x = at::mm(grad, weight);
    grad_x.addmm_(grad_a, encoder);
    return {grad_x.view(x.sizes()), Tensor(), grad_enc, grad_mid, grad_dec, Tensor()};
  }
};

Tensor dense_add(Tensor x, Tensor weight, Tensor encoder, Tensor middle, Tensor decoder, double scaling) {
  return DenseFn::apply(x, weight, encoder, middle, decoder, scaling);
}
"""


def parse_args(argv: list[str] | None = None):
    parser = StrictArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=positive_int, default=2)
    parser.add_argument("--seq", type=positive_int, default=128)
    parser.add_argument("--repeats", type=positive_int, default=16)
    parser.add_argument("--warmup", type=positive_int, default=2)
    parser.add_argument("--threads", type=positive_int, default=2)
    return parser.parse_args(argv)


def build_models():
    """DenseLoRA (nonzero adapter, dropout 0) and LoRA on two copies of SmolLM2 in float32, in train mode."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dense_lora.models import smollm2_path

    def wrap(config):
        base = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
        return get_peft_model(base, config).train()

    dense = wrap(
        DenseLoraConfig(
            r=32, lora_alpha=64, lora_dropout=0.0, target_modules=TARGETS, init_weights=False, init_seed=0
        )
    )
    lora = wrap(LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, target_modules=TARGETS))
    return dense, lora


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from torch.utils.cpp_extension import load_inline

    native = load_inline("dense_lora_native_probe", CPP, functions=["dense_add"], extra_cflags=["-O3"])
    python_fused = layer.fused_dense_add

    def native_fused(base, x, encoder, middle, decoder, activation, scaling, p, seed=None):
        if activation != "gelu" or p or not isinstance(base, torch.nn.Linear) or base.bias is not None:
            raise ValueError("the native twin covers GELU, dropout 0 and a bias-free nn.Linear base only")
        return native.dense_add(x, base.weight, encoder, middle, decoder, scaling)

    dense, lora = build_models()
    ids = torch.randint(0, 1000, (args.batch, args.seq))

    def step(arm: str) -> None:
        if arm == "lora":
            lora(input_ids=ids, labels=ids).loss.backward()
            return
        layer.fused_dense_add = native_fused if arm == "native" else python_fused
        try:
            with layer.one_call_per_layer(arm != "grouped"):
                dense(input_ids=ids, labels=ids).loss.backward()
        finally:
            layer.fused_dense_add = python_fused

    grads = {}
    for arm in ("python", "native"):
        dense.zero_grad()
        step(arm)
        grads[arm] = [p.grad.clone() for p in dense.parameters() if p.grad is not None]
    identical = all(torch.equal(a, b) for a, b in zip(grads["python"], grads["native"], strict=True))
    print(f"gradients of the two DenseLoRA implementations bit-identical: {identical}")
    for arm in ARMS:
        for _ in range(args.warmup):
            step(arm)
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for repeat in range(args.repeats):
        for arm in ARMS[repeat % len(ARMS) :] + ARMS[: repeat % len(ARMS)]:
            start = time.perf_counter()
            step(arm)
            times[arm].append(time.perf_counter() - start)
    print(f"{args.batch} x {args.seq}, float32, {args.threads} threads, {args.repeats} repeats")
    print("| arm | median step ms | paired x LoRA (IQR) | 95% CI of the median |")
    print("|---|---:|---:|---:|")
    for arm in ARMS:
        ratio, (low, high) = paired_ratios(times[arm], times["lora"])
        ci_low, ci_high = median_interval(step_ratios(times[arm], times["lora"]))
        median_ms = statistics.median(times[arm]) * 1e3
        print(
            f"| {arm} | {median_ms:.1f} | {ratio:.3f} ({low:.2f}-{high:.2f}) | {ci_low:.2f}-{ci_high:.2f} |"
        )


if __name__ == "__main__":
    main()
