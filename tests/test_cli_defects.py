"""Issue 11, one test per defect, through the CLIs as users call them.

Each case runs `finetune.py` / `commonsense_evaluate.py` main() on its argv in its own process. To spare a torch
import per case (minutes on a loaded 2-core machine) the driver imports the CLIs once and forks one child per
case, as tests/test_finetune_cli.py does; each child has its own exit status, stderr file and count of the
models it loaded (refusals that need no model must come before one loads). The evaluation case that checks
stderr for the bitsandbytes notice runs as a plain subprocess, since only a fresh interpreter prints it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from helpers import ENV, REPO, make_tiny_llama, run_forked_clis, tiny_run_flags
from peft import LoraConfig, get_peft_model

from dense_lora.train import TRAINER_STATE_FILE

# This module's tiny runs take 4 steps without warmup; a case may override either.
flags = partial(tiny_run_flags, max_steps=4, warmup_steps=0)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def cases(tiny_base, train_file, smollm2_dir, tmp_path_factory) -> dict[str, Any]:
    """Build the folders, run every case in two phases (then a third that depends on the second)."""
    tmp = tmp_path_factory.mktemp("defects")
    base, data = tiny_base, train_file
    # An evaluation base with the SmolLM2 tokenizer, and adapters that do not fit it or cannot be read.
    eval_base = tmp / "eval_base"
    sizes = dict(
        vocab_size=49152, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=2
    )
    make_tiny_llama(**sizes).save_pretrained(eval_base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, eval_base / name)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    deeper = make_tiny_llama(seed=1, **{**sizes, "num_hidden_layers": 4})  # same shapes, two more layers
    get_peft_model(deeper, lora).save_pretrained(tmp / "lora_other_base")
    get_peft_model(make_tiny_llama(seed=1, **sizes), lora).save_pretrained(tmp / "lora_truncated")
    weights = tmp / "lora_truncated" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(tmp / "lora_other_base", tmp / "lora_pickle")
    (tmp / "lora_pickle" / "adapter_model.safetensors").rename(tmp / "lora_pickle" / "adapter_model.bin")

    # A run folder of an earlier run with an eval/ folder, to be replaced with --overwrite.
    old = tmp / "overwritten"
    old.mkdir()
    (old / "run_config.json").write_text('{"learning_rate": 0.5}')
    (old / "adapter_model.safetensors").write_bytes(b"old adapter")
    (old / "eval").mkdir()
    (old / "eval" / "boolq.json").write_text('{"accuracy": 0.9}')
    (tmp / "a_file").write_text("not a folder")

    def ev(out: Path, adapter: Path) -> list[str]:
        return ["--dataset=boolq", f"--base_model={eval_base}", f"--lora_weights={adapter}", f"--output_dir={out}",
                "--limit=2", "--max_new_tokens=2"]  # fmt: skip

    def case(script: str, argv: list[str], name: str) -> tuple[str, list[str], str]:
        return (script, [str(a) for a in argv], str(tmp / f"{name}.stderr"))

    killed, other_rank, bad_state = tmp / "killed", tmp / "other_rank", tmp / "bad_state"
    phases: list[dict[str, Any]] = [
        {
            "fp16 on CPU": case("finetune", flags(base, data, tmp / "fp16", fp16=True), "fp16"),
            "truncated safetensors": case("commonsense_evaluate", ev(tmp / "e_trunc", tmp / "lora_truncated"), "trunc"),
            "pickle adapter": case("commonsense_evaluate", ev(tmp / "e_pickle", tmp / "lora_pickle"), "pickle"),
            "large adapter": case("finetune", flags(base, data, tmp / "large", method="lora", lora_r=2048,
                                                     max_steps=1, save_step=1000, eval_step=1000), "large"),
            "overwrite": case("finetune", flags(base, data, old, overwrite=True, max_steps=2), "overwrite"),
            "first run": case("finetune", flags(base, data, killed), "first"),
            "left padding with packing": case("finetune", flags(base, data, tmp / "padleft", padding_side="left",
                                                                 packing=True), "padleft"),
            "eval output under a file": case("commonsense_evaluate", ev(tmp / "a_file" / "eval",
                                                                       tmp / "lora_other_base"), "evfile"),
        },
    ]  # fmt: skip
    # Phase 2 works on what "first run" left: its checkpoints stand in for a run killed after checkpoint-2.
    phases.append(
        {
            "rerun resumes": case("finetune", flags(base, data, killed), "rerun"),
            "explicit no resume": case("finetune", flags(base, data, other_rank, resume_from_checkpoint=False), "nores"),
            "checkpoint of another rank": case("finetune", flags(base, data, tmp / "rank4", lora_r=4,
                                               resume_from_checkpoint=other_rank / "checkpoint-2"), "rank"),
            "corrupt trainer state": case("finetune", flags(base, data, bad_state), "state"),
            "failed resume": case("finetune", flags(base, data, tmp / "failed",
                                  resume_from_checkpoint=bad_state / "checkpoint-4"), "failed"),
        }
    )  # fmt: skip
    # Run phase 1, prepare phase 2's folders from "first run", then run phase 2.

    def drive(phase: dict) -> dict:
        return run_forked_clis([phase], timeout=1800)

    results = drive(phases[0])
    assert results["first run"][0] == 0, (tmp / "first.stderr").read_text()[-3000:]
    shutil.copytree(killed, other_rank)
    shutil.copytree(killed, bad_state)
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "summary.json",
    ):  # as if killed after step 2
        (killed / name).unlink()
    shutil.rmtree(killed / "checkpoint-4")
    with (killed / "metrics.jsonl").open("a") as metrics:  # killed while writing a line
        metrics.write('{"step": 5, "lo')
    (bad_state / "checkpoint-4" / TRAINER_STATE_FILE).write_text('{"global_step": 4, "log_hist')
    shutil.copytree(other_rank / "checkpoint-4", tmp / "broken_optimizer")
    (tmp / "broken_optimizer" / "optimizer.pt").write_bytes(b"not a torch file")
    phases[1]["failed resume"] = case(
        "finetune",
        flags(base, data, tmp / "failed", resume_from_checkpoint=tmp / "broken_optimizer"),
        "failed",
    )
    results.update(drive(phases[1]))
    stderr = {name: Path(case[2]).read_text() for phase in phases for name, case in phase.items()}
    return {"tmp": tmp, "results": results, "stderr": stderr, "eval_base": eval_base}


def test_11_2_overwrite_clears_eval_and_hashes_the_adapter(cases):
    status, models_loaded = cases["results"]["overwrite"]
    folder = cases["tmp"] / "overwritten"
    assert status == 0, cases["stderr"]["overwrite"][-3000:]
    assert models_loaded == 1  # the count the refusals below are held to sees a run's one base model
    assert not (folder / "eval").exists()  # the old adapter's scores went with it
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["adapter_sha256"] == sha256(folder / "adapter_model.safetensors")
    assert summary["global_step"] == 2


def test_11_3_lora_adapter_of_another_base_is_refused_whole(cases, real_data):
    """A plain subprocess: one error line, no bitsandbytes notice, no output folder (11.6)."""
    real_data("dataset/boolq/test.json")
    out = cases["tmp"] / "e_other"
    done = subprocess.run(
        [sys.executable, str(REPO / "commonsense_evaluate.py"), "--dataset", "boolq", "--base_model",
         str(cases["eval_base"]), "--lora_weights", str(cases["tmp"] / "lora_other_base"), "--output_dir", str(out),
         "--limit", "2"],
        capture_output=True, text=True, env=ENV, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 2
    line = one_error_line(done.stderr)
    # The only line besides transformers' weight-loading progress bar: no bitsandbytes kernels notice (11.6),
    # no peft warning about keys it could not place.
    assert [text for text in done.stderr.strip().splitlines() if not text.startswith("Loading weights")] == [
        line
    ]
    assert "does not fit base model" in line and "with no place in the model" in line
    assert "layers.2." in line or "layers.3." in line
    assert not out.exists()


def test_11_4_rerun_resumes_from_the_newest_checkpoint_and_says_so(cases):
    status, _ = cases["results"]["rerun resumes"]
    killed = cases["tmp"] / "killed"
    stderr = cases["stderr"]["rerun resumes"]
    assert status == 0, stderr[-3000:]
    assert f"note: resuming from {killed / 'checkpoint-2'}" in stderr
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from"] == str(killed / "checkpoint-2") and summary["global_step"] == 4
    records = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if "loss" in record] == [1, 2, 3, 4]  # one history
    # Asking explicitly not to resume a folder with progress is refused, naming the ways forward.
    status, models_loaded = cases["results"]["explicit no resume"]
    line = one_error_line(cases["stderr"]["explicit no resume"])
    assert status == 2 and models_loaded == 0
    assert "holds this run's checkpoints up to checkpoint-4" in line and "--overwrite" in line


def test_11_5_damaged_files_are_one_line(cases):
    tmp = cases["tmp"]
    expectations = {
        "truncated safetensors": ("is truncated or corrupt", tmp / "e_trunc"),
        "pickle adapter": ("is a pickle file", tmp / "e_pickle"),
        "corrupt trainer state": ("trainer_state.json is damaged", None),
        "checkpoint of another rank": ("was saved by another adapter configuration", tmp / "rank4"),
        "failed resume": ("cannot resume from", tmp / "failed"),
    }
    for name, (needle, folder) in expectations.items():
        status, models_loaded = cases["results"][name]
        line = one_error_line(cases["stderr"][name])
        assert status == 2 and needle in line, (name, line)
        if folder is not None:
            assert not folder.exists(), name  # nothing written, no run_config.json left to block the folder
        if name in ("truncated safetensors", "pickle adapter", "corrupt trainer state"):
            assert models_loaded == 0, name  # refused before a model loads
    assert "weights_only=True" in cases["stderr"]["pickle adapter"]  # says how to convert
    # The damaged folder itself is left as it was (its progress is not discarded).
    assert (tmp / "bad_state" / "checkpoint-4" / TRAINER_STATE_FILE).read_text().endswith("log_hist")


def test_inconsistent_flags_are_refused_before_a_model_loads(cases):
    """Flags that parse but contradict each other are TrainConfig's checks: after torch is imported (the parse
    errors of tests/test_cli_parse.py come before), before any model loads or anything is written."""
    status, models_loaded = cases["results"]["left padding with packing"]
    line = one_error_line(cases["stderr"]["left padding with packing"])
    assert status == 2 and models_loaded == 0
    assert line.startswith("error: --padding_side left asks for LLM-Adapters' left-padded batches")
    assert not (cases["tmp"] / "padleft").exists()


def test_evaluation_output_under_a_file_is_refused_before_a_model_loads(cases):
    status, models_loaded = cases["results"]["eval output under a file"]
    line = one_error_line(cases["stderr"]["eval output under a file"])
    assert status == 2 and models_loaded == 0
    assert line.endswith("a_file exists and is not a folder")
    assert (cases["tmp"] / "a_file").read_text() == "not a folder"


def test_11_6_fp16_on_cpu_and_oversized_adapters(cases):
    status, models_loaded = cases["results"]["fp16 on CPU"]
    line = one_error_line(cases["stderr"]["fp16 on CPU"])
    assert status == 2 and models_loaded == 0
    assert line == "error: --fp16 needs a CUDA GPU (float16 mixed precision does not run on CPU); use --bf16"
    assert not (cases["tmp"] / "fp16").exists()
    status, _ = cases["results"]["large adapter"]
    stderr = cases["stderr"]["large adapter"]
    assert status == 0, stderr[-3000:]
    summary = json.loads((cases["tmp"] / "large" / "summary.json").read_text())
    assert summary["trainable_share_pct"] > 50
    warning = [line for line in stderr.splitlines() if line.startswith("warning: ")]
    assert warning == [
        f"warning: the adapter trains {summary['trainable_params']:,} parameters, "
        f"{summary['trainable_share_pct']:.0f}% of the base model's {summary['base_params']:,}: "
        "--lora_r 2048 is not parameter-efficient"
    ]
