"""The DenseLoRA paper's published facts as data: hyper-parameters (Tables 5-6) and every result table.

``results.json`` holds the figures as printed in Mu et al., ACL 2025 (arXiv 2505.23808); ``NOTES.md`` beside it
says where a printed row is internally inconsistent (swapped columns, averages that do not add up). Nothing here is
"fixed": a reproduction is compared with what the paper printed, and the notes travel with every comparison.
Recipes (scripts/*.sh, checked by tests/test_recipes.py) and reports (``python -m dense_lora.report``) read them.
"""

from __future__ import annotations

import functools
import json
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
