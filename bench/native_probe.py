"""How much of DenseLoRA's step is Python: the fused layer against the same ATen ops in one C++ autograd Function.

A probe, not a feature. It compiles (``torch.utils.cpp_extension.load_inline``: a C++ compiler and ninja, about
a minute on 2 cores, every run, in a temporary directory) a C++ twin of ``fused._DenseLoraFunction`` for the case
it covers: dropout 0, GELU, a frozen bias-free ``nn.Linear`` run inside the function. The twin issues the same ATen calls in the same order, so its
gradients are bit-identical (checked before timing) and any time it saves is the Python around the kernels: the
autograd Function's Python forward and backward and the fused module's helpers. The layer wrapper and
``InputGroup`` bookkeeping are the same in both arms.

Arms, interleaved one step each per repeat in a rotated order, paired ratios to LoRA's step:
``python`` (the fused path, one call per layer), ``native`` (the C++ twin, one call per layer), ``grouped``
(the fused path as shipped: q/k/v in one call) and ``lora`` (peft LoRA). SmolLM2-135M, float32, QKVUD, r = 32,
dropout 0, models, batch and step as ``bench/train_step.py`` builds and takes them (one set of weights, real
BoolQ text, gradients dropped before each step).

    python bench/native_probe.py --batch 1 --seq 8 --repeats 40
    python bench/native_probe.py --batch 2 --seq 128 --repeats 16
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # this checkout's dense_lora, from any working directory
sys.path.insert(0, str(REPO_ROOT / "bench"))  # the other bench scripts

import train_step as bench  # noqa: E402

from dense_lora import layer  # noqa: E402
from dense_lora.cli import StrictArgumentParser, positive_int  # noqa: E402

ARMS = ("python", "native", "grouped", "lora")
PYTHON_FUSED = layer.fused_dense_add

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


def native_twin(build_directory: str) -> Callable[..., torch.Tensor]:
    """``fused_dense_add`` through the compiled twin, for the calls it covers; anything else is refused.

    Built in a directory of this run's own: torch's shared extension cache keeps a lock file while compiling,
    and a run killed then leaves it behind, so that every later build there waits for it forever."""
    from torch.utils.cpp_extension import load_inline

    native = load_inline(
        "dense_lora_native_probe",
        CPP,
        functions=["dense_add"],
        extra_cflags=["-O3"],
        build_directory=build_directory,
    )

    def fused_dense_add(base, x, encoder, middle, decoder, activation, scaling, p, seed=None):
        if activation != "gelu" or p or not isinstance(base, torch.nn.Linear) or base.bias is not None:
            raise ValueError("the native twin covers GELU, dropout 0 and a bias-free nn.Linear base only")
        return native.dense_add(x, base.weight, encoder, middle, decoder, scaling)

    return fused_dense_add


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="dense-lora-native-probe-") as build_directory:
        twin = native_twin(build_directory)  # loaded: the library stays mapped once its file is gone
    settings = bench.Settings(model="smollm2", dtype="fp32", batch=args.batch, seq=args.seq, dropout=0.0)
    base = bench.build_base(settings)
    dense = bench.attach_method(copy.deepcopy(base), "denselora", settings)
    lora = bench.attach_method(base, "lora", settings)
    batch = bench.make_batch(settings, base.config.vocab_size)

    def step(arm: str) -> None:
        if arm == "lora":
            bench.train_step(lora, batch, "lora")
            return
        # the shipped path ("denselora"), or one call per layer ("denselora-per-layer") through either function
        method = "denselora" if arm == "grouped" else "denselora-per-layer"
        layer.fused_dense_add = twin if arm == "native" else PYTHON_FUSED
        try:
            bench.train_step(dense, batch, method)
        finally:
            layer.fused_dense_add = PYTHON_FUSED

    grads = {}
    for arm in ("python", "native"):
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
        ratio, (low, high) = bench.paired_ratios(times[arm], times["lora"])
        ci_low, ci_high = bench.median_interval(bench.step_ratios(times[arm], times["lora"]))
        median_ms = statistics.median(times[arm]) * 1e3
        print(
            f"| {arm} | {median_ms:.1f} | {ratio:.3f} ({low:.2f}-{high:.2f}) | {ci_low:.2f}-{ci_high:.2f} |"
        )


if __name__ == "__main__":
    main()
