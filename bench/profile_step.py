"""Per-op self CPU time of one training step, DenseLoRA against LoRA and the frozen base (torch.profiler).

Builds the models as ``bench/train_step.py`` does (same weights, adapters, tokens), warms each up, profiles
``--steps`` steps and prints, per op name, self time per step and calls per step for each method, sorted by how
much more DenseLoRA spends than LoRA. The profiler's times are wall-clock: on a shared machine read the shares
of a step, not the milliseconds.

    python bench/profile_step.py --batch 2 --seq 128 --dropout 0.05
"""

from __future__ import annotations

import argparse
import collections
import copy
import importlib.util
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # this checkout's dense_lora, from any working directory

from dense_lora.cli import StrictArgumentParser  # noqa: E402


def load_train_step():
    """bench/train_step.py as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_train_step", REPO_ROOT / "bench" / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def profile_method(bench, base, batch, method: str, settings, steps: int) -> dict[str, list[float]]:
    """{op name: [self ms per step, calls per step]} over ``steps`` profiled steps after two warm-up steps."""
    model = bench.attach_method(copy.deepcopy(base), method, settings)
    for _ in range(2):
        bench.train_step(model, batch, method)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            bench.train_step(model, batch, method)
    ops: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for event in prof.key_averages():
        ops[event.key][0] += event.self_cpu_time_total / 1e3 / steps
        ops[event.key][1] += event.count / steps
    return ops


def print_table(per_method: dict[str, dict[str, list[float]]], top: int) -> None:
    methods = list(per_method)
    for method, ops in per_method.items():
        print(f"{method}: {sum(v[0] for v in ops.values()):.1f} ms self time per step")
    names = set().union(*per_method.values())

    def extra(name: str) -> float:
        return per_method["denselora"].get(name, [0, 0])[0] - per_method["lora"].get(name, [0, 0])[0]

    print(f"{'op':48s}" + "".join(f" {m[:9]:>9s} ms {'calls':>6s}" for m in methods))
    for name in sorted(names, key=lambda n: -abs(extra(n)))[:top]:
        cells = "".join(
            f" {per_method[m].get(name, [0, 0])[0]:12.2f} {per_method[m].get(name, [0, 0])[1]:6.0f}"
            for m in methods
        )
        print(f"{name[:48]:48s}{cells}")


def main(argv: list[str] | None = None) -> None:
    parser = StrictArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "tiny"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=40, help="ops shown, by |DenseLoRA - LoRA|")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    bench = load_train_step()
    settings = bench.Settings(
        model=args.model,
        r=args.r,
        lora_alpha=2.0 * args.r,
        dtype="bf16" if args.model == "smollm2" else "fp32",
        batch=args.batch,
        seq=args.seq,
        dropout=args.dropout,
        methods=["denselora", "lora", "frozen"],
    )
    base = bench.build_base(settings)
    batch = bench.make_batch(settings, base.config.vocab_size)
    per_method = {m: profile_method(bench, base, batch, m, settings, args.steps) for m in settings.methods}
    print_table(per_method, args.top)


if __name__ == "__main__":
    main()
