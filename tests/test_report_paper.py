"""The report beside the paper: run folders written the way finetune.py and the evaluation CLIs write them.

Each run folder holds run_config.json (the training flags), summary.json (counts and the flags' copy),
adapter_config.json (peft's own save) and eval/<dataset>.json; the report must find the published row of the
same experiment and print ours, the paper's figures and ours − paper, or say that the paper has no such row.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest

from dense_lora.evaluate import BENCHMARKS
from dense_lora.paper import PAPER_BENCHMARKS, table
from dense_lora.report import comparisons, load_run, main, run_facts
from dense_lora.train import TrainConfig, build_peft_config

LLAMA3 = "meta-llama/Meta-Llama-3-8B"
COMMONSENSE_DATA = "ft-training_set/commonsense_170k.json"
MATH_DATA = "ft-training_set/math_10k.json"


def make_run(
    folder: Path,
    accuracies: dict[str, float],
    *,
    with_flags: bool = True,
    share_pct: float = 0.02,
    **flags: object,
) -> Path:
    """A finished, evaluated run: the files and formats of dense_lora.train.run and dense_lora.evaluate.run."""
    config = TrainConfig(
        output_dir=str(folder), **{"base_model": LLAMA3, "data_path": COMMONSENSE_DATA, **flags}
    )
    folder.mkdir(parents=True)
    adapter = build_peft_config(config)
    adapter.base_model_name_or_path = config.base_model
    adapter.save_pretrained(str(folder))  # peft's adapter_config.json, as Trainer.save_model writes it
    if with_flags:
        (folder / "run_config.json").write_text(json.dumps(config.fingerprint(), indent=2, sort_keys=True))
        summary = {
            "status": "completed",
            "method": config.method,
            "base_model": config.base_model,
            "trainable_params": 1,
            "base_params": round(100 / share_pct),
            "trainable_share_pct": share_pct,
            "config": dataclasses.asdict(config),
        }
        (folder / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    write_results(folder / "eval", accuracies)
    return folder


def write_results(folder: Path, accuracies: dict[str, float]) -> None:
    """eval/<dataset>.json as dense_lora.evaluate writes it (accuracy is a fraction; counts over 1000 examples)."""
    folder.mkdir(parents=True, exist_ok=True)
    for dataset, accuracy in accuracies.items():
        kind = "math" if dataset in BENCHMARKS["math"] else "commonsense"
        result = {
            "dataset": dataset,
            "kind": kind,
            "accuracy": accuracy,
            "correct": round(accuracy * 1000),
            "total": 1000,
            "config": {"dataset": dataset, "batch_size": 1},
            "timing": {"world_size": 1},
        }
        (folder / f"{dataset}.json").write_text(json.dumps(result, indent=2))


def published(name: str, **match: object) -> dict:
    return next(row for row in table(name) if all(row.get(k) == v for k, v in match.items()))


def commonsense(offset: float) -> dict[str, float]:
    """Accuracies (fractions) a fixed offset from DenseLoRA r=32's published row, so differences are known."""
    row = published("table1_commonsense", method="DenseLoRA", model="llama3-8b", r=32)
    return {name: row["scores"][name] / 100 + offset for name in PAPER_BENCHMARKS["commonsense"]}


