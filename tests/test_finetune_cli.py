"""finetune.py as a subprocess: bad input, DDP over gloo, SIGKILL / SIGTERM and exact resume."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    ENV,
    adapter,
    assert_same_adapter,
    finetune,
    finetune_signalling_itself,
    finetune_succeeds,
    run_forked_clis,
    torchrun,
)
from helpers import tiny_run_flags as cli_flags

from dense_lora.train import INTERRUPTED_EXIT_CODE
from dense_lora.train import TRAINER_STATE_FILE as TRAINER_STATE

# --- bad input: one line on stderr, status 2, nothing written ----------------------------------------------

BAD_INPUTS: dict[str, tuple[dict[str, Any], str]] = {
    "missing data file": ({"data_path": "{tmp}/missing.json"}, "not found"),
    "malformed JSON": ({"data_path": "{tmp}/malformed.json"}, "malformed JSON"),
    "record without output": ({"data_path": "{tmp}/no_output.json"}, "has no 'output'"),
    "empty dataset": ({"data_path": "{tmp}/empty.json"}, "no records"),
    "batch not divisible": ({"batch_size": 6, "micro_batch_size": 4}, "not divisible"),
    "cutoff_len too small": ({"cutoff_len": 8, "train_on_inputs": False}, "keeps a label token"),
    "another run in output_dir": ({"output_dir": "{tmp}/other_run"}, "holds a different run"),
    "unknown method": ({"method": "loha"}, "unknown --method"),
    "unknown target module": ({"target_modules": "q_proj,qq_proj"}, "unknown target modules"),
    "r larger than a module": ({"lora_r": 48}, "larger than"),
    "resume from nothing": ({"resume_from_checkpoint": "{tmp}/nowhere"}, "not a complete checkpoint"),
    # --overwrite would delete the checkpoints --resume_from_checkpoint True continues (the folder is kept as is)
    "overwrite and resume": (
        {"output_dir": "{tmp}/other_run", "overwrite": True, "resume_from_checkpoint": True},
        "--overwrite deletes the checkpoints",
    ),
    "unknown activation": ({"activation": "gleu"}, "unknown --activation 'gleu'"),
    "lora_modules not targeted": (
        {"target_modules": "q_proj,v_proj", "lora_modules": "up_proj"},
        "--lora_modules up_proj not in --target_modules",
    ),
    "output_dir under a file": ({"output_dir": "{tmp}/a_file/run"}, "a_file exists and is not a folder"),
    "nothing to predict": ({"cutoff_len": 1}, "keeps a label token"),
}


@pytest.fixture(scope="module")
def bad_runs(tiny_base, train_file, tmp_path_factory) -> dict[str, tuple[int, str, Path, dict | None]]:
    """Run every bad-input case through the CLI; returns (exit status, stderr, output_dir, its prior content)."""
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "malformed.json").write_text('[{"instruction": "a", "output": "b"},')
    (tmp / "no_output.json").write_text(json.dumps([{"instruction": "a", "input": ""}]))
    (tmp / "empty.json").write_text("[]")
    (tmp / "a_file").write_text("not a folder")
    other = tmp / "other_run"
    other.mkdir()
    (other / "adapter_config.json").write_text('{"r": 4}')
    (other / "run_config.json").write_text('{"learning_rate": 0.5}')
    cases, folders = {}, {}
    for case, (overrides, _) in BAD_INPUTS.items():
        values = {
            "output_dir": tmp / case.replace(" ", "_"),
            **{k: str(v).format(tmp=tmp) for k, v in overrides.items()},
        }
        output_dir = Path(values["output_dir"])
        folders[case] = (
            output_dir,
            {p.name: p.read_bytes() for p in output_dir.iterdir()} if output_dir.exists() else None,
        )
        cases[case] = (
            "finetune",
            [str(flag) for flag in cli_flags(tiny_base, train_file, **values)],
            str(tmp / f"{case}.stderr"),
        )
    results = run_forked_clis([cases], timeout=300)
    return {case: (results[case][0], Path(cases[case][2]).read_text(), *folders[case]) for case in BAD_INPUTS}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_writes_nothing(case, bad_runs):
    status, stderr, output_dir, before = bad_runs[case]
    assert status == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and BAD_INPUTS[case][1] in errors[0], stderr[-2000:]
    if before is None:
        assert not output_dir.exists()
    else:  # a folder that already held another run is left exactly as it was
        assert {p.name: p.read_bytes() for p in output_dir.iterdir()} == before


# --- DDP --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_two_processes_matches_one_process(tiny_base, train_file, tmp_path):
    """Same global batch (4): 1 process x micro 2 x accumulation 2 == 2 gloo processes x micro 2 x accumulation 1."""
    common = dict(max_steps=3, lora_dropout=0.0)  # dropout masks depend on the process's RNG stream
    finetune_succeeds(*cli_flags(tiny_base, train_file, tmp_path / "one", **common))
    finetune_succeeds(
        *cli_flags(tiny_base, train_file, tmp_path / "two", **common), launcher=torchrun(2, 29517)
    )
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (summary["world_size"], summary["gradient_accumulation_steps"]) == (2, 1)
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["gradient_accumulation_steps"] == 2
    assert_same_adapter(adapter(tmp_path / "one"), adapter(tmp_path / "two"), atol=2e-5)


# --- interruption and resume ------------------------------------------------------------------------------


def test_sigterm_while_the_model_loads_stops_with_the_documented_status(tiny_base, train_file, tmp_path):
    """Pre-emption can come before the first step (an 8B model takes minutes to load): the run stops with 75, as
    a requeue loop expects, rather than dying of the signal, and writes nothing."""
    out = tmp_path / "early"
    command, env = finetune_signalling_itself("load", signal.SIGTERM, *cli_flags(tiny_base, train_file, out))
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == INTERRUPTED_EXIT_CODE, done.stderr[-3000:]
    assert "note: SIGTERM before training began; nothing was written" in done.stderr
    assert not out.exists()


def logged_steps(output_dir: Path) -> list[int]:
    """The steps with a training loss in a run's metrics.jsonl so far (a line still being written is left out)."""
    path = output_dir / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []  # after the last newline: unfinished
    return [record["step"] for record in map(json.loads, lines) if "loss" in record]


