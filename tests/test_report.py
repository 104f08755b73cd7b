"""The results report on fabricated runs: markdown table, CSV, PNG, share from summary.json or counted."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from helpers import make_tiny_llama
from peft import get_peft_model

from dense_lora import DenseLoraConfig
from dense_lora.evaluate import BENCHMARKS
from dense_lora.report import load_run, main


def _results(folder: Path, accuracies: dict[str, float]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for dataset, accuracy in accuracies.items():
        (folder / f"{dataset}.json").write_text(json.dumps({"dataset": dataset, "accuracy": accuracy}))


def test_report_of_two_runs(tmp_path, capsys):
    dense, lora = tmp_path / "dense", tmp_path / "lora"
    _results(dense / "eval", {name: 0.5 + i / 100 for i, name in enumerate(BENCHMARKS["commonsense"])})
    (dense / "summary.json").write_text(
        json.dumps({"method": "denselora", "trainable_share_pct": 0.01, "config": {"r": 16}})
    )
    _results(lora / "eval", {name: 0.4 for name in BENCHMARKS["commonsense"][:3]})
    (lora / "summary.json").write_text(
        json.dumps({"method": "lora", "trainable_params": 200, "base_params": 10000})
    )
    out = tmp_path / "reports" / "table"
    assert main([str(dense), str(lora), "--out", str(out)]) == 0
    text = Path(f"{out}.md").read_text()
    assert (
        "| Method | Params (%) | BoolQ | PIQA | SIQA | HellaS. | WinoG. | ARC-c | ARC-e | OBQA | Avg. |"
        in text
    )
    assert (
        "| DenseLoRA (r=16) | 0.01 | 50.0 | 51.0 | 52.0 | 53.0 | 54.0 | 55.0 | 56.0 | 57.0 | 53.5 |" in text
    )
    assert "| LoRA | 2 | 40.0 | 40.0 | 40.0 | – | – | – | – | – | – |" in text  # no average of a partial row
    assert text in capsys.readouterr().out
    rows = list(csv.DictReader(Path(f"{out}.csv").read_text().splitlines()))
    assert {"run", "method", "trainable_share_pct", "kind", "dataset", "accuracy_pct"} <= set(rows[0])
    assert {r["paper_source"] for r in rows} == {
        "no published row: the run does not record its base model"
    }  # no base model recorded: no row is guessed
    assert [r["accuracy_pct"] for r in rows if r["dataset"] == "average"] == ["53.5", ""]
    assert Path(f"{out}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_share_counted_without_summary(tmp_path, smollm2_dir):
    run = tmp_path / "run"
    model = make_tiny_llama()
    config = DenseLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    get_peft_model(model, config).save_pretrained(run)
    adapter_config = json.loads((run / "adapter_config.json").read_text())
    model.config.save_pretrained(tmp_path / "base")
    adapter_config["base_model_name_or_path"] = str(tmp_path / "base")
    (run / "adapter_config.json").write_text(json.dumps(adapter_config))
    _results(run / "eval", {"gsm8k": 0.25})
    loaded = load_run(run)
    trainable = sum(
        p.numel() for p in get_peft_model(make_tiny_llama(), config).parameters() if p.requires_grad
    )
    base = sum(p.numel() for p in make_tiny_llama().parameters())
    assert abs(loaded.share_pct - 100 * trainable / base) < 1e-9
    assert loaded.method == "DenseLoRA (r=4)" and loaded.accuracy == {"gsm8k": 25.0}


def test_run_without_results_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_results_of_another_adapter_are_refused(tmp_path, capsys):
    """After --overwrite retrains a folder, results scored with the old adapter must not be reported as its own."""
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"adapter_sha256": "a" * 64, "trainable_share_pct": 0.1}))
    _results(run / "eval", {"boolq": 0.5})
    scored = json.loads((run / "eval" / "boolq.json").read_text())
    (run / "eval" / "boolq.json").write_text(json.dumps({**scored, "adapter_sha256": "a" * 64}))
    assert load_run(run).accuracy == {"boolq": 50.0}  # the same adapter: reported
    (run / "eval" / "boolq.json").write_text(json.dumps({**scored, "adapter": {"sha256": "b" * 64}}))
    assert main([str(run), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "scored adapter bbbbbbbbbbbb" in err and "aaaaaaaaaaaa" in err
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "report").exists()
