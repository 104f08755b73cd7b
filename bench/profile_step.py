"""Where a training step's time goes, per op, forward and backward, DenseLoRA against LoRA and the frozen base.

Builds the models as ``bench/train_step.py`` does (same weights, adapters, tokens), warms each up, then profiles
``--steps`` rounds in which every method takes one step, the order alternating from round to round, all inside
one torch.profiler session. Each op is charged to the method and phase (forward or backward) whose marked range
it ran in. Interleaving matters on a machine whose speed drifts: profiled one after the other, identical ops
(attention, the loss) differed by 10% between methods here, more than the differences being looked for.

Printed: per method the profiled step, forward and backward time; then, per op name, self time per step for each
method, sorted by how much more DenseLoRA spends than LoRA. Times are wall-clock inside the profiler, which adds a
few microseconds per op: the self time of an autograd Function (``_DenseLoraFunction``, its backward) is its
Python code (and, with dropout, the numpy work of drawing and packing the masks) plus that overhead for the ops
it calls. ``--out`` writes the same numbers as JSON.

    python bench/profile_step.py --batch 2 --seq 128 --dropout 0 --threads 2 --steps 8
"""

from __future__ import annotations

import argparse
import bisect
import collections
import copy
import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # this checkout's dense_lora, from any working directory

from dense_lora.cli import StrictArgumentParser  # noqa: E402
from dense_lora.runtime import write_json_atomic  # noqa: E402

METHODS = ("denselora", "lora", "frozen")
PHASES = ("forward", "backward")


def load_train_step():
    """bench/train_step.py as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_train_step", REPO_ROOT / "bench" / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def profile_interleaved(bench, models: dict[str, torch.nn.Module], batch, steps: int) -> list:
    """The profiler's events of ``steps`` rounds, one step per method each, phases marked "<phase> <method>"."""
    for method, model in models.items():  # warm-up, outside the profile
        for _ in range(2):
            bench.train_step(model, batch, method)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for step in range(steps):
            order = list(models) if step % 2 == 0 else list(models)[::-1]
            for method in order:
                bench.train_step(
                    models[method], batch, method, phase=lambda name, m=method: record_function(f"{name} {m}")
                )
    return list(prof.events())


def phase_mark(event) -> tuple[str, str] | None:
    """(phase, method) when ``event`` is one of the ranges ``profile_interleaved`` marks, else None."""
    words = event.name.split(" ")
    return (words[0], words[1]) if len(words) == 2 and words[0] in PHASES else None


def charge(events: list, steps: int) -> dict[str, Any]:
    """Per method: ms per step of each phase, and per op the self ms per step in each phase and the calls per step,
    for the ops inside the marked ranges."""
    tagged = [(event, phase_mark(event)) for event in events]
    marks = sorted((e.time_range.start, e.time_range.end, *mark) for e, mark in tagged if mark)
    starts = [mark[0] for mark in marks]
    marked = {mark[3] for mark in marks}
    phases = {
        m: dict.fromkeys(PHASES, 0.0)
        for m in sorted(marked, key=lambda m: METHODS.index(m) if m in METHODS else len(METHODS))
    }
    ops: dict[str, dict[str, dict[str, float]]] = {m: collections.defaultdict(dict) for m in phases}
    calls: dict[str, dict[str, float]] = {m: collections.defaultdict(float) for m in phases}
    for start, end, phase, method in marks:
        phases[method][phase] += (end - start) / 1e3 / steps
    for event, mark in tagged:
        i = bisect.bisect_right(starts, event.time_range.start) - 1
        if mark or i < 0 or event.time_range.start > marks[i][1]:
            continue  # a mark itself, or between phases (dropping gradients, the loop itself)
        _, _, phase, method = marks[i]
        cell = ops[method][event.name]
        cell[phase] = cell.get(phase, 0.0) + event.self_cpu_time_total / 1e3 / steps
        calls[method][event.name] += 1 / steps
    return {m: {"phases_ms": phases[m], "ops_ms": dict(ops[m]), "calls": dict(calls[m])} for m in phases}


def total(cell: dict[str, float]) -> float:
    return sum(cell.values())


def print_report(report: dict[str, Any], top: int) -> None:
    methods = [m for m in METHODS if m in report]
    for method in methods:
        forward, backward = (report[method]["phases_ms"][p] for p in PHASES)
        print(
            f"{method:10s} step {forward + backward:8.1f} ms   forward {forward:8.1f}   backward {backward:8.1f}"
        )
    ops = {m: report[m]["ops_ms"] for m in methods}

    def extra(name: str) -> float:
        return total(ops["denselora"].get(name, {})) - total(ops["lora"].get(name, {}))

    calls = {m: report[m]["calls"] for m in methods}
    print(
        f"\n{'op (self ms per step; fwd + bwd)':52s}"
        + "".join(f" {m[:10]:>10s}" for m in methods)
        + "  DL - LoRA"
        + "".join(f" {'calls ' + m[:4]:>10s}" for m in methods)
    )
    for name in sorted(set().union(*ops.values()), key=lambda n: -abs(extra(n)))[:top]:
        cells = "".join(f" {total(ops[m].get(name, {})):10.2f}" for m in methods)
        counts = "".join(f" {calls[m].get(name, 0):10.0f}" for m in methods)
        print(f"{name[:52]:52s}{cells} {extra(name):+10.2f}{counts}")


def main(argv: list[str] | None = None) -> None:
    parser = StrictArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "tiny"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument(
        "--dtype", choices=("bf16", "fp32"), default=None, help="default bf16 for smollm2, fp32 for tiny"
    )
    parser.add_argument("--steps", type=int, default=4, help="profiled rounds, one step per method each")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--top", type=int, default=40, help="ops shown, by |DenseLoRA - LoRA|")
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    args = parser.parse_args(argv)
    for name in ("batch", "seq", "r", "steps", "threads", "top"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if not 0 <= args.dropout < 1:
        parser.error("--dropout must be in [0, 1)")
    torch.set_num_threads(args.threads)
    bench = load_train_step()
    settings = bench.Settings(
        model=args.model,
        r=args.r,
        lora_alpha=2.0 * args.r,
        dtype=args.dtype or ("bf16" if args.model == "smollm2" else "fp32"),
        batch=args.batch,
        seq=args.seq,
        dropout=args.dropout,
        methods=list(METHODS),
    )
    if note := bench.emulated_bf16_note(settings):
        print(note, file=sys.stderr)
    base = bench.build_base(settings)
    batch = bench.make_batch(settings, base.config.vocab_size)
    models = {m: bench.attach_method(copy.deepcopy(base), m, settings) for m in METHODS}
    report = charge(profile_interleaved(bench, models, batch, args.steps), args.steps)
    print_report(report, args.top)
    if args.out:
        meta = {"argv": sys.argv[1:] if argv is None else argv, "torch_threads": torch.get_num_threads()}
        meta["dtype"] = settings.dtype
        write_json_atomic(args.out, {"settings": meta, "methods": report})


if __name__ == "__main__":
    main()