def test_table1_row_beside_a_llama3_denselora_run(tmp_path, capsys):
    run = make_run(tmp_path / "dense-r32", commonsense(-0.02), lora_r=32)
    out = tmp_path / "report"
    assert main([str(run), "--out", str(out)]) == 0
    text = Path(f"{out}.md").read_text()
    assert text in capsys.readouterr().out  # the console shows the same report
    assert "beside the paper (Mu et al., DenseLoRA, ACL 2025" in text
    row = published("table1_commonsense", method="DenseLoRA", model="llama3-8b", r=32)
    assert (
        "| DenseLoRA (r=32) | ours | 0.02 | 72.3 | 86.0 | 78.3 | 92.5 | 84.0 | 76.7 | 87.7 | 83.6 | 82.6 |"
        in text
    )
    assert (
        "|  | paper: Table 1, DenseLoRA r=32, llama3-8b | 0.02 | 74.3 | 88.0 | 80.3 | 94.5 | 86.0 | 78.7 | 89.7 "
        "| 85.6 | 84.6 |" in text
    )
    assert "|  | ours − paper |  | -2.0 | -2.0 | -2.0 | -2.0 | -2.0 | -2.0 | -2.0 | -2.0 | -2.0 |" in text
    rows = list(csv.DictReader(Path(f"{out}.csv").read_text().splitlines()))
    boolq = next(r for r in rows if r["dataset"] == "boolq")
    assert float(boolq["paper_accuracy_pct"]) == row["scores"]["boolq"]
    assert float(boolq["ours_minus_paper"]) == pytest.approx(-2.0)
    assert boolq["paper_source"] == "Table 1, DenseLoRA r=32, llama3-8b"
    avg = next(r for r in rows if r["dataset"] == "average")
    assert float(avg["paper_accuracy_pct"]) == 84.6
    assert float(avg["ours_minus_paper"]) == pytest.approx(sum(row["scores"].values()) / 8 - 2 - 84.6)


@pytest.mark.parametrize(
    ("flags", "source", "paper_avg"),
    [
        ({"lora_r": 128, "train_shared": False}, "Table 4, Freeze, llama3-8b", 79.5),
        ({"lora_r": 32, "activation": "identity"}, "Table 4, Only Matrix, llama3-8b", 83.3),
        (
            {"lora_r": 32, "lora_modules": "q_proj,k_proj,v_proj"},
            "Table 3/8, LoRA QKV + DenseLoRA UD, llama3-8b",
            83.8,
        ),
        (
            {"lora_r": 32, "target_modules": "q_proj,k_proj,v_proj"},
            "Table 3/8, DenseLoRA QKV, llama3-8b",
            82.3,
        ),
        ({"lora_r": 32, "data_fraction": 0.4}, "Table 7, 40% data, llama3-8b", 83.6),
        (
            {"lora_r": 16, "base_model": "meta-llama/Llama-2-7b-hf"},
            "Table 1, DenseLoRA r=16, llama2-7b",
            76.3,
        ),
        ({"lora_r": 32, "adapter_name": "lora"}, "Table 1, LoRA r=32, llama3-8b", 80.8),
        ({"lora_r": 16, "adapter_name": "dora"}, "Table 1, DoRA r=16, llama3-8b", 85.0),
        ({"lora_r": 256, "method": "vera"}, "Table 1, VeRA r=256, llama3-8b", 67.7),
    ],
)
def test_each_experiment_finds_its_published_row(tmp_path, flags, source, paper_avg):
    run = load_run(make_run(tmp_path / "run", commonsense(0.0), **flags))
    (item,) = comparisons([run], "commonsense")
    assert item.source == source and item.row.avg == paper_avg
    ours = sum(run.accuracy[name] for name in PAPER_BENCHMARKS["commonsense"]) / 8
    assert item.avg_diff == pytest.approx(ours - paper_avg)
    if item.row.scores:  # Table 4 rows print only an average: no per-benchmark difference is made up
        assert item.diff("boolq") == pytest.approx(run.accuracy["boolq"] - item.row.scores["boolq"])
    else:
        assert item.diff("boolq") is None


def test_run_config_alone_names_the_method():
    """run_config.json records --method (adapter_name: folders from before the rename); it alone names the run."""
    for flags in ({"method": "dora"}, {"adapter_name": "dora"}):
        facts = run_facts({**flags, "lora_r": 16, "base_model": LLAMA3}, {}, {})
        assert (facts.method, facts.r) == ("DoRA", 16)