@pytest.mark.slow
def test_sigkill_and_sigterm_then_resume_give_the_uninterrupted_adapter(tiny_base, train_file, tmp_path):
    """Dropout on (0.05): exact resume needs the data order, optimizer, scheduler and RNG streams restored.

    The uninterrupted reference, a run killed with SIGKILL and a run stopped with SIGTERM start together. The
    interrupted runs send themselves their signal as step 4 begins (steps 1-3 logged, checkpoint-2 complete), so
    where it lands does not depend on how the scheduler shares the CPU; then both resume together.
    """
    folders = {name: tmp_path / name for name in ("reference", "killed", "stopped")}
    commands = {
        "reference": (finetune(*cli_flags(tiny_base, train_file, folders["reference"])), ENV),
        # SIGKILL between checkpoints: the resumed run restarts from the newest complete one.
        "killed": finetune_signalling_itself(
            3, signal.SIGKILL, *cli_flags(tiny_base, train_file, folders["killed"])
        ),
        # SIGTERM during training: a checkpoint is saved and the run stops with the documented status.
        "stopped": finetune_signalling_itself(
            3, signal.SIGTERM, *cli_flags(tiny_base, train_file, folders["stopped"])
        ),
    }
    runs = {
        name: subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        for name, (command, env) in commands.items()
    }
    statuses = {name: (run.wait(timeout=600), run.stderr.read()) for name, run in runs.items()}
    assert statuses["reference"][0] == 0, statuses["reference"][1][-3000:]
    assert statuses["killed"][0] == -signal.SIGKILL, statuses["killed"][1][-3000:]
    assert statuses["stopped"][0] == INTERRUPTED_EXIT_CODE, statuses["stopped"][1][-3000:]
    # The killed run logged step 3 after its last checkpoint (2); the stopped one finished step 4 and saved it.
    assert logged_steps(folders["killed"]) == [1, 2, 3]
    assert sorted(p.name for p in folders["killed"].glob("checkpoint-*")) == ["checkpoint-2"]
    summary = json.loads((folders["stopped"] / "summary.json").read_text())
    assert (summary["status"], summary["global_step"]) == ("interrupted", 4)
    assert (folders["stopped"] / "checkpoint-4" / TRAINER_STATE).is_file()
    for name in ("killed", "stopped"):
        assert not (folders[name] / "adapter_model.safetensors").exists()

    resumes = {
        name: subprocess.Popen(
            finetune(*cli_flags(tiny_base, train_file, folders[name]), "--resume_from_checkpoint=True"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for name in ("killed", "stopped")
    }
    expected = adapter(folders["reference"])
    for name, resumed in resumes.items():
        assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
        summary = json.loads((folders[name] / "summary.json").read_text())
        assert summary["resumed_from"] is not None
        # its train_loss averages the steps this call trained, and says which
        assert summary["train_loss_steps"] == [{"killed": 3, "stopped": 5}[name], 6]
        assert logged_steps(folders[name]) == [
            1,
            2,
            3,
            4,
            5,
            6,
        ]  # the killed run's line of step 3, past its checkpoint, dropped
        assert_same_adapter(adapter(folders[name]), expected, atol=1e-6)
