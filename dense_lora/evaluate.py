"""The evaluation driver behind ``commonsense_evaluate.py`` and ``math_evaluate.py``.

One function, :func:`run`, does everything for both CLIs; the CLIs only fix the benchmark family. See
docs/evaluation.md for the protocol, the flags and the file layout.

Files in the output folder, per benchmark:

* ``<dataset>.jsonl``: a header line ``{"header": <config>}`` then one record per example
  (``index, prompt, output, prediction, label, correct`` and, with ``--extraction both``, the strict
  pair too). Records are appended and flushed after every batch; under ``torchrun`` each rank appends to
  ``<dataset>.rank<r>.jsonl``. When the benchmark completes, every part is merged into ``<dataset>.jsonl``
  sorted by index, so the final file does not depend on interruptions or the number of processes.
* ``<dataset>.json``: accuracy, counts, config, adapter, versions; the run-dependent values (wall time,
  throughput, process count) sit under ``"timing"``. Written atomically (temporary file + ``os.replace``).

A rerun with the same config resumes: finished examples are read back (a line cut off by a kill is
dropped) and only the rest is generated, in the same batches as an uninterrupted run (see
:func:`dense_lora.generation.plan_batches`), so the final files are identical. A folder holding results
of another config or adapter is refused unless ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import inspect
import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from dense_lora import benchmarks
from dense_lora.answers import EXTRACTIONS, extract_answer, is_correct
from dense_lora.benchmarks import ACCEPTED, BENCHMARKS, MAX_OPTION_CHARS
from dense_lora.data import (
    DataError,
    benchmark_test_file,
    canonical_dataset_name,
    generate_eval_prompt,
    load_test_records,
)
from dense_lora.generation import first_match_is_final, generate_planned, marker_is_final, plan_batches
from dense_lora.runtime import DenseLoRAError, file_sha256

Kind = Literal["commonsense", "math"]

# Defaults of the authors' scripts: DoRA/DenseLoRA commonsense_evaluate.py generates 32 new tokens, the
# math evaluate.py (DenseLoRA copy and LLM-Adapters at the time of the paper) 128; both use 4 beams.
DEFAULT_MAX_NEW_TOKENS: dict[Kind, int] = {"commonsense": 128, "math": 128}
EXTRACTION_CHOICES = (*EXTRACTIONS, "both")
# Batch size when --batch_size is not given and there is no GPU to probe: on CPU the fast decoder gains little
# beyond 16 rows (measured on SmolLM2, docs/evaluation.md), and 16 keeps memory small on any machine.
CPU_DEFAULT_BATCH_SIZE = 16
# The largest batch the GPU probe tries; beyond it finished rows leave the batch so fast that more rows add
# little, and a smaller ceiling keeps the probe short.
GPU_MAX_BATCH_SIZE = 64
# Pickled weights execute code on load; the message says how to convert them once, somewhere trusted.
PICKLE_REFUSAL = (
    "{path} is a pickle file (adapter_model.bin), which can run arbitrary code when loaded, so it is refused; "
    'convert it once where you trust it: python -c "import torch, safetensors.torch as st; '
    "st.save_file(torch.load('{path}', weights_only=True), '{folder}/adapter_model.safetensors')\" "
    "and delete the .bin"
)


class EvaluationError(DenseLoRAError):
    """Bad input to the evaluation (flags, output folder, adapter, records); the message is one line."""


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSettings:
    """Everything that determines the generated text and the scores; a resumed run must match it."""

    dataset: str
    base_model: str
    lora_weights: str | None
    adapter_sha256: str | None
    test_file_sha256: str
    dtype: str
    load_8bit: bool
    load_4bit: bool
    num_beams: int
    max_new_tokens: int
    batch_size: int
    early_stop: bool
    limit: int | None
    extraction: str
    seed: int


def select_datasets(kind: Kind, dataset: str | Sequence[str]) -> list[str]:
    """Canonical names from ``all``, one name, a comma-separated string or a list (fire parses "a,b" as a tuple)."""
    names = (
        [part.strip() for part in dataset.split(",")]
        if isinstance(dataset, str)
        else [str(d) for d in dataset]
    )
    names = [name for name in names if name]
    if not names:
        raise EvaluationError(f"no dataset given; valid {kind} datasets: all, {', '.join(ACCEPTED[kind])}")
    if [name.lower() for name in names] == ["all"]:
        return list(BENCHMARKS[kind])
    selected = []
    for name in names:
        try:
            canonical = canonical_dataset_name(name)
        except ValueError:
            canonical = None
        if canonical not in ACCEPTED[kind]:
            raise EvaluationError(f"unknown {kind} dataset '{name}'; valid: all, {', '.join(ACCEPTED[kind])}")
        selected.append(canonical)
    return selected


def adapter_info(lora_weights: str | None) -> dict[str, Any] | None:
    """Path, peft type and weight hash of an adapter folder; None for the bare base model.

    The hash makes "same folder, retrained adapter" count as a different adapter when resuming.
    """
    if lora_weights is None:
        return None
    folder = Path(lora_weights).expanduser()
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise EvaluationError(
            f"--lora_weights {folder}: no adapter_config.json there (not a peft adapter folder)"
        )
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise EvaluationError(PICKLE_REFUSAL.format(path=folder / "adapter_model.bin", folder=folder))
        raise EvaluationError(f"--lora_weights {folder}: no adapter_model.safetensors")
    check_safetensors(weights)
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise EvaluationError(
            f"{config_file} is not valid JSON ({error}); the adapter folder is damaged"
        ) from None
    return {
        "path": str(folder.resolve()),
        "peft_type": config.get("peft_type"),
        "r": config.get("r"),
        "use_dora": bool(config.get("use_dora", False)),
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "sha256": file_sha256(weights),
    }


def check_safetensors(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a safetensors file, checked to be complete; a truncated or corrupt file is one line.

    Read before the model loads, so a damaged adapter fails in seconds, not after minutes of loading.
    """
    from safetensors import safe_open

    try:  # the header must describe exactly the bytes that follow it, so a cut-off file fails here
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises its own SafetensorError (or OSError)
        reason = " ".join(str(error).split())[:120]
        raise EvaluationError(
            f"{path} is truncated or corrupt ({reason}); copy or train the adapter again"
        ) from None
    if not shapes:
        raise EvaluationError(f"{path} holds no tensors; copy or train the adapter again")
    return shapes


