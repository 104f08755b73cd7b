"""finetune.py as a subprocess: bad input, DDP over gloo, SIGKILL / SIGTERM and exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import test_train
import torch
from safetensors.torch import load_file

from dense_lora.train import INTERRUPTED_EXIT_CODE
from dense_lora.train import TRAINER_STATE_FILE as TRAINER_STATE

# The session fixtures of the in-process tests (tiny LLaMA with the SmolLM2 tokenizer, real records), shared.
tiny_base = test_train.tiny_base
train_file = test_train.train_file
REPO = test_train.REPO
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}


def cli_flags(base: Path, data: Path, output_dir: Path, **overrides: Any) -> list[str]:
    values: dict[str, Any] = dict(
        base_model=base,
        data_path=data,
        output_dir=output_dir,
        batch_size=4,
        micro_batch_size=2,
        max_steps=6,
        val_set_size=0,
        eval_step=2,
        save_step=2,
        logging_steps=1,
        warmup_steps=2,
        learning_rate=1e-2,
        lora_r=8,
        cutoff_len=48,
    )
    values.update(overrides)
    return [f"--{key}={value}" for key, value in values.items()]


def finetune(*flags: str, launcher: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, *launcher, str(REPO / "finetune.py"), *flags]


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[key] - b[key]).abs().max().item() for key in a)
    assert worst <= atol, f"adapters differ by {worst}"
    assert any(t.abs().sum() > 0 for key, t in a.items() if "decoder" in key or "lora_B" in key)  # it trained


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
}


# Imports finetune.py once, then forks one child per case that runs the CLI entry point (main) on that case's
# argv with stderr sent to a file, and exits with the CLI's status. Each case is still its own process with its own
# exit status; the fork only saves re-importing torch/transformers/peft eleven times (~6 s each on 2 cores).
FORKING_DRIVER = """
import json, os, runpy, sys
import dense_lora.train  # what main() imports lazily: load it once, before forking
cli = runpy.run_path(sys.argv[1], run_name="finetune_cli")
children = {}
for name, (argv, stderr_path) in json.loads(sys.argv[2]).items():
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        try:
            status = cli["main"](argv)
        except SystemExit as stop:
            status = stop.code if isinstance(stop.code, int) else 1
        except BaseException:
            import traceback
            traceback.print_exc()
            status = 1
        sys.stderr.flush()
        os._exit(status)
    children[pid] = name
statuses = {}
while children:
    pid, wait_status = os.wait()
    statuses[children.pop(pid)] = os.waitstatus_to_exitcode(wait_status)
print(json.dumps(statuses))
"""


@pytest.fixture(scope="module")
def bad_runs(tiny_base, train_file, tmp_path_factory) -> dict[str, tuple[int, str, Path, dict | None]]:
    """Run every bad-input case through the CLI; returns (exit status, stderr, output_dir, its prior content)."""
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "malformed.json").write_text('[{"instruction": "a", "output": "b"},')
    (tmp / "no_output.json").write_text(json.dumps([{"instruction": "a", "input": ""}]))
    (tmp / "empty.json").write_text("[]")
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
            [str(flag) for flag in cli_flags(tiny_base, train_file, **values)],
            str(tmp / f"{case}.stderr"),
        )
    driver = tmp / "driver.py"
    driver.write_text(FORKING_DRIVER)
    done = subprocess.run(
        [sys.executable, str(driver), str(REPO / "finetune.py"), json.dumps(cases)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    statuses = json.loads(done.stdout.strip().splitlines()[-1])
    return {case: (statuses[case], Path(cases[case][1]).read_text(), *folders[case]) for case in BAD_INPUTS}


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
    single = subprocess.run(
        finetune(*cli_flags(tiny_base, train_file, tmp_path / "one", **common)),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    launcher = ("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517")
    ddp = subprocess.run(
        finetune(*cli_flags(tiny_base, train_file, tmp_path / "two", **common), launcher=launcher),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (summary["world_size"], summary["gradient_accumulation_steps"]) == (2, 1)
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["gradient_accumulation_steps"] == 2
    assert_same_adapter(adapter(tmp_path / "one"), adapter(tmp_path / "two"), atol=2e-5)


# --- interruption and resume ------------------------------------------------------------------------------


def wait_for(condition, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"run ended early: {process.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def logged_steps(output_dir: Path) -> list[int]:
    lines = (
        (output_dir / "metrics.jsonl").read_text().splitlines()
        if (output_dir / "metrics.jsonl").exists()
        else []
    )
    return [record["step"] for record in map(json.loads, lines) if "loss" in record]


@pytest.mark.slow
def test_sigkill_and_sigterm_then_resume_give_the_uninterrupted_adapter(tiny_base, train_file, tmp_path):
    """Dropout on (0.05): exact resume needs the data order, optimizer, scheduler and RNG streams restored.

    The uninterrupted reference, the run killed with SIGKILL and the run stopped with SIGTERM start together
    (each waits on events, not on timing), then both interrupted runs resume together.
    """
    folders = {name: tmp_path / name for name in ("reference", "killed", "stopped")}
    runs = {
        name: subprocess.Popen(
            finetune(*cli_flags(tiny_base, train_file, folder)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for name, folder in folders.items()
    }
    # SIGTERM during training: a checkpoint is saved and the run stops with the documented status.
    wait_for(lambda: logged_steps(folders["stopped"]) != [], runs["stopped"])
    runs["stopped"].send_signal(signal.SIGTERM)
    # SIGKILL once a checkpoint is complete; the resumed run restarts from the newest complete one.
    wait_for(lambda: (folders["killed"] / "checkpoint-2" / TRAINER_STATE).is_file(), runs["killed"])
    runs["killed"].send_signal(signal.SIGKILL)
    statuses = {name: (run.wait(timeout=300), run.stderr.read()) for name, run in runs.items()}
    assert statuses["reference"][0] == 0, statuses["reference"][1][-3000:]
    assert statuses["killed"][0] == -signal.SIGKILL
    assert statuses["stopped"][0] == INTERRUPTED_EXIT_CODE, statuses["stopped"][1][-3000:]
    summary = json.loads((folders["stopped"] / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["global_step"] < 6
    assert (folders["stopped"] / f"checkpoint-{summary['global_step']}" / TRAINER_STATE).is_file()
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
        assert json.loads((folders[name] / "summary.json").read_text())["resumed_from"] is not None
        assert logged_steps(folders[name]) == [
            1,
            2,
            3,
            4,
            5,
            6,
        ]  # the killed run's lines past its checkpoint dropped
        assert_same_adapter(adapter(folders[name]), expected, atol=1e-6)
