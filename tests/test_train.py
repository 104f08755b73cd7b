"""Training harness, in process: a tiny LLaMA with the real SmolLM2 tokenizer on real commonsense records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import REPO, adapter, read_metrics, small_run
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dense_lora.train import (
    INTERRUPTED_EXIT_CODE,
    TrainConfig,
    TrainError,
    build_peft_config,
    check_output_dir,
    config_from_flags,
    gradient_accumulation_steps,
    latest_checkpoint,
    run,
)


@pytest.fixture(scope="module")
def trained(tiny_base: Path, train_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    output_dir = tmp_path_factory.mktemp("run") / "out"
    summary = run(TrainConfig(**small_run(tiny_base, train_file, output_dir)))
    return output_dir, summary


def test_run_writes_adapter_metrics_and_summary(trained):
    output_dir, summary = trained
    assert (output_dir / "adapter_config.json").is_file()
    assert (output_dir / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]
    on_disk = json.loads((output_dir / "summary.json").read_text())
    assert on_disk["status"] == summary["status"] == "completed"
    assert on_disk["global_step"] == 6 and on_disk["method"] == "denselora"
    adapter = load_file(output_dir / "adapter_model.safetensors")
    assert on_disk["trainable_params"] == sum(t.numel() for t in adapter.values())
    assert 0 < on_disk["trainable_share_pct"] < 100
    assert on_disk["tokens_seen"] > 0 and on_disk["tokens_per_s"] > 0 and on_disk["peak_memory_bytes"] > 0
    assert on_disk["config"]["lora_alpha"] == 16  # alpha defaults to 2r
    assert {"torch", "transformers", "peft"} <= set(on_disk["versions"])
    metrics = read_metrics(output_dir)
    train_logs = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in train_logs] == [1, 2, 3, 4, 5, 6]
    assert all(m["tokens_per_s"] > 0 and "learning_rate" in m for m in train_logs)
    assert [m["step"] for m in metrics if "eval_loss" in m] == [2, 4, 6]


def test_run_folder_holds_no_pickle(trained):
    """transformers' Trainer pickles its TrainingArguments (training_args.bin) into every save; the harness keeps
    them as JSON instead. The only torch.save files left are the checkpoints' optimizer, scheduler and RNG states,
    which resume loads with weights_only=True."""
    output_dir, _ = trained
    assert not list(output_dir.rglob("training_args.bin"))
    for folder in (output_dir, *output_dir.glob("checkpoint-*")):
        args = json.loads((folder / "training_args.json").read_text())
        assert args["learning_rate"] > 0 and args["output_dir"] == str(output_dir)
    pickled = {path.name for path in output_dir.rglob("*") if path.suffix in (".bin", ".pt", ".pth", ".pkl")}
    assert pickled <= {"optimizer.pt", "scheduler.pt", "rng_state.pth"}


def test_final_adapter_is_the_best_checkpoint(trained):
    """load_best_model_at_end works with a DenseLoRA PeftModel: the saved adapter is the lowest-eval-loss one."""
    output_dir, summary = trained
    evals = {m["step"]: m["eval_loss"] for m in read_metrics(output_dir) if "eval_loss" in m}
    best_step = min(evals, key=evals.get)
    assert summary["best_checkpoint"] == str(output_dir / f"checkpoint-{best_step}")
    final = load_file(output_dir / "adapter_model.safetensors")
    best = load_file(output_dir / f"checkpoint-{best_step}" / "adapter_model.safetensors")
    assert final.keys() == best.keys()
    assert all(torch.equal(final[key], best[key]) for key in final)


def test_saved_adapter_reloads_and_generates(trained, tiny_base):
    output_dir, _ = trained
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    inputs = AutoTokenizer.from_pretrained(tiny_base)("Is the sky blue?", return_tensors="pt")
    with torch.no_grad():
        base_logits = base(**inputs).logits
    model = PeftModel.from_pretrained(base, output_dir).eval()
    with torch.no_grad():
        adapted_logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert not torch.allclose(base_logits, adapted_logits)  # the trained adapter changes the model
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 4


def test_loss_falls_on_real_records(tiny_base, train_file, tmp_path):
    summary = run(
        TrainConfig(
            **small_run(
                tiny_base,
                train_file,
                tmp_path / "out",
                max_steps=12,
                val_set_size=0,
                batch_size=2,
                cutoff_len=48,
                learning_rate=3e-2,
            )
        )
    )
    losses = [m["loss"] for m in read_metrics(tmp_path / "out") if "loss" in m]
    assert len(losses) == 12 and summary["best_eval_loss"] is None
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1, losses


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_peft_baselines_train_in_the_same_harness(method, tiny_base, train_file, tmp_path):
    summary = run(
        TrainConfig(**small_run(tiny_base, train_file, tmp_path, method=method, max_steps=2, val_set_size=0))
    )
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["use_dora"] is (method == "dora")
    assert saved["r"] == 8 and saved["lora_alpha"] == 16
    assert summary["method"] == method and summary["global_step"] == 2


def test_vera_trains_and_keeps_its_initial_adapter(tiny_base, train_file, tmp_path):
    """VeRA (the paper's other shared-matrix baseline) runs in the harness; adapter_init/ holds step 0."""
    summary = run(
        TrainConfig(
            **small_run(
                tiny_base, train_file, tmp_path, method="vera", max_steps=2, val_set_size=0, lora_r=16
            )
        )
    )
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "VERA" and saved["r"] == 16 and saved["projection_prng_key"] == 42
    assert summary["method"] == "vera" and summary["global_step"] == 2
    start = load_file(tmp_path / "adapter_init" / "adapter_model.safetensors")
    end = load_file(tmp_path / "adapter_model.safetensors")
    lambdas = [key for key in end if "vera_lambda_b" in key]
    assert lambdas and all(torch.count_nonzero(start[key]) == 0 for key in lambdas)  # VeRA starts at b = 0
    assert any(torch.count_nonzero(end[key]) > 0 for key in lambdas)  # and training moved it


def test_adapter_name_is_a_deprecated_spelling_of_method(capsys):
    config = TrainConfig(base_model="x", adapter_name="dora")
    assert (config.method, config.adapter_name) == ("dora", None)
    assert "--adapter_name is deprecated; use --method" in capsys.readouterr().err
    with pytest.raises(TrainError, match="pass only --method"):
        TrainConfig(base_model="x", adapter_name="dora", method="lora")


def test_folder_written_before_the_rename_still_resumes(tmp_path):
    config = TrainConfig(base_model="x", output_dir=str(tmp_path), method="lora")
    old = config.fingerprint()
    old["adapter_name"] = old.pop("method")
    (tmp_path / "run_config.json").write_text(json.dumps(old))
    (tmp_path / "adapter_config.json").write_text("{}")
    check_output_dir(config)  # same run: accepted
    with pytest.raises(TrainError, match="differs in method"):
        check_output_dir(TrainConfig(base_model="x", output_dir=str(tmp_path), method="dora"))


def test_a_run_from_before_torch_compile_resumes_eagerly(tmp_path):
    """A run_config.json without the field was an eager run: it resumes without --torch_compile, not with it."""
    config = TrainConfig(base_model="x", output_dir=str(tmp_path))
    old = config.fingerprint()
    del old["torch_compile"]
    (tmp_path / "run_config.json").write_text(json.dumps(old))
    (tmp_path / "adapter_config.json").write_text("{}")
    check_output_dir(config)  # same run: accepted
    with pytest.raises(TrainError, match="differs in torch_compile"):
        check_output_dir(TrainConfig(base_model="x", output_dir=str(tmp_path), torch_compile=True))


def test_torch_compile_flag_compiles_the_run(tiny_base, train_file, tmp_path):
    """--torch_compile hands the model to torch.compile (the Trainer's torch_compile) and the run really compiles.
    Its first step sees the eager run's loss and it saves the adapter under the same names. Later steps are not
    compared: at step 2 Adam moves every element by about the learning rate whatever the size of its first
    nonzero gradient, so float rounding differences in near-zero gradients become 1e-2 apart. The compiled
    gradients themselves are compared with the eager ones in tests/test_fused_dropout.py."""
    from torch._dynamo.utils import counters

    settings = dict(max_steps=2, val_set_size=0, lora_dropout=0.0)
    run(TrainConfig(**small_run(tiny_base, train_file, tmp_path / "eager", **settings)))
    counters.clear()
    summary = run(
        TrainConfig(**small_run(tiny_base, train_file, tmp_path / "compiled", torch_compile=True, **settings))
    )
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])
    assert summary["global_step"] == 2
    assert json.loads((tmp_path / "compiled" / "run_config.json").read_text())["torch_compile"] is True
    first = [
        next(m["loss"] for m in read_metrics(tmp_path / name) if "loss" in m)
        for name in ("eager", "compiled")
    ]
    assert first[1] == pytest.approx(first[0], rel=1e-5)
    compiled, eager = adapter(tmp_path / "compiled"), adapter(tmp_path / "eager")
    assert compiled.keys() == eager.keys() and all(torch.isfinite(t).all() for t in compiled.values())


