"""The DenseLoRA paper's published facts as data: hyper-parameters (Tables 5-6) and every result table.

``results.json`` holds the figures as printed in Mu et al., ACL 2025 (arXiv 2505.23808); ``NOTES.md`` beside it
says where a printed row is internally inconsistent (swapped columns, averages that do not add up). Nothing here is
"fixed": a reproduction is compared with what the paper printed, and the notes travel with every comparison.
Recipes (scripts/*.sh, checked by tests/test_recipes.py) and reports (``python -m dense_lora.report``) read them.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS_FILE = Path(__file__).with_name("results.json")
NOTES_FILE = Path(__file__).with_name("NOTES.md")
CITATION = "Mu et al., DenseLoRA, ACL 2025, arXiv 2505.23808"


@functools.cache
def published() -> dict[str, Any]:
    """Every figure of the paper, as transcribed (read once)."""
    return json.loads(RESULTS_FILE.read_text())


def hyperparameters(family: str) -> dict[str, Any]:
    """The training settings of Table 5 (``commonsense``) or Table 6 (``math``)."""
    settings = published()["hyperparameters"]
    if family not in settings or family == "inference":
        raise KeyError(f"no published hyper-parameters for {family!r}; known: commonsense, math")
    return settings[family]


def table(name: str) -> list[dict[str, Any]]:
    """The rows of one result table by its key in results.json (e.g. ``table1_commonsense``)."""
    data = published()
    if name not in data or not isinstance(data[name], list):
        tables = sorted(key for key, value in data.items() if isinstance(value, list))
        raise KeyError(f"no published table {name!r}; known: {', '.join(tables)}")
    return data[name]


# ------------------------------------------------------------------------------------------------------------
# Which published row a run reproduces
# ------------------------------------------------------------------------------------------------------------

PAPER_MODELS = {
    "llama3-8b": re.compile(r"llama[-_ ]?3[-_.]?(?:0[-_.]?)?8b", re.IGNORECASE),
    "llama2-7b": re.compile(r"llama[-_ ]?2[-_.]?7b", re.IGNORECASE),
}
MODULE_GROUPS = {
    "QKV": ("q_proj", "k_proj", "v_proj"),
    "UD": ("up_proj", "down_proj"),
    "QKVUD": ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"),
    "": (),
}
TABLE_TITLES = {
    "table1_commonsense": "Table 1",
    "table2_math": "Table 2",
    "table3_table8_granularity": "Table 3/8",
    "table4_variants": "Table 4",
    "table7_low_resource": "Table 7",
}


@dataclass(frozen=True)
class RunFacts:
    """What decides which published row a run reproduces."""

    base_model: str  # as the run recorded it: alias, hub id or folder
    family: str  # "commonsense" or "math"
    method: str  # "DenseLoRA", "LoRA", "DoRA", ...
    r: int | None
    activation: str = "gelu"
    train_shared: bool = True
    target_modules: tuple[str, ...] = MODULE_GROUPS["QKVUD"]
    lora_modules: tuple[str, ...] = ()
    data_fraction: float = 1.0


@dataclass(frozen=True)
class PaperRow:
    """A published row: where it is printed, its label, its figures (accuracy %) and the transcription note."""

    table: str
    label: str
    model: str
    scores: dict[str, float]
    avg: float | None
    params_percent: float | None
    note: str | None


def paper_model(name: str) -> str | None:
    """The paper's name for a base model ("llama3-8b", "llama2-7b"), or None for a model the paper did not use."""
    return next((key for key, pattern in PAPER_MODELS.items() if pattern.search(name)), None)


def _group(modules: tuple[str, ...]) -> str | None:
    return next((name for name, group in MODULE_GROUPS.items() if set(group) == set(modules)), None)


def _row(table_name: str, label: str, model: str, row: dict[str, Any]) -> PaperRow:
    return PaperRow(
        table=TABLE_TITLES[table_name],
        label=label,
        model=model,
        scores=dict(row.get("scores", {})),
        avg=row.get("avg"),
        params_percent=row.get("params_percent"),
        note=row.get("note"),
    )


