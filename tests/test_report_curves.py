"""Training curves in the report, on a run trained by the real training code and evaluated by the real CLI code.

The tiny LLaMA (SmolLM2's vocabulary and tokenizer) trains 6 steps on real boolq/ARC-Easy records, is
evaluated on 2 real ARC-Easy test questions, and is reported; the PNG must exist and its lines must hold
exactly the losses and throughputs metrics.jsonl logged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import read_metrics, small_run

from dense_lora import evaluate
from dense_lora.report import Curves, load_run, main, plot_curves, read_curves
from dense_lora.train import TrainConfig, run

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def evaluated_run(tiny_base: Path, train_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output_dir = tmp_path_factory.mktemp("curves") / "dense-r8"
    run(TrainConfig(**small_run(tiny_base, train_file, output_dir)))
    evaluate.run(
        "commonsense", "ARC-Easy", str(tiny_base), lora_weights=str(output_dir), limit=2, max_new_tokens=4
    )
    return output_dir


def logged(output_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """The series straight from metrics.jsonl, read independently of the report's reader."""
    records: list[dict[str, Any]] = read_metrics(output_dir)
    return {
        "train_loss": [(r["step"], r["loss"]) for r in records if "loss" in r],
        "eval_loss": [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r],
        "tokens_per_s": [
            (r["step"], r["tokens_per_s"]) for r in records if r.get("tokens_per_s") is not None
        ],
    }


def test_report_draws_the_logged_curves_of_a_real_run(evaluated_run: Path, tmp_path: Path, capsys):
    out = tmp_path / "reports" / "tiny"
    assert main([str(evaluated_run), "--out", str(out)]) == 0
    png = tmp_path / "reports" / "curves" / "dense-r8.png"
    assert png.read_bytes()[:8] == PNG
    expected = logged(evaluated_run)
    assert [step for step, _ in expected["train_loss"]] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in expected["eval_loss"]] == [2, 4, 6]
    drawn = plot_curves(load_run(evaluated_run).curves, "again", tmp_path / "again.png")
    assert drawn == Curves(**expected)  # exactly the logged points: nothing smoothed, dropped or reordered
    text = Path(f"{out}.md").read_text()
    best_step, best = min(expected["eval_loss"], key=lambda point: point[1])
    assert f"| {expected['train_loss'][-1][1]:.4f} | {best:.4f} ({best_step}) |" in text
    assert "[dense-r8.png](curves/dense-r8.png)" in text
    assert "ARC-e" in text and "no published row: the paper did not fine-tune" in text  # its accuracy too
    assert str(png) in capsys.readouterr().out


def test_curves_of_a_resumed_file_with_a_cut_line(tmp_path: Path):
    """A line cut off by a kill is skipped; the final train_loss log is not a curve point."""
    metrics = tmp_path / "metrics.jsonl"
    lines = [
        {"step": 1, "epoch": 0.1, "loss": 2.5, "learning_rate": 1e-3, "tokens_per_s": 100.0},
        {"step": 2, "epoch": 0.2, "loss": 2.0, "learning_rate": 1e-3, "tokens_per_s": None},
        {"step": 2, "epoch": 0.2, "eval_loss": 2.2, "eval_runtime": 0.1},
        {"step": 2, "epoch": 0.2, "train_runtime": 3.0, "train_loss": 2.25},
    ]
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 3, "lo')
    curves = read_curves(metrics)
    assert curves == Curves([(1, 2.5), (2, 2.0)], [(2, 2.2)], [(1, 100.0)])
    assert read_curves(tmp_path / "absent.jsonl") is None


def test_run_with_curves_but_no_results_is_reported(tmp_path: Path, capsys):
    run_dir = tmp_path / "training-only"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.5}) + "\n")
    assert main([str(run_dir), "--out", str(tmp_path)]) == 0  # an existing folder: report.* inside it
    assert (tmp_path / "report.md").is_file() and (tmp_path / "curves" / "training-only.png").is_file()