def test_bf16_run_keeps_float32_trainable_weights(tiny_base, train_file, tmp_path):
    run(TrainConfig(**small_run(tiny_base, train_file, tmp_path, bf16=True, max_steps=2, val_set_size=0)))
    adapter = load_file(tmp_path / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in adapter.values())


# --- configuration, without training -------------------------------------------------------------------


@pytest.mark.parametrize("native", [False, True, None])
def test_bf16_on_a_cpu_without_native_bf16_warns(native, tmp_path, monkeypatch, capsys):
    """An AVX2-only CPU emulates bf16 matrix products (a SmolLM2 step 56 s against 2.5 s in float32): --bf16 there
    still trains, after one warning line, before anything is loaded; a CPU with native bf16, one that cannot
    tell, a GPU, or a run without --bf16 get none."""
    import dense_lora.models
    import dense_lora.training.run as training_run

    monkeypatch.setattr(dense_lora.models, "cpu_has_native_bf16", lambda: native)
    for cuda, bf16 in ((False, True), (False, False), (True, True)):
        monkeypatch.setattr(training_run.torch.cuda, "is_available", lambda cuda=cuda: cuda)
        output_dir = tmp_path / f"run-{cuda}-{bf16}"
        training_run._setup(TrainConfig(base_model="x", output_dir=str(output_dir), bf16=bf16))
        warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
        if bf16 and not cuda and native is False:
            (line,) = warnings
            assert "has no native bf16" in line and "without --bf16" in line
        else:
            assert warnings == []


