"""The paper's figures as data, and which published row a run reproduces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dense_lora import paper
from dense_lora.paper import RunFacts, paper_model, published_row

QKV = ("q_proj", "k_proj", "v_proj")
UD = ("up_proj", "down_proj")


def test_the_project_carries_the_papers_figures():
    """The copy in the package is the data (no runtime read of ../shared); it holds every table with notes."""
    data = paper.published()
    assert paper.RESULTS_FILE.parent == Path(paper.__file__).parent
    for name in paper.TABLE_TITLES:
        assert paper.table(name)
    assert "Freeze" in paper.NOTES_FILE.read_text()
    shared = Path(__file__).resolve().parents[2] / "shared" / "paper" / "results.json"
    if shared.is_file():  # where the transcription is at hand, the copy must not have drifted from it
        assert json.loads(shared.read_text()) == data
    with pytest.raises(KeyError, match="known"):
        paper.table("table9")


def test_inconsistent_rows_are_kept_as_printed_with_their_note():
    dense_math = next(row for row in paper.table("table2_math") if row.get("r") == 32)
    assert (
        dense_math["scores"]["AddSub"] == 73.5
        and dense_math["avg"] == 57.5
        and "swapped" in dense_math["note"]
    )
    vera = next(row for row in paper.table("table1_commonsense") if row["method"] == "VeRA")
    assert vera["scores"]["winogrande"] == 6.18


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("meta-llama/Meta-Llama-3-8B", "llama3-8b"),
        ("llama3-8b", "llama3-8b"),
        ("/models/Llama-3.0-8B", "llama3-8b"),
        ("meta-llama/Llama-2-7b-hf", "llama2-7b"),
        ("smollm2", None),
        ("meta-llama/Llama-3.1-70B", None),
    ],
)
def test_paper_model_names(name, expected):
    assert paper_model(name) == expected


@pytest.mark.parametrize(
    ("facts", "table", "label", "avg"),
    [
        (
            RunFacts("meta-llama/Meta-Llama-3-8B", "commonsense", "DenseLoRA", 32),
            "Table 1",
            "DenseLoRA r=32",
            84.6,
        ),
        (RunFacts("llama2-7b", "commonsense", "DenseLoRA", 16), "Table 1", "DenseLoRA r=16", 76.3),
        (RunFacts("llama3-8b", "commonsense", "LoRA", 32), "Table 1", "LoRA r=32", 80.8),
        (RunFacts("llama3-8b", "commonsense", "DoRA", 16), "Table 1", "DoRA r=16", 85.0),
        (RunFacts("llama3-8b", "math", "LoRA", 32), "Table 2", "LoRA r=32", 56.9),
        (RunFacts("llama3-8b", "math", "DenseLoRA", 64), "Table 2", "DenseLoRA r=64", 58.5),
        (
            RunFacts("llama3-8b", "commonsense", "DenseLoRA", 128, train_shared=False),
            "Table 4",
            "Freeze",
            79.5,
        ),
        (
            RunFacts("llama3-8b", "commonsense", "DenseLoRA", 32, activation="identity"),
            "Table 4",
            "Only Matrix",
            83.3,
        ),
        (
            RunFacts("llama3-8b", "commonsense", "DenseLoRA", 32, lora_modules=QKV),
            "Table 3/8",
            "LoRA QKV + DenseLoRA UD",
            83.8,
        ),
        (
            RunFacts("llama3-8b", "commonsense", "DenseLoRA", 32, lora_modules=UD),
            "Table 3/8",
            "LoRA UD + DenseLoRA QKV",
            83.2,
        ),
        (
            RunFacts("llama3-8b", "commonsense", "DenseLoRA", 32, target_modules=QKV),
            "Table 3/8",
            "DenseLoRA QKV",
            82.3,
        ),
        (
            RunFacts("llama3-8b", "commonsense", "DenseLoRA", 32, data_fraction=0.4),
            "Table 7",
            "40% data",
            83.6,
        ),
    ],
)
def test_published_row_of_a_run(facts, table, label, avg):
    row = published_row(facts)
    assert (row.table, row.label, row.avg) == (table, label, avg)


@pytest.mark.parametrize(
    "facts",
    [
        RunFacts("smollm2", "commonsense", "DenseLoRA", 32),  # the paper has no SmolLM2 row
        RunFacts("llama3-8b", "commonsense", "DenseLoRA", 8),  # nor this rank
        RunFacts("llama3-8b", "commonsense", "DenseLoRA", 32, train_shared=False),  # Freeze was run at r=128
        RunFacts(
            "llama2-7b", "commonsense", "DenseLoRA", 32, activation="identity"
        ),  # variants: LLaMA-3 only
        RunFacts("llama3-8b", "commonsense", "DenseLoRA", 32, data_fraction=0.3),  # no 30% row
        RunFacts("llama3-8b", "math", "DenseLoRA", 16),
        RunFacts("llama3-8b", "math", "DenseLoRA", 32, data_fraction=0.1),  # Table 7 is commonsense only
    ],
)
def test_runs_without_a_published_row(facts):
    assert published_row(facts) is None
