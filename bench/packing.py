"""Useful tokens per second of real fine-tuning, padding-free (``--packing True``) against padded batches.

Runs ``dense_lora.train.run`` (what ``finetune.py`` runs: the HF Trainer, the recipe's optimizer, dropout 0.05)
on the commonsense training mix (boolq, ARC-Easy, ARC-Challenge, openbookqa ``train.json``, seeded shuffle),
alternating packed and padded runs in one process: A, B, A, B, ... with the starting side swapped each round, so
load drift on a shared machine hits both alike. Both runs see the same records in the same order (same seed), so
each step trains the same real tokens. A step's wall time comes from the per-step log (``metrics.jsonl``:
tokens and tokens/s since the previous log), its CPU time (``time.process_time`` between the Trainer's step
ends: data, forward, backward and optimizer) from a callback this script adds; on a shared machine the CPU
figure is the one to trust (with ``--threads 1`` it is the step's own work, which other processes cannot
stretch). The first step of each run (warm-up) is dropped.

    python bench/packing.py --rounds 2 --steps 6                # SmolLM2, bf16, cutoff 256, micro-batch 4

Reported: per variant the median step time and the pooled useful tokens/s (real tokens / time, over every
measured step), by wall and by CPU time, and packed ÷ padded; and the padding ceiling, the padded batches' tokens
÷ their real tokens on the measured steps: the speed-up packing would give if a step's time were proportional to
its tokens. Appends a block to bench/RESULTS.md unless --no_results.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # this checkout's dense_lora, from any working directory

from dense_lora.cli import StrictArgumentParser, existing_file, non_negative_int, positive_int  # noqa: E402

MIX = ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa")
DEFAULT_RESULTS = REPO_ROOT / "bench" / "RESULTS.md"


def write_mix(folder: Path, records: int, seed: int) -> Path:
    """The first ``records`` of the seeded shuffle of the mix's training records, as one JSON file."""
    from dense_lora.data import load_records

    mix: list[Any] = []
    for name in MIX:
        mix += load_records(f"dataset/{name}/train.json")
    random.Random(seed).shuffle(mix)
    path = folder / "mix.json"
    path.write_text(json.dumps(mix[:records]))
    return path


def step_times(output_dir: Path) -> list[tuple[int, float]]:
    """(real tokens, seconds) of each logged training step after the first, from metrics.jsonl."""
    entries = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in entries if "loss" in e and e.get("tokens_per_s")]
    out, previous = [], None
    for entry in steps:
        seen = entry["num_input_tokens_seen"]
        if previous is not None:
            tokens = seen - previous
            out.append((tokens, tokens / entry["tokens_per_s"]))
        previous = seen
    return out


def cpu_clocked_trainer(steps: list[tuple[int, float]]) -> type:
    """The Trainer class dense_lora.train runs (``RecipeTrainer``) with a callback that appends (tokens seen,
    process CPU seconds) at every step end to ``steps``."""
    from transformers import TrainerCallback

    import dense_lora.training.run

    class CpuClock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            steps.append((state.num_input_tokens_seen, time.process_time()))

    class Trainer(dense_lora.training.run.RecipeTrainer):
        def __init__(self, *args: Any, callbacks: list | None = None, **kwargs: Any) -> None:
            super().__init__(*args, callbacks=[*(callbacks or []), CpuClock()], **kwargs)

    return Trainer