def test_native_bf16_is_onednns_answer(monkeypatch):
    from dense_lora.models import cpu_has_native_bf16

    assert cpu_has_native_bf16() is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert cpu_has_native_bf16() is None  # this build cannot tell


def test_gradient_accumulation_uses_the_global_batch():
    config = TrainConfig(base_model="x", batch_size=16, micro_batch_size=4)
    assert gradient_accumulation_steps(config, 1) == 4
    assert gradient_accumulation_steps(config, 2) == 2
    with pytest.raises(TrainError, match="not divisible"):
        gradient_accumulation_steps(config, 3)


@pytest.mark.parametrize(
    "given",
    ['["q_proj", "v_proj"]', "q_proj,v_proj", ("q_proj", "v_proj"), ["q_proj", "v_proj"]],
)
def test_target_modules_accepts_lists_and_strings(given):
    assert TrainConfig(base_model="x", target_modules=given).target_modules == ["q_proj", "v_proj"]


def test_boolean_flags_accept_words():
    config = TrainConfig(base_model="x", train_shared="false", train_on_inputs="True")
    assert (config.train_shared, config.train_on_inputs) == (False, True)


def test_defaults_follow_the_paper():
    config = TrainConfig(base_model="x", lora_r=16)
    assert config.target_modules == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    assert (config.lora_alpha, config.lora_dropout, config.cutoff_len, config.val_set_size) == (
        32,
        0.05,
        256,
        120,
    )


