"""The replication study's parts: the plan (learning-rate choice, seeds), the data (clean slices and their
baselines), the aggregation (mean ± sd over seeds beside baselines) and the increments analysis."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dense_lora.analysis import analyse, increments, near_zero_share, participation_ratio
from dense_lora.study import aggregate
from dense_lora.study.data import baselines, build_heldout, build_training
from dense_lora.study.plan import (
    METHODS,
    METHODS_BY_KEY,
    PROFILES,
    Run,
    main_runs,
    select_learning_rates,
    sweep_runs,
    with_matched_headline,
)
from dense_lora.study.runner import Study


def test_parameter_matched_pair_on_smollm2():
    """LoRA r=2 is the LoRA closest to DenseLoRA r=32's count on SmolLM2 (the study's matched comparison)."""
    layers, r = 30, 32
    dims = {"q": (576, 576), "k": (576, 192), "v": (576, 192), "up": (576, 1536), "down": (1536, 576)}
    dense = sum((i + o + layers * r) * r for i, o in dims.values())
    lora = {rank: layers * rank * sum(i + o for i, o in dims.values()) for rank in (1, 2, 3)}
    assert dense == 374_784 and lora[2] == 414_720
    assert min(lora, key=lambda rank: abs(lora[rank] - dense)) == 2


def test_learning_rate_is_chosen_on_validation_loss_per_family():
    profile = PROFILES["cpu-long"]
    sweep = sweep_runs(profile)
    assert {run.method.key for run in sweep} == {"denselora-r32", "lora-r2"}  # VeRA: a fixed rate
    assert all(run.is_sweep and run.seed == profile.seeds[0] for run in sweep)
    losses = {run.name: 1.0 + abs(math.log10(run.lr) + 3) for run in sweep}  # best at 1e-3 for both
    losses["denselora-r32_lr0.003_s42"] = 0.5  # now best at 3e-3 for DenseLoRA only
    chosen = select_learning_rates(profile, losses, sweep)
    assert chosen == {"denselora": 3e-3, "lora": 1e-3, "vera": 1e-2}
    # a family whose sweep is unfinished gets no rate, so none of its runs is planned yet
    partial = {name: loss for name, loss in losses.items() if not name.startswith("lora-r2_lr0.003")}
    assert "lora" not in select_learning_rates(profile, partial, sweep)
    runs = main_runs(profile, select_learning_rates(profile, partial, sweep), ["commonsense"])
    assert runs and all(run.method.lr_group != "lora" for run in runs)


def test_learning_rate_check_trains_the_cpu_study_runs_at_more_rates():
    """cpu-lr differs from cpu only in its sweep, so its 2e-3 runs are the cpu study's seed-42 runs."""
    cpu, check = PROFILES["cpu"], PROFILES["cpu-lr"]
    differing = {name for name in cpu.__dataclass_fields__ if getattr(cpu, name) != getattr(check, name)}
    assert differing == {"name", "sweep", "fixed_lr"}  # the swept families leave fixed_lr
    assert all(cpu.fixed_lr[group] in grid for group, grid in check.sweep.items())
    sweep = sweep_runs(check, [METHODS_BY_KEY["denselora-r32"], METHODS_BY_KEY["lora-r2"]])
    assert len(sweep) == 8 and {run.seed for run in sweep} == {42}
    run = Run("commonsense", METHODS_BY_KEY["lora-r2"], cpu.fixed_lr["lora"], 42)
    assert run.finetune_flags(cpu, "smollm2", "t.json", "o") == run.finetune_flags(
        check, "smollm2", "t.json", "o"
    )


def test_headline_methods_get_every_seed_and_math_only_the_headline():
    profile = PROFILES["cpu-long"]
    runs = main_runs(profile, {"denselora": 1e-3, "lora": 1e-3, "vera": 1e-2}, ["commonsense", "math"])
    seeds = {}
    for run in runs:
        seeds.setdefault((run.family, run.method.key), []).append(run.seed)
    assert seeds[("commonsense", "denselora-r32")] == [42, 43, 44]
    assert seeds[("commonsense", "lora-r2")] == [42, 43, 44]
    assert seeds[("commonsense", "freeze-r128")] == [42]
    # every method's first seed comes before any second seed: a study cut short still covers the grid
    first_seed = [run.seed for run in runs if run.family == "commonsense"]
    assert first_seed == sorted(first_seed)
    assert {key for family, key in seeds if family == "math"} == {"denselora-r32", "lora-r2", "lora-r32"}


