"""FSDP2 across two processes trains the adapter a single process trains, and the shared W_e / W_d stay reachable.

accelerate enables FSDP only for accelerator process groups (not MULTI_CPU), so the two-process run wraps the model the way accelerate does for
``fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP`` (docs/training.md): ``fully_shard`` on every decoder layer, then
on the root. DenseLoRA's shared encoder/decoder belong to the root, so the root unit all-gathers them before any
layer runs; a unit of their own would never be gathered (their containers have no forward), which is what the
wrap-policy test guards against.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, make_tiny_llama
from peft import get_peft_model
from peft.utils.other import fsdp_auto_wrap_policy

from dense_lora import DEFAULT_TARGET_MODULES, DenseLoraConfig

# The two-process program torch.distributed.run launches (a file of its own, so it can be read and run alone).
TWO_PROCESSES = Path(__file__).resolve().with_name("fsdp2_driver.py")


@pytest.mark.slow
def test_two_process_fsdp2_adapter_equals_one_process(tiny_base: Path, tmp_path: Path) -> None:
    """2 gloo processes, fully_shard per decoder layer + root, 3 AdamW steps on halves of each global batch: every
    trained tensor (shared W_e/W_d sharded across the processes included) equals a one-process run's."""
    script = TWO_PROCESSES
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541"]
    done = subprocess.run(
        [sys.executable, *launcher, str(script), str(tiny_base)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fsdp2 worst" in done.stdout and "layers 3" in done.stdout, done.stdout


def test_wrap_policies_leave_the_shared_weights_in_the_root_unit() -> None:
    """peft's FSDP auto-wrap policy (and the transformer-layer policy accelerate uses for FSDP2) pick the decoder
    layers and never a module holding W_e / W_d: those stay with the root, which every layer's forward runs under."""
    model = get_peft_model(
        make_tiny_llama(), DenseLoraConfig(r=4, target_modules=list(DEFAULT_TARGET_MODULES), init_seed=0)
    )
    policy = fsdp_auto_wrap_policy(model)
    wrapped = [
        name for name, m in model.named_modules() if policy(module=m, recurse=False, nonwrapped_numel=0)
    ]
    shared = {
        name
        for name, _ in model.named_parameters()
        if "denselora_encoder" in name or "denselora_decoder" in name
    }
    assert len(shared) == 2 * len(DEFAULT_TARGET_MODULES)
    assert sorted(wrapped) == [f"base_model.model.model.layers.{i}" for i in range(3)]
    assert not any(param.startswith(unit + ".") for unit in wrapped for param in shared)