def test_ablation_flags_reach_the_adapter_config():
    freeze = build_peft_config(TrainConfig(base_model="x", train_shared=False, activation="identity"))
    assert (freeze.train_shared, freeze.activation) == (False, "identity")
    mixed = build_peft_config(TrainConfig(base_model="x", lora_modules="up_proj,down_proj"))
    assert mixed.lora_modules == ["down_proj", "up_proj"]
    dora = build_peft_config(TrainConfig(base_model="x", method="dora"))
    assert dora.use_dora and dora.peft_type.value == "LORA"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"method": "loha"}, "unknown --method"),
        ({"lora_r": 0}, "--lora_r must be a positive integer"),
        ({"bf16": True, "fp16": True}, "mutually exclusive"),
        ({"data_fraction": 1.5}, "--data_fraction"),
        ({"activation": "identity", "method": "lora"}, "only apply to --method denselora"),
        ({"save_step": 30, "eval_step": 20}, "multiple of --eval_step"),
        ({"no_such_flag": 1}, "unknown flag"),
        ({"train_shared": "maybe"}, "must be true or false"),
        ({"padding_side": "left", "packing": True}, "--padding_side left asks for LLM-Adapters' left-padded"),
    ],
)
def test_bad_flags_are_one_line_errors(flags, message):
    with pytest.raises(TrainError, match=message) as caught:
        config_from_flags({"base_model": "x", **flags})
    assert "\n" not in str(caught.value)


def test_left_padding_trains_padded_batches(capsys):
    """Packed rows equal right-padded batches, not LLM-Adapters' left-padded ones (which shift short records'
    positions and train a row's first real token from a pad): --padding_side left turns packing off, saying so."""
    assert config_from_flags({"base_model": "x"}).packing
    assert config_from_flags({"base_model": "x", "padding_side": "right"}).packing
    left = config_from_flags({"base_model": "x", "padding_side": "left"})
    assert (left.packing, left.padding_side) == (False, "left")
    assert capsys.readouterr().err == "note: --padding_side left trains on padded batches (packing off)\n"
    assert not config_from_flags({"base_model": "x", "padding_side": "left", "packing": False}).packing
    assert capsys.readouterr().err == ""


def test_output_dir_guard(tmp_path):
    config = TrainConfig(base_model="x", output_dir=str(tmp_path))
    check_output_dir(config)  # empty folder
    (tmp_path / "notes.txt").write_text("unrelated files are fine")
    check_output_dir(config)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(TrainError, match="from another run"):
        check_output_dir(config)
    (tmp_path / "run_config.json").write_text(json.dumps(config.fingerprint()))
    check_output_dir(config)  # same run: resuming is allowed
    with pytest.raises(TrainError, match="differs in learning_rate"):
        check_output_dir(TrainConfig(base_model="x", output_dir=str(tmp_path), learning_rate=1e-4))
    check_output_dir(
        TrainConfig(base_model="x", output_dir=str(tmp_path), learning_rate=1e-4, overwrite=True)
    )


def test_latest_checkpoint_skips_one_cut_off_mid_save(tmp_path):
    for step, complete in ((80, True), (160, True), (240, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-160"
    assert latest_checkpoint(tmp_path / "missing") is None


def test_interrupted_exit_code_is_documented():
    assert f"{INTERRUPTED_EXIT_CODE} stopped by SIGTERM" in (REPO / "finetune.py").read_text()


# --- FSDP2 -----------------------------------------------------------------------------------------------

FSDP2_STEP = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    from peft import get_peft_model
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from transformers import AutoModelForCausalLM
    from dense_lora import DEFAULT_TARGET_MODULES, DenseLoraConfig

    dist.init_process_group("gloo", init_method=f"file://{sys.argv[2]}", rank=0, world_size=1)
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    model = get_peft_model(model, DenseLoraConfig(r=8, lora_alpha=16, target_modules=DEFAULT_TARGET_MODULES, init_seed=0))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)  # the root owns the shared W_e / W_d, outside every layer
    assert isinstance(model, FSDPModule)
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().full_tensor().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    moved = sum(int(not torch.equal(b, p.detach().full_tensor())) for b, p in zip(before, trainable))
    assert torch.isfinite(loss) and moved == len(trainable), (loss, moved, len(trainable))
    dist.destroy_process_group()
    print("fsdp2 ok", len(trainable))
    """
)


@pytest.mark.slow
def test_fsdp2_fully_shard_wraps_and_steps(tiny_base, tmp_path):
    """FSDP2 (fully_shard) on a 1-process gloo group: the DenseLoRA model wraps and one optimizer step moves every
    trainable tensor, shared encoder/decoder included."""
    script = tmp_path / "fsdp2_step.py"
    script.write_text(FSDP2_STEP)
    done = subprocess.run(
        [sys.executable, str(script), str(tiny_base), str(tmp_path / "pg")],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fsdp2 ok" in done.stdout
