"""Training-step benchmark: DenseLoRA against peft LoRA / DoRA and the frozen base, at the same r and targets.

One invocation compares every requested method on the same model shape, dtype, batch and sequence length and
reports, per method: median forward+backward time (with its ratio to LoRA measured in the same run), FLOPs of
one step, bytes the autograd graph saves for backward (per token, and over the frozen base), peak memory and
the number of trainable parameters. See bench/README.md for what each column means and its caveats.

Why the measurements are taken the way they are:

* Timing interleaves methods (one step of each, in a rotated order, per repeat) inside one process, so drift in
  machine load and CPU frequency hits every method alike; ratios to LoRA are the numbers to compare across runs.
* Saved-for-backward bytes are counted with ``torch.autograd.graph.saved_tensors_hooks`` and deduplicated by
  storage: many ops save views of one buffer (q/k/v transposes, the same normed input seen by q, k and v), and
  what costs memory is the buffer, once. Parameters and buffers of the model are excluded: they are resident
  anyway, so only activations (and per-step copies such as dtype casts of weights) are counted.
* Peak memory on CPU is the process RSS high-water mark, which is per process and never goes down, so each
  method is measured in a fresh subprocess; on CUDA it is ``torch.cuda.max_memory_allocated``.
* ``*-shape`` models (published LLaMA configs, random weights) are built on the meta device when no GPU is
  present: FLOPs, saved bytes and parameter counts are then exact without allocating a single weight.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import gc
import json
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # this checkout's dense_lora, from any working directory

import dense_lora  # noqa: E402  (registers the DENSELORA peft type)
from dense_lora.cli import StrictArgumentParser, dropout_rate, existing_file, non_negative_int, positive_int  # noqa: E402
from dense_lora.layer import one_call_per_layer, reference_implementation  # noqa: E402
from dense_lora.models import emulated_bf16_warning  # noqa: E402

DEFAULT_METHODS = ("denselora", "denselora-reference", "lora", "dora", "frozen")
# The paper's "Only Matrix" variant (identity activation) on the fused path: run beside "denselora", it shows
# what the activation costs, since everything else (GEMMs, dropout, kernels, bookkeeping) is the same.
# "denselora-per-layer" computes q, k and v in three calls instead of one (dense_lora.layer.InputGroup): beside
# "denselora", at any dropout, it shows what computing them together saves.
METHODS = (*DEFAULT_METHODS, "denselora-only-matrix", "denselora-per-layer")
MODELS = ("tiny", "smollm2", "llama3-8b-shape", "llama2-7b-shape")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BASELINE = "lora"  # ratios are reported against this method
FROZEN = "frozen"  # "over the frozen base" subtracts this method
DEFAULT_RESULTS = REPO_ROOT / "bench" / "RESULTS.md"
KIB = 1024


# ----------------------------------------------------------------------------------------------------------
# Settings and model construction
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Settings:
    """Everything that decides what is measured; stored in the JSON so a row can be reproduced."""

    model: str = "tiny"
    r: int = 32
    lora_alpha: float = 64.0
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    dtype: str = "bf16"
    batch: int = 2
    seq: int = 128
    checkpointing: bool = False
    repeats: int = 10
    warmup: int = 3
    seed: int = 0
    device: str = "cpu"
    peak_tflops: float = 989.0
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    dropout: float = 0.05  # adapter dropout of every method: the recipe's (LLM-Adapters trains with 0.05)
    compile: bool = False  # time torch.compile'd models (FLOPs and saved bytes are still counted eagerly)
    # every step under bf16 autocast, as finetune.py --bf16 trains (a bf16 base, the Trainer's autocast): peft LoRA
    # then runs its adapter in bf16, not in its float32 weights' dtype
    autocast: bool = False

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def uses_meta(settings: Settings) -> bool:
    """Shape models without a GPU are only counted (on meta), never run for time or memory."""
    return settings.model.endswith("-shape") and settings.device == "cpu"


def build_base(settings: Settings) -> nn.Module:
    """The frozen base model in the benchmark dtype and device, in train mode, with fixed weights.

    Every method gets its own copy of the same weights (deep copies of one build), so differences between
    methods never come from different initialisations.
    """
    from transformers import AutoModelForCausalLM

    from dense_lora.models import build_model_on_meta, published_config, smollm2_path
    from dense_lora.testing import tiny_llama_config

    torch.manual_seed(settings.seed)
    if settings.model == "tiny":
        model = AutoModelForCausalLM.from_config(tiny_llama_config(max_position_embeddings=512)).to(
            settings.torch_dtype
        )
    elif settings.model == "smollm2":
        model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=settings.torch_dtype)
    elif settings.model.endswith("-shape"):
        config = published_config(settings.model.removesuffix("-shape"))
        if uses_meta(settings):
            model = build_model_on_meta(config).to(settings.torch_dtype)
        else:
            with torch.device(settings.device):
                model = AutoModelForCausalLM.from_config(config, dtype=settings.torch_dtype)
    else:
        raise ValueError(f"unknown model {settings.model!r}; use one of {', '.join(MODELS)}")
    if not uses_meta(settings):
        model = model.to(settings.device)
    model.requires_grad_(False)
    return model.train()  # train mode: checkpointing and adapter dropout active


def attach_method(base: nn.Module, method: str, settings: Settings) -> nn.Module:
    """Wrap a copy-owned base with the method's adapter (same r, alpha, QKVUD targets and dropout).

    Gradient checkpointing is enabled before wrapping, as a training script would; transformers then makes the
    embedding output require grad, which the non-reentrant checkpoint does not need but real runs have.
    The frozen method gets no adapter, and its embedding output requires grad so backward still runs through
    every layer (activation gradients only): the cost any adapter pays before adding its own.
    """
    from peft import LoraConfig, get_peft_model

    if settings.checkpointing:
        base.gradient_checkpointing_enable()
    targets = list(dense_lora.DEFAULT_TARGET_MODULES)
    torch.manual_seed(settings.seed + 1)
    if method == FROZEN:
        base.enable_input_require_grads()
        return base
    if method in ("denselora", "denselora-reference", "denselora-only-matrix", "denselora-per-layer"):
        config = dense_lora.DenseLoraConfig(
            r=settings.r,
            lora_alpha=settings.lora_alpha,
            target_modules=targets,
            lora_dropout=settings.dropout,
            init_seed=settings.seed,
            activation="identity" if method == "denselora-only-matrix" else "gelu",
        )
    elif method in ("lora", "dora"):
        config = LoraConfig(
            r=settings.r,
            lora_alpha=settings.lora_alpha,
            target_modules=targets,
            lora_dropout=settings.dropout,
            use_dora=method == "dora",
        )
    else:
        raise ValueError(f"unknown method {method!r}; use any of {', '.join(METHODS)}")
    model = get_peft_model(base, config)
    return model.train()


def method_context(method: str) -> contextlib.AbstractContextManager[None]:
    """The reference variant runs the same DenseLoRA model through the plain formula, the per-layer variant
    without q/k/v computed together."""
    if method == "denselora-reference":
        return reference_implementation()
    if method == "denselora-per-layer":
        return one_call_per_layer()
    return contextlib.nullcontext()


def real_token_rows(settings: Settings, vocab_size: int) -> torch.Tensor | None:
    """Token ids of real training text (BoolQ prompts as LLM-Adapters formats them) for SmolLM2, else None.

    Real text matters little for dense compute but keeps the embedding-gather pattern and the loss realistic.
    Examples are concatenated (EOS between them) and cut into rows, so every position is a real token.
    """
    if settings.model != "smollm2":
        return None
    try:
        from dense_lora.data import generate_train_prompt, load_records
        from dense_lora.models import load_tokenizer, smollm2_path

        records = load_records("dataset/boolq/train.json")
        tokenizer = load_tokenizer(smollm2_path())
    except (ImportError, FileNotFoundError, ValueError) as error:
        print(f"[bench] real text unavailable ({error}); using random token ids", file=sys.stderr)
        return None
    order = random.Random(settings.seed).sample(range(len(records)), k=min(len(records), 200))
    stream: list[int] = []
    for index in order:
        stream += tokenizer(generate_train_prompt(records[index]))["input_ids"] + [tokenizer.eos_token_id]
        if len(stream) >= settings.tokens:
            break
    ids = torch.tensor(stream[: settings.tokens]).view(settings.batch, settings.seq)
    return ids if int(ids.max()) < vocab_size else None


def make_batch(settings: Settings, vocab_size: int) -> dict[str, torch.Tensor]:
    """input_ids / labels (labels = inputs, the causal-LM loss shifts them); random ids with a fixed seed
    when no real text applies."""
    ids = real_token_rows(settings, vocab_size)
    if ids is None:
        generator = torch.Generator().manual_seed(settings.seed)
        ids = torch.randint(3, vocab_size, (settings.batch, settings.seq), generator=generator)
    device = "meta" if uses_meta(settings) else settings.device
    ids = ids.to(device)
    return {"input_ids": ids, "labels": ids.clone()}


# ----------------------------------------------------------------------------------------------------------
# One training step and what it costs
# ----------------------------------------------------------------------------------------------------------


def train_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    method: str,
    phase: Callable[[str], contextlib.AbstractContextManager[Any]] | None = None,
) -> float:
    """Forward + backward of the causal-LM loss. Gradients are dropped before the step (as
    ``zero_grad(set_to_none=True)`` does), so allocating them is part of every step. ``phase(name)``, when
    given, wraps the "forward" and the "backward" (bench/profile_step.py marks them for the profiler)."""
    phase = phase or (lambda name: contextlib.nullcontext())
    for param in model.parameters():
        param.grad = None
    with method_context(method):
        with phase("forward"):
            loss = model(**batch).loss
        with phase("backward"):
            loss.backward()
    return float(loss.detach().float()) if loss.device.type != "meta" else float("nan")


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def trainable_parameters(model: nn.Module) -> tuple[int, dict[str, int]]:
    """Trainable parameter count and how many of them are in each dtype (peft upcasts adapters to fp32)."""
    by_dtype: dict[str, int] = defaultdict(int)
    for param in model.parameters():
        if param.requires_grad:
            by_dtype[str(param.dtype).removeprefix("torch.")] += param.numel()
    return sum(by_dtype.values()), dict(by_dtype)


def count_flops(model: nn.Module, batch: dict[str, torch.Tensor], method: str) -> int:
    """FLOPs of one forward+backward as torch's FlopCounterMode counts them (matmuls and attention; CPU's
    flash-attention kernel is counted with the same formula as the CUDA one, see ``_cpu_sdpa_mapping``; in-place
    ``addmm_``, which it skips, like ``addmm``)."""
    from torch.utils.flop_counter import FlopCounterMode

    def addmm_flops(_, mat1, mat2, *args, out_shape=None, **kwargs) -> int:
        return 2 * mat1[0] * mat1[1] * mat2[1]  # FlopCounterMode passes shapes, not tensors

    mapping = {**_cpu_sdpa_mapping(), torch.ops.aten.addmm_: addmm_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        train_step(model, batch, method)
    return int(counter.get_total_flops())


def _flops_without_checkpointing(model: nn.Module, batch: dict[str, torch.Tensor], method: str) -> int:
    """The step's model FLOPs: with checkpointing off for the count, so the recomputed forward, which costs time
    but computes nothing new, is not in MFU's numerator (it is in the FLOPs column, which counts what runs)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_disable()
    try:
        return count_flops(model, batch, method)
    finally:
        base.gradient_checkpointing_enable()