# --------------------------------------------------------------------------------------------------
# Scoring
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


def _check_labels(dataset: str, file: Path, records: Sequence[dict[str, Any]]) -> None:
    """Fail before any generation on a label the scorer cannot use (a numeric dataset with a word label)."""
    numeric = benchmarks.lookup(dataset).answer == "number"
    for index, record in enumerate(records):
        label = record["answer"]
        if numeric:
            try:
                float(label)
            except ValueError:
                raise DataError(f"{file}: record {index} has answer {label!r}, expected a number") from None
        elif not isinstance(label, str):
            raise DataError(f"{file}: record {index} has answer {label!r}, expected an option string")


# --------------------------------------------------------------------------------------------------
# Files: JSONL parts, atomic JSON
# --------------------------------------------------------------------------------------------------


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON via a temporary file and os.replace: readers see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def _write_lines_atomic(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, path)


def _parts(out_dir: Path, dataset: str) -> list[Path]:
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
    final = out_dir / f"{dataset}.json"
    existing = [path for path in [final, *_parts(out_dir, dataset)] if path.exists()]
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
    final = out_dir / f"{dataset}.json"
    try:
        if final.is_file():
            return json.loads(final.read_text()).get("config", {}).get("batch_size") or None
        for part in _parts(out_dir, dataset):
            if part.is_file():
                header, _ = read_part(part)
                if header is not None:
                    return header.get("batch_size") or None
    except (json.JSONDecodeError, EvaluationError):
        return None  # damaged files: load_progress reports them
    return None


