"""Benchmark data for the LLM-Adapters protocol: finding files, loading records, prompts, tokenization.

DenseLoRA's numbers are only comparable to the LoRA/DoRA baselines if training and evaluation see the
same text and the same token labels as LLM-Adapters (``finetune.py``, ``commonsense_evaluate.py``,
``evaluate.py`` of AGI-Edgerunners/LLM-Adapters; the DenseLoRA authors' repository carries copies with
the same templates). This module reproduces those facts; it does not import or copy that code.

Prompt templates, character for character
-----------------------------------------
LLM-Adapters writes each prompt as an indented triple-quoted f-string, so every line after the first
starts with 16 spaces, and the training and evaluation scripts carry different copies:

* training (``finetune.py``): the "blank" lines between sections hold 16 spaces; the first line ends
  with ONE trailing space in the with-input variant and TWO in the without-input variant; the response
  starts after ``"### Response:\\n" + 16 spaces`` and the output follows immediately (no newline).
* evaluation (``evaluate.py`` / ``commonsense_evaluate.py``): the blank lines are truly empty; the first
  line ends with NO trailing space with input and ONE without; the prompt ends with ``"### Response:\\n"``
  followed by 16 spaces. The evaluation scripts only ever pass the instruction (every benchmark record
  has an empty ``input``), so in practice the without-input variant is the one used.

(Older LLM-Adapters revisions also had the text ``  # noqa: E501`` *inside* the first line of the
training prompt; the current revision and the DenseLoRA copy moved it out, leaving the trailing spaces
above. We follow the current revision.)

The variant is chosen by the truthiness of ``input``: ``""`` and ``None`` both give the without-input
prompt.

Tokenization, as LLM-Adapters ``finetune.py``
---------------------------------------------
The full prompt (with output) is tokenized with truncation at ``cutoff_len`` and no padding; EOS is
appended when the last token is not EOS and the sequence is shorter than ``cutoff_len`` (so truncated
examples get no EOS). Labels are the input ids; with ``train_on_inputs=False`` the first ``n`` labels
are set to -100, where ``n`` is the length of the prompt without the output tokenized the same way
(without the EOS). Special tokens are whatever the tokenizer adds by itself (BOS for LLaMA-2/3, nothing
for SmolLM2), identically in both calls, so an automatically added BOS is counted in ``n`` and masked.
Like LLM-Adapters, ``n`` is a token *count*, not a verified prefix: the 16 spaces that end the prompt
can merge with the first output token, in which case one output token is masked too. One deliberate
difference: for a tokenizer that appends EOS by itself, LLM-Adapters counts that EOS in ``n`` and so masks the
first output token; here it is not counted. The paper's LLaMA-2/3 and SmolLM2 append none, so for them the
labels are LLM-Adapters' exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dense_lora import benchmarks
from dense_lora.runtime import DenseLoRAError

if TYPE_CHECKING:
    from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

DATA_ENV_VAR = "DENSELORA_DATA"
REPO_ROOT = Path(__file__).resolve().parents[1]

# Label value the loss ignores (torch CrossEntropyLoss / transformers default).
IGNORE_INDEX = -100

# Derived from the one benchmark registry (dense_lora.benchmarks); kept here because callers import them.
COMMONSENSE_DATASETS = benchmarks.names("commonsense")
MATH_DATASETS = benchmarks.names("math", in_paper=True)
# In LLM-Adapters' dataset/ folder and scored like the other numeric sets, but not in DenseLoRA's tables.
EXTRA_MATH_DATASETS = benchmarks.names("math", in_paper=False)
ALL_DATASETS = COMMONSENSE_DATASETS + MATH_DATASETS + EXTRA_MATH_DATASETS

# Continuation indent of LLM-Adapters' f-string prompts (see the module docstring).
_INDENT = " " * 16
_HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
_HEADER_WITHOUT_INPUT = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


class DataError(DenseLoRAError, ValueError):
    """A data file or tokenized set that cannot be used as given; the message is one line."""


# --------------------------------------------------------------------------------------------------
# Finding files
# --------------------------------------------------------------------------------------------------


def data_roots() -> list[Path]:
    """Folders searched for relative data paths, in order: $DENSELORA_DATA, ../shared/data, the repo.

    The environment variable comes first so a user can point every script at another copy without
    editing anything; the repo itself comes last because that is where `scripts/download_data.sh` puts
    the files.
    """
    roots: list[Path] = []
    override = os.environ.get(DATA_ENV_VAR)
    if override:
        roots.append(Path(override).expanduser())
    roots.append(REPO_ROOT.parent / "shared" / "data")
    roots.append(REPO_ROOT)
    return roots


def resolve_data_file(path: str | Path) -> Path:
    """Return an existing data file: `path` itself if it exists, else the first `root / path`.

    Raises FileNotFoundError (one line) naming every place tried and how to obtain the data.
    """
    given = Path(path).expanduser()
    if given.is_file():
        return given
    tried = [str(given)]
    if not given.is_absolute():
        for root in data_roots():
            candidate = root / given
            if candidate.is_file():
                return candidate
            tried.append(str(candidate))
    raise FileNotFoundError(
        f"data file '{path}' not found (tried: {', '.join(tried)}); run `bash scripts/download_data.sh` "
        f"or set {DATA_ENV_VAR} to a folder holding dataset/ and ft-training_set/"
    )


def canonical_dataset_name(name: str) -> str:
    """Return the canonical spelling of a benchmark name, matched case-insensitively.

    Scripts and users write "arc-easy" or "ARC-Easy", "gsm8k" or "GSM8K"; the file layout and the
    scorer need one spelling. Raises ValueError listing the valid names.
    """
    return benchmarks.canonical_name(name)


def benchmark_test_file(name: str) -> Path:
    """The resolved `dataset/<name>/test.json` of a benchmark (name matched case-insensitively)."""
    return resolve_data_file(Path("dataset") / canonical_dataset_name(name) / "test.json")


# --------------------------------------------------------------------------------------------------
# Loading records
# --------------------------------------------------------------------------------------------------


def _parse_jsonl(file: Path, text: str) -> list[Any]:
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DataError(
                f"{file}: malformed JSON Lines at line {line_number}, column {error.colno}: {error.msg}"
            ) from None
    return rows


def _read_rows(file: Path) -> list[Any]:
    """Parse a JSON array or JSON Lines, decided by content: a file starting with '{' is JSONL."""
    text = file.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise DataError(f"{file}: the file is empty, expected a JSON list of records or JSON Lines")
    if text.lstrip().startswith("{"):
        try:
            return _parse_jsonl(file, text)
        except DataError as jsonl_error:
            # A pretty-printed single object is valid JSON but not a dataset: say so instead of
            # reporting a JSONL syntax error on its first line.
            try:
                json.loads(text)
            except json.JSONDecodeError:
                raise jsonl_error from None
            raise DataError(
                f"{file}: the top level is a JSON object, expected a list of records or JSON Lines"
            ) from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{file}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from None
    if not isinstance(rows, list):
        raise DataError(f"{file}: the top level is a JSON {type(rows).__name__}, expected a list of records")
    return rows


def _validated(file: Path, rows: list[Any], required: Sequence[str]) -> list[dict[str, Any]]:
    if not rows:
        raise DataError(f"{file}: the dataset has no records")
    records = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{file}: record {index} is a {type(row).__name__}, expected an object")
        for field in required:
            value = row.get(field)
            if value is None:
                raise DataError(f"{file}: record {index} has no '{field}' (keys: {', '.join(sorted(row))})")
            # Test-set answers are strings in LLM-Adapters' files, but a number is an equally clear label.
            numeric_ok = field == "answer" and isinstance(value, int | float) and not isinstance(value, bool)
            if not (isinstance(value, str) or numeric_ok):
                expected = "a string or a number" if field == "answer" else "a string"
                raise DataError(
                    f"{file}: record {index} has '{field}' of type {type(value).__name__}, expected {expected}"
                )
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise DataError(
                f"{file}: record {index} has 'input' of type {type(extra).__name__}, expected a string"
            )
        # Missing and null inputs both mean "no input" (the prompt templates test truthiness).
        records.append({**row, "input": extra or ""})
    return records


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Load training records (string `instruction` and `output`; `input`, `answer` optional).

    `path` goes through `resolve_data_file`, so "ft-training_set/math_10k.json" works from anywhere.
    The file may be a JSON list or JSON Lines. Every returned record has a string `input` ("" when
    absent). Raises DataError for malformed JSON, a non-list top level, a bad record, or no records.
    """
    file = resolve_data_file(path)
    return _validated(file, _read_rows(file), required=("instruction", "output"))


