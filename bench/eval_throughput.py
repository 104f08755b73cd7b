"""Throughput of the LLM-Adapters evaluation protocol vs this repo's fast path, on real test data.

    python bench/eval_throughput.py --model smollm2 --datasets boolq,piqa --per_dataset 32 --batch_size 32

(runs from any working directory: it puts this checkout first on ``sys.path``; ``--help`` lists the flags).

Three decodes of the same prompts (first `per_dataset` records of each test set), timed end to end:

* protocol: one example at a time, 4-beam search, `max_new_tokens` (what the published numbers used);
* batch-1 greedy: one example at a time with transformers' ``generate``, full length (the reference for
  agreement);
* fast: this repo's path: length-sorted left-padded batches of `batch_size` per benchmark, greedy, KV cache,
  rows leaving the batch at EOS or early stop.

Prints examples/s of protocol and fast, the speedup, and how many fast predictions equal batch-1 greedy
(and how many fast responses are a prefix of the batch-1 response, which also checks the early-stopped
text). The numbers go to bench/RESULTS_eval.md by hand, with the machine and command.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # this checkout's dense_lora, from any working directory

from dense_lora.answers import extract_answer  # noqa: E402
from dense_lora.data import (  # noqa: E402
    benchmark_test_file,
    canonical_dataset_name,
    generate_eval_prompt,
    load_test_records,
)
from dense_lora.evaluate import EvalSettings, load_model, stop_rule  # noqa: E402
from dense_lora.generation import (  # noqa: E402
    generate_planned,
    generate_with_transformers,
    plan_batches,
)
from dense_lora.runtime import DenseLoRAError  # noqa: E402
from dense_lora.train import require_positive_int  # noqa: E402


def _timed(step: Callable[[], list[str]]) -> tuple[list[str], float]:
    started = time.perf_counter()
    responses = step()
    return responses, time.perf_counter() - started


def main(
    model: str = "smollm2",
    datasets: str | Sequence[str] = "boolq,piqa",
    per_dataset: int = 16,
    batch_size: int = 32,
    max_new_tokens: int = 128,
    lora_weights: str | None = None,
    dtype: str = "float32",
) -> None:
    """Run the three decodes and print a JSON summary (see the module docstring)."""
    for flag, value in (
        ("per_dataset", per_dataset),
        ("batch_size", batch_size),
        ("max_new_tokens", max_new_tokens),
    ):
        require_positive_int(flag, value)  # before the model loads
    names = [
        canonical_dataset_name(n) for n in (datasets.split(",") if isinstance(datasets, str) else datasets)
    ]
    loaded, tokenizer = load_model(
        model, lora_weights, dtype=dtype, load_8bit=False, load_4bit=False, device=torch.device("cpu")
    )
    prompts, owners = _prompts(names, per_dataset)
    settings = dict(model=model, dtype=dtype, batch_size=batch_size, max_new_tokens=max_new_tokens)
    fast_out, fast_s = _timed(lambda: _decode_fast(loaded, tokenizer, prompts, owners, names, settings))
    greedy_out, greedy_s = _timed(lambda: _decode_one_by_one(loaded, tokenizer, prompts, max_new_tokens, 1))
    protocol_out, protocol_s = _timed(
        lambda: _decode_one_by_one(loaded, tokenizer, prompts, max_new_tokens, 4)
    )
    summary = {
        "examples": len(prompts),
        "datasets": names,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "dtype": dtype,
        **_comparison(owners, (fast_out, fast_s), (greedy_out, greedy_s), (protocol_out, protocol_s)),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    print(json.dumps(summary, indent=2))


def _prompts(names: Sequence[str], per_dataset: int) -> tuple[list[str], list[str]]:
    """The first `per_dataset` test prompts of each benchmark, and the benchmark each belongs to."""
    prompts, owners = [], []
    for name in names:
        for record in load_test_records(benchmark_test_file(name))[:per_dataset]:
            prompts.append(generate_eval_prompt(record["instruction"]))
            owners.append(name)
    return prompts, owners


def _decode_one_by_one(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, beams: int
) -> list[str]:
    """generate() one prompt at a time: the protocol (4 beams) or batch-1 greedy decoding (1 beam)."""
    return [
        generate_with_transformers(model, tokenizer, [p], max_new_tokens=max_new_tokens, num_beams=beams)[0]
        for p in prompts
    ]


def _decode_fast(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    owners: Sequence[str],
    names: Sequence[str],
    settings: dict,
) -> list[str]:
    """The evaluator's path: length-planned batches, the shared-prefix decoder and each benchmark's stop rule."""
    lengths = [len(ids) for ids in tokenizer(list(prompts))["input_ids"]]
    batch_size, max_new_tokens = settings["batch_size"], settings["max_new_tokens"]
    out: dict[int, str] = {}
    for name in names:  # the stop rule depends on the benchmark's extractor
        mine = [i for i, owner in enumerate(owners) if owner == name]
        eval_settings = EvalSettings(name, settings["model"], None, None, "", settings["dtype"], False, False, 1,
                                     max_new_tokens, batch_size, True, None, "llm-adapters", 0)  # fmt: skip
        plan = [[mine[j] for j in batch] for batch in plan_batches([lengths[i] for i in mine], batch_size)]
        rule = stop_rule("commonsense", name, eval_settings)
        for batch in generate_planned(
            model, tokenizer, prompts, plan, max_new_tokens=max_new_tokens, is_final=rule
        ):
            out.update(batch)
    return [out[i] for i in range(len(prompts))]


def _comparison(
    owners: Sequence[str],
    fast: tuple[list[str], float],
    greedy: tuple[list[str], float],
    protocol: tuple[list[str], float],
) -> dict[str, float]:
    """Examples/s of each decode, speedups, and how often the fast path's answers equal batch-1 greedy's."""
    (fast_out, fast_s), (greedy_out, greedy_s), (protocol_out, protocol_s) = fast, greedy, protocol
    n = len(owners)

    def predictions(responses: list[str]) -> list[str | float]:
        return [extract_answer(owner, text) for owner, text in zip(owners, responses, strict=True)]

    def agree_pct(a: list[str], b: list[str]) -> float:
        return round(100 * sum(x == y for x, y in zip(predictions(a), predictions(b), strict=True)) / n, 2)

    prefix = sum(g.startswith(f) for f, g in zip(fast_out, greedy_out, strict=True))
    return {
        "protocol_examples_per_s": round(n / protocol_s, 4),
        "batch1_greedy_examples_per_s": round(n / greedy_s, 4),
        "fast_examples_per_s": round(n / fast_s, 4),
        "speedup_vs_protocol": round(protocol_s / fast_s, 2),
        "speedup_vs_batch1_greedy": round(greedy_s / fast_s, 2),
        "fast_equal_to_batch1_greedy_predictions_pct": agree_pct(fast_out, greedy_out),
        "fast_response_prefix_of_batch1_pct": round(100 * prefix / n, 2),
        "protocol_equal_to_batch1_greedy_predictions_pct": agree_pct(protocol_out, greedy_out),
        "mean_fast_response_chars": round(sum(map(len, fast_out)) / n, 1),
        "mean_batch1_response_chars": round(sum(map(len, greedy_out)) / n, 1),
    }


FLAG_HELP = {
    "model": "base model: a local folder, a hub id or an alias (smollm2)",
    "datasets": "commonsense benchmarks to draw prompts from, comma list",
    "per_dataset": "first N test records of each benchmark",
    "batch_size": "batch size of the fast path",
    "max_new_tokens": "generated-token budget of every decode",
    "lora_weights": "peft adapter folder applied to the model (none: the bare base)",
    "dtype": "model dtype: float32, bfloat16 or float16",
}


def cli(argv: Sequence[str] | None = None) -> int:
    """Strict flags (dense_lora.cli): a typo is one error line and exit status 2 before the model loads."""
    from dense_lora.cli import fail, parse_or_exit, signature_flags

    flags = signature_flags(str(Path(__file__).resolve()), "main", FLAG_HELP)
    values = parse_or_exit(argv, flags, "bench/eval_throughput.py", __doc__ or "")
    try:
        main(**values)
    except (DenseLoRAError, ValueError, FileNotFoundError) as error:  # EvaluationError: a bad --lora_weights
        fail(error)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
