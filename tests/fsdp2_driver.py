"""Two gloo processes train a DenseLoRA adapter under FSDP2; rank 0 checks it equals a one-process run's.

Launched by tests/test_fsdp2_multiproc.py as
``python -m torch.distributed.run --nproc_per_node 2 tests/fsdp2_driver.py TINY_BASE_FOLDER``; prints
``fsdp2 worst ...`` on rank 0 and fails (an assertion) if the two runs differ.
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
        r=8,
        lora_alpha=16,
        target_modules=DEFAULT_TARGET_MODULES,
        lora_dropout=0.0,
        init_seed=0,
        init_weights=False,
    )
    return get_peft_model(model, config).train()


LR = 1e-2
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
    optimizer = torch.optim.AdamW(trainable, lr=LR)
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
    print(
        f"fsdp2 worst {worst:.3e} tensors {len(full)} shared {len(sharded)} layers {len(layers)}", flush=True
    )
    # AdamW divides by sqrt(v): a weight whose gradient is near eps moves by an lr-sized step that float rounding of
    # the reduction order can shift (1.6e-5 at lr 1e-2 on an AVX2 CPU, under 1e-5 on AVX512); an adapter that
    # missed a process's gradients or weighted the halves wrongly is off by about lr
    # (AdamW ignores a uniform scale of the gradients, so this check cannot see one)
    assert worst < 1e-2 * LR, worst
dist.destroy_process_group()
