"""Loading base models and tokenizers: the one place that knows where models come from.

A ``--base_model`` is an alias (``smollm2``, ``llama3-8b``, ...), a local HF folder or a hub id
(:func:`resolve_model_path`); :func:`load_base_model` loads it as the frozen base, optionally in 8-bit or
4-bit NF4 through bitsandbytes as in the LLM-Adapters recipes, and :func:`load_tokenizer` makes sure its
tokenizer can pad. The SmolLM2 GGUF conversion lives in :mod:`dense_lora.smollm2` and the weight-free
published architectures in :mod:`dense_lora.published`; their names are re-exported here for callers
that import them from this module.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dense_lora.published import PUBLISHED_CONFIGS, build_model_on_meta, published_config
from dense_lora.smollm2 import smollm2_path

__all__ = [
    "MODEL_ALIASES",
    "PUBLISHED_CONFIGS",
    "build_model_on_meta",
    "load_base_model",
    "load_tokenizer",
    "published_config",
    "resolve_model_path",
    "smollm2_path",
]

# Short names → a function giving the path or hub id (functions, because resolving SmolLM2 may convert it).
MODEL_ALIASES: dict[str, Callable[[], str | Path]] = {
    "smollm2": smollm2_path,
    "smollm2-135m-instruct": smollm2_path,
    "llama2-7b": lambda: "meta-llama/Llama-2-7b-hf",
    "llama3-8b": lambda: "meta-llama/Meta-Llama-3-8B",
}


def _looks_like_local_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else with path syntax is meant as a local folder."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name


def resolve_model_path(name_or_path: str | os.PathLike[str]) -> str:
    """Turn an alias, local folder or hub id into what ``from_pretrained`` should get.

    A missing local path fails here with one line instead of a long hub-lookup traceback; hub ids are passed
    through untouched so users with internet access can still use them.
    """
    name = os.fspath(name_or_path)
    alias = MODEL_ALIASES.get(name.lower())
    if alias is not None:
        return str(alias())
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if isinstance(name_or_path, os.PathLike) or _looks_like_local_path(name):
        raise FileNotFoundError(f"model path does not exist: {path}")
    return name


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def cpu_has_native_bf16() -> bool | None:
    """Whether oneDNN has bf16 kernels for this CPU (AVX512 or newer: AVX512-BF16, AMX, AVX2-VNNI-2; its own test);
    None where the torch build cannot say (no oneDNN). Without them bf16 matrix products are emulated: a
    SmolLM2-135M training step (2 x 128 tokens, 2 cores, an AVX2-only AMD EPYC) took 56 s in bf16 against 2.5 s in
    float32."""
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if supported is None or not torch.backends.mkldnn.is_available():
        return None
    return bool(supported())


def emulated_bf16_warning(remedy: str) -> str | None:
    """The one-line warning for bf16 work on a CPU known to emulate bf16 (``remedy``: what to do instead); None
    when the CPU has bf16 kernels or cannot tell (no warning on a guess)."""
    if cpu_has_native_bf16() is not False:
        return None
    return (
        f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16: bf16 matrix products are "
        f"emulated here, tens of times slower than float32; {remedy}"
    )


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """``"auto"`` keeps the checkpoint dtype on GPU but means float32 on CPU, where bf16/fp16 matmuls are slow
    or unsupported and the tests compare logits exactly."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return "auto" if torch.cuda.is_available() else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(
            f"dtype must be 'auto', {', '.join(map(repr, _DTYPES))} or a torch.dtype, got {dtype!r}"
        )
    return _DTYPES[dtype]


def _keep_4bit_layers_trainable_on_cpu(model: PreTrainedModel) -> None:
    """Turn off bitsandbytes' AVX512-BF16 CPU inference path for 4-bit layers.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a ``Linear4bit`` weight in place on its first eval
    forward under ``no_grad``. That path crashes for layers whose input size is not a multiple of the 64-wide
    quantization block, and once repacked the layer has no autograd kernel, so training after an evaluation
    silently loses the gradient through the frozen weight. The generic path is correct everywhere (and GPU
    layers never take the CPU path), so we always use it.
    """
    import bitsandbytes as bnb  # imported here: only 4-bit loads need it

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_base_model(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype = "auto",
    load_8bit: bool = False,
    load_4bit: bool = False,
    device_map: str | dict[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load a causal LM as the frozen base for DenseLoRA, optionally quantized with bitsandbytes.

    8-bit uses LLM.int8(); 4-bit uses NF4 with double quantization and computes in ``dtype`` (bf16 when the
    dtype is left to the checkpoint), the QLoRA settings. Remote code runs only when explicitly allowed.
    """
    if load_8bit and load_4bit:
        raise ValueError("load_8bit and load_4bit are mutually exclusive; pass at most one")
    path = resolve_model_path(name_or_path)
    torch_dtype = _resolve_dtype(dtype)
    quantization_config = None
    if load_8bit:
        quantization_config = BitsAndBytesConfig(load_in_8bit=True)
    elif load_4bit:
        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype if isinstance(torch_dtype, torch.dtype) else torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch_dtype,
        quantization_config=quantization_config,
        device_map=device_map,
        trust_remote_code=trust_remote_code,
    )
    if load_4bit:
        _keep_4bit_layers_trainable_on_cpu(model)
    return model


def load_tokenizer(
    name_or_path: str | os.PathLike[str], *, padding_side: str = "right", trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Load the tokenizer and make sure it can pad batches.

    Tokenizers without a pad token (LLaMA-3) reuse an existing token instead of adding one, which would mean
    resizing the embeddings: the unk token when there is one (as LLM-Adapters does with id 0 on LLaMA), else
    EOS. Either is safe because padding is never learned from nor attended to: the training collator pads
    labels with -100 and the attention mask hides padded positions. (It follows that padding must be masked
    by position, never by comparing token ids with ``pad_token_id``, or real EOS tokens would be masked too.)
    Right padding is the training default; batched generation wants ``padding_side="left"``. Code shipped with
    the tokenizer runs only with ``trust_remote_code`` (as for the model).
    """
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(name_or_path), trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None:
        fallback = tokenizer.unk_token or tokenizer.eos_token
        if fallback is None:
            raise ValueError(f"tokenizer of {name_or_path} has no pad, unk or EOS token to pad with")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = padding_side
    return tokenizer