def test_run_flags_are_the_paper_recipe_at_the_profile_scale():
    profile = PROFILES["cpu-long"]
    run = Run("commonsense", METHODS_BY_KEY["freeze-r128"], 1e-3, 43)
    flags = run.finetune_flags(profile, "smollm2", "train.json", "out")
    values = dict(zip(flags[::2], flags[1::2], strict=False))
    assert values["--lora_r"] == "128" and values["--lora_alpha"] == "256"  # alpha = 2r
    assert values["--lora_dropout"] == "0.05" and values["--num_epochs"] == "2"
    assert values["--batch_size"] == "8" and values["--seed"] == "43" and values["--learning_rate"] == "0.001"
    assert values["--method"] == "denselora" and values["--train_shared"] == "False"
    assert flags[-1] == "--bf16"


def test_baselines_count_each_records_options():
    records = [
        {"instruction": "Q? Answer format: answer1/answer2/answer3/answer4", "answer": "answer1"},
        {"instruction": "Q? Answer format: true/false", "answer": "true"},
        {"instruction": "Q? Answer format: true/false", "answer": "true"},
        {"instruction": "Q? Answer format: true/false", "answer": "false"},
    ]
    chance, majority = baselines(records, "boolq")
    assert chance == pytest.approx((1 / 4 + 3 / 2) / 4)
    assert majority == pytest.approx(2 / 4)
    assert baselines([{"instruction": "How many?", "answer": "4"}], "gsm8k") == (0.0, 1.0)
    assert baselines([{"instruction": "(A) 1 (B) 2", "answer": "B"}], "AQuA")[0] == pytest.approx(0.2)


def test_heldout_slices_drop_test_records_seen_in_training(tmp_path, monkeypatch):
    data = tmp_path / "data"
    train = [
        {"instruction": f"question {i}", "input": "", "output": "x", "answer": "true"} for i in range(10)
    ]
    test = [
        {"instruction": f"question  {i}", "input": "", "output": "x", "answer": str(i < 12).lower()}
        for i in range(5, 15)
    ]
    (data / "dataset" / "boolq").mkdir(parents=True)
    (data / "dataset" / "boolq" / "train.json").write_text(json.dumps(train))
    (data / "dataset" / "boolq" / "test.json").write_text(json.dumps(test))
    monkeypatch.setenv("DENSELORA_DATA", str(data))
    slices = [
        item
        for item in build_heldout("commonsense", ["dataset/boolq/train.json"], 3, tmp_path / "out", scored=2)
        if item.dataset == "boolq"
    ]
    assert slices[0].excluded_overlap == 5  # "question  5" is "question 5" up to whitespace
    assert (slices[0].records, slices[0].scored) == (3, 2)
    # the baselines are over the 2 scored records (true, true), not the slice's 3 (true, true, false)
    assert slices[0].majority == 1.0
    kept = json.loads((tmp_path / "out" / "dataset" / "boolq" / "test.json").read_text())
    assert [record["instruction"] for record in kept] == ["question  10", "question  11", "question  12"]
    taken = build_training("commonsense", ["dataset/boolq/train.json"], 6, 2, tmp_path / "mix")
    assert taken["dataset/boolq/train.json"] == {"available": 10, "train": 6, "validation": 2}
    mix = json.loads((tmp_path / "mix" / "train_commonsense.json").read_text())
    held = json.loads((tmp_path / "mix" / "validation_commonsense.json").read_text())
    assert len(mix) == 6 and len(held) == 2
    assert not {r["instruction"] for r in mix} & {r["instruction"] for r in held}