def published_row(facts: RunFacts) -> PaperRow | None:
    """The published figures of the experiment a run reproduces, or None if the paper has no such row.

    The variants (Freeze, Only Matrix), the granularity rows and the low-resource fractions are LLaMA-3-8B
    commonsense experiments; a plain run matches Table 1 (commonsense) or Table 2 (math) by model, method and r.
    """
    model = paper_model(facts.base_model)
    if model is None:
        return None
    dense = tuple(name for name in facts.target_modules if name not in facts.lora_modules)
    variant = (
        "Freeze" if not facts.train_shared else "Only Matrix" if facts.activation == "identity" else None
    )
    if facts.method == "DenseLoRA" and (variant or facts.lora_modules or _group(dense) != "QKVUD"):
        if model != "llama3-8b" or facts.family != "commonsense" or facts.data_fraction != 1.0:
            return None
        if variant:
            rows = [
                row for row in table("table4_variants") if row["variant"] == variant and row["r"] == facts.r
            ]
            return _row("table4_variants", variant, model, rows[0]) if rows else None
        lora_group, dense_group = _group(facts.lora_modules), _group(dense)
        rows = [
            row
            for row in table("table3_table8_granularity")
            if row["lora"] == lora_group and row["denselora"] == dense_group and facts.r == 32
        ]
        label = " + ".join(
            part for part in (lora_group and f"LoRA {lora_group}", f"DenseLoRA {dense_group}") if part
        )
        return _row("table3_table8_granularity", label, model, rows[0]) if rows else None
    if facts.data_fraction != 1.0:
        rows = [row for row in table("table7_low_resource") if row["fraction"] == facts.data_fraction]
        # Table 7 is DenseLoRA r=32 on LLaMA-3-8B trained on fractions of the commonsense data, nothing else
        usable = (
            rows
            and facts.family == "commonsense"
            and facts.method == "DenseLoRA"
            and facts.r == 32
            and model == "llama3-8b"
        )
        return (
            _row("table7_low_resource", f"{facts.data_fraction:.0%} data", model, rows[0]) if usable else None
        )
    name = "table1_commonsense" if facts.family == "commonsense" else "table2_math"
    rows = [
        row
        for row in table(name)
        if row["method"] == facts.method
        and row.get("model") == model
        and row.get("r", 32 if row["method"] == "LoRA" else None) == facts.r
    ]
    return _row(name, f"{facts.method} r={facts.r}", model, rows[0]) if rows else None


# The benchmarks each family's published average is taken over (Table 2 prints four of our six math sets).
PAPER_BENCHMARKS = {
    "commonsense": (
        "boolq",
        "piqa",
        "social_i_qa",
        "hellaswag",
        "winogrande",
        "ARC-Easy",
        "ARC-Challenge",
        "openbookqa",
    ),
    "math": ("gsm8k", "AQuA", "AddSub", "SVAMP"),
}


def variant(facts: RunFacts) -> str | None:
    """The Table 4 variant a run is ("Freeze", "Only Matrix"), or None for plain DenseLoRA and other methods."""
    if facts.method != "DenseLoRA":
        return None
    if not facts.train_shared:
        return "Freeze"
    return "Only Matrix" if facts.activation == "identity" else None


def describe(facts: RunFacts) -> str:
    """A run's experiment in the paper's terms, e.g. "DenseLoRA r=8, Freeze, DenseLoRA on QKV, 30% data"."""
    parts = [f"{facts.method} r={facts.r}" if facts.r is not None else facts.method]
    if variant(facts):
        parts.append(str(variant(facts)))
    if facts.lora_modules:
        parts.append(f"LoRA on {_group(facts.lora_modules) or ','.join(facts.lora_modules)}")
    dense = tuple(name for name in facts.target_modules if name not in facts.lora_modules)
    group = _group(dense)
    if group != "QKVUD":
        parts.append(f"{facts.method} on {group or ','.join(dense)}")
    if facts.data_fraction != 1.0:
        parts.append(f"{facts.data_fraction:.0%} data")
    return ", ".join(parts)


def no_row_reason(facts: RunFacts) -> str:
    """Why :func:`published_row` found nothing, in one line, so a report says it instead of inventing a row."""
    if not facts.base_model:
        return "the run does not record its base model"
    if paper_model(facts.base_model) is None:
        return f"the paper did not fine-tune {facts.base_model} (only LLaMA2-7B and LLaMA3-8B)"
    return f"the paper printed no {facts.family} row for {describe(facts)} on {paper_model(facts.base_model)}"
