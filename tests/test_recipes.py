"""The paper scripts reproduce the published settings by default: checked through their dry runs against the
paper's figures carried in dense_lora/paper (Tables 5-6 hyper-parameters, the ranks and variants of Tables 1-4, 7
and Figure 4)."""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
from pathlib import Path

import pytest

from dense_lora import paper

REPO = Path(__file__).resolve().parents[1]
QKVUD = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


LAUNCHERS = ("python", "python3", "torchrun", "accelerate")


def run_dry(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``DRY_RUN=1 bash scripts/<script> args``, with stand-ins for the launchers first on PATH that note each
    call: a dry run must succeed and start none of them (nothing is loaded, whatever the machine's speed)."""
    with tempfile.TemporaryDirectory() as stand_ins:
        calls = Path(stand_ins) / "calls"
        for name in LAUNCHERS:
            (Path(stand_ins) / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\nexit 1\n')
            (Path(stand_ins) / name).chmod(0o755)
        done = subprocess.run(
            ["bash", str(REPO / "scripts" / script), *args],
            capture_output=True,
            text=True,
            env={**os.environ, "DRY_RUN": "1", **env, "PATH": f"{stand_ins}:{os.environ['PATH']}"},
            cwd=REPO,
        )
        assert done.returncode == 0, done.stderr
        assert not calls.exists(), f"a dry run started {calls.read_text()}"
    return done


def dry_run(script: str, *args: str, **env: str) -> tuple[list[dict[str, object]], str]:
    """The finetune.py flags of every command the script would launch, and its stderr."""
    done = run_dry(script, *args, **env)
    return [parse_command(line) for line in done.stdout.splitlines() if line.strip()], done.stderr


def parse_command(line: str) -> dict[str, object]:
    """`--flag value` pairs after finetune.py; a flag followed by another flag is a bare boolean (True)."""
    words = shlex.split(line)
    start = next(i for i, word in enumerate(words) if word.endswith("finetune.py")) + 1
    flags: dict[str, object] = {"_launcher": words[:start]}
    rest = words[start:]
    while rest:
        name = rest.pop(0)
        assert name.startswith("--"), line
        flags[name[2:]] = rest.pop(0) if rest and not rest[0].startswith("--") else True
    return flags


def assert_published_recipe(flags: dict[str, object], family: str) -> None:
    published = paper.hyperparameters(family)
    assert float(flags["num_epochs"]) == published["epochs"] == 2
    assert float(flags["learning_rate"]) == published["lr"]
    assert int(flags["batch_size"]) == published["batch_size"]
    assert int(flags["warmup_steps"]) == published["warmup_steps"]
    assert float(flags["lora_dropout"]) == published["dropout"]
    assert str(flags["target_modules"]).split(",") == published["targets"] == QKVUD
    assert float(flags["lora_alpha"]) == 2 * int(flags["lora_r"])  # alpha = 2r


def published_ranks(table: str, model: str) -> set[int]:
    return {
        row["r"] for row in paper.table(table) if row["method"] == "DenseLoRA" and row.get("model") == model
    }


@pytest.mark.parametrize("model", ["llama3-8b", "llama2-7b"])
def test_table1_scripts_are_the_published_recipe(model):
    ranks = set()
    for rank in (16, 32, 64):
        script = f"{model.replace('-', '_')}_r{rank}.sh"
        (flags,), stderr = dry_run(script)
        assert_published_recipe(flags, "commonsense")
        assert flags["base_model"] == model and int(flags["lora_r"]) == rank
        assert flags["data_path"] == "ft-training_set/commonsense_170k.json"
        assert flags["output_dir"] == f"runs/{model}-r{rank}"
        assert "note:" not in stderr  # the defaults are the paper's: nothing departs
        ranks.add(rank)
    assert ranks == published_ranks("table1_commonsense", model)


def test_math_scripts_run_the_ranks_of_table2():
    ranks = set()
    for rank in (32, 64):
        (flags,), stderr = dry_run(f"math_llama3_8b_r{rank}.sh")
        assert_published_recipe(flags, "math")
        assert flags["data_path"] == "ft-training_set/math_10k.json"
        assert "note:" not in stderr
        ranks.add(int(flags["lora_r"]))
    assert ranks == published_ranks("table2_math", "llama3-8b")


def test_ablation_runs_the_variants_of_table4():
    runs, stderr = dry_run("ablation.sh", "llama3-8b", "32", "64", "runs/ablation", "0")
    assert "note:" not in stderr
    by_variant = {Path(str(flags["output_dir"])).name: flags for flags in runs}
    published = {row["variant"]: row for row in paper.table("table4_variants")}
    assert set(by_variant) == {"full", "freeze", "only_matrix"}
    for flags in runs:
        assert_published_recipe(flags, "commonsense")
    assert int(by_variant["full"]["lora_r"]) == published["DenseLoRA"]["r"] == 32
    freeze = by_variant["freeze"]
    assert int(freeze["lora_r"]) == published["Freeze"]["r"] == 128  # only the M matrices train: 0.03%
    assert freeze["train_shared"] == "False" and "activation" not in freeze
    only_matrix = by_variant["only_matrix"]
    assert int(only_matrix["lora_r"]) == published["Only Matrix"]["r"] == 32
    assert only_matrix["activation"] == "identity" and "train_shared" not in only_matrix


def test_granularity_runs_the_rows_of_table3():
    runs, stderr = dry_run("granularity.sh", "llama3-8b", "32", "64", "runs/granularity", "0")
    assert "note:" not in stderr  # target subsets are what this sweep varies, not a deviation
    names = {"QKV": ["q_proj", "k_proj", "v_proj"], "UD": ["up_proj", "down_proj"], "QKVUD": QKVUD, "": []}
    ours = set()
    for flags in runs:
        targets = str(flags["target_modules"]).split(",")
        lora = str(flags.get("lora_modules", "")).split(",") if "lora_modules" in flags else []
        dense = [name for name in targets if name not in lora]
        ours.add((tuple(lora), tuple(dense)))
    published = {
        (tuple(names[row["lora"]]), tuple(names[row["denselora"]]))
        for row in paper.table("table3_table8_granularity")
        if row["denselora"]  # the LoRA-only row is the LoRA baseline (scripts/baseline.sh)
    }
    assert ours == published


def test_low_resource_runs_the_fractions_of_table7():
    runs, _ = dry_run("low_resource.sh", "llama3-8b", "32", "64", "runs/low", "0")
    fractions = [float(flags["data_fraction"]) for flags in runs]
    assert fractions == [row["fraction"] for row in paper.table("table7_low_resource")]
    for flags in runs:
        assert_published_recipe(flags, "commonsense")


def test_rank_sweep_spans_figure4():
    runs, _ = dry_run("rank_sweep.sh", "llama3-8b", "runs/ranks", "0")
    ranks = [int(flags["lora_r"]) for flags in runs]
    assert ranks == [16, 32, 64, 128, 256, 512]
    assert {row["r"] for row in paper.table("figure4_rank")} <= set(ranks)
    for flags in runs:
        assert_published_recipe(flags, "commonsense")


def test_baseline_uses_the_learning_rate_of_the_quoted_dora_scripts():
    (lora,), stderr = dry_run("baseline.sh", "lora", "llama3-8b", "32", "64", "runs/lora", "0")
    assert float(lora["learning_rate"]) == 1e-4 and lora["method"] == "lora"
    assert "note:" not in stderr
    (dora,), _ = dry_run("baseline.sh", "dora", "llama2-7b", "32", "64", "runs/dora", "0")
    assert float(dora["learning_rate"]) == 2e-4 and dora["method"] == "dora"


def test_overrides_are_explicit_and_reported(tmp_path):
    (flags,), stderr = dry_run("llama3_8b_r32.sh", str(tmp_path / "out"), "0,1", EPOCHS="3", LR="1e-4")
    assert float(flags["num_epochs"]) == 3 and float(flags["learning_rate"]) == 1e-4
    assert "EPOCHS=3 departs from the paper's 2" in stderr and "LR=1e-4 departs" in stderr
    assert flags["_launcher"][:3] == ["CUDA_VISIBLE_DEVICES=0,1", "torchrun", "--nproc_per_node"]
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_evaluation_script_dry_run():
    done = run_dry("eval_commonsense.sh", "runs/x", "llama3-8b")
    evaluate, report = done.stdout.splitlines()
    assert "commonsense_evaluate.py --dataset all --base_model llama3-8b --lora_weights runs/x" in evaluate
    assert report == "python -m dense_lora.report runs/x --out runs/x/eval/report"