def choose_batch_size(
    model: Any, tokenizer: Any, records: Sequence[dict[str, Any]], settings: EvalSettings, procs: Processes
) -> tuple[int, str]:
    """Batch size and how it was chosen when --batch_size is not given: a GPU probe, else the CPU default.

    The probe runs one forward pass over `size` copies of the benchmark's longest prompt padded to its
    longest possible sequence (prompt + max_new_tokens) with the KV cache on, which needs at least the memory
    of any batch the decoder will run (the decoder keeps logits of one position only), halving from
    GPU_MAX_BATCH_SIZE until one fits. All ranks use rank 0's choice, so the batch plan stays the same.
    """
    if procs.device.type != "cuda":
        return CPU_DEFAULT_BATCH_SIZE, f"auto: CPU default {CPU_DEFAULT_BATCH_SIZE}"
    size = GPU_MAX_BATCH_SIZE
    if procs.rank == 0:
        prompts = [generate_eval_prompt(record["instruction"]) for record in records]
        longest = max(len(ids) for ids in tokenizer(prompts)["input_ids"])
        length = longest + settings.max_new_tokens
        size = min(GPU_MAX_BATCH_SIZE, 1 << max(len(records) - 1, 0).bit_length())
        while size > 1:
            try:
                ids = torch.full((size, length), tokenizer.pad_token_id or 0, device=procs.device)
                with torch.no_grad():
                    model(input_ids=ids, use_cache=True, logits_to_keep=1)
                break
            except torch.cuda.OutOfMemoryError:
                size //= 2
            finally:
                torch.cuda.empty_cache()
    if procs.world > 1:
        shared = torch.tensor([size], device=procs.device)
        torch.distributed.broadcast(shared, src=0)
        size = int(shared.item())
    return size, f"auto: GPU probe (largest power of two up to {GPU_MAX_BATCH_SIZE} that fits)"


# --------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Processes:
    """This process's place among ``torchrun`` workers (rank 0 of 1 without torchrun)."""

    rank: int
    world: int
    device: torch.device

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


