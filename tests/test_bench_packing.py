"""bench/packing.py's bookkeeping; one short run on the tiny LLaMA (the real runs take minutes on SmolLM2)."""

from __future__ import annotations

import argparse
from types import ModuleType

from helpers import load_bench_script


def load_bench() -> ModuleType:
    return load_bench_script("packing")


def test_cpu_step_times_are_differences_of_step_ends() -> None:
    bench = load_bench()
    clock = [(100, 1.0), (350, 3.5), (500, 4.0)]  # (tokens seen, CPU s) at each step end
    assert bench.cpu_step_times(clock) == [(250, 2.5), (150, 0.5)]
    assert bench.cpu_step_times(clock[:1]) == []


def test_report_pools_tokens_per_cpu_second_and_renders_both_ratios() -> None:
    bench = load_bench()
    args = argparse.Namespace(model="smollm2", method="denselora", dtype="bf16", micro_batch=4, cutoff=256)
    wall = {True: [(300, 30.0), (300, 30.0)], False: [(300, 40.0), (300, 35.0)]}
    cpu = {True: [(300, 2.0), (300, 3.0)], False: [(300, 3.0), (300, 3.0)]}
    batches = [(512, 400), (256, 200)]  # (padded tokens, real tokens) of the measured padded batches
    report = bench.make_report(["--steps", "3"], args, (1.0, 1.0, 1.0), wall, cpu, 1, batches)
    assert report["padding_ceiling"] == 768 / 600
    assert report["packed"]["useful_tokens_per_cpu_s"] == 600 / 5.0
    assert report["padded"]["median_step_cpu_s"] == 3.0
    assert report["packed_over_padded_cpu_s"] == (600 / 5.0) / (600 / 6.0)
    assert report["packed_over_padded"] == (600 / 60.0) / (600 / 75.0)  # wall clock, as before
    text = bench.render(report)
    assert "useful tokens/CPU s" in text and f"**{report['packed_over_padded_cpu_s']:.2f}**" in text
    assert "(padded tokens ÷ real tokens): 1.28×" in text


def test_counting_collator_records_padded_and_real_tokens(smollm2_dir) -> None:
    """The padded collator's batches are counted as they are collated: rows x padded length, and real tokens."""
    from transformers import AutoTokenizer

    bench = load_bench()
    batches: list[tuple[int, int]] = []
    collate = bench.counting_collators(batches)(AutoTokenizer.from_pretrained(smollm2_dir))
    features = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate(features)
    assert batch["input_ids"].shape == (2, 8)  # padded to a multiple of 8, as LLM-Adapters pads
    assert batches == [(16, 4)]


def test_one_run_clocks_and_counts_the_harness_steps(tiny_base, train_file, tmp_path) -> None:
    """A padded run of finetune's harness, through the bench's hooks: the CPU clock sees every step (the hook
    replaces the Trainer class the harness really uses) and every padded micro-batch is counted."""
    bench = load_bench()
    args = argparse.Namespace(
        model=str(tiny_base), method="denselora", dtype="fp32", micro_batch=4, cutoff=64, steps=3
    )
    batches: list[tuple[int, int]] = []
    wall, cpu = bench.one_run(train_file, tmp_path / "run", False, args, batches)
    assert len(wall) == len(cpu) == 2  # steps after the first
    assert all(tokens > 0 and seconds > 0 for tokens, seconds in cpu)
    assert [tokens for tokens, _ in cpu] == [tokens for tokens, _ in wall]
    assert len(batches) >= 3 and all(padded >= real > 0 for padded, real in batches)