def cpu_step_times(clock: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """(real tokens, CPU seconds) of each step after the first, from consecutive step ends."""
    return [(t1 - t0, c1 - c0) for (t0, c0), (t1, c1) in itertools.pairwise(clock)]


def counting_collators(batches: list[tuple[int, int]]):
    """dense_lora's padded-collator factory, wrapped to append (tokens in the padded batch, real tokens) of each
    micro-batch it collates to ``batches``: what packing could save on exactly the batches measured."""
    from dense_lora.data import make_collator

    def make_counting_collator(tokenizer: Any) -> Any:
        collate = make_collator(tokenizer)

        def counted(features: Any) -> Any:
            batch = collate(features)
            batches.append((batch["input_ids"].numel(), int(batch["attention_mask"].sum())))
            return batch

        return counted

    return make_counting_collator


def one_run(
    data: Path, output_dir: Path, packing: bool, args: argparse.Namespace, batches: list[tuple[int, int]]
) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """One fine-tuning run: (tokens, wall s) and (tokens, CPU s) of each step after the first; a padded run also
    appends (padded, real) token counts of its micro-batches to ``batches``."""
    import dense_lora.training.run
    from dense_lora.train import TrainConfig, run

    config = TrainConfig(
        base_model=args.model,
        data_path=str(data),
        output_dir=str(output_dir),
        batch_size=args.micro_batch,
        micro_batch_size=args.micro_batch,
        max_steps=args.steps,
        val_set_size=0,
        save_step=10**6,
        logging_steps=1,
        warmup_steps=0,
        cutoff_len=args.cutoff,
        bf16=args.dtype == "bf16",
        method=args.method,
        packing=packing,
        overwrite=True,
    )
    clock: list[tuple[int, float]] = []
    with (
        mock.patch.object(dense_lora.training.run, "RecipeTrainer", cpu_clocked_trainer(clock)),
        mock.patch.object(dense_lora.training.run, "make_collator", counting_collators(batches)),
    ):
        summary = run(config)
    assert summary["packed"] is packing, "packing was switched off for this model"
    return step_times(output_dir), cpu_step_times(clock)


def at_least_two(text: str) -> int:
    """--steps: the first step of each run is dropped, so a run needs two for one measured step."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (the first step is not measured), got {text}")
    return value


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = StrictArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--method", default="denselora", choices=("denselora", "lora", "dora"))
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--micro_batch", type=positive_int, default=4)
    parser.add_argument("--cutoff", type=positive_int, default=256)
    parser.add_argument(
        "--steps", type=at_least_two, default=6, help="optimizer steps per run (the first is dropped)"
    )
    parser.add_argument("--rounds", type=positive_int, default=2, help="packed+padded pairs")
    parser.add_argument("--records", type=positive_int, default=400)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--threads", type=non_negative_int, default=0, help="torch CPU threads (0: torch's default)"
    )
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--no_results", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="also write the report as JSON here")
    parser.add_argument(
        "--render", type=existing_file, default=None, help="append the block of a saved --out report and exit"
    )
    args = parser.parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text())
        with args.results.open("a") as handle:
            handle.write(render(report))
        return report

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    times: dict[bool, list[tuple[int, float]]] = {True: [], False: []}
    cpu: dict[bool, list[tuple[int, float]]] = {True: [], False: []}
    batches: list[tuple[int, int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_mix(Path(tmp), args.records, args.seed)
        for round_index in range(args.rounds):
            order = (True, False) if round_index % 2 == 0 else (False, True)
            for packing in order:
                padded_batches: list[tuple[int, int]] = []
                wall, cpu_s = one_run(data, Path(tmp) / f"run-{packing}", packing, args, padded_batches)
                batches += padded_batches[1 : 1 + len(wall)]  # the measured steps (the first is dropped)
                times[packing] += wall
                cpu[packing] += cpu_s
                print(
                    f"[bench] round {round_index} packing={packing}: wall {wall}, cpu {cpu_s}",
                    file=sys.stderr,
                )
    report = make_report(argv, args, load_start, times, cpu, torch.get_num_threads(), batches)
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    if not args.no_results:
        with args.results.open("a") as handle:
            handle.write(render(report))
    return report


def make_report(
    argv: list[str] | None,
    args: argparse.Namespace,
    load_start: tuple[float, float, float],
    times: dict[bool, list[tuple[int, float]]],
    cpu: dict[bool, list[tuple[int, float]]],
    threads: int,
    batches: list[tuple[int, int]],
) -> dict[str, Any]:
    """The JSON report: settings, load, per variant step counts, median steps and pooled useful tokens/s, and the
    padding ceiling of the measured padded batches (``batches``: (padded tokens, real tokens) per batch)."""
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python bench/packing.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "torch_threads": threads,
        "padding_ceiling": sum(b[0] for b in batches) / sum(b[1] for b in batches) if batches else None,
    }
    for packing, name in ((True, "packed"), (False, "padded")):
        tokens = sum(t for t, _ in times[packing])
        cpu_tokens = sum(t for t, _ in cpu[packing])
        report[name] = {
            "steps": len(times[packing]),
            "median_step_s": statistics.median(s for _, s in times[packing]),
            "useful_tokens": tokens,
            "useful_tokens_per_s": tokens / sum(s for _, s in times[packing]),
            "median_step_cpu_s": statistics.median(s for _, s in cpu[packing]),
            "useful_tokens_per_cpu_s": cpu_tokens / sum(s for _, s in cpu[packing]),
        }
    for key in ("useful_tokens_per_s", "useful_tokens_per_cpu_s"):
        report[f"packed_over_padded{key.removeprefix('useful_tokens_per')}"] = (
            report["packed"][key] / report["padded"][key]
        )
    report["packed_over_padded"] = report["packed_over_padded_s"]  # the wall-clock ratio, as before
    return report


def render(report: dict[str, Any]) -> str:
    packed, padded, s = report["packed"], report["padded"], report["settings"]
    return "\n".join(
        [
            "",
            f"### {report['date']} — padding-free training, {s['model']} {s['method']} {s['dtype']}, "
            f"micro-batch {s['micro_batch']}, cutoff {s['cutoff']}, the commonsense mix",
            "",
            f"- command: `{report['command']}`",
            f"- shared machine: load average {report['loadavg_start'][0]:.1f} at start, "
            f"{report['loadavg_end'][0]:.1f} at end; {report['torch_threads']} torch threads; runs interleaved",
            "- padding ceiling on the measured batches (padded tokens ÷ real tokens): "
            + ("–" if report.get("padding_ceiling") is None else f"{report['padding_ceiling']:.2f}×"),
            "",
            "| batches | measured steps | median step s | useful tokens/s | × padded | median step CPU s "
            "| useful tokens/CPU s | × padded (CPU) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            f"| padded | {padded['steps']} | {padded['median_step_s']:.2f} | {padded['useful_tokens_per_s']:.0f} | 1.00 "
            f"| {padded['median_step_cpu_s']:.2f} | {padded['useful_tokens_per_cpu_s']:.0f} | 1.00 |",
            f"| packed | {packed['steps']} | {packed['median_step_s']:.2f} | {packed['useful_tokens_per_s']:.0f} "
            f"| {report['packed_over_padded']:.2f} | {packed['median_step_cpu_s']:.2f} "
            f"| {packed['useful_tokens_per_cpu_s']:.0f} | **{report['packed_over_padded_cpu_s']:.2f}** |",
            "",
        ]
    )


if __name__ == "__main__":
    from dense_lora.cli import fail
    from dense_lora.runtime import DenseLoRAError

    try:
        main()
    except DenseLoRAError as error:  # a bad --model or data: finetune's one line, exit 2
        fail(error)
