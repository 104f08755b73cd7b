"""Orchestration: one benchmark across ranks, and :func:`run`, the entry point behind both evaluation CLIs.

This module decides who does what and when (which rank generates which batches, who merges, where the
barriers stand); what the files look like is :mod:`dense_lora.evaluation.results`, what the flags mean
:mod:`dense_lora.evaluation.settings`, and how the model loads :mod:`dense_lora.evaluation.model`.
"""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from dense_lora.answers import extract_answer
from dense_lora.benchmarks import ACCEPTED, MAX_OPTION_CHARS
from dense_lora.data import DataError, benchmark_test_file, generate_eval_prompt
from dense_lora.evaluation import results
from dense_lora.evaluation.model import choose_batch_size, load_model
from dense_lora.evaluation.settings import (
    EvalSettings,
    EvaluationError,
    Kind,
    adapter_info,
    benchmark_records,
    check_flags,
    output_folder,
    select_datasets,
)
from dense_lora.generation import first_match_is_final, generate_planned, marker_is_final, plan_batches
from dense_lora.runtime import Processes, file_sha256, processes, versions

Planned = list[tuple[EvalSettings, list[dict[str, Any]]]]

# --------------------------------------------------------------------------------------------------
# One benchmark
# --------------------------------------------------------------------------------------------------


def stop_rule(kind: Kind, dataset: str, settings: EvalSettings) -> Callable[[str, bool], bool] | None:
    """The early-stop test for this benchmark, or None where stopping early could change a score.

    Exact only for greedy decoding with the first-match commonsense extractor; the math extractors read
    the LAST number and the strict extractors the LAST marker, so those rows only stop at EOS or at a
    second response marker (which ends the protocol's response for good).
    """
    if not settings.early_stop or settings.num_beams > 1:
        return None
    if kind == "commonsense" and settings.extraction == "llm-adapters":
        return first_match_is_final(lambda text: str(extract_answer(dataset, text)), MAX_OPTION_CHARS)
    return marker_is_final


def _resume(
    out_dir: Path, config: dict[str, Any], procs: Processes, overwrite: bool
) -> dict[int, dict[str, Any]] | None:
    """Finished records of this config (None: already complete), read by every rank from the same state.

    Rank 0 alone deletes for `overwrite`; the barriers make every rank read after that deletion and before
    any rank rewrites its own part.
    """
    if overwrite and procs.rank == 0:
        results.load_progress(out_dir, config, overwrite=True)
    procs.barrier()
    done = results.load_progress(out_dir, config, overwrite=False)
    procs.barrier()
    return done


def _generate_into(
    part: Path,
    model: Any,
    tokenizer: Any,
    kind: Kind,
    settings: EvalSettings,
    records: Sequence[dict[str, Any]],
    prompts: Sequence[str],
    mine: Sequence[Sequence[int]],
    done: dict[int, dict[str, Any]],
    show_progress: bool,
) -> None:
    """Generate this rank's unfinished batches, appending their scored records to `part` as they come."""
    from tqdm import tqdm

    dataset = settings.dataset
    mine_indices = [index for batch in mine for index in batch]
    finished = [done[index] for index in mine_indices if index in done]
    pending = [batch for batch in mine if any(index not in done for index in batch)]
    progress = tqdm(
        total=len(mine_indices),
        initial=len(finished),
        desc=dataset,
        disable=not show_progress,
        dynamic_ncols=True,
    )
    correct = sum(record["correct"] for record in finished)
    with part.open("a") as sink:
        stream = generate_planned(
            model,
            tokenizer,
            prompts,
            pending,
            max_new_tokens=settings.max_new_tokens,
            num_beams=settings.num_beams,
            is_final=stop_rule(kind, dataset, settings),
        )
        for outputs in stream:
            new = [
                results.score_record(
                    dataset, index, prompts[index], output, records[index]["answer"], settings.extraction
                )
                for index, output in sorted(outputs)
                if index not in done
            ]
            results.append_records(sink, new)
            for record in new:
                done[record["index"]] = record
            correct += sum(record["correct"] for record in new)
            progress.update(len(new))
            progress.set_postfix(acc=f"{correct / max(progress.n, 1):.4f}")
    progress.close()


