"""The evaluation driver end to end: tiny LLaMA (+ DenseLoRA adapter) with the real SmolLM2 tokenizer and real
test files; resume after a kill; torchrun sharding; every bad input as one line and exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dense_lora.data
from dense_lora.evaluate import cli, run

REPO = Path(__file__).resolve().parents[1]


def _strip_timing(result: dict) -> dict:
    return {key: value for key, value in result.items() if key != "timing"}


def test_end_to_end_commonsense_with_adapter(tiny, tmp_path, real_data):
    real_data("dataset/boolq/test.json")
    out = tmp_path / "out"

    def evaluate() -> list[dict]:
        return run(
            "commonsense",
            "boolq",
            str(tiny["base"]),
            str(tiny["adapter"]),
            batch_size=4,
            limit=6,
            max_new_tokens=8,
            output_dir=str(out),
            extraction="both",
        )

    (result,) = evaluate()
    saved = json.loads((out / "boolq.json").read_text())
    assert saved == result
    assert saved["total"] == 6 and 0 <= saved["accuracy"] <= 1 and "accuracy_strict" in saved
    assert saved["adapter"]["peft_type"] == "DENSELORA" and saved["config"]["max_new_tokens"] == 8
    lines = [json.loads(line) for line in (out / "boolq.jsonl").read_text().splitlines()]
    assert lines[0]["header"] == saved["config"]
    assert [r["index"] for r in lines[1:]] == list(range(6))
    assert set(lines[1]) == {
        "index",
        "prompt",
        "output",
        "prediction",
        "label",
        "correct",
        "prediction_strict",
        "correct_strict",
    }
    assert sum(r["correct"] for r in lines[1:]) == saved["correct"]
    # a rerun with the same config finds the final result and generates nothing
    assert evaluate()[0] == saved


def test_math_defaults_and_base_model_without_adapter(tiny, tmp_path, real_data):
    real_data("dataset/AQuA/test.json")
    (result,) = run(
        "math", "aqua", str(tiny["base"]), batch_size=2, limit=3, max_new_tokens=4, output_dir=str(tmp_path)
    )
    assert result["dataset"] == "AQuA" and result["adapter"] is None and result["total"] == 3


def test_resume_after_kill_is_identical(tiny, tmp_path, real_data):
    real_data("dataset/piqa/test.json")
    flags = dict(batch_size=2, limit=7, max_new_tokens=6)
    whole = run(
        "commonsense",
        "piqa",
        str(tiny["base"]),
        str(tiny["adapter"]),
        output_dir=str(tmp_path / "a"),
        **flags,
    )[0]
    # the state a kill leaves: header, two finished batches, half a line, no final JSON
    killed = tmp_path / "b"
    killed.mkdir()
    lines = (tmp_path / "a" / "piqa.jsonl").read_text().splitlines(keepends=True)
    (killed / "piqa.jsonl").write_text("".join(lines[:1] + lines[3:7]) + lines[1][:40])
    resumed = run(
        "commonsense", "piqa", str(tiny["base"]), str(tiny["adapter"]), output_dir=str(killed), **flags
    )[0]
    assert resumed["timing"]["examples_generated"] == 3
    assert _strip_timing(resumed) == _strip_timing(whole)
    assert (killed / "piqa.jsonl").read_text() == (tmp_path / "a" / "piqa.jsonl").read_text()


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(tiny, tmp_path, real_data):
    real_data("dataset/winogrande/test.json")
    common = ["--dataset", "winogrande", "--base_model", str(tiny["base"]), "--lora_weights", str(tiny["adapter"]),
              "--batch_size", "2", "--limit", "9", "--max_new_tokens", "6"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    single = subprocess.run(
        [sys.executable, "commonsense_evaluate.py", *common, "--output_dir", str(tmp_path / "one")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
    ]
    sharded = subprocess.run(
        [*torchrun, "commonsense_evaluate.py", *common, "--output_dir", str(tmp_path / "two")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert sharded.returncode == 0, sharded.stderr[-2000:]
    one = json.loads((tmp_path / "one" / "winogrande.json").read_text())
    two = json.loads((tmp_path / "two" / "winogrande.json").read_text())
    assert two["timing"]["world_size"] == 2
    assert _strip_timing(one) == _strip_timing(two)
    assert (tmp_path / "one" / "winogrande.jsonl").read_text() == (
        tmp_path / "two" / "winogrande.jsonl"
    ).read_text()
    assert not list((tmp_path / "two").glob("*.rank*.jsonl"))


# --------------------------------------------------------------------------------------------------
# Bad input: `error: ...` on one line, exit status 2
# --------------------------------------------------------------------------------------------------


def _fails(capsys, kind: str, **flags) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli(kind)(**flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ")
    return err[-1]


def test_cli_unknown_dataset_exits_2_in_a_subprocess():
    done = subprocess.run(
        [
            sys.executable,
            "commonsense_evaluate.py",
            "--dataset",
            "gsm8k",
            "--base_model",
            "x",
            "--output_dir",
            "/tmp/unused",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: unknown commonsense dataset 'gsm8k'; valid: all, boolq, piqa, social_i_qa, hellaswag, winogrande, ARC-Challenge, ARC-Easy, openbookqa"
    )


def test_missing_test_file_says_how_to_get_it(capsys, tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(dense_lora.data, "data_roots", lambda: [tmp_path])
    line = _fails(
        capsys, "math", dataset="SVAMP", base_model=str(tiny["base"]), output_dir=str(tmp_path / "o")
    )
    assert "download_data.sh" in line and "DENSELORA_DATA" in line


@pytest.mark.parametrize(
    ("dataset", "rows", "needle"),
    [
        ("boolq", [{"instruction": "q"}], "has no 'answer'"),
        ("gsm8k", [{"instruction": "q", "answer": "twelve"}], "expected a number"),
        ("piqa", "[{", "JSON"),
    ],
)
def test_malformed_records(capsys, tiny, tmp_path, monkeypatch, dataset, rows, needle):
    (tmp_path / "dataset" / dataset).mkdir(parents=True)
    (tmp_path / "dataset" / dataset / "test.json").write_text(
        rows if isinstance(rows, str) else json.dumps(rows)
    )
    monkeypatch.setattr(dense_lora.data, "data_roots", lambda: [tmp_path])
    kind = "math" if dataset == "gsm8k" else "commonsense"
    assert needle in _fails(
        capsys, kind, dataset=dataset, base_model=str(tiny["base"]), output_dir=str(tmp_path / "o")
    )


def test_adapter_for_another_base_is_one_line(capsys, tiny, tmp_path, real_data):
    real_data("dataset/boolq/test.json")
    line = _fails(
        capsys,
        "commonsense",
        dataset="boolq",
        base_model=str(tiny["base"]),
        lora_weights=str(tiny["foreign"]),
        limit=1,
    )
    assert "does not fit base model" in line


def test_not_an_adapter_folder(capsys, tiny, tmp_path):
    assert "adapter_config.json" in _fails(
        capsys, "commonsense", dataset="boolq", base_model=str(tiny["base"]), lora_weights=str(tmp_path)
    )


def test_output_folder_of_another_config_is_refused_unless_overwrite(capsys, tiny, tmp_path, real_data):
    real_data("dataset/boolq/test.json")
    flags = dict(
        dataset="boolq",
        base_model=str(tiny["base"]),
        lora_weights=str(tiny["adapter"]),
        limit=2,
        output_dir=str(tmp_path),
        batch_size=2,
    )
    cli("commonsense")(max_new_tokens=4, **flags)
    line = _fails(capsys, "commonsense", max_new_tokens=5, **flags)
    assert "different config" in line and "max_new_tokens" in line and "--overwrite" in line
    cli("commonsense")(max_new_tokens=5, overwrite=True, **flags)
    assert json.loads((tmp_path / "boolq.json").read_text())["config"]["max_new_tokens"] == 5


def test_bad_flags(capsys, tiny):
    base = str(tiny["base"])
    assert "--output_dir is required" in _fails(capsys, "commonsense", dataset="boolq", base_model=base)
    assert "--extraction" in _fails(
        capsys, "commonsense", dataset="boolq", base_model=base, output_dir="/tmp/x", extraction="loose"
    )
    assert "mutually exclusive" in _fails(
        capsys, "math", dataset="gsm8k", base_model=base, output_dir="/tmp/x", load_8bit=True, load_4bit=True
    )


@pytest.mark.slow
def test_smollm2_on_real_slices(smollm2_dir, tmp_path, real_data):
    real_data("dataset/ARC-Challenge/test.json")
    real_data("dataset/MultiArith/test.json")
    (arc,) = run(
        "commonsense", "ARC-Challenge", str(smollm2_dir), batch_size=4, limit=4, output_dir=str(tmp_path)
    )
    (multi,) = run(
        "math",
        "MultiArith",
        str(smollm2_dir),
        batch_size=2,
        limit=2,
        max_new_tokens=24,
        output_dir=str(tmp_path),
    )
    assert arc["total"] == 4 and multi["total"] == 2
    records = [json.loads(line) for line in (tmp_path / "MultiArith.jsonl").read_text().splitlines()[1:]]
    assert all(isinstance(r["prediction"], float | type(None)) for r in records)
