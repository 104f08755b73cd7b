"""The quickstart on the real SmolLM2-135M-Instruct at a tiny size: it prints baselines and held-out losses."""

from __future__ import annotations

import math

import pytest

from dense_lora import quickstart
from dense_lora.data import load_records


@pytest.fixture(scope="module")
def arc_present() -> None:
    for name in quickstart.DATASETS:
        try:
            load_records(f"dataset/{name}/test.json")
        except FileNotFoundError as error:
            pytest.skip(str(error))


def test_reference_baselines_count_options_and_labels(arc_present):
    reference = quickstart.reference_baselines(8)
    for name in quickstart.DATASETS:
        records = load_records(f"dataset/{name}/test.json")[:8]
        options = [record["instruction"].split("Answer format:")[-1].strip().split("/") for record in records]
        chance, majority = reference[name]
        assert chance == pytest.approx(sum(1 / len(o) for o in options) / 8)
        answers = [record["answer"] for record in records]
        assert majority == max(answers.count(a) for a in set(answers)) / 8


def test_quickstart_prints_baselines_and_a_falling_answer_loss(arc_present, tmp_path, capsys, smollm2_dir):
    quickstart.main(
        output_dir=str(tmp_path),
        train_per_dataset=8,
        eval_limit=3,
        eval_batch_size=4,
        max_new_tokens=16,  # the untrained model writes to the cap: 128 tokens would be most of the test's time
        lora_r=8,
        learning_rate=5e-3,
        num_epochs=3,
    )
    out = capsys.readouterr().out
    assert "| dataset | examples | chance | majority | accuracy before | accuracy after |" in out
    rows = {
        line.split("|")[1].strip(): line.split("|")[2:-1]
        for line in out.splitlines()
        if line.startswith("| ARC")
    }
    assert set(rows) == set(quickstart.DATASETS)
    for name, cells in rows.items():
        values = [float(cell) for cell in cells]
        assert values[0] == 3 and values[1] == pytest.approx(
            quickstart.reference_baselines(3)[name][0], abs=1e-3
        )
        loss_before, loss_after = values[-2], values[-1]
        assert math.isfinite(loss_before) and loss_after < loss_before, (name, loss_before, loss_after)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max_new_tokens", "0", "--max_new_tokens must be a positive integer, got 0"),
        ("--eval_limit", "0", "--eval_limit must be a positive integer, got 0"),
        ("--eval_batch_size", "-2", "--eval_batch_size must be a positive integer, got -2"),
        ("--train_per_dataset", "0", "--train_per_dataset must be a positive integer, got 0"),
        ("--lora_r", "0", "--lora_r"),
        ("--learning_rate", "-1", "--learning_rate"),
    ],
)
def test_bad_flags_are_refused_before_anything_is_read_or_written(
    flag, value, message, tmp_path, capsys, monkeypatch
):
    """Each flag is checked first: no data read, no SmolLM2 conversion, no output folder."""
    out = tmp_path / "out"
    assert_refused_first(["--output_dir", str(out), flag, value], message, out, capsys, monkeypatch)


def test_output_dir_under_a_file_is_refused_first(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "out"
    assert_refused_first(["--output_dir", str(out)], "is not a folder", out, capsys, monkeypatch)


def assert_refused_first(argv, message, out, capsys, monkeypatch):
    """One error line, exit 2, before any data is read or SmolLM2 converted, and no output folder."""

    def must_not_run(*args, **kwargs):
        raise AssertionError("read or converted before the flags were checked")

    monkeypatch.setattr(quickstart, "load_records", must_not_run)
    monkeypatch.setattr(quickstart, "smollm2_path", must_not_run)
    with pytest.raises(SystemExit) as stop:
        quickstart.cli(argv)
    assert stop.value.code == 2
    captured = capsys.readouterr()
    # nothing started: the first line of a run is its "[quickstart] base model" note
    assert captured.out == ""
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("error: ") and message in line
    assert not out.exists()