def _fake_run(folder: Path, trainable: int, losses: dict, accuracy: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(
        json.dumps(
            {"status": "completed", "trainable_params": trainable, "trainable_share_pct": trainable / 1e6}
        )
    )
    (folder / "heldout.json").write_text(
        json.dumps({"losses": {name: {"loss": v} for name, v in losses.items()}})
    )
    (folder / "eval").mkdir()
    for name, value in accuracy.items():
        (folder / "eval" / f"{name}.json").write_text(json.dumps({"dataset": name, "accuracy": value}))


def test_aggregation_reports_seed_spread_beside_baselines(tmp_path):
    study = Study("tiny", "cpu", PROFILES["cpu-long"], tmp_path, families=("commonsense",))
    slices = [
        {
            "dataset": "boolq",
            "family": "commonsense",
            "records": 4,
            "excluded_overlap": 0,
            "scored": 4,
            "chance": 0.5,
            "majority": 0.75,
        },
        {
            "dataset": "ARC-Easy",
            "family": "commonsense",
            "records": 4,
            "excluded_overlap": 0,
            "scored": 4,
            "chance": 0.25,
            "majority": 0.5,
        },
    ]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text(json.dumps({"slices": slices}))
    runs = [Run("commonsense", METHODS_BY_KEY["denselora-r32"], 1e-3, seed) for seed in (42, 43, 44)]
    runs += [Run("commonsense", METHODS_BY_KEY["lora-r2"], 1e-3, seed) for seed in (42, 43, 44)]
    for index, run in enumerate(runs):
        dense = run.method.key.startswith("dense")
        loss = (1.0 if dense else 1.2) + 0.01 * (index % 3)
        _fake_run(
            study.run_dir(run),
            374_784 if dense else 414_720,
            {"validation": loss, "boolq": loss, "ARC-Easy": loss + 0.2},
            {"boolq": 0.6, "ARC-Easy": 0.3 + 0.1 * (index % 3)},
        )
    _fake_run(
        tmp_path / "commonsense" / "base", 0, {"boolq": 3.0, "ARC-Easy": 3.0}, {"boolq": 0.1, "ARC-Easy": 0.0}
    )
    shutil.rmtree(study.run_dir(runs[-1]) / "eval")  # one LoRA seed trained but not yet scored
    text = aggregate.write_results(study, runs, tmp_path / "results", {"machine": "test"})
    assert (
        "| LoRA r=2 (matched) | 414,720 | 0.415 | 3 | 1.3100 ± 0.0100 | 47.5 ± 3.5 (2 of 3 seeds) |" in text
    )
    assert (
        "| DenseLoRA r=32 | 374,784 | 0.375 | 3 | 1.1100 ± 0.0100 | 50.0 ± 5.0 | 60.0 ± 0.0 | 40.0 ± 10.0 |"
        in text
    )
    assert "| base model (no adapter) | 0 | 0.000 | 1 | 3.0000 | 5.0 |" in text
    assert "| chance (uniform guess) |  |  |  |  | 37.5 | 50.0 | 25.0 |" in text
    assert "| majority class of the slice |  |  |  |  | 62.5 | 75.0 | 50.0 |" in text
    assert (
        "held-out loss 1.1100 ± 0.0100 vs 1.3100 ± 0.0100 (difference -0.2000, Welch t = -24.49 (beyond the seed noise)"
        in text
    )
    assert (tmp_path / "results" / "commonsense_loss.png").stat().st_size > 1000
    rows = (tmp_path / "results" / "runs.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 + 1


def test_the_parameter_match_comes_from_the_measured_counts():
    """LLaMA-3-8B's counts: LoRA r=2 trains 1.83x DenseLoRA r=32's parameters, r=1 0.92x; only r=1 is matched."""

    def group(key: str, trainable: int) -> list[aggregate.RunResult]:
        return [
            aggregate.RunResult("commonsense", key, METHODS_BY_KEY[key].label, 1e-3, 42, trainable, 0.0, None)
        ]

    groups = {"denselora-r32": group("denselora-r32", 1_933_312), "lora-r2": group("lora-r2", 3_538_944)}
    assert aggregate.matched_lora(groups) is None
    groups["lora-r1"] = group("lora-r1", 1_769_472)
    assert aggregate.matched_lora(groups) == "lora-r1"
    far = {"denselora-r32": group("denselora-r32", 1_933_312), "lora-r32": group("lora-r32", 56_623_104)}
    assert aggregate.matched_lora(far) is None  # the only LoRA run trains 29x: nothing is matched
    smollm2 = {"denselora-r32": group("denselora-r32", 374_784), "lora-r2": group("lora-r2", 414_720)}
    assert aggregate.matched_lora(smollm2) == "lora-r2"


def test_heldout_losses_are_measured_once_per_set(tmp_path, monkeypatch, real_data):
    """The sweep asks a folder for its validation loss, the main phase for the test slices too: on a rerun of a
    finished study neither recomputes anything, and a validation-only request keeps the test losses."""
    import peft

    import dense_lora.heldout
    import dense_lora.models
    from dense_lora.study import runner

    real_data("dataset/boolq/test.json")
    study = Study("smollm2", "cpu", PROFILES["smoke"], tmp_path, families=("commonsense",))
    runner.prepare_data(study)
    measured: list[tuple[str, int]] = []

    class Loss:
        def as_dict(self):
            return {"loss": 1.0}

    class Model:
        def to(self, device):
            return self

        def eval(self):
            return self

    def answer_loss(model, tokenizer, records, cutoff_len):
        measured.append(len(records))
        return Loss()

    monkeypatch.setattr(dense_lora.heldout, "answer_loss", answer_loss)
    monkeypatch.setattr(dense_lora.models, "load_base_model", lambda *args, **kwargs: Model())
    monkeypatch.setattr(dense_lora.models, "load_tokenizer", lambda *args, **kwargs: None)
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", staticmethod(lambda model, path: model))
    folder = tmp_path / "commonsense" / "run"
    folder.mkdir(parents=True)
    runner.evaluate_heldout(study, [(folder, "commonsense", False)])  # the sweep: validation only
    assert len(measured) == 1
    runner.evaluate_heldout(study, [(folder, "commonsense", True)])  # the main phase: the test slices join
    sets = json.loads((folder / "heldout.json").read_text())["losses"]
    assert "validation" in sets and len(sets) > 1 and len(measured) == len(sets)
    runner.evaluate_heldout(study, [(folder, "commonsense", False)])  # a rerun's sweep phase
    runner.evaluate_heldout(study, [(folder, "commonsense", True)])
    assert len(measured) == len(sets)  # nothing measured again
    assert json.loads((folder / "heldout.json").read_text())["losses"] == sets


def test_the_plan_gives_the_seeds_to_the_lora_rank_that_matches():
    """LoRA r=2 is DenseLoRA r=32's parameter match on SmolLM2, r=1 on LLaMA-3-8B: the seeds and the math runs go
    to the match (counted on the meta device); an architecture unknown offline keeps the plan as written."""
    from dense_lora.study.__main__ import matched_lora_rank

    assert matched_lora_rank("smollm2") == "lora-r2"
    assert matched_lora_rank("llama3-8b") == "lora-r1"
    assert matched_lora_rank("some-org/not-here") is None
    assert with_matched_headline(METHODS, "lora-r2") == METHODS
    plan = {method.key: method for method in with_matched_headline(METHODS, "lora-r1")}
    assert plan["lora-r1"].headline and plan["lora-r1"].math
    assert not plan["lora-r2"].headline and not plan["lora-r2"].math and plan["lora-r2"].sweep
    alone = (METHODS_BY_KEY["denselora-r32"], METHODS_BY_KEY["lora-r2"])  # r=1 not in the plan: left as asked
    assert with_matched_headline(alone, "lora-r1") == alone


def test_nearest_count_measures_by_ratio():
    """Twice the target is as far as half of it; a tie goes to the first key in name order; the factor is >= 1."""
    from dense_lora.study.plan import nearest_count

    assert nearest_count(100, {}) is None
    key, factor = nearest_count(100, {"above": 190, "below": 60})  # 1/0.6 = 1.67x beats 1.9x
    assert key == "below" and factor == pytest.approx(100 / 60)
    key, factor = nearest_count(100, {"half": 50, "double": 200})  # equally far: the first name wins
    assert key == "double" and factor == pytest.approx(2.0)
    key, factor = nearest_count(374_784, {"lora-r1": 207_360, "lora-r2": 414_720})
    assert key == "lora-r2" and factor == pytest.approx(414_720 / 374_784)


def test_density_statistics():
    dense = torch.ones(8, 8)
    sparse = torch.zeros(8, 8)
    sparse[0, :2] = 1.0
    assert near_zero_share(dense) == 0.0 and participation_ratio(dense) == pytest.approx(1.0)
    assert near_zero_share(sparse) == pytest.approx(62 / 64)
    assert participation_ratio(sparse) == pytest.approx(2 / 64)
    gaussian = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    assert participation_ratio(gaussian) == pytest.approx(2 / math.pi, abs=0.01)


def test_analysis_of_two_adapter_folders(tmp_path):
    generator = torch.Generator().manual_seed(0)
    key_m = "base_model.model.model.layers.1.self_attn.q_proj.denselora_M"
    key_a = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    for name, key, shape in (("dense", key_m, (4, 4)), ("lora", key_a, (4, 16))):
        run = tmp_path / name
        (run / "adapter_init").mkdir(parents=True)
        start = torch.randn(*shape, generator=generator)
        delta = torch.zeros(*shape)
        delta[:, 0] = 1.0 if name == "lora" else 0.0
        if name == "dense":
            delta += 1.0
        save_file({key: start}, str(run / "adapter_init" / "adapter_model.safetensors"))
        save_file({key: start + delta}, str(run / "adapter_model.safetensors"))
    text = analyse(
        [tmp_path / "dense", tmp_path / "lora"], tmp_path / "out", module="q_proj", layer=None, seed=0
    )
    assert "| dense | ΔM | 1 | 4x4 | 0.000 | 1.000 |" in text
    assert "| lora | ΔA | 1 | 4x16 | 0.938 | 0.062 |" in text
    assert (tmp_path / "out" / "increments_heatmaps.png").is_file()
    with pytest.raises(Exception, match="different tensors"):
        increments({"a.denselora_M": torch.zeros(2, 2)}, {"b.denselora_M": torch.zeros(2, 2)})
