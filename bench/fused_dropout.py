"""The fused DenseLoRA function's forward+backward with and without dropout, now against an older revision.

Why CPU time: on a shared 2-core machine wall time is stretched by other processes; CPU time is not. With
``--threads 1`` (the default) it is the CPU time of the one thread torch runs on; with more threads, the process's
(every thread's work counted, so a GEMM split across threads is not made to look cheaper). Versions are
interleaved (one call of each per repeat, the order reversed every other repeat), and each repeat's now / old ratio is paired.

``--shape in,out`` times one adapted layer (``fused_dense_add``); ``--shape in,out1,out2,...`` times siblings that
read one x, as q/k/v do (``fused_group_add``).

    python bench/fused_dropout.py --old 4270540 --repeats 15
    python bench/fused_dropout.py --old 522f249 --shape 576,576,192,192 --dtype fp32 --tokens 256 --repeats 80
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # this checkout's dense_lora, from any working directory
sys.path.insert(0, str(REPO_ROOT / "bench"))  # the other bench scripts

from train_step import paired_ratios  # noqa: E402

from dense_lora.cli import StrictArgumentParser  # noqa: E402


def load_revision(revision: str):
    """dense_lora/fused.py as it was at ``revision`` (it imports only torch), as a module."""
    source = subprocess.run(
        ["git", "show", f"{revision}:dense_lora/fused.py"],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "fused_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("fused_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _takes_positional(function, count: int) -> bool:
    """Whether ``function`` exists and accepts ``count`` positional arguments (the call this script makes)."""
    if function is None:
        return False
    try:
        inspect.signature(function).bind(*([None] * count))
    except TypeError:
        return False
    return True


def parse_shape(text: str) -> tuple[int, list[int]]:
    """``in,out[,out...]`` as (in, [outs])."""
    try:
        dims = [int(d) for d in text.split(",")]
    except ValueError:
        dims = []
    if len(dims) < 2 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"--shape takes in,out[,out...] as positive integers, got {text!r}")
    return dims[0], dims[1:]


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = StrictArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", default="4270540", help="git revision of the version to compare with")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument(
        "--shape",
        type=parse_shape,
        default="576,1536",
        help="in,out features (default: SmolLM2's up_proj); in,out1,out2,... for siblings sharing x (q/k/v)",
    )
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument(
        "--dtype", choices=("bf16", "fp32"), default="bf16", help="the input's and base's dtype"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    for name in ("repeats", "tokens", "r", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    torch.set_num_threads(args.threads)
    from dense_lora import fused as new

    old = load_revision(args.old)
    function = "fused_dense_add" if len(args.shape[1]) == 1 else "fused_group_add"
    if not _takes_positional(getattr(old, function, None), 8):  # the calls in step() below
        parser.error(f"revision {args.old} has no {function} with today's arguments; pick a later --old")
    clock = time.thread_time if args.threads == 1 else time.process_time
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    in_features, outs = args.shape
    x = torch.randn(args.tokens, in_features, dtype=dtype, requires_grad=True)
    linears = [torch.nn.Linear(in_features, out, dtype=dtype).requires_grad_(False) for out in outs]
    weights = [
        [
            torch.randn(shape, requires_grad=True)
            for shape in ((args.r, in_features), (args.r, args.r), (out, args.r))
        ]
        for out in outs
    ]

    def step(module, p: float) -> None:
        if len(outs) == 1:
            module.fused_dense_add(linears[0], x, *weights[0], "gelu", 2.0, p).sum().backward()
        else:
            encoders, middles, decoders = zip(*weights, strict=True)
            results = module.fused_group_add(
                linears, x, encoders, middles, decoders, "gelu", [2.0] * len(outs), p
            )
            torch.autograd.backward(results, [torch.ones_like(result) for result in results])

    cases = {
        f"{args.old} p=0.05": lambda: step(old, 0.05),
        "now p=0.05": lambda: step(new, 0.05),
        f"{args.old} p=0": lambda: step(old, 0.0),
        "now p=0": lambda: step(new, 0.0),
    }
    for case in cases.values():  # warm-up
        case()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for repeat in range(args.repeats):
        order = list(cases.items())
        for name, case in order if repeat % 2 == 0 else order[::-1]:  # neither version always runs first
            start = clock()
            case()
            times[name].append(clock() - start)
    for name, values in times.items():
        print(f"{name:22s} median {statistics.median(values) * 1e3:7.2f} ms  min {min(values) * 1e3:7.2f} ms")
    summary = {}
    for p in ("0.05", "0"):
        median, (first, third) = paired_ratios(times[f"now p={p}"], times[f"{args.old} p={p}"])
        summary[f"p={p}"] = {"median": median, "q1": first, "q3": third}
        print(f"p={p}: now / {args.old}, paired median {median:.3f} (IQR {first:.3f}-{third:.3f})")
    return summary


if __name__ == "__main__":
    main()