def load_test_records(path: str | Path) -> list[dict[str, Any]]:
    """Load evaluation records: a string `instruction` and an `answer` (string or number) each.

    Test sets need no `output`: the model writes it. Same formats and errors as `load_records`.
    """
    file = resolve_data_file(path)
    return _validated(file, _read_rows(file), required=("instruction", "answer"))


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------


def generate_train_prompt(record: Mapping[str, Any]) -> str:
    """The LLM-Adapters training text for a record: prompt followed directly by `output`."""
    instruction, extra, output = record["instruction"], record.get("input"), record["output"]
    if extra:
        return (
            f"{_HEADER_WITH_INPUT} \n\n"
            f"{_INDENT}### Instruction:\n{_INDENT}{instruction}\n{_INDENT}\n"
            f"{_INDENT}### Input:\n{_INDENT}{extra}\n{_INDENT}\n"
            f"{_INDENT}### Response:\n{_INDENT}{output}"
        )
    return (
        f"{_HEADER_WITHOUT_INPUT}  \n\n"
        f"{_INDENT}### Instruction:\n{_INDENT}{instruction}\n{_INDENT}\n"
        f"{_INDENT}### Response:\n{_INDENT}{output}"
    )


def generate_eval_prompt(instruction: str, input: str | None = None) -> str:
    """The LLM-Adapters evaluation prompt; it ends where the model's response begins."""
    if input:
        return (
            f"{_HEADER_WITH_INPUT}\n\n"
            f"{_INDENT}### Instruction:\n{_INDENT}{instruction}\n\n"
            f"{_INDENT}### Input:\n{_INDENT}{input}\n\n"
            f"{_INDENT}### Response:\n{_INDENT}"
        )
    return (
        f"{_HEADER_WITHOUT_INPUT} \n\n"
        f"{_INDENT}### Instruction:\n{_INDENT}{instruction}\n\n"
        f"{_INDENT}### Response:\n{_INDENT}"
    )


