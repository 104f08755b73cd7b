"""Issue 12.3: the evaluators choose their batch size when --batch_size is not given, and record it."""

from __future__ import annotations

import json

from dense_lora.evaluate import CPU_DEFAULT_BATCH_SIZE, run


def test_default_batch_size_on_cpu_is_recorded_and_kept_on_resume(tiny, tmp_path, real_data):
    real_data("dataset/boolq/test.json")
    common = dict(limit=3, max_new_tokens=4)
    (auto,) = run(
        "commonsense",
        "boolq",
        str(tiny["base"]),
        str(tiny["adapter"]),
        output_dir=str(tmp_path / "a"),
        **common,
    )
    assert CPU_DEFAULT_BATCH_SIZE == 16
    assert (auto["batch_size"], auto["config"]["batch_size"]) == (16, 16)
    assert auto["batch_size_source"] == "auto: CPU default 16"
    assert auto["adapter_sha256"] == auto["adapter"]["sha256"] == auto["config"]["adapter_sha256"]
    # A folder holding results of an explicit --batch_size 2 (a killed run's part): the automatic choice is the
    # earlier run's, so the rerun resumes instead of being refused as "a different config".
    (explicit,) = run(
        "commonsense", "boolq", str(tiny["base"]), str(tiny["adapter"]), output_dir=str(tmp_path / "b"),
        batch_size=2, **common,
    )  # fmt: skip
    killed = tmp_path / "c"
    killed.mkdir()
    lines = (tmp_path / "b" / "boolq.jsonl").read_text().splitlines(keepends=True)
    (killed / "boolq.jsonl").write_text("".join(lines[:3]))  # header and two finished examples
    (resumed,) = run(
        "commonsense", "boolq", str(tiny["base"]), str(tiny["adapter"]), output_dir=str(killed), **common
    )
    assert resumed["batch_size"] == 2 and resumed["batch_size_source"] == "auto: the earlier run's, resumed"
    assert resumed["timing"]["examples_generated"] == 1
    assert (killed / "boolq.jsonl").read_text() == (tmp_path / "b" / "boolq.jsonl").read_text()
    assert json.loads((killed / "boolq.json").read_text())["correct"] == explicit["correct"]
    # --batch_size 1 is still the published batch-1 protocol.
    (one,) = run("commonsense", "boolq", str(tiny["base"]), str(tiny["adapter"]), output_dir=str(tmp_path / "d"),
                 batch_size=1, **common)  # fmt: skip
    assert one["batch_size"] == 1 and one["batch_size_source"] == "--batch_size"