def _cpu_sdpa_mapping() -> dict[Any, Callable[..., int]]:
    """FlopCounterMode knows the CUDA SDPA kernels but not ``_scaled_dot_product_flash_attention_for_cpu``,
    which would make attention free on CPU; count it (forward and backward) like the CUDA flash kernel."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    mapping: dict[Any, Callable[..., int]] = {}
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is not None:

        def forward_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_flop_count(query, key, value)  # FlopCounterMode passes shapes, not tensors

        mapping[forward] = forward_flops
    if backward is not None:

        def backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_backward_flop_count(grad_out, query, key, value)

        mapping[backward] = backward_flops
    return mapping


@dataclass
class SavedTensor:
    """One storage saved for backward: where (module), what (shape/dtype), and which autograd nodes hold it."""

    nbytes: int
    shape: list[int]
    dtype: str
    module: str
    token_shaped: bool
    nodes: list[str] = field(default_factory=list)


def is_token_shaped(tensor: torch.Tensor, settings: Settings) -> bool:
    """Whether a saved tensor grows with the tokens (a heuristic by shape): activations have a token-count or
    sequence-length dimension, weights do not. A flat uint8 tensor is DenseLoRA's dropout masks packed one bit
    per element (``dense_lora.fused.pack_bits``): token-sized too."""
    shape = list(tensor.shape)
    if tensor.dtype == torch.uint8 and len(shape) == 1:
        return True
    return bool(shape) and (shape[0] == settings.tokens or settings.seq in shape)


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    """Identity of the underlying storage: its data pointer, or on meta (where every pointer is 0) the address
    of the StorageImpl, which is just as unique while the tensor is alive."""
    storage = tensor.untyped_storage()
    if tensor.device.type == "meta":
        return ("meta", storage._cdata)
    return (str(tensor.device), storage.data_ptr())


class ModuleTracker:
    """Names the innermost module whose forward is running, to attribute each saved tensor to a module.

    Adapter layers' frozen ``base_layer``s get no hooks (what they save is attributed to the adapter layer): a
    hooked base layer must be called, so DenseLoRA's fused path would stop computing its product itself, and the
    step measured would not be the step trained."""

    def __init__(self, model: nn.Module) -> None:
        self.stack: list[str] = []
        self.handles = []
        for name, module in model.named_modules():
            if name.endswith(".base_layer"):
                continue
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._leave(name), always_call=True))

    def _enter(self, name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            self.stack.append(name)

        return hook

    def _leave(self, name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            if self.stack and self.stack[-1] == name:
                self.stack.pop()

        return hook

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else "<outside modules>"

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _Packed:
    """What the graph holds for one saved tensor: the tensor and its index in the recorder. The recorder keeps
    only a weak reference, so a saved tensor dies with the graph branch that saved it, as it does in training."""

    __slots__ = ("__weakref__", "index", "tensor")

    def __init__(self, index: int, tensor: torch.Tensor) -> None:
        self.index, self.tensor = index, tensor


class SavedTensorRecorder:
    """saved_tensors_hooks that record every storage autograd keeps, once, parameters and buffers excluded.

    Saved tensors are held by the graph alone (``_Packed``): a branch the forward builds and then drops (peft's
    DoRA, for one, computes its weight norm through a product it detaches) frees what it saved, and
    ``alive_storages`` counts only what the graph still holds when the forward ends."""

    def __init__(self, model: nn.Module, settings: Settings) -> None:
        self.resident = {_storage_key(t) for t in (*model.parameters(), *model.buffers())}
        self.settings = settings
        self.storages: dict[tuple[str, int], SavedTensor] = {}
        self.holders: dict[tuple[str, int], list[weakref.ref]] = defaultdict(list)  # per storage key
        # each saved tensor's storage key, by the index its _Packed carries (None: a parameter's)
        self.packed: list[tuple[str, int] | None] = []
        self.probe: list[int] = []
        self.tracker = ModuleTracker(model)
        # Undeduplicated sums, only to compare with counts made that way (see README, "validation").
        self.naive = {"per_save_tensor_bytes": 0, "per_save_storage_bytes": 0, "including_parameters": 0}

    def pack(self, tensor: torch.Tensor) -> _Packed:
        key = _storage_key(tensor)
        held = _Packed(len(self.packed), tensor)
        self.naive["including_parameters"] += tensor.numel() * tensor.element_size()
        if key in self.resident:
            self.packed.append(None)
            return held
        self.naive["per_save_tensor_bytes"] += tensor.numel() * tensor.element_size()
        self.naive["per_save_storage_bytes"] += tensor.untyped_storage().nbytes()
        self.packed.append(key)
        if key in self.storages and not any(ref() is not None for ref in self.holders[key]):
            del self.storages[key]  # everything saved there is gone: a new storage at a freed address
            self.holders[key].clear()
        self.holders[key].append(weakref.ref(held))
        if key not in self.storages:
            shape = list(tensor.shape)
            self.storages[key] = SavedTensor(
                nbytes=tensor.untyped_storage().nbytes(),
                shape=shape,
                dtype=str(tensor.dtype).removeprefix("torch."),
                module=self.tracker.current,
                token_shaped=is_token_shaped(tensor, self.settings),
            )
        return held

    def unpack(self, held: _Packed) -> torch.Tensor:
        self.probe.append(held.index)
        return held.tensor

    def alive_storages(self) -> dict[tuple[str, int], SavedTensor]:
        """The recorded storages that some saved tensor still alive in the graph belongs to."""
        gc.collect()
        return {
            key: saved
            for key, saved in self.storages.items()
            if any(ref() is not None for ref in self.holders[key])
        }


def measure_saved(
    model: nn.Module, batch: dict[str, torch.Tensor], settings: Settings, method: str, attribute_ops: bool
) -> dict[str, Any]:
    """Bytes saved for backward by one forward, each storage counted once, parameters and buffers excluded.

    ``attribute_ops`` also walks the autograd graph afterwards, unpacking each node's saved tensors to learn
    which op (node type) holds which storage. That walk is skipped with checkpointing: unpacking a tensor saved
    inside a checkpointed region would trigger its recomputation.
    """
    recorder = SavedTensorRecorder(model, settings)
    for param in model.parameters():
        param.grad = None
    try:
        with method_context(method), torch.autograd.graph.saved_tensors_hooks(recorder.pack, recorder.unpack):
            loss = model(**batch).loss
    finally:
        recorder.tracker.remove()
    storages = recorder.alive_storages()
    if attribute_ops and not settings.checkpointing:
        _attribute_nodes(loss.grad_fn, recorder.packed, storages, recorder.probe)
    with method_context(method):
        loss.backward()  # frees the graph (and checks the step still works under the hooks)
    for param in model.parameters():
        param.grad = None
    total = sum(s.nbytes for s in storages.values())
    tokens = settings.tokens
    return {
        "saved_bytes": total,
        "saved_bytes_fixed": sum(s.nbytes for s in storages.values() if not s.token_shaped),
        "saved_storages": len(storages),
        "saved_bytes_per_token": total / tokens,
        "naive_bytes_per_token": {name: value / tokens for name, value in recorder.naive.items()},
        "tensors": [asdict(s) for s in storages.values()],
    }


def _attribute_nodes(
    root: Any,
    packed: list[tuple[str, int] | None],
    storages: dict[tuple[str, int], SavedTensor],
    probe: list[int],
) -> None:
    """Visit every autograd node once and record its type name on each storage it saved."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        probe.clear()
        names = [n for n in dir(node) if n.startswith("_saved_")] + (
            ["saved_tensors"] if hasattr(node, "saved_tensors") else []
        )
        for name in names:
            with contextlib.suppress(Exception):
                getattr(node, name)
        for index in probe:
            key = packed[index]
            if key in storages and node.name() not in storages[key].nodes:
                storages[key].nodes.append(node.name())
        stack.extend(next_node for next_node, _ in node.next_functions)