# --------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------


def _encode(
    tokenizer: PreTrainedTokenizerBase, text: str, cutoff_len: int, add_eos: bool
) -> dict[str, list[int]]:
    encoded = tokenizer(text, truncation=True, max_length=cutoff_len, padding=False, return_tensors=None)
    input_ids = list(encoded["input_ids"])
    attention_mask = list(encoded["attention_mask"])
    eos = tokenizer.eos_token_id
    if add_eos and (not input_ids or input_ids[-1] != eos) and len(input_ids) < cutoff_len:
        input_ids.append(eos)
        attention_mask.append(1)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase,
    record: Mapping[str, Any],
    cutoff_len: int,
    train_on_inputs: bool,
) -> dict[str, list[int]]:
    """Tokenize one training record exactly as LLM-Adapters (see the module docstring).

    Returns lists (not tensors) of equal length: `input_ids`, `attention_mask`, `labels`.
    """
    if cutoff_len < 1:
        raise ValueError(f"cutoff_len must be a positive number of tokens, got {cutoff_len}")
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "the tokenizer has no EOS token; LLM-Adapters tokenization appends one to each example"
        )
    example = _encode(tokenizer, generate_train_prompt(record), cutoff_len, add_eos=True)
    labels = list(example["input_ids"])
    if not train_on_inputs:
        prompt_ids = _encode(
            tokenizer, generate_train_prompt({**record, "output": ""}), cutoff_len, add_eos=False
        )
        prompt_len = len(prompt_ids["input_ids"])
        # A tokenizer that appends EOS by itself would otherwise mask the first output token; for
        # tokenizers that do not (LLaMA-2/3, SmolLM2) this is a no-op and the result is LLM-Adapters'.
        if 0 < prompt_len < cutoff_len and prompt_ids["input_ids"][-1] == tokenizer.eos_token_id:
            prompt_len -= 1
        prompt_len = min(prompt_len, len(labels))
        labels[:prompt_len] = [IGNORE_INDEX] * prompt_len
    example["labels"] = labels
    return example