def evaluate_benchmark(
    model: Any,
    tokenizer: Any,
    kind: Kind,
    settings: EvalSettings,
    records: Sequence[dict[str, Any]],
    out_dir: Path,
    procs: Processes,
    overwrite: bool,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Generate, score and write one benchmark (all ranks call this); returns the final result.

    Batches are planned once for all ranks and dealt round-robin, so resumed and multi-process runs generate
    the same batches as one uninterrupted process. After generation rank 0 merges the parts and writes the
    result while the others wait at the last barrier, then read it.
    """
    dataset, config = settings.dataset, asdict(settings)
    done = _resume(out_dir, config, procs, overwrite)
    if done is None:
        return results.read_result(out_dir, dataset)
    done_before = len(done)
    prompts = [generate_eval_prompt(record["instruction"]) for record in records]
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    plan = plan_batches(lengths, settings.batch_size)
    mine = [batch for number, batch in enumerate(plan) if number % procs.world == procs.rank]
    part = results.part_path(out_dir, dataset, procs.rank, procs.world)
    results.start_part(part, config)
    started = time.perf_counter()
    _generate_into(part, model, tokenizer, kind, settings, records, prompts, mine, done, procs.rank == 0)
    procs.barrier()
    seconds = time.perf_counter() - started  # after the barrier: the slowest rank's time
    if procs.rank != 0:
        procs.barrier()
        return results.read_result(out_dir, dataset)
    ordered = results.merge_parts(out_dir, dataset, config, len(records))
    timing = results.timing(procs.world, len(records) - done_before, seconds)
    result = results.write_result(out_dir, kind, config, ordered, meta, timing)
    procs.barrier()
    return result


# --------------------------------------------------------------------------------------------------
# Entry point shared by the CLIs
# --------------------------------------------------------------------------------------------------


def _plan(names: Sequence[str], limit: int | None, **common: Any) -> Planned:
    """Settings and records of every benchmark, read and checked before the model loads."""
    planned = []
    for name in names:
        file, records = benchmark_records(name, limit)
        settings = EvalSettings(dataset=name, test_file_sha256=file_sha256(file), limit=limit, **common)
        planned.append((settings, records))
    return planned


def _reuse_batch_sizes(planned: Planned, out_dir: Path, overwrite: bool) -> dict[str, str]:
    """Fill in the batch size of an earlier run where none was given (so a rerun resumes); returns sources.

    Then refuse a folder holding another config before minutes are spent on loading the model.
    """
    sources = {}
    for number, (settings, records) in enumerate(planned):
        chosen, source = settings.batch_size, "--batch_size"
        if (
            not chosen
            and not overwrite
            and (earlier := results.earlier_batch_size(out_dir, settings.dataset))
        ):
            chosen, source = earlier, "auto: the earlier run's, resumed"
        planned[number] = (replace(settings, batch_size=chosen), records)
        sources[settings.dataset] = source
    if not overwrite:
        for settings, _ in planned:
            if settings.batch_size:
                results.load_progress(out_dir, asdict(settings), overwrite=False)
    return sources


def _print_result(result: dict[str, Any]) -> None:
    """One console line per benchmark, so a long run shows its scores as they come."""
    line = f"{result['dataset']}: accuracy {result['accuracy']:.4f} ({result['correct']}/{result['total']})"
    if "accuracy_strict" in result:
        line += f", strict {result['accuracy_strict']:.4f}"
    print(line, flush=True)


def _evaluate_all(
    kind: Kind,
    planned: Planned,
    sources: dict[str, str],
    out_dir: Path,
    overwrite: bool,
    adapter: dict[str, Any] | None,
    trust_remote_code: bool,
) -> list[dict[str, Any]]:
    """Load the model once, then evaluate each planned benchmark (choosing its batch size if still open).

    The model flags are the same in every benchmark's settings, so the first one's say how to load it
    (``trust_remote_code`` is not a setting: it allows code to run, it does not change what is computed).
    """
    meta = {"adapter": adapter, "adapter_sha256": adapter and adapter["sha256"], "versions": versions()}
    first = planned[0][0]
    torch.manual_seed(first.seed)
    out = []
    with processes() as procs:
        model, tokenizer = load_model(
            first.base_model,
            first.lora_weights,
            dtype=first.dtype,
            load_8bit=first.load_8bit,
            load_4bit=first.load_4bit,
            device=procs.device,
            trust_remote_code=trust_remote_code,
        )
        out_dir.mkdir(
            parents=True, exist_ok=True
        )  # only now: a refused adapter leaves no empty folder behind
        for settings, records in planned:
            if not settings.batch_size:
                size, sources[settings.dataset] = choose_batch_size(
                    model, tokenizer, records, settings, procs
                )
                settings = replace(settings, batch_size=size)
            details = {
                **meta,
                "test_file": str(benchmark_test_file(settings.dataset)),
                "batch_size": settings.batch_size,
                "batch_size_source": sources[settings.dataset],
            }
            result = evaluate_benchmark(
                model, tokenizer, kind, settings, records, out_dir, procs, overwrite, details
            )
            if procs.rank == 0:
                _print_result(result)
            out.append(result)
    return out


def run(
    kind: Kind,
    dataset: str | Sequence[str],
    base_model: str,
    lora_weights: str | None = None,
    batch_size: int | None = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    dtype: str = "auto",
    num_beams: int = 1,
    max_new_tokens: int | None = None,
    limit: int | None = None,
    extraction: str = "llm-adapters",
    output_dir: str | None = None,
    overwrite: bool = False,
    seed: int = 42,
    early_stop: bool = True,
    trust_remote_code: bool = False,
) -> list[dict[str, Any]]:
    """Evaluate `base_model` (+ `lora_weights`) on benchmarks of one family; returns one result per benchmark.

    Raises EvaluationError, DataError or FileNotFoundError with one-line messages on bad input, before
    the model is loaded whenever the problem can be seen without it; the output folder is created only once
    the model and adapter have loaded. Without `batch_size`, the batch size is chosen: the one an earlier
    run in `output_dir` used (so a rerun resumes), else the largest that fits on the GPU, else 16 on CPU;
    ``batch_size=1`` is the published batch-1 protocol.
    """
    datasets = select_datasets(kind, dataset)
    batch_size, max_new_tokens = check_flags(
        kind,
        batch_size=batch_size,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        limit=limit,
        extraction=extraction,
        load_8bit=load_8bit,
        load_4bit=load_4bit,
    )
    adapter = adapter_info(None if lora_weights is None else str(lora_weights))
    out_dir = output_folder(output_dir, lora_weights, adapter)
    planned = _plan(
        datasets,
        limit,
        base_model=str(base_model),
        dtype=str(dtype),
        load_8bit=bool(load_8bit),
        load_4bit=bool(load_4bit),
        lora_weights=None if adapter is None else adapter["path"],
        adapter_sha256=None if adapter is None else adapter["sha256"],
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size or 0,  # 0: chosen once the model is loaded
        early_stop=bool(early_stop),
        extraction=extraction,
        seed=seed,
    )
    sources = _reuse_batch_sizes(planned, out_dir, overwrite)
    return _evaluate_all(kind, planned, sources, out_dir, overwrite, adapter, bool(trust_remote_code))


def cli(kind: Kind) -> Callable[..., None]:
    """An in-process entry point for one benchmark family: errors become ``error: ...`` and exit status 2.

    Takes :func:`run`'s parameters after ``kind`` as keywords, already typed. The command lines parse their
    arguments strictly in :mod:`dense_lora.cli` (from the same signature) and then call :func:`run`.
    """

    def main(*args: Any, **flags: Any) -> None:
        try:
            run(kind, *args, **flags)
        except (EvaluationError, DataError, FileNotFoundError, ValueError) as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    signature = inspect.signature(run)
    main.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=list(signature.parameters.values())[1:], return_annotation=None
    )
    main.__doc__ = (
        f"Evaluate a base model, optionally with a peft adapter, on the {kind} benchmarks "
        f"({', '.join(ACCEPTED[kind])}, or 'all') with the LLM-Adapters protocol. See docs/evaluation.md."
    )
    return main
