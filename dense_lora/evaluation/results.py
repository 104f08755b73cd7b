"""The results folder's file format: JSONL parts, resuming from them, merging them, the final summary.

Per benchmark, ``<dataset>.jsonl`` holds a header line ``{"header": <config>}`` then one scored record per
example; under ``torchrun`` each rank appends to ``<dataset>.rank<r>.jsonl`` and rank 0 merges every part
into ``<dataset>.jsonl`` sorted by index. ``<dataset>.json`` is the final result (accuracy, counts, config,
adapter, versions, and the run-dependent values under ``"timing"``). Records are fsync'd after every batch
and whole files are replaced atomically, so a kill loses at most the batch in flight. Plain file I/O: no
torch, no process group (the caller decides which rank calls what, and when).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from dense_lora.answers import extract_answer, is_correct
from dense_lora.evaluation.settings import EvaluationError
from dense_lora.runtime import write_json_atomic, write_jsonl_atomic

# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


def _json_prediction(prediction: str | float) -> str | float | None:
    """Predictions as JSON values: math "no number" (inf) becomes null, since JSON has no infinity."""
    return None if isinstance(prediction, float) and math.isinf(prediction) else prediction


def score_record(
    dataset: str, index: int, prompt: str, output: str, label: Any, extraction: str
) -> dict[str, Any]:
    """The per-example JSONL record; with ``extraction="both"`` the strict reading sits beside the default."""
    primary = "llm-adapters" if extraction == "both" else extraction
    record = {
        "index": index,
        "prompt": prompt,
        "output": output,
        "prediction": _json_prediction(extract_answer(dataset, output, primary)),
        "label": label,
        "correct": is_correct(dataset, output, label, primary),
    }
    if extraction == "both":
        record["prediction_strict"] = _json_prediction(extract_answer(dataset, output, "strict"))
        record["correct_strict"] = is_correct(dataset, output, label, "strict")
    return record


def summarize(records: Sequence[dict[str, Any]], extraction: str) -> dict[str, Any]:
    """Accuracy and counts of scored records (and the strict reading's, with ``extraction="both"``)."""
    total = len(records)
    correct = sum(record["correct"] for record in records)
    result: dict[str, Any] = {
        "accuracy": correct / total if total else 0.0,
        "correct": correct,
        "total": total,
    }
    if extraction == "both":
        strict = sum(record["correct_strict"] for record in records)
        result.update(accuracy_strict=strict / total if total else 0.0, correct_strict=strict)
    return result


# --------------------------------------------------------------------------------------------------
# JSONL parts
# --------------------------------------------------------------------------------------------------


def final_path(out_dir: Path, dataset: str) -> Path:
    """``<dataset>.json``: the finished benchmark's result."""
    return out_dir / f"{dataset}.json"


def part_path(out_dir: Path, dataset: str, rank: int, world: int) -> Path:
    """The JSONL part this rank appends to: the merged file itself when there is one process."""
    return out_dir / (f"{dataset}.jsonl" if world == 1 else f"{dataset}.rank{rank}.jsonl")


def parts(out_dir: Path, dataset: str) -> list[Path]:
    """Every JSONL part a run of `dataset` may have left, the merged file first (existing or not)."""
    return [out_dir / f"{dataset}.jsonl", *sorted(out_dir.glob(f"{dataset}.rank*.jsonl"))]


def read_part(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Header and records of one JSONL part. A last line cut off by a kill is dropped; other damage raises."""
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise EvaluationError(
                f"{path}: line {number} is not JSON; delete the file or pass --overwrite"
            ) from None
    if not rows:
        return None, []
    if "header" not in rows[0]:
        raise EvaluationError(
            f"{path}: no header line; not written by this tool (pass --overwrite to replace)"
        )
    return rows[0]["header"], rows[1:]


def start_part(part: Path, config: dict[str, Any]) -> None:
    """Rewrite this rank's part as header + the records it already holds (drops a line cut off by a kill)."""
    own_records = read_part(part)[1] if part.exists() else []
    write_jsonl_atomic(part, [{"header": config}, *own_records])


def append_records(sink: IO[str], records: Sequence[dict[str, Any]]) -> None:
    """Append scored records to an open part and fsync, so a kill loses at most the batch in flight."""
    sink.write("".join(json.dumps(record) + "\n" for record in records))
    sink.flush()
    os.fsync(sink.fileno())


def merge_parts(out_dir: Path, dataset: str, config: dict[str, Any], total: int) -> list[dict[str, Any]]:
    """Merge every part into ``<dataset>.jsonl`` sorted by index and delete the rank parts; returns the records.

    The merged file does not depend on interruptions or the number of processes. Every example must have a
    record by now; a gap is an error, not a silently smaller denominator.
    """
    merged: dict[int, dict[str, Any]] = {}
    for path in parts(out_dir, dataset):
        if path.exists():
            merged.update((record["index"], record) for record in read_part(path)[1])
    missing = [index for index in range(total) if index not in merged]
    if missing:
        raise EvaluationError(
            f"{dataset}: {len(missing)} examples have no result after generation (first: {missing[0]})"
        )
    ordered = [merged[index] for index in range(total)]
    write_jsonl_atomic(out_dir / f"{dataset}.jsonl", [{"header": config}, *ordered])
    for path in parts(out_dir, dataset)[1:]:
        path.unlink()
    return ordered


# --------------------------------------------------------------------------------------------------
# Resuming
# --------------------------------------------------------------------------------------------------


def _refuse(what: str, theirs: dict[str, Any], ours: dict[str, Any]) -> EvaluationError:
    changed = sorted(key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key))
    details = ", ".join(f"{key}: {theirs.get(key)!r} -> {ours.get(key)!r}" for key in changed[:4])
    return EvaluationError(
        f"{what} holds results of a different config ({details}); pass --overwrite to replace them"
    )


def load_progress(out_dir: Path, config: dict[str, Any], overwrite: bool) -> dict[int, dict[str, Any]] | None:
    """Finished records by index, or None when ``<dataset>.json`` already holds this config's final result.

    With `overwrite`, every earlier file of the benchmark is deleted instead.
    """
    dataset = config["dataset"]
    final = final_path(out_dir, dataset)
    existing = [path for path in [final, *parts(out_dir, dataset)] if path.exists()]
    if overwrite:
        for path in existing:
            path.unlink()
        return {}
    if final.exists():
        previous = json.loads(final.read_text()).get("config", {})
        if previous != config:
            raise _refuse(str(final), previous, config)
        return None
    done: dict[int, dict[str, Any]] = {}
    for path in existing:
        header, records = read_part(path)
        if header is not None and header != config:
            raise _refuse(str(path), header, config)
        done.update((record["index"], record) for record in records)
    return done


def earlier_batch_size(out_dir: Path, dataset: str) -> int | None:
    """The batch size of results already in `out_dir` for `dataset` (final file or a JSONL part), if any.

    An automatic batch size must not change between a killed run and its rerun: the batch plan, and so the
    generated text, depends on it, and a different size would make the folder "a different config".
    """
    final = final_path(out_dir, dataset)
    try:
        if final.is_file():
            return json.loads(final.read_text()).get("config", {}).get("batch_size") or None
        for part in parts(out_dir, dataset):
            if part.is_file():
                header, _ = read_part(part)
                if header is not None:
                    return header.get("batch_size") or None
    except (json.JSONDecodeError, EvaluationError):
        return None  # damaged files: load_progress reports them
    return None


# --------------------------------------------------------------------------------------------------
# The final result
# --------------------------------------------------------------------------------------------------


def read_result(out_dir: Path, dataset: str) -> dict[str, Any]:
    """The finished result of `dataset`, as written by :func:`write_result`."""
    return json.loads(final_path(out_dir, dataset).read_text())


def write_result(
    out_dir: Path,
    kind: str,
    config: dict[str, Any],
    records: Sequence[dict[str, Any]],
    meta: dict[str, Any],
    timing: dict[str, Any],
) -> dict[str, Any]:
    """Summarize the merged records into ``<dataset>.json`` (atomically) and return that result."""
    dataset = config["dataset"]
    result = {
        "dataset": dataset,
        "kind": kind,
        **summarize(records, config["extraction"]),
        "config": config,
        **meta,
        "timing": timing,
    }
    write_json_atomic(final_path(out_dir, dataset), result)
    return result


def timing(world: int, generated: int, seconds: float) -> dict[str, Any]:
    """The run-dependent values of a result, kept apart so the rest compares equal across runs."""
    return {
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "world_size": world,
        "examples_generated": generated,
        "generation_seconds": round(seconds, 3),
        "examples_per_second": round(generated / seconds, 4) if seconds > 0 else None,
    }