def check_trainable(tokenized: Sequence[Mapping[str, Sequence[int]]]) -> int:
    """Return how many examples keep at least one trainable label; raise DataError if none does.

    With `train_on_inputs=False` and a `cutoff_len` shorter than the prompts, truncation leaves only
    masked labels and training would silently compute a NaN/zero loss; this catches it up front. A sequence's
    first label is never a target (each position predicts the next token), so it does not count: at
    cutoff_len 1 nothing is trained whatever the masking.
    """
    trainable = sum(any(label != IGNORE_INDEX for label in example["labels"][1:]) for example in tokenized)
    if trainable == 0:
        raise DataError(
            f"none of the {len(tokenized)} tokenized examples keeps a label token to train on "
            "(the prompts fill cutoff_len, or it is too short to predict a token); raise cutoff_len or set "
            "train_on_inputs=True"
        )
    return trainable


def tokenize_records(
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Mapping[str, Any]],
    cutoff_len: int,
    train_on_inputs: bool,
    progress: str | None = None,
) -> list[dict[str, list[int]]]:
    """Tokenize a whole training set with `tokenize_example`, then `check_trainable` it.

    `progress` names a transient progress bar (training shows one on the main process; None shows none).
    """
    if progress is not None:
        from tqdm.auto import tqdm

        records = tqdm(records, desc=progress, leave=False)
    tokenized = [tokenize_example(tokenizer, record, cutoff_len, train_on_inputs) for record in records]
    check_trainable(tokenized)
    return tokenized


def make_collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorForSeq2Seq:
    """LLM-Adapters' training collator: dynamic padding to a multiple of 8, labels padded with -100.

    Padding labels with -100 (not the pad id) is what keeps training correct when pad_token == eos_token
    (LLaMA-3, SmolLM2): real EOS labels stay trainable and padding never is. The padding side is the
    tokenizer's (LLM-Adapters sets "left"); choosing the pad token is the model loader's job.
    """
    from transformers import DataCollatorForSeq2Seq

    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set one (dense_lora.models does) before collating")
    return DataCollatorForSeq2Seq(
        tokenizer,
        pad_to_multiple_of=8,
        padding=True,
        label_pad_token_id=IGNORE_INDEX,
        return_tensors="pt",
    )


# --------------------------------------------------------------------------------------------------
# Splits and subsets
# --------------------------------------------------------------------------------------------------


def train_val_split(records: Sequence[Any], val_set_size: int, seed: int = 42) -> tuple[list[Any], list[Any]]:
    """Split off `val_set_size` records for validation with a seeded permutation.

    The permutation is `numpy.random.default_rng(seed).permutation(n)` with the first `val_set_size`
    indices as validation, which is what `datasets.Dataset.train_test_split(test_size=val_set_size,
    shuffle=True, seed=seed)` does; LLM-Adapters calls that with seed 42, so the same records end up
    in each part. `val_set_size=0` returns all records (original order) and no validation set.
    """
    if isinstance(val_set_size, bool) or not isinstance(val_set_size, int) or val_set_size < 0:
        raise ValueError(f"val_set_size must be a non-negative number of records, got {val_set_size!r}")
    if val_set_size == 0:
        return list(records), []
    if val_set_size >= len(records):
        raise DataError(
            f"val_set_size={val_set_size} leaves no training records (the dataset has {len(records)})"
        )
    order = np.random.default_rng(seed).permutation(len(records))
    return [records[i] for i in order[val_set_size:]], [records[i] for i in order[:val_set_size]]


def subset(records: Sequence[Any], fraction: float, seed: int = 42) -> list[Any]:
    """A seeded random `fraction` of the records (rounded, at least one) for low-resource runs.

    Subsets drawn with the same seed are nested (the 10% subset lies inside the 20% one), so a
    data-size sweep only adds data from one point to the next. Records keep their original order.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if not records:
        raise DataError("cannot take a subset of an empty dataset")
    count = max(1, round(fraction * len(records)))
    chosen = np.random.default_rng(seed).permutation(len(records))[:count]
    return [records[i] for i in sorted(chosen)]