def test_adapter_without_training_flags_is_matched_from_adapter_config(tmp_path):
    """A downloaded adapter folder (no run_config/summary): method, rank and variant come from peft's config."""
    run = load_run(
        make_run(tmp_path / "run", commonsense(0.0), with_flags=False, lora_r=128, train_shared=False)
    )
    (item,) = comparisons([run], "commonsense")
    assert run.method == "DenseLoRA (r=128, Freeze)" and item.source == "Table 4, Freeze, llama3-8b"


def test_math_run_compares_averages_over_the_papers_four_benchmarks(tmp_path):
    accuracies = {name: 0.5 for name in BENCHMARKS["math"]}  # six sets; Table 2 prints four
    run = make_run(tmp_path / "lora-math", accuracies, adapter_name="lora", lora_r=32, data_path=MATH_DATA)
    out = tmp_path / "report"
    assert main([str(run), "--out", str(out)]) == 0
    text = Path(f"{out}.md").read_text()
    assert (
        "|  | paper: Table 2, LoRA r=32, llama3-8b | 0.7 | 90.6 | – | – | 47.1 | 18.1 | 71.9 | 56.9 |" in text
    )
    assert "|  | ours − paper |  | -40.6 | – | – | +2.9 | +31.9 | -21.9 | -6.9 |" in text
    rows = {r["dataset"]: r for r in csv.DictReader(Path(f"{out}.csv").read_text().splitlines())}
    assert rows["average"]["paper_accuracy_pct"] == ""  # our six-set mean is not the paper's four-set one
    assert float(rows["average_paper_benchmarks"]["ours_minus_paper"]) == pytest.approx(50.0 - 56.9)
    assert "AddSub/SVAMP" not in text  # only the matched row's note is shown (LoRA's row has none)


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        ({"base_model": "smollm2", "lora_r": 32}, "the paper did not fine-tune smollm2"),
        ({"lora_r": 8}, "the paper printed no commonsense row for DenseLoRA r=8 on llama3-8b"),
        ({"lora_r": 32, "train_shared": False}, "no commonsense row for DenseLoRA r=32, Freeze on llama3-8b"),
        ({"lora_r": 32, "data_fraction": 0.3}, "DenseLoRA r=32, 30% data on llama3-8b"),
        ({"lora_r": 32, "data_path": MATH_DATA}, "trained on math data"),
    ],
)
def test_no_published_row_is_said_not_invented(tmp_path, flags, reason):
    run = make_run(tmp_path / "run", commonsense(0.0), **flags)
    out = tmp_path / "report"
    assert main([str(run), "--out", str(out)]) == 0
    text = Path(f"{out}.md").read_text()
    assert "no published row: " in text and reason in text
    assert "paper:" not in text and "ours − paper" not in text
    rows = list(csv.DictReader(Path(f"{out}.csv").read_text().splitlines()))
    assert all(r["paper_accuracy_pct"] == "" and r["ours_minus_paper"] == "" for r in rows)
    assert all(r["paper_source"].startswith("no published row: ") for r in rows)


def test_base_model_results_have_no_published_row(tmp_path):
    write_results(tmp_path / "base", {"boolq": 0.6})
    run = load_run(tmp_path / "base")
    (item,) = comparisons([run], "commonsense")
    assert run.method == "base model" and item.row is None and "without an adapter" in item.source


def test_notes_travel_with_inconsistent_rows(tmp_path):
    run = make_run(tmp_path / "run", commonsense(0.0), lora_r=32, lora_modules="q_proj,k_proj,v_proj")
    out = tmp_path / "report"
    assert main([str(run), "--out", str(out)]) == 0
    assert (
        "Transcription note, Table 3/8, LoRA QKV + DenseLoRA UD, llama3-8b: as printed; ARC-e/ARC-c look"
        in (Path(f"{out}.md").read_text())
    )


def test_malformed_result_is_one_line_error_and_nothing_written(tmp_path, capsys):
    run = make_run(tmp_path / "run", {"boolq": 0.5}, lora_r=32)
    (run / "eval" / "piqa.json").write_text("{not json")
    out = tmp_path / "out" / "report"
    assert main([str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "piqa.json" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
