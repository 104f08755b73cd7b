"""The fused DenseLoRA function's forward+backward with and without dropout, now against an older revision.

Why thread CPU time: on a shared 2-core machine wall time is stretched by other processes; the CPU time of the
one thread torch runs on (``--threads 1``) is not. Versions are interleaved (one call of each per repeat).

    python bench/fused_dropout.py --old 4270540 --repeats 15
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # this checkout's dense_lora, from any working directory

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


def main() -> None:
    parser = StrictArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", default="4270540", help="git revision of the version to compare with")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--shape", default="576,1536", help="in,out features (default: SmolLM2's up_proj)")
    parser.add_argument("--r", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from dense_lora import fused as new

    old = load_revision(args.old)
    in_features, out_features = map(int, args.shape.split(","))
    x = torch.randn(args.tokens, in_features, dtype=torch.bfloat16, requires_grad=True)
    linear = torch.nn.Linear(in_features, out_features, dtype=torch.bfloat16).requires_grad_(False)
    weights = [
        torch.randn(shape, requires_grad=True)
        for shape in ((args.r, in_features), (args.r, args.r), (out_features, args.r))
    ]

    def step(module, p: float) -> None:
        module.fused_dense_add(linear, x, *weights, "gelu", 2.0, p).sum().backward()

    cases = {
        f"{args.old} p=0.05": lambda: step(old, 0.05),
        "now p=0.05": lambda: step(new, 0.05),
        f"{args.old} p=0": lambda: step(old, 0.0),
        "now p=0": lambda: step(new, 0.0),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, case in cases.items():
            start = time.thread_time()
            case()
            times[name].append(time.thread_time() - start)
    for name, values in times.items():
        print(f"{name:22s} median {statistics.median(values) * 1e3:7.2f} ms  min {min(values) * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
