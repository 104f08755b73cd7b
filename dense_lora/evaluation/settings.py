"""What an evaluation is asked to do, checked before anything loads: flags, datasets, records, the adapter.

Everything here can be decided from the command line and the files on disk, so a bad flag, an unknown
benchmark, a malformed test file or a damaged adapter fails in a second, not after minutes of loading a
model. No torch: the settings are plain data, written into every result as its ``config``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dense_lora import benchmarks
from dense_lora.answers import EXTRACTIONS
from dense_lora.benchmarks import ACCEPTED, BENCHMARKS
from dense_lora.benchmarks import Family as Kind
from dense_lora.data import DataError, benchmark_test_file, canonical_dataset_name, load_test_records
from dense_lora.runtime import DenseLoRAError, file_sha256, folder_problem

# The paper's setting, 128 new tokens for both families. The authors' scripts differ: DoRA/DenseLoRA
# commonsense_evaluate.py generates 32, the math evaluate.py (DenseLoRA copy and LLM-Adapters at the time of the
# paper) 128, both with 4 beams; docs/evaluation.md says how to match them.
DEFAULT_MAX_NEW_TOKENS: dict[Kind, int] = {"commonsense": 128, "math": 128}
EXTRACTION_CHOICES = (*EXTRACTIONS, "both")
# Pickled weights execute code on load; the message says how to convert them once, somewhere trusted.
PICKLE_REFUSAL = (
    "{path} is a pickle file (adapter_model.bin), which can run arbitrary code when loaded, so it is refused; "
    'convert it once where you trust it: python -c "import torch, safetensors.torch as st; '
    "st.save_file(torch.load('{path}', weights_only=True), '{folder}/adapter_model.safetensors')\" "
    "and delete the .bin"
)


class EvaluationError(DenseLoRAError):
    """Bad input to the evaluation (flags, output folder, adapter, records); the message is one line."""


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


# --------------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------------


def _positive(name: str, value: Any) -> None:
    """Refuse anything but a positive int (bool is an int to Python, not to a user)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EvaluationError(f"--{name} must be a positive integer, got {value!r}")


def check_flags(
    kind: Kind,
    *,
    batch_size: int | None,
    num_beams: int,
    max_new_tokens: int | None,
    limit: int | None,
    extraction: str,
    load_8bit: bool,
    load_4bit: bool,
) -> tuple[int | None, int]:
    """Check the numeric and choice flags; returns the batch size and max_new_tokens to use.

    Beam search runs one example at a time, as LLM-Adapters does, so ``num_beams > 1`` forces batch size 1
    (with a note when the user asked for another size).
    """
    if extraction not in EXTRACTION_CHOICES:
        raise EvaluationError(f"unknown --extraction '{extraction}'; valid: {', '.join(EXTRACTION_CHOICES)}")
    _positive("batch_size", 1 if batch_size is None else batch_size)
    _positive("num_beams", num_beams)
    if limit is not None:
        _positive("limit", limit)
    if max_new_tokens is None:
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS[kind]
    _positive("max_new_tokens", max_new_tokens)
    if load_8bit and load_4bit:
        raise EvaluationError("--load_8bit and --load_4bit are mutually exclusive")
    if num_beams > 1 and batch_size != 1:
        if batch_size is not None:
            print(
                f"note: --num_beams {num_beams} runs one example at a time, as LLM-Adapters does",
                file=sys.stderr,
            )
        batch_size = 1
    return batch_size, max_new_tokens


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


def output_folder(output_dir: str | None, lora_weights: str | None, adapter: dict[str, Any] | None) -> Path:
    """Where results go: ``--output_dir``, else ``<lora_weights>/eval``; a bare base model must name one."""
    if output_dir is None:
        if adapter is None:
            raise EvaluationError("--output_dir is required when no --lora_weights is given")
        output_dir = str(Path(str(lora_weights)) / "eval")
    folder = Path(output_dir).expanduser()
    problem = folder_problem(folder)
    if problem:
        raise EvaluationError(f"--output_dir {folder}: {problem}")
    return folder


# --------------------------------------------------------------------------------------------------
# Test records
# --------------------------------------------------------------------------------------------------


def check_labels(dataset: str, file: Path, records: Sequence[dict[str, Any]]) -> None:
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


def benchmark_records(name: str, limit: int | None) -> tuple[Path, list[dict[str, Any]]]:
    """The test file of one benchmark and its first `limit` records, labels checked."""
    file = benchmark_test_file(name)
    records = load_test_records(file)
    if limit is not None:
        records = records[:limit]
    check_labels(name, file, records)
    return file, records


# --------------------------------------------------------------------------------------------------
# Adapter folder
# --------------------------------------------------------------------------------------------------


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
