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
import textwrap
from pathlib import Path

import pytest
import test_train
from conftest import make_tiny_llama
from peft import get_peft_model
from peft.utils.other import fsdp_auto_wrap_policy

from dense_lora import DEFAULT_TARGET_MODULES, DenseLoraConfig

REPO = test_train.REPO
tiny_base = test_train.tiny_base

TWO_PROCESSES = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    from peft import get_peft_model
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from dense_lora import DEFAULT_TARGET_MODULES, DenseLoraConfig

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)


    def build():
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
        model.config.use_cache = False
        config = DenseLoraConfig(
            r=8, lora_alpha=16, target_modules=DEFAULT_TARGET_MODULES, lora_dropout=0.0, init_seed=0,
            init_weights=False,
        )
        return get_peft_model(model, config).train()


    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):  # global batches of 4 rows; prompt-masked labels give the two halves different counts
        ids = torch.randint(3, 1000, (4, 12), generator=generator)
        labels = ids.clone()
        labels[0, :7] = labels[1, :3] = labels[3, :5] = -100
        batches.append((ids, labels))


    def train(model, rows, processes):
        # Trainer's normalisation: the loss sums over this process's tokens and divides by the global count,
        # times the process count because FSDP averages gradients over processes
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-2)
        for ids, labels in batches:
            items = int((labels[:, 1:] != -100).sum())
            loss = model(input_ids=ids[rows], labels=labels[rows], num_items_in_batch=items).loss * processes
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return {n: p for n, p in model.named_parameters() if p.requires_grad}


    if rank == 0:
        torch.manual_seed(0)
        reference = {n: p.detach().clone() for n, p in train(build(), slice(0, 4), 1).items()}

    torch.manual_seed(0)
    model = build()
    layers = [m for m in model.modules() if isinstance(m, LlamaDecoderLayer)]
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    shared = model.base_model.denselora_encoder, model.base_model.denselora_decoder
    assert not any(isinstance(m, FSDPModule) for owner in shared for m in owner.modules())
    trained = train(model, slice(2 * rank, 2 * rank + 2), world)
    full = {n: p.detach().full_tensor() for n, p in trained.items()}  # collective: every rank calls it
    sharded = [n for n, p in trained.items() if "denselora_encoder" in n or "denselora_decoder" in n]
    assert sharded and all(p.placements[0].is_shard() for n, p in trained.items() if n in sharded)
    if rank == 0:
        assert full.keys() == reference.keys()
        worst = max((full[n] - reference[n]).abs().max().item() for n in full)
        start = {n: p.detach() for n, p in build().named_parameters() if p.requires_grad}
        assert all(not torch.equal(full[n], start[n]) for n in full)  # every tensor trained, shared ones included
        print(f"fsdp2 worst {worst:.3e} tensors {len(full)} shared {len(sharded)} layers {len(layers)}", flush=True)
        assert worst < 1e-5, worst
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_two_process_fsdp2_adapter_equals_one_process(tiny_base: Path, tmp_path: Path) -> None:
    """2 gloo processes, fully_shard per decoder layer + root, 3 AdamW steps on halves of each global batch: every
    trained tensor (shared W_e/W_d sharded across the processes included) equals a one-process run's."""
    script = tmp_path / "fsdp2_two.py"
    script.write_text(TWO_PROCESSES)
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