@contextlib.contextmanager
def processes() -> Iterator[Processes]:
    """Join the ``torchrun`` group when launched by it: gloo on CPU (NCCL would need GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if world == 1:
        yield Processes(0, 1, device)
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Processes(rank, world, device)
    finally:
        torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def load_model(
    base_model: str,
    lora_weights: str | None,
    *,
    dtype: str,
    load_8bit: bool,
    load_4bit: bool,
    device: torch.device,
) -> tuple[Any, Any]:
    """Base model (optionally quantized) plus any peft adapter, in eval mode, and a left-padding tokenizer.

    Importing dense_lora registers DENSELORA with peft, so LoRA, DoRA and DenseLoRA folders all load
    through ``PeftModel.from_pretrained``. A shape mismatch (adapter trained on another base) surfaces
    as one line.
    """
    import dense_lora  # noqa: F401  (registers the DENSELORA peft type)
    from dense_lora.models import load_base_model, load_tokenizer

    quantized = load_8bit or load_4bit
    device_map = {"": device.index or 0} if device.type == "cuda" and quantized else None
    model = load_base_model(
        base_model, dtype=dtype, load_8bit=load_8bit, load_4bit=load_4bit, device_map=device_map
    )
    if not quantized:
        model = model.to(device)
    if lora_weights is not None:
        from peft import PeftModel

        # peft's warnings about keys it could not place are held back: the check below turns a partial load
        # into one error line; any other warning is shown once the adapter is known to fit.
        with warnings.catch_warnings(record=True) as held:
            warnings.simplefilter("always")
            try:
                model = PeftModel.from_pretrained(model, lora_weights, is_trainable=False)
            except (ValueError, RuntimeError, KeyError) as error:
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise EvaluationError(
                    f"adapter {lora_weights} does not fit base model {base_model}: {first}"
                ) from None
        check_adapter_loaded(model, Path(lora_weights), base_model)
        for caught in held:
            warnings.warn_explicit(caught.message, caught.category, caught.filename, caught.lineno)
    model.eval()
    return model, load_tokenizer(base_model, padding_side="left")


def check_adapter_loaded(model: Any, folder: Path, base_model: str) -> None:
    """All or nothing, for every peft method: every saved tensor found its place, and every adapter tensor came.

    peft loads with ``strict=False`` and only warns about keys it could not place, so a LoRA/DoRA/VeRA adapter
    trained on another base (other layer count or module names) would be evaluated half-applied. DenseLoRA
    refuses that in its own loader; this check holds the other methods to the same rule.
    """
    from peft import get_peft_model_state_dict

    saved = check_safetensors(folder / "adapter_model.safetensors")
    expected = {key: tuple(value.shape) for key, value in get_peft_model_state_dict(model).items()}
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    misshapen = sorted(key for key in set(saved) & set(expected) if saved[key] != expected[key])
    if missing or unexpected or misshapen:
        details = [f"{len(missing)} adapter tensors missing (e.g. '{missing[0]}')"] if missing else []
        details += (
            [f"{len(unexpected)} with no place in the model (e.g. '{unexpected[0]}')"] if unexpected else []
        )
        details += [f"{len(misshapen)} of another shape (e.g. '{misshapen[0]}')"] if misshapen else []
        raise EvaluationError(
            f"adapter {folder} does not fit base model {base_model}: {'; '.join(details)}; "
            "it was trained on another base model"
        )


def versions() -> dict[str, str]:
    import peft
    import transformers

    from dense_lora import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "dense_lora": __version__,
    }


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


def summarize(records: Sequence[dict[str, Any]], extraction: str) -> dict[str, Any]:
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
    """Generate, score and write one benchmark (all ranks call this); returns the final result."""
    from tqdm import tqdm

    dataset = settings.dataset
    config = asdict(settings)
    if overwrite and procs.rank == 0:
        load_progress(out_dir, config, overwrite=True)
    procs.barrier()
    done = load_progress(out_dir, config, overwrite=False)
    procs.barrier()  # every rank has read the shared state before anyone rewrites its part
    final_path = out_dir / f"{dataset}.json"
    if done is None:
        return json.loads(final_path.read_text())
    done_before = len(done)

    prompts = [generate_eval_prompt(record["instruction"]) for record in records]
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    plan = plan_batches(lengths, settings.batch_size)
    mine = [batch for number, batch in enumerate(plan) if number % procs.world == procs.rank]
    pending = [batch for batch in mine if any(index not in done for index in batch)]
    part = out_dir / (f"{dataset}.jsonl" if procs.world == 1 else f"{dataset}.rank{procs.rank}.jsonl")
    own_records = read_part(part)[1] if part.exists() else []
    _write_lines_atomic(part, [{"header": config}, *own_records])  # also drops a line cut off by a kill

    mine_indices = [index for batch in mine for index in batch]
    finished = [done[index] for index in mine_indices if index in done]
    progress = tqdm(
        total=len(mine_indices),
        initial=len(finished),
        desc=dataset,
        disable=procs.rank != 0,
        dynamic_ncols=True,
    )
    correct = sum(record["correct"] for record in finished)
    started = time.perf_counter()
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
        for results in stream:
            new = [
                score_record(
                    dataset, index, prompts[index], output, records[index]["answer"], settings.extraction
                )
                for index, output in sorted(results)
                if index not in done
            ]
            sink.write("".join(json.dumps(record) + "\n" for record in new))
            sink.flush()
            os.fsync(sink.fileno())
            for record in new:
                done[record["index"]] = record
            correct += sum(record["correct"] for record in new)
            progress.update(len(new))
            progress.set_postfix(acc=f"{correct / max(progress.n, 1):.4f}")
    progress.close()
    procs.barrier()
    seconds = time.perf_counter() - started  # after the barrier: the slowest rank's time
    if procs.rank != 0:
        procs.barrier()
        return json.loads(final_path.read_text())
    merged: dict[int, dict[str, Any]] = {}
    for path in _parts(out_dir, dataset):
        if path.exists():
            merged.update((record["index"], record) for record in read_part(path)[1])
    missing = [index for index in range(len(records)) if index not in merged]
    if missing:
        raise EvaluationError(
            f"{dataset}: {len(missing)} examples have no result after generation (first: {missing[0]})"
        )
    ordered = [merged[index] for index in range(len(records))]
    _write_lines_atomic(out_dir / f"{dataset}.jsonl", [{"header": config}, *ordered])
    for path in _parts(out_dir, dataset)[1:]:
        path.unlink()
    result = {
        "dataset": dataset,
        "kind": kind,
        **summarize(ordered, settings.extraction),
        "config": config,
        **meta,
        "timing": {
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "world_size": procs.world,
            "examples_generated": len(records) - done_before,
            "generation_seconds": round(seconds, 3),
            "examples_per_second": round((len(records) - done_before) / seconds, 4) if seconds > 0 else None,
        },
    }
    write_json_atomic(final_path, result)
    procs.barrier()
    return result


# --------------------------------------------------------------------------------------------------
# Entry point shared by the CLIs
# --------------------------------------------------------------------------------------------------


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
) -> list[dict[str, Any]]:
    """Evaluate `base_model` (+ `lora_weights`) on benchmarks of one family; returns one result per benchmark.

    Raises EvaluationError, DataError or FileNotFoundError with one-line messages on bad input, before
    the model is loaded whenever the problem can be seen without it; the output folder is created only once
    the model and adapter have loaded. Without `batch_size`, the batch size is chosen: the one an earlier
    run in `output_dir` used (so a rerun resumes), else the largest that fits on the GPU, else 16 on CPU;
    ``batch_size=1`` is the published batch-1 protocol.
    """
    datasets = select_datasets(kind, dataset)
    if extraction not in EXTRACTION_CHOICES:
        raise EvaluationError(f"unknown --extraction '{extraction}'; valid: {', '.join(EXTRACTION_CHOICES)}")
    for name, value in (("batch_size", 1 if batch_size is None else batch_size), ("num_beams", num_beams)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EvaluationError(f"--{name} must be a positive integer, got {value!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise EvaluationError(f"--limit must be a positive integer, got {limit!r}")
    if max_new_tokens is None:
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS[kind]
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise EvaluationError(f"--max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if load_8bit and load_4bit:
        raise EvaluationError("--load_8bit and --load_4bit are mutually exclusive")
    if num_beams > 1 and batch_size != 1:
        if batch_size is not None:
            print(
                f"note: --num_beams {num_beams} runs one example at a time, as LLM-Adapters does",
                file=sys.stderr,
            )
        batch_size = 1
    adapter = adapter_info(None if lora_weights is None else str(lora_weights))
    if output_dir is None:
        if adapter is None:
            raise EvaluationError("--output_dir is required when no --lora_weights is given")
        output_dir = str(Path(str(lora_weights)) / "eval")
    out_dir = Path(output_dir).expanduser()

    # Everything checkable without the model: test files, records, labels.
    benchmarks = []
    for name in datasets:
        file = benchmark_test_file(name)
        records = load_test_records(file)
        if limit is not None:
            records = records[:limit]
        _check_labels(name, file, records)
        settings = EvalSettings(
            dataset=name,
            base_model=str(base_model),
            lora_weights=None if adapter is None else adapter["path"],
            adapter_sha256=None if adapter is None else adapter["sha256"],
            test_file_sha256=file_sha256(file),
            dtype=str(dtype),
            load_8bit=bool(load_8bit),
            load_4bit=bool(load_4bit),
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size or 0,  # 0: chosen once the model is loaded
            early_stop=bool(early_stop),
            limit=limit,
            extraction=extraction,
            seed=seed,
        )
        benchmarks.append((settings, records))

    sources = {}
    for number, (settings, records) in enumerate(benchmarks):
        chosen, source = settings.batch_size, "--batch_size"
        if not chosen and not overwrite and (earlier := earlier_batch_size(out_dir, settings.dataset)):
            chosen, source = earlier, "auto: the earlier run's, resumed"
        benchmarks[number] = (replace(settings, batch_size=chosen), records)
        sources[settings.dataset] = source
    if not overwrite:  # refuse a foreign folder before spending minutes on loading the model
        for settings, _ in benchmarks:
            if settings.batch_size:
                load_progress(out_dir, asdict(settings), overwrite=False)
    meta = {"adapter": adapter, "adapter_sha256": adapter and adapter["sha256"], "versions": versions()}
    torch.manual_seed(seed)
    results = []
    with processes() as procs:
        model, tokenizer = load_model(
            str(base_model),
            adapter and adapter["path"],
            dtype=str(dtype),
            load_8bit=load_8bit,
            load_4bit=load_4bit,
            device=procs.device,
        )
        out_dir.mkdir(
            parents=True, exist_ok=True
        )  # only now: a refused adapter leaves no empty folder behind
        for settings, records in benchmarks:
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
                line = f"{settings.dataset}: accuracy {result['accuracy']:.4f} ({result['correct']}/{result['total']})"
                if "accuracy_strict" in result:
                    line += f", strict {result['accuracy_strict']:.4f}"
                print(line, flush=True)
            results.append(result)
    return results


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
