"""The study's data: training mixes, validation sets and clean held-out test slices, with their baselines.

Training (commonsense): the training sets present among commonsense_170k's constituents (boolq, ARC-Easy,
ARC-Challenge, openbookqa ``train.json``), or commonsense_170k itself when a profile takes every record and the file
is present. Training (arithmetic): Math10K when present, else ``ft-training_set/math_data.json``.

Held-out slices are test records whose instruction does not occur in the family's training files. That matters:
``math_data.json`` contains about 80% of every arithmetic test set verbatim (LLM-Adapters built it from them), so
scoring a model trained on it on the whole test sets would measure memorisation. Each slice is written as
``<root>/dataset/<name>/test.json`` so the evaluation CLIs read it through ``DENSELORA_DATA=<root>``.
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data import COMMONSENSE_DATASETS, MATH_DATASETS, load_records, load_test_records, resolve_data_file
from ..runtime import write_text_atomic

COMMONSENSE_TRAIN_SETS = ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa")
COMMONSENSE_170K = "ft-training_set/commonsense_170k.json"
MATH_TRAIN_FILES = ("ft-training_set/math_10k.json", "ft-training_set/math_data.json")
_ANSWER_FORMAT = re.compile(r"Answer format:\s*(\S+)")


@dataclass(frozen=True)
class Slice:
    """A held-out test slice and the scores a model gets without knowing anything."""

    dataset: str
    family: str
    records: int  # in the slice (the held-out loss reads them all)
    excluded_overlap: int  # test records dropped because their instruction is in the training files
    scored: int  # the first records of the slice, the ones generation accuracy is measured on
    # Both baselines are over the scored records, the ones the accuracies next to them are measured on:
    chance: float  # expected accuracy of a uniform guess among each record's options (0 for numeric answers)
    majority: float  # accuracy of always answering the most frequent label


def _exists(relative: str) -> bool:
    try:
        resolve_data_file(relative)
    except FileNotFoundError:
        return False
    return True


def _seeded_order(count: int, seed: int) -> list[int]:
    return [int(i) for i in np.random.default_rng(seed).permutation(count)]


def _write(path: Path, records: Sequence[Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(list(records), indent=1))


def _split(records: list[dict], validation: int, train: int | None, seed: int) -> tuple[list, list]:
    """Seeded disjoint validation and training subsets (training: every remaining record when `train` is None)."""
    order = _seeded_order(len(records), seed)
    held = [records[i] for i in order[:validation]]
    rest = [records[i] for i in order[validation:]]
    return held, rest if train is None else rest[:train]


def training_sources(family: str, take_all: bool) -> list[str]:
    """The training files of a family, in the order they are mixed."""
    if family == "math":
        present = [path for path in MATH_TRAIN_FILES if _exists(path)]
        if not present:
            raise FileNotFoundError(
                f"no arithmetic training file found (tried {', '.join(MATH_TRAIN_FILES)})"
            )
        return present[:1]
    if take_all and _exists(COMMONSENSE_170K):
        return [COMMONSENSE_170K]
    present = [f"dataset/{name}/train.json" for name in COMMONSENSE_TRAIN_SETS]
    present = [path for path in present if _exists(path)]
    if not present:
        raise FileNotFoundError("no commonsense training set found (dataset/<name>/train.json)")
    return present


def build_training(
    family: str, sources: Sequence[str], per_source: int | None, validation: int, out: Path, seed: int = 0
) -> dict[str, Any]:
    """Write ``train_<family>.json`` and ``validation_<family>.json`` under `out`; returns what was taken."""
    train, held, taken = [], [], {}
    for source in sources:
        records = load_records(source)
        part_held, part_train = _split(records, validation, per_source, seed)
        held += part_held
        train += part_train
        taken[source] = {"available": len(records), "train": len(part_train), "validation": len(part_held)}
    shuffled = [train[i] for i in _seeded_order(len(train), seed)]  # mix the sources
    _write(out / f"train_{family}.json", shuffled)
    _write(out / f"validation_{family}.json", held)
    return taken


def _instruction_key(record: dict[str, Any]) -> str:
    return " ".join(str(record["instruction"]).split())


def _options(record: dict[str, Any]) -> int | None:
    """Number of options a record offers, read from its "Answer format: a/b/c" line (None: free-form number)."""
    found = _ANSWER_FORMAT.search(str(record["instruction"]))
    return len(found.group(1).split("/")) if found else None


def baselines(records: Sequence[dict[str, Any]], dataset: str) -> tuple[float, float]:
    """(chance, majority) accuracy on these records."""
    if dataset == "AQuA":
        chance = 1 / 5  # five lettered options, not announced by an "Answer format" line
    else:
        counts = [_options(record) for record in records]
        chance = float(np.mean([1 / n if n else 0.0 for n in counts])) if counts else 0.0
    labels = collections.Counter(str(record["answer"]) for record in records)
    majority = labels.most_common(1)[0][1] / len(records) if records else 0.0
    return chance, majority


def build_heldout(
    family: str, training_files: Sequence[str], limit: int | None, root: Path, scored: int | None = None
) -> list[Slice]:
    """Write the clean test slice of every benchmark of `family` that is present, under ``root/dataset/``.

    ``limit`` records per slice (None: all); accuracy is measured on the first ``scored`` of them (None: all), so
    the chance and majority baselines are computed on those."""
    seen = {_instruction_key(record) for path in training_files for record in load_records(path)}
    slices = []
    for dataset in COMMONSENSE_DATASETS if family == "commonsense" else MATH_DATASETS:
        relative = f"dataset/{dataset}/test.json"
        if not _exists(relative):
            continue
        records = load_test_records(relative)
        clean = [record for record in records if _instruction_key(record) not in seen]
        kept = clean if limit is None else clean[:limit]
        _write(root / relative, kept)
        scored_records = kept if scored is None else kept[:scored]
        chance, majority = baselines(scored_records, dataset)
        slices.append(
            Slice(
                dataset, family, len(kept), len(records) - len(clean), len(scored_records), chance, majority
            )
        )
    return slices


def slices_as_dicts(slices: Sequence[Slice]) -> list[dict[str, Any]]:
    return [asdict(item) for item in slices]
