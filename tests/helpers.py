"""Helpers shared by the test modules: tiny-run settings, the finetune.py command line, adapter comparison.

Test modules import these from here (never from one another); the pytest fixtures they share live in
conftest.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from dense_lora.testing import tiny_llama_config

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
# Runs the CLIs' main() once per case in forked children (tests/cli_fork_driver.py explains why).
CLI_FORK_DRIVER = Path(__file__).resolve().with_name("cli_fork_driver.py")

# A run small enough for a 2-core CPU: 4-record global batches of 2-record micro-batches, r=8, short records.
TINY_RUN: dict[str, Any] = dict(
    batch_size=4,
    micro_batch_size=2,
    max_steps=6,
    val_set_size=8,
    eval_step=2,
    save_step=2,
    logging_steps=1,
    warmup_steps=0,
    learning_rate=1e-2,
    lora_r=8,
    cutoff_len=64,
)
# The command-line tests train without validation, on shorter records, after 2 warmup steps.
TINY_CLI_RUN: dict[str, Any] = {**TINY_RUN, "val_set_size": 0, "warmup_steps": 2, "cutoff_len": 48}


def small_run(base: Path, data: Path, output_dir: Path, **overrides: Any) -> dict[str, Any]:
    """TrainConfig fields of a tiny run; overrides are TrainConfig fields."""
    paths = dict(base_model=str(base), data_path=str(data), output_dir=str(output_dir))
    return {**paths, **TINY_RUN, **overrides}


def tiny_run_flags(base: Path, data: Path, output_dir: Path, **overrides: Any) -> list[str]:
    """finetune.py flags (``--name=value``) of a tiny run without validation; overrides are flag values."""
    values = {"base_model": base, "data_path": data, "output_dir": output_dir, **TINY_CLI_RUN, **overrides}
    return [f"--{key}={value}" for key, value in values.items()]


def finetune(*flags: str, launcher: tuple[str, ...] = ()) -> list[str]:
    """The command that runs finetune.py (under `launcher`, e.g. torch.distributed.run) with `flags`."""
    return [sys.executable, *launcher, str(REPO / "finetune.py"), *flags]


# Runs a script (argv[1]) that sends its own process `signum` once, at a chosen point: with SIGNAL_AT "load", as
# the base model starts loading; with a step number n, as transformers' Trainer begins the first micro-batch of
# optimizer step n + 1 (steps 1..n logged, their checkpoints complete, nothing of the next step done). A signal at
# a chosen point, where one sent from outside could land anywhere.
SIGNAL_ITSELF = """
import os, runpy, signal, sys
import transformers
at, signum = os.environ["SIGNAL_AT"], signal.Signals[os.environ["SIGNAL_NAME"]]
if at == "load":
    load = transformers.PreTrainedModel.from_pretrained.__func__
    def loading(cls, *args, **kwargs):
        os.kill(os.getpid(), signum)
        return load(cls, *args, **kwargs)
    transformers.PreTrainedModel.from_pretrained = classmethod(loading)
else:
    training_step = transformers.Trainer.training_step
    def signalling_step(self, *args, **kwargs):
        if self.state.global_step == int(at) and not getattr(self, "_signal_sent", False):
            self._signal_sent = True
            os.kill(os.getpid(), signum)
        return training_step(self, *args, **kwargs)
    transformers.Trainer.training_step = signalling_step
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def finetune_signalling_itself(
    at: int | str, signum: signal.Signals, *flags: str
) -> tuple[list[str], dict[str, str]]:
    """The command and environment of a finetune.py run that sends itself `signum` at `at` (SIGNAL_ITSELF)."""
    command = [sys.executable, "-c", SIGNAL_ITSELF, str(REPO / "finetune.py"), *flags]
    return command, {**ENV, "SIGNAL_AT": str(at), "SIGNAL_NAME": signum.name}


def torchrun(processes: int, port: int) -> tuple[str, ...]:
    """The launcher of finetune() for `processes` local processes (gloo on CPU) on a port of the test's own."""
    return ("-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(port))


def finetune_succeeds(*flags: str, launcher: tuple[str, ...] = ()) -> None:
    """Run finetune.py to the end in a subprocess; fail the test with its stderr when it does not exit 0."""
    done = subprocess.run(
        finetune(*flags, launcher=launcher), capture_output=True, text=True, env=ENV, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]


def run_forked_clis(phases: list[dict[str, Any]], timeout: float) -> dict[str, list[int | None]]:
    """Run every case {name: (script, argv, stderr_path)} of each phase through tests/cli_fork_driver.py.

    Returns {name: [exit status, number of models the case loaded (None: the child died first)]}; the driver itself must succeed.
    """
    done = subprocess.run(
        [sys.executable, str(CLI_FORK_DRIVER), str(REPO), json.dumps(phases, default=str)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a saved adapter."""
    return load_file(folder / "adapter_model.safetensors")


def assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    """Same tensors within `atol`, and trained (some decoder / lora_B weight left zero)."""
    assert a.keys() == b.keys()
    worst = max((a[key] - b[key]).abs().max().item() for key in a)
    assert worst <= atol, f"adapters differ by {worst}"
    assert any(t.abs().sum() > 0 for key, t in a.items() if "decoder" in key or "lora_B" in key)  # it trained


def make_tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> LlamaForCausalLM:
    """A seeded tiny LLaMA (GQA, distinct dims; dense_lora.testing.tiny_llama_config) in eval mode."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype)
    return model.eval()


def load_bench_script(name: str) -> ModuleType:
    """bench/ is a folder of scripts, not a package: import bench/<name>.py by path (as module bench_<name>)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