def summarize_saved(tensors: list[dict[str, Any]], tokens: int, layer_filter: str) -> list[dict[str, Any]]:
    """Group the saved storages of the modules whose name contains ``layer_filter`` by (module, node, shape)."""
    rows = []
    for t in tensors:
        if layer_filter and layer_filter not in t["module"]:
            continue
        rows.append(
            {
                "module": t["module"].split(layer_filter, 1)[-1] if layer_filter else t["module"],
                "nodes": "+".join(t["nodes"]) or "?",
                "shape": "x".join(map(str, t["shape"])),
                "dtype": t["dtype"],
                "bytes_per_token": t["nbytes"] / tokens,
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------------------


def _read_status_kib(field_name: str) -> int | None:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return None


def _reset_rss_peak() -> bool:
    """Linux resets VmHWM to the current RSS on writing 5 to /proc/self/clear_refs (since 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def peak_memory_probe(settings: Settings, method: str, steps: int = 2) -> dict[str, Any]:
    """Peak memory of ``steps`` training steps of one method, measured in this (fresh) process.

    CUDA: bytes allocated at the peak, over what the model held before the step. CPU: RSS high-water, both
    absolute (the whole process: Python, libraries, weights) and over the RSS right before the first step
    (what the step itself needs, subject to allocator caching; see README).
    """
    base = build_base(settings)
    model = attach_method(base, method, settings)
    batch = make_batch(
        settings, model.config.vocab_size if hasattr(model, "config") else base.config.vocab_size
    )
    if settings.device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            train_step(model, batch, method)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_mib": peak / 2**20, "step_peak_mib": (peak - before) / 2**20, "kind": "cuda_allocated"}
    before_kib = _read_status_kib("VmRSS") or 0
    reset = _reset_rss_peak()
    for _ in range(steps):
        train_step(model, batch, method)
    peak_kib = _read_status_kib("VmHWM") or 0
    return {
        "peak_mib": peak_kib / KIB,
        "step_peak_mib": (peak_kib - before_kib) / KIB if reset else None,
        "kind": "rss_hwm",
    }


def peak_memory_in_subprocess(settings: Settings, method: str) -> dict[str, Any]:
    """Run ``peak_memory_probe`` in a new interpreter: RSS peaks of earlier methods would otherwise mask this one."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_probe_memory",
        method,
        "--_settings",
        json.dumps(asdict(settings)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"[bench] memory probe for {method} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return {"peak_mib": None, "step_peak_mib": None, "kind": "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------


@dataclass
class MethodResult:
    method: str
    checkpointing: bool
    trainable_params: int
    trainable_by_dtype: dict[str, int]
    flops: int
    saved_bytes_per_token: float
    saved_bytes_fixed: int
    saved_storages: int
    naive_saved_bytes_per_token: dict[str, float]
    step_times_s: list[float] = field(default_factory=list)
    median_step_s: float | None = None
    min_step_s: float | None = None  # the least-disturbed step: a second view when the machine is shared
    ratio_to_lora: float | None = None
    step_cpu_s: list[float] = field(default_factory=list)  # process CPU time of each timed step
    median_cpu_s: float | None = None
    cpu_ratio_to_lora: float | None = None  # the ratio to trust on a shared machine (see timed_step)
    # median and quartiles over repeats of this step's time over LoRA's step in the same repeat: the machine's
    # speed drifts between repeats (by up to 30% on a virtual machine), hardly within one
    paired_ratio_to_lora: float | None = None
    paired_ratio_quartiles: tuple[float, float] | None = None
    # where the median paired ratio lies with 95% confidence (``median_interval``): a target of "<= 1.0x LoRA" is
    # met when the upper end is at most 1, missed when the lower end is above 1, and not yet decided otherwise
    paired_ratio_ci95: tuple[float, float] | None = None
    saved_over_frozen_per_token: float | None = None
    saved_over_frozen_ratio_to_lora: float | None = None
    peak_mib: float | None = None
    step_peak_mib: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    # MFU's numerator: the step's FLOPs without checkpointing's recomputed forward (None: flops, no checkpointing)
    model_flops: int | None = None
    loss: float | None = None
    saved_breakdown: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None  # set when the method could not be measured (only tolerated on meta)


def count_method(
    base: nn.Module, method: str, settings: Settings, batch: dict[str, torch.Tensor]
) -> tuple[nn.Module, MethodResult]:
    """Build ``method`` on a copy of ``base`` and count what does not depend on the machine: trainable
    parameters, FLOPs, saved-for-backward bytes (raises on meta where a kernel cannot run there)."""
    model = attach_method(copy.deepcopy(base), method, settings)
    trainable, by_dtype = trainable_parameters(model)
    # A middle layer: layer 0 is atypical (without input grads its norms and attention save nothing).
    probe_layer = f".layers.{base.config.num_hidden_layers // 2}."
    flops = count_flops(model, batch, method)
    model_flops = _flops_without_checkpointing(model, batch, method) if settings.checkpointing else None
    saved = measure_saved(model, batch, settings, method, attribute_ops=True)
    result = MethodResult(
        method=method,
        checkpointing=settings.checkpointing,
        trainable_params=trainable,
        trainable_by_dtype=by_dtype,
        flops=flops,
        model_flops=model_flops,
        saved_bytes_per_token=saved["saved_bytes_per_token"],
        saved_bytes_fixed=saved["saved_bytes_fixed"],
        saved_storages=saved["saved_storages"],
        naive_saved_bytes_per_token=saved["naive_bytes_per_token"],
        saved_breakdown=summarize_saved(saved["tensors"], settings.tokens, probe_layer),
    )
    return model, result


def count_methods(
    settings: Settings, base: nn.Module, batch: dict[str, torch.Tensor], log: Callable[[str], None]
) -> tuple[dict[str, nn.Module], dict[str, MethodResult], dict[str, str]]:
    """Models and counts of every method; on meta, methods whose kernels cannot run there are skipped."""
    models: dict[str, nn.Module] = {}
    results: dict[str, MethodResult] = {}
    failures: dict[str, str] = {}
    for method in settings.methods:
        try:
            models[method], results[method] = count_method(base, method, settings, batch)
        except Exception as error:
            if not uses_meta(settings):
                raise
            # Some kernels cannot run on meta; the other methods' counts are still worth having.
            message = f"{type(error).__name__}: {error}"
            log(f"{method}: cannot be counted on the meta device ({message}); skipped")
            failures[method] = message
            continue
        result = results[method]
        log(
            f"{method}: {result.trainable_params:,} trainable, {result.flops / 1e9:.2f} GFLOP, "
            f"{result.saved_bytes_per_token / KIB:.0f} KiB/token saved"
        )
    return models, results, failures


def timed_step(
    model: nn.Module, batch: dict[str, torch.Tensor], method: str, device: str
) -> tuple[float, float, float]:
    """One training step: (loss, wall seconds, CPU seconds of this process).

    CPU time is what the step computed: other processes on a shared machine stretch wall time, not it (with one
    torch thread it is the step's own work; with more it sums the threads' work, spinning included)."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    loss = train_step(model, batch, method)
    synchronize(device)
    return loss, time.perf_counter() - wall, time.process_time() - cpu


def time_methods(
    settings: Settings,
    models: dict[str, nn.Module],
    results: dict[str, MethodResult],
    batch: dict[str, torch.Tensor],
    log: Callable[[str], None],
) -> None:
    """Warm up, then time the methods interleaved: one step of each per repeat, in an order rotated by one.

    With ``settings.compile`` every model is wrapped by ``torch.compile`` first; compilation happens in the
    warm-up steps and is logged with its time, not counted in the steps."""
    order = [method for method in settings.methods if method in models]
    for method in order:  # warm-up: allocator, kernels, lazy inits (and compilation)
        if settings.compile:
            models[method].compile()
        start = time.perf_counter()
        for _ in range(settings.warmup):
            results[method].loss = train_step(models[method], batch, method)
        log(f"{method}: {settings.warmup} warm-up steps in {time.perf_counter() - start:.1f} s")
    for repeat in range(settings.repeats):
        shift = repeat % len(order)
        for method in order[shift:] + order[:shift]:
            result = results[method]
            result.loss, wall, cpu = timed_step(models[method], batch, method, settings.device)
            result.step_times_s.append(wall)
            result.step_cpu_s.append(cpu)
        log(
            f"repeat {repeat + 1}/{settings.repeats}: "
            + ", ".join(
                f"{m} {results[m].step_times_s[-1]:.3f}s (cpu {results[m].step_cpu_s[-1]:.3f}s)"
                for m in order
            )
        )
    for result in results.values():
        if not result.step_times_s:  # --repeats 0: counts only
            continue
        result.median_step_s = statistics.median(result.step_times_s)
        result.min_step_s = min(result.step_times_s)
        result.median_cpu_s = statistics.median(result.step_cpu_s)
        result.tokens_per_s = settings.tokens / result.median_step_s
        if settings.device.startswith("cuda"):
            model_flops = result.model_flops or result.flops
            result.mfu = model_flops / result.median_step_s / (settings.peak_tflops * 1e12)


def measure_peak_memory(
    settings: Settings, results: dict[str, MethodResult], log: Callable[[str], None]
) -> None:
    """Peak memory of each method, each in a fresh subprocess (RSS high-water never goes down)."""
    for method in settings.methods:
        memory = peak_memory_in_subprocess(settings, method)
        results[method].peak_mib = memory["peak_mib"]
        results[method].step_peak_mib = memory["step_peak_mib"]
        log(f"{method}: peak {_fmt(memory['peak_mib'], '.0f')} MiB ({memory['kind']})")
        if memory.get("blobs", CODE_STATE.get("blobs")) != CODE_STATE.get("blobs"):
            log(f"WARNING: dense_lora/layer.py changed during the run; {method}'s memory probe measured it")
            results[method].peak_mib = results[method].step_peak_mib = None


def step_ratios(times: list[float], baseline: list[float]) -> list[float]:
    """``times[i] / baseline[i]``: each repeat's ratio, steps taken back to back."""
    return [t / b for t, b in zip(times, baseline, strict=True)]


def paired_ratios(times: list[float], baseline: list[float]) -> tuple[float, tuple[float, float]]:
    """Median and (first, third) quartile of ``step_ratios(times, baseline)``."""
    ratios = step_ratios(times, baseline)
    if len(ratios) == 1:
        return ratios[0], (ratios[0], ratios[0])
    first, _, third = statistics.quantiles(ratios, n=4, method="inclusive")
    return statistics.median(ratios), (first, third)


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval for the median of ``values``: the k-th smallest and k-th largest,
    with k the largest rank for which a Binomial(n, 1/2) count falls below k with probability at most
    (1 - level) / 2. It assumes only independent repeats, nothing about their distribution (step times on a
    shared machine have long right tails). With too few values for ``level`` (n < 6 at 95%) it is their range."""
    ordered = sorted(values)
    n, tail, below, k = len(ordered), (1 - level) / 2, 0.0, 0
    while k < n and below + math.comb(n, k) / 2**n <= tail:
        below += math.comb(n, k) / 2**n
        k += 1  # P(count <= k - 1) <= tail: the k-th smallest is a lower bound at this level
    k = max(k, 1)
    return ordered[k - 1], ordered[n - k]


def add_ratios(results: dict[str, MethodResult]) -> None:
    """Step time (wall and CPU) over LoRA's, and saved bytes over the frozen base's (absolute and × LoRA's)."""
    lora = results.get(BASELINE)
    frozen = results.get(FROZEN)
    for result in results.values():
        if lora and lora.median_step_s and result.median_step_s:
            result.ratio_to_lora = result.median_step_s / lora.median_step_s
        if lora and lora.median_cpu_s and result.median_cpu_s:
            result.cpu_ratio_to_lora = result.median_cpu_s / lora.median_cpu_s
        if lora and result.step_times_s and len(result.step_times_s) == len(lora.step_times_s):
            result.paired_ratio_to_lora, result.paired_ratio_quartiles = paired_ratios(
                result.step_times_s, lora.step_times_s
            )
            result.paired_ratio_ci95 = median_interval(step_ratios(result.step_times_s, lora.step_times_s))
        if frozen:
            result.saved_over_frozen_per_token = result.saved_bytes_per_token - frozen.saved_bytes_per_token
    lora_over = lora.saved_over_frozen_per_token if lora else None
    for result in results.values():
        if lora_over and result.saved_over_frozen_per_token is not None:
            result.saved_over_frozen_ratio_to_lora = result.saved_over_frozen_per_token / lora_over


def step_autocast(settings: Settings) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast around the counted, timed and memory-probed steps with ``--autocast``; nothing otherwise."""
    if not settings.autocast:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(settings.device).type, dtype=torch.bfloat16)


def run_setting(
    settings: Settings, log: Callable[[str], None], measure_memory: bool = True
) -> list[MethodResult]:
    """Measure every method at one checkpointing setting (memory subprocesses optional: the smoke test skips
    them for speed)."""
    base = build_base(settings)
    batch = make_batch(settings, base.config.vocab_size)
    with step_autocast(settings):
        models, results, failures = count_methods(settings, base, batch, log)
        del base
        if not uses_meta(settings):
            time_methods(settings, models, results, batch, log)
    models.clear()
    if measure_memory and not uses_meta(settings):
        measure_peak_memory(settings, results, log)
    add_ratios(results)
    for method, message in failures.items():
        results[method] = MethodResult(method, settings.checkpointing, 0, {}, 0, 0.0, 0, 0, {}, error=message)
    return [results[method] for method in settings.methods]


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def code_state() -> dict[str, Any]:
    """Commit and the blob hashes of the DenseLoRA layer files as imported: the layer changes between runs (and
    during them, while someone optimises it), so each block records exactly which version it measured."""
    files = [name for name in ("dense_lora/layer.py", "dense_lora/fused.py") if (REPO_ROOT / name).is_file()]
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return {
            "commit": _git("rev-parse", "--short", "HEAD"),
            "dirty": [line for line in _git("status", "--porcelain", "--", *files).splitlines() if line],
            "blobs": {Path(name).name: _git("hash-object", name)[:10] for name in files},
        }
    return {}


CODE_STATE = code_state()  # taken at import, next to the import of dense_lora.layer


def emulated_bf16_note(settings: Settings) -> str | None:
    """A warning for a bf16 run on a CPU that emulates bf16; None when the figures measure the methods."""
    if settings.device != "cpu" or settings.dtype != "bf16" or uses_meta(settings):
        return None
    warning = emulated_bf16_warning("they dominate every method's step; --dtype fp32 times the methods here")
    return warning and f"note: {warning}"


def machine_info() -> dict[str, Any]:
    """Machine and library versions, so rows from different runs can be told apart."""
    import peft
    import transformers

    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16": dense_lora.models.cpu_has_native_bf16(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "loadavg": os.getloadavg(),
        "git": CODE_STATE,
    }


def _cpu_features(info: dict[str, Any]) -> str:
    """``, AVX512, native bf16`` for the machine line of a CPU run (a GPU run: the instruction set only); empty for
    reports written before these were recorded."""
    if "cpu_capability" not in info:
        return ""
    if info["gpu"]:
        return f", {info['cpu_capability']}"
    bf16 = {True: "native bf16", False: "bf16 emulated", None: "bf16 support unknown"}[info["cpu_bf16"]]
    return f", {info['cpu_capability']}, {bf16}"


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _paired(result: MethodResult) -> str:
    """The paired ratio with its interquartile range and the 95% interval of the median (reports written before
    it was computed have none), e.g. ``1.02 (0.98–1.05; 1.00–1.04)``."""
    if result.paired_ratio_to_lora is None or result.paired_ratio_quartiles is None:
        return "–"
    first, third = result.paired_ratio_quartiles
    interval = ""
    if result.paired_ratio_ci95 is not None:
        interval = "; {:.2f}–{:.2f}".format(*result.paired_ratio_ci95)
    return f"{result.paired_ratio_to_lora:.2f} ({first:.2f}–{third:.2f}{interval})"


def markdown_rows(settings: Settings, results: list[MethodResult]) -> list[str]:
    rows = []
    for res in results:
        if res.error:
            rows.append(
                f"| {res.method} | {'on' if res.checkpointing else 'off'} | not measured: {res.error[:120]} |"
            )
            continue
        rows.append(
            "| "
            + " | ".join(
                [
                    res.method,
                    "on" if res.checkpointing else "off",
                    _fmt(res.median_step_s, ".3f"),
                    _fmt(res.ratio_to_lora, ".2f"),
                    _paired(res),
                    _fmt(res.median_cpu_s, ".3f"),
                    _fmt(res.cpu_ratio_to_lora, ".2f"),
                    f"{res.flops / 1e9:.1f}",
                    f"{res.saved_bytes_per_token / KIB:.0f}",
                    f"{res.saved_bytes_fixed / 2**20:.1f}",
                    _fmt(
                        None
                        if res.saved_over_frozen_per_token is None
                        else res.saved_over_frozen_per_token / KIB,
                        ".0f",
                    ),
                    _fmt(res.saved_over_frozen_ratio_to_lora, ".2f"),
                    _fmt(res.step_peak_mib, ".0f") + " / " + _fmt(res.peak_mib, ".0f"),
                    _fmt(res.tokens_per_s, ".0f"),
                    _fmt(res.mfu * 100 if res.mfu is not None else None, ".1f"),
                    f"{res.trainable_params:,}",
                ]
            )
            + " |"
        )
    return rows


TABLE_HEADER = (
    "| method | ckpt | median step s | × LoRA | paired × LoRA (IQR; 95% CI of the median) | median CPU s | CPU × LoRA | GFLOP fwd+bwd "
    "| saved KiB/token | of which fixed MiB | over frozen KiB/token | over frozen × LoRA | peak MiB step / process "
    "| tokens/s | MFU % | trainable |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def render_block(report: dict[str, Any]) -> str:
    """One markdown block for a JSON report: a heading with machine, versions, load, code version and command,
    then a row per method and checkpointing setting."""
    info, runs = report["machine"], report["runs"]
    settings = Settings(**{"dropout": 0.0, **runs[0]["settings"]})  # reports before --dropout measured 0
    results = [MethodResult(**res) for run in runs for res in run["results"]]
    start_load = report.get("loadavg_start")
    load = f"{start_load[0]:.2f} at start, " if start_load else ""
    git = info.get("git") or {}
    hashes = ", ".join(f"{name} {sha}" for name, sha in git.get("blobs", {}).items())
    memory_note = "CUDA max_memory_allocated" if settings.device.startswith("cuda") else "RSS high-water"
    date = dt.datetime.fromisoformat(report["date"]).strftime("%Y-%m-%d %H:%M %Z")
    block = [
        "",
        f"### {date} — {settings.model}, {settings.dtype}, batch {settings.batch}×{settings.seq}, r={settings.r}, "
        f"QKVUD, dropout {settings.dropout:g}"
        + (", torch.compile" if settings.compile else "")
        + (", bf16 autocast" if settings.autocast else ""),
        "",
        f"- command: `{report['command']}`",
        f"- machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads)"
        + _cpu_features(info)
        + (f", GPU {info['gpu']}" if info["gpu"] else ", no GPU")
        + f"; load average {load}{info['loadavg'][0]:.2f} at end",
        f"- versions: torch {info['torch']}, transformers {info['transformers']}, peft {info['peft']}, "
        f"python {info['python']}; code: commit {git.get('commit', '?')}"
        + (f", blobs {hashes}" if hashes else "")
        + (" (uncommitted changes)" if git.get("dirty") else ""),
        f"- repeats {settings.repeats} after {settings.warmup} warm-up; peak memory: {memory_note}"
        + ("; meta device: counts only" if uses_meta(settings) else ""),
        "",
        TABLE_HEADER,
        *markdown_rows(settings, results),
    ]
    return "\n".join(block) + "\n"


def append_results(path: Path, report: dict[str, Any]) -> None:
    """Append the run's block to the results file (created with a title when missing)."""
    if not path.exists():
        path.write_text(
            "# Training-step benchmark results\n\nWritten by `bench/train_step.py`; columns are "
            "explained in bench/README.md.\n"
        )
    with path.open("a") as handle:
        handle.write(render_block(report))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = StrictArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="tiny")
    parser.add_argument("--r", type=positive_int, default=32)
    parser.add_argument("--lora_alpha", type=float, default=None, help="default 2·r (the paper's setting)")
    parser.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated subset of {METHODS}"
    )
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default bf16 (fp32 for --model tiny)")
    parser.add_argument("--batch", type=positive_int, default=2)
    parser.add_argument("--seq", type=positive_int, default=128)
    parser.add_argument("--checkpointing", choices=("off", "on", "both"), default="off")
    parser.add_argument("--repeats", type=non_negative_int, default=10)
    parser.add_argument("--warmup", type=non_negative_int, default=3)
    parser.add_argument(
        "--compile", action="store_true", help="time torch.compile'd models (warm-up compiles)"
    )
    parser.add_argument(
        "--autocast",
        action="store_true",
        help="run every step under bf16 autocast, as finetune.py --bf16 trains (peft LoRA then computes in bf16)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dropout",
        type=dropout_rate,
        default=0.05,
        help="adapter dropout of every method (default: the recipe's 0.05)",
    )
    parser.add_argument("--device", default=None, help="default cuda when available, else cpu")
    parser.add_argument(
        "--peak_tflops", type=float, default=989.0, help="device peak for MFU (H100 bf16 dense)"
    )
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON output (default bench/out/<timestamp>.json)"
    )
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="markdown file to append to")
    parser.add_argument("--no_results", action="store_true", help="do not append to the markdown file")
    parser.add_argument("--no_memory", action="store_true", help="skip the per-method memory subprocesses")
    parser.add_argument(
        "--render", type=existing_file, default=None, help="append the block of a saved JSON report and exit"
    )
    parser.add_argument("--_probe_memory", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_settings", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = sorted(set(method_list(args.methods)) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if args.device is not None:
        try:
            torch.device(args.device)
        except RuntimeError:
            parser.error(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)")
    for flag in ("out", "results"):
        if getattr(args, flag) is not None and getattr(args, flag).is_dir():
            parser.error(f"--{flag} {getattr(args, flag)} is a directory; give a file path")
    return args


def method_list(text: str) -> list[str]:
    """The methods of a comma-separated ``--methods`` value, in order."""
    return [m.strip() for m in text.split(",") if m.strip()]


def settings_for(args: argparse.Namespace, checkpointing: bool) -> Settings:
    methods = method_list(args.methods)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return Settings(
        model=args.model,
        r=args.r,
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2.0 * args.r,
        methods=methods,
        dtype=args.dtype or ("fp32" if args.model == "tiny" else "bf16"),
        batch=args.batch,
        seq=args.seq,
        checkpointing=checkpointing,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
        device=device,
        peak_tflops=args.peak_tflops,
        threads=args.threads or 0,
        dropout=args.dropout,
        compile=args.compile,
        autocast=args.autocast,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.render:
        append_results(args.results, json.loads(args.render.read_text()))
        return {}
    if args._probe_memory:
        settings = Settings(**json.loads(args._settings))
        if settings.threads:
            torch.set_num_threads(settings.threads)
        with step_autocast(settings):
            memory = peak_memory_probe(settings, args._probe_memory)
        print(json.dumps({**memory, "blobs": CODE_STATE.get("blobs")}))
        return {}
    command = "python bench/train_step.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    started_load = os.getloadavg()
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]

    def log(message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    runs = []
    all_results: list[MethodResult] = []
    if note := emulated_bf16_note(settings_for(args, modes[0])):  # the same for every checkpointing mode
        log(note)
    for checkpointing in modes:
        settings = settings_for(args, checkpointing)
        log(
            f"model {settings.model}, checkpointing {'on' if checkpointing else 'off'}, device {settings.device}"
            + (" (meta: counts only)" if uses_meta(settings) else "")
        )
        results = run_setting(settings, log, measure_memory=not args.no_memory)
        all_results += results
        runs.append({"settings": asdict(settings), "results": [asdict(r) for r in results]})
    info = machine_info()
    report = {
        "command": command,
        "machine": info,
        "date": dt.datetime.now().astimezone().isoformat(),
        "loadavg_start": started_load,
        "runs": runs,
    }
    out = args.out or REPO_ROOT / "bench" / "out" / f"{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    log(f"wrote {out}")
    if not args.no_results:
        append_results(args.results, report)
        log(f"appended to {args.results}")
    print("\n".join([TABLE_HEADER, *markdown_rows(settings_for(args, False), all_results)]))
    return report


if __name__ == "__main__":
    main()
