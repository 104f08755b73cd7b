"""peft's own generic test suite, run against DenseLoRA: users reach DenseLoRA through peft's API, so it must pass
the checks peft applies to its built-in methods, not only ours.

The tests of the installed peft version are taken from its source distribution at test time (``pip download
peft==<version> --no-binary :all:``), cached under ``~/.cache/dense_lora/peft-tests/<version>`` (or
``$DENSELORA_PEFT_TESTS_CACHE/<version>``); without network and cache the module is skipped, saying why.

peft's test classes are imported with their bodies unchanged and re-parametrised with DenseLoRA configs:

- ``TestPeftCustomModel`` (``test_custom_models.py``) on peft's MLP models (``CUSTOM_CASES``),
- ``TestMultipleActiveAdapters`` (same file) with two DenseLoRA adapters active at once,
- ``TestDecoderModels`` (``test_decoder_models.py``) on a tiny local ``LlamaForCausalLM`` (``DECODER_CONFIGS``;
  the hub model ids those tests name are unreachable here, so every decoder test runs on the local model), its
  merge tests on the Only Matrix variant (``DECODER_MERGEABLE_CONFIGS``) with peft's ``check_beft_config`` as
  meant (as shipped, it skips them for every method on LLaMA),
- ``TestSequenceClassificationModels`` (``test_seq_classifier.py``) on the same LLaMA with its classification head,
- ``TestPeftFeatureExtractionModel`` (``test_feature_extraction_models.py``) on a tiny local ``BertModel``, the
  encoder family those tests use,
- ``TestEncoderDecoderModels`` (``test_encoder_decoder_models.py``) on a tiny local BART,
- ``TestPeftConfig`` (``test_config.py``): saving, loading (forward-compatible: unknown keys warn), copying,
- ``TestAdapterTargeting`` (``test_other.py``): a second adapter's regex never adapts the first one's weights.

Selection, for a module CI runs on 2 cores (about 4 minutes): every generic test of those classes with every
DenseLoRA case, except the cross product of ``test_adapter_dtype_autocast`` (peft's dtype x autocast x low-cpu-mem
grid) and the decoder tests, which run on the three decoder configs that differ in code path (gelu, Freeze, mixed
granularity) rather than on all six; the other configs run there too through the custom-model cases.

Tests that check one method's own features, or behaviour DenseLoRA does not have by design, are listed in
``NOT_APPLICABLE`` with the reason; they are collected and reported as skipped. peft's bodies also skip
themselves for methods outside their whitelists (e.g. ``bias="all"``, Conv layers); those skips carry peft's reason.
Two helper bodies gate a feature DenseLoRA has (mixed-adapter batches) by a whitelist of config classes; they run
here with ``DenseLoraConfig`` resolved in place of the whitelisted class (``_with_whitelist``), nothing else changed.
"""

from __future__ import annotations

import atexit
import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    BartConfig,
    BertConfig,
    PretrainedConfig,
)

from dense_lora import DenseLoraConfig
from dense_lora.testing import tiny_llama_config

PEFT_VERSION = version("peft")
PACKAGE = "peft_upstream_tests"


def cache_dir() -> Path:
    root = (
        os.environ.get("DENSELORA_PEFT_TESTS_CACHE") or Path.home() / ".cache" / "dense_lora" / "peft-tests"
    )
    return Path(root) / PEFT_VERSION


def fetch_peft_tests(cache: Path) -> Path:
    """peft's ``tests/`` folder of the installed version, as an importable package; raises RuntimeError if unobtainable.

    Only the sdist's ``tests/`` members are extracted (with tarfile's "data" filter: no links out, no absolute paths).
    """
    package_dir = cache / PACKAGE
    if (package_dir / "testing_common.py").exists():
        return package_dir
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"peft-{PEFT_VERSION}.tar.gz"
    if not sdist.exists():
        command = [sys.executable, "-m", "pip", "download", f"peft=={PEFT_VERSION}", "--no-deps"]
        command += ["--no-binary", ":all:", "--disable-pip-version-check", "-q", "-d", str(cache)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise RuntimeError(f"pip download of the peft {PEFT_VERSION} sdist failed: {error}") from error
        if result.returncode != 0 or not sdist.exists():
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"cannot fetch the peft {PEFT_VERSION} sdist (its tests/): {tail[0]}")
    staging = Path(tempfile.mkdtemp(dir=cache))
    prefix = f"peft-{PEFT_VERSION}/tests/"
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(prefix) and m.name.count("/") == 2]
        archive.extractall(staging, members=members, filter="data")
    extracted = staging / prefix
    (extracted / "__init__.py").touch()
    if not (extracted / "testing_common.py").exists():
        raise RuntimeError(f"the peft {PEFT_VERSION} sdist has no tests/testing_common.py")
    extracted.rename(package_dir)
    shutil.rmtree(staging, ignore_errors=True)
    return package_dir


UPSTREAM_MODULES = (
    "testing_common",
    "test_custom_models",
    "test_decoder_models",
    "test_seq_classifier",
    "test_feature_extraction_models",
    "test_encoder_decoder_models",
    "test_config",
    "test_other",
)


def import_upstream(package_dir: Path) -> tuple[types.ModuleType, ...]:
    """Import peft's testing_common and test modules (UPSTREAM_MODULES) from the cached package.

    ``testing_common`` imports diffusers' StableDiffusionPipeline at module level, only for Stable Diffusion tests
    that do not apply to a Linear-only method; when diffusers is absent a placeholder stands in during the import.
    """
    sys.path.insert(0, str(package_dir.parent))
    placeholder = None
    try:
        importlib.import_module("diffusers")
    except ImportError:
        placeholder = types.ModuleType("diffusers")
        placeholder.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})
        sys.modules["diffusers"] = placeholder
    try:
        return tuple(importlib.import_module(f"{PACKAGE}.{name}") for name in UPSTREAM_MODULES)
    finally:
        if placeholder is not None and sys.modules.get("diffusers") is placeholder:
            del sys.modules["diffusers"]


try:
    common, custom, decoder, seq_cls, feature, seq2seq, config_tests, other = import_upstream(
        fetch_peft_tests(cache_dir())
    )
except (RuntimeError, ImportError) as error:
    pytest.skip(f"peft's own tests are not available: {error}", allow_module_level=True)


# --- DenseLoRA cases ----------------------------------------------------------------------------------------------
# peft's MLP: lin0 10 -> 20, lin1 20 -> 2. DenseLoRA's r is at most min(in, out), so cases that adapt lin1 use r=2.
CUSTOM_CASES = [
    ("MLP DenseLoRA gelu", "MLP", DenseLoraConfig, {"target_modules": ["lin0"], "r": 4}),
    (  # lora_alpha=2 (s = 1): peft's training tests use SGD at lr 0.5 on inputs up to 90; a purely linear
        # three-factor update at s = 4 diverges to NaN there (so would LoRA at that scale)
        "MLP DenseLoRA identity",
        "MLP",
        DenseLoraConfig,
        # r=2, alpha=4: at alpha=2 three SGD steps move M by less than the suite's 1e-4 tolerance (W_d starts at
        # zero, so M only gets gradient from the second step on); lin1 (20 -> 2) allows no larger r.
        {"target_modules": ["lin0", "lin1"], "r": 2, "lora_alpha": 4, "activation": "identity"},
    ),
    (
        "MLP DenseLoRA Freeze",
        "MLP",
        DenseLoraConfig,
        {"target_modules": ["lin0", "lin1"], "r": 2, "train_shared": False},
    ),
    (
        "MLP DenseLoRA lora_modules",
        "MLP",
        DenseLoraConfig,
        {"target_modules": ["lin0", "lin1"], "r": 2, "lora_alpha": 2, "lora_modules": ["lin1"]},
    ),
    (
        "MLP DenseLoRA dropout",
        "MLP",
        DenseLoraConfig,
        {"target_modules": ["lin0"], "r": 4, "lora_alpha": 4, "lora_dropout": 0.1},
    ),
    ("MLP DenseLoRA regex", "MLP", DenseLoraConfig, {"target_modules": "lin[0]", "r": 4}),
    (
        "MLP DenseLoRA modules_to_save",
        "MLP",
        DenseLoraConfig,
        {"target_modules": ["lin0"], "r": 4, "modules_to_save": ["lin1"]},
    ),
    (
        "MLP_LayerNorm DenseLoRA identity",
        "MLP_LayerNorm",
        DenseLoraConfig,
        # r=2, alpha=4: at alpha=2 three SGD steps move M by less than the suite's 1e-4 tolerance (W_d starts at
        # zero, so M only gets gradient from the second step on); lin1 (20 -> 2) allows no larger r.
        {"target_modules": ["lin0", "lin1"], "r": 2, "lora_alpha": 4, "activation": "identity"},
    ),
]
# Merging folds a weight matrix into W0: only the identity variant's update is one (the others are non-linear in x
# and refuse to merge, by design), so peft's merge tests run on the mergeable cases.
MERGEABLE_CASES = [
    *(case for case in CUSTOM_CASES if case[3].get("activation") == "identity"),
    (
        "MLP DenseLoRA identity lora_modules",
        "MLP",
        DenseLoraConfig,
        {
            "target_modules": ["lin0", "lin1"],
            "r": 2,
            "lora_alpha": 2,
            "activation": "identity",
            "lora_modules": ["lin1"],
        },
    ),
]
MERGE_TESTS = (
    "test_merge_layers",
    "test_merge_layers_fp16",
    "test_merge_layers_is_idempotent",
    "test_merge_layers_is_deterministic_in_train_mode",
    "test_safe_merge",
    "test_disable_adapters_with_merging",
    "test_delete_merged_adapter_raises_without_mutation",
    "test_delete_merged_adapter_only_rejects_the_merged_one",
    "test_forward_float16",  # the four forward tests end with a merge
    "test_forward_bfloat16",
    "test_forward_float16_no_autocast",
    "test_forward_bfloat16_no_autocast",
)
# Cases for peft's dtype x autocast x low-cpu-mem grid (24 runs a case): one per parameter layout.
DTYPE_CASES = [CUSTOM_CASES[0], CUSTOM_CASES[2], CUSTOM_CASES[3]]

# The local decoder: tiny_llama_config (hidden 64, GQA k/v 64 -> 32, up 64 -> 96, 3 layers), target_modules=None
# picks DenseLoRA's default for llama (q, k, v, up, down).
DECODER_CONFIGS = [
    (DenseLoraConfig, {"task_type": "CAUSAL_LM", "target_modules": None, "r": 8}),
    (DenseLoraConfig, {"task_type": "CAUSAL_LM", "target_modules": None, "r": 8, "train_shared": False}),
    (
        DenseLoraConfig,
        {
            "task_type": "CAUSAL_LM",
            "target_modules": None,
            "r": 8,
            "lora_modules": ["up_proj", "down_proj"],
            "layers_to_transform": [0, 2],
            "layers_pattern": "layers",
            "lora_dropout": 0.1,
        },
    ),
]
LOCAL_LLAMA_ID = "local/tiny-random-LlamaForCausalLM"
# The decoder's merge tests run on the Only Matrix variant, the one whose update is a weight matrix.
DECODER_MERGEABLE_CONFIGS = [
    (DenseLoraConfig, {"task_type": "CAUSAL_LM", "target_modules": None, "r": 8, "activation": "identity"}),
    (
        DenseLoraConfig,
        {
            "task_type": "CAUSAL_LM",
            "target_modules": None,
            "r": 8,
            "activation": "identity",
            "lora_modules": ["up_proj", "down_proj"],
        },
    ),
]
DECODER_MERGE_TESTS = (
    "test_merge_layers",
    "test_merge_layers_multi",
    "test_merge_layers_nan",
    "test_merge_layers_fp16",
)
# The same tiny LLaMA behind the sequence-classification head (peft adds the head, ``score``, to modules_to_save),
# with the default targets and with Freeze.
SEQ_CLS_CONFIGS = [
    (DenseLoraConfig, {"task_type": "SEQ_CLS", "target_modules": None, "r": 8}),
    (DenseLoraConfig, {"task_type": "SEQ_CLS", "target_modules": None, "r": 8, "train_shared": False}),
]


def gelu_and_only_matrix(task_type: str, targets: list[str]) -> list[tuple[type, dict]]:
    """The default variant and Only Matrix (the one that can merge) at r=8, for one task type and target list."""
    gelu = {"task_type": task_type, "target_modules": targets, "r": 8}
    return [(DenseLoraConfig, gelu), (DenseLoraConfig, {**gelu, "activation": "identity"})]


# peft runs its encoder-decoder tests on T5 and BART: here a tiny local BART, adapted on q_proj and v_proj (the
# encoder's, the decoder's and its cross-attention's share one W_e/W_d pair a type: all are d_model -> d_model).
LOCAL_BART_ID = "local/tiny-random-BartForConditionalGeneration"
LOCAL_BART_CONFIG = BartConfig(
    vocab_size=128,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=40,
    decoder_ffn_dim=40,
    max_position_embeddings=64,
)
SEQ2SEQ_CONFIGS = gelu_and_only_matrix("SEQ_2_SEQ_LM", ["q_proj", "v_proj"])
# peft runs its feature-extraction tests on encoders (BERT, RoBERTa, DeBERTa): here a tiny local BERT, adapted on
# query and value (peft's LoRA default for BERT), with GELU and as Only Matrix (which can merge).
LOCAL_BERT_ID = "local/tiny-random-BertModel"
LOCAL_BERT_CONFIG = BertConfig(
    vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40
)
FEATURE_EXTRACTION_CONFIGS = gelu_and_only_matrix("FEATURE_EXTRACTION", ["query", "value"])

MULTIPLE_ACTIVE_CASES = [
    (
        "DenseLoRA Same",
        "denselora",
        DenseLoraConfig,
        {"target_modules": ["lin0"], "r": 4, "init_weights": False},
        {"target_modules": ["lin0"], "r": 4, "init_weights": False},
    ),
    (
        "DenseLoRA Different",
        "denselora",
        DenseLoraConfig,
        {"target_modules": ["lin0"], "r": 4, "init_weights": False},
        {"target_modules": ["lin1"], "r": 2, "init_weights": False},
    ),
    (
        "DenseLoRA identity + lora_modules",
        "denselora",
        DenseLoraConfig,
        {"target_modules": ["lin0", "lin1"], "r": 2, "activation": "identity", "init_weights": False},
        {"target_modules": ["lin0", "lin1"], "r": 2, "lora_modules": ["lin1"], "init_weights": False},
    ),
]
MULTIPLE_ACTIVE_MERGEABLE = [
    (
        "DenseLoRA identity Different",
        "denselora",
        DenseLoraConfig,
        {"target_modules": ["lin0"], "r": 4, "activation": "identity", "init_weights": False},
        {"target_modules": ["lin1"], "r": 2, "activation": "identity", "init_weights": False},
    ),
    (
        "DenseLoRA identity + identity lora_modules",
        "denselora",
        DenseLoraConfig,
        {"target_modules": ["lin0", "lin1"], "r": 2, "activation": "identity", "init_weights": False},
        {
            "target_modules": ["lin0", "lin1"],
            "r": 2,
            "activation": "identity",
            "lora_modules": ["lin1"],
            "init_weights": False,
        },
    ),
]

# peft test name -> why it does not apply to DenseLoRA. Collected and reported as skipped with this reason.
NOT_APPLICABLE = {
    "test_disable_adapter_with_bias_warns": 'bias="all"/"lora_only": DenseLoRA trains no biases (bias="none" only)',
    "test_adding_multiple_adapters_with_bias_raises": 'needs bias="all"; DenseLoraConfig only accepts bias="none"',
    "test_weighted_combination_of_adapters": "add_weighted_adapter is LoRA/IA3's API (SVD/cat of B A); DenseLoRA "
    "adapters share W_e/W_d per type and have no such combination",
    "test_lora_conversion": "LoRA conversion is for methods with a low-rank ΔW; DenseLoRA's update is non-linear "
    "in x except for the identity variant",
    "test_prompt_tuning_text_prepare_for_training": "prompt learning only",
    "test_prompt_tuning_sample_vocab_prepare_for_training": "prompt learning only",
    "test_training_prompt_learning_tasks": "prompt learning only",
    "test_prompt_learning_forward_with_inputs_embeds": "prompt learning only (and loads a hub model by name)",
    "test_passing_input_embeds_works": "prompt learning only (checks virtual-token handling of inputs_embeds)",
    "test_set_requires_grad_prompt_learning_raises": "prompt learning only",
    "test_prompt_learning_with_gradient_checkpointing": "prompt learning only (and needs the hub tokenizer)",
    "test_multiple_adapters_mixed_modules_to_save": "builds its adapters at the config's default r (16) on peft's "
    "10 -> 20 MLP; DenseLoRA refuses r above min(in, out) (its r x r M and shared W_e/W_d would be rank-deficient)",
    "test_multiple_adapters_mixed_modules_to_save_order_switched": "same as test_multiple_adapters_mixed_modules_"
    "to_save (default r=16 on a 10 -> 20 layer)",
}

# peft test name -> the hub files it loads by name. Tests run without network (no test may download), so these are
# reported as skipped; each one's local counterpart runs (test_save_pretrained, test_from_json_file, ...).
NEEDS_HUB = {
    name: "loads a LoRA adapter config from the hub (peft-internal-testing/tiny-opt-lora-revision)"
    for name in (
        "test_from_pretrained",
        "test_from_pretrained_cache_dir",
        "test_save_pretrained_with_runtime_config",
    )
}


# --- re-parametrisation -------------------------------------------------------------------------------------------
def _argnames(mark: pytest.Mark) -> tuple[str, ...]:
    names = mark.args[0]
    if isinstance(names, str):
        names = names.split(",")
    return tuple(name.strip() for name in names)


CUSTOM_ARGNAMES = ("test_name", "model_id", "config_cls", "config_kwargs")
REPLACEMENTS = {
    CUSTOM_ARGNAMES: CUSTOM_CASES,
    ("config_cls", "config_kwargs"): DECODER_CONFIGS,
    ("model_id",): [LOCAL_LLAMA_ID],
    ("config_cls",): [DenseLoraConfig],
    ("config_class", "mandatory_kwargs"): [(DenseLoraConfig, {})],
    ("test_name", "tuner_method", "config_cls", "config_kwargs_1", "config_kwargs_2"): MULTIPLE_ACTIVE_CASES,
}
# Test bodies that gate a feature DenseLoRA has by a whitelist of config class names: those names resolve to
# DenseLoraConfig in the copy (the decoder tests of mixed-adapter batches skip anything but LoraConfig).
WHITELISTED = {
    "test_mixed_adapter_batches": ("LoraConfig",),
    "test_generate_with_mixed_adapter_batches": ("LoraConfig",),
}
# Marks that decide applicability: a test parametrised by none of these is method-specific (LoRA, IA3, ...).
CASE_ARGNAMES = {names for names in REPLACEMENTS if {"config_cls", "config_class"} & set(names)}


def reparametrised(
    function: types.FunctionType, overrides: dict[tuple[str, ...], list]
) -> types.FunctionType | None:
    """A copy of one of peft's test functions with its config parametrisation swapped for DenseLoRA's.

    Returns None for tests not parametrised by a config (they test one method's own feature).
    """
    marks = list(getattr(function, "pytestmark", []))
    params = [mark for mark in marks if mark.name == "parametrize"]
    if not any(_argnames(mark) in CASE_ARGNAMES for mark in params):
        return None
    replacements = {**REPLACEMENTS, **overrides}
    new_marks = []
    for mark in marks:
        names = _argnames(mark) if mark.name == "parametrize" else ()
        if names in replacements:
            mark = pytest.mark.parametrize(mark.args[0], replacements[names]).mark
        new_marks.append(mark)
    namespace = function.__globals__
    if function.__name__ in WHITELISTED:
        namespace = {**namespace, **dict.fromkeys(WHITELISTED[function.__name__], DenseLoraConfig)}
    if "check_beft_config" in function.__code__.co_names:
        namespace = {**namespace, "check_beft_config": check_beft_config}
    copy = types.FunctionType(
        function.__code__, namespace, function.__name__, function.__defaults__, function.__closure__
    )
    copy.__dict__.update({k: v for k, v in function.__dict__.items() if k != "pytestmark"})
    copy.__qualname__ = function.__qualname__
    reason = NOT_APPLICABLE.get(function.__name__)
    if reason:
        new_marks.append(pytest.mark.skip(reason=f"not applicable to DenseLoRA: {reason}").mark)
    elif function.__name__ in NEEDS_HUB:
        new_marks.append(
            pytest.mark.skip(reason=f"needs the Hugging Face hub: {NEEDS_HUB[function.__name__]}").mark
        )
    copy.pytestmark = new_marks
    return copy


def check_beft_config(config_cls: type, model_id: str, config_kwargs: dict) -> None:
    """peft 0.21's helper of the decoder merge tests, as meant: it tests ``isinstance(config_cls, BeftConfig)`` on a
    class, which is never true, so its "LLaMA layers have no bias term" skip (a BEFT concern) skips those tests for
    every method on every LLaMA. Only a BEFT config is its business; for any other config it does nothing."""
    if config_cls.__name__ == "BeftConfig":
        decoder.check_beft_config(config_cls, model_id, config_kwargs)


def adapt_class(
    upstream: type,
    overrides: dict[str, dict[tuple[str, ...], list]] | None = None,
    everywhere: dict[tuple[str, ...], list] | None = None,
) -> dict:
    """Namespace for a subclass of a peft test class: every test re-parametrised or removed.

    ``everywhere`` replaces parametrisations in every test of the class (e.g. a task type's configs),
    ``overrides`` in the named tests only."""
    namespace: dict = {}
    for name in dir(upstream):
        if not name.startswith("test_"):
            continue
        function = getattr(upstream, name)
        if not isinstance(function, types.FunctionType):
            continue
        namespace[name] = reparametrised(function, {**(everywhere or {}), **(overrides or {}).get(name, {})})
    return namespace


def _with_whitelist(method: types.FunctionType, names: tuple[str, ...]) -> types.FunctionType:
    """peft's helper body unchanged, with the whitelisted config class names resolving to DenseLoraConfig."""
    namespace = {**method.__globals__, **dict.fromkeys(names, DenseLoraConfig)}
    return types.FunctionType(
        method.__code__, namespace, method.__name__, method.__defaults__, method.__closure__
    )


# --- the local decoder --------------------------------------------------------------------------------------------
_LOCAL_DIR = Path(tempfile.mkdtemp(prefix="dense-lora-tiny-llama-"))
atexit.register(shutil.rmtree, _LOCAL_DIR, True)


def local_stand_in(
    auto_class: type, model_id: str = LOCAL_LLAMA_ID, config: PretrainedConfig | None = None
) -> type:
    """Stands in for ``auto_class`` (AutoModelForCausalLM, ...): ``model_id``, where peft's tests name hub models,
    resolves to one tiny local model (the tiny LLaMA unless ``config`` says otherwise), saved once per head with
    fixed weights so that every load of it is the same model. Folders the tests saved themselves load as usual."""

    folder = _LOCAL_DIR / f"{auto_class.__name__}-{model_id.replace('/', '--')}"

    class LocalModel:
        @classmethod
        def from_pretrained(cls, name: str, *args, **kwargs):
            if Path(name).is_dir():
                return auto_class.from_pretrained(name, *args, **kwargs)
            if name != model_id:
                raise ValueError(f"no local stand-in for {name!r}")
            if not (folder / "config.json").exists():
                torch.manual_seed(0)
                auto_class.from_config(config or tiny_llama_config()).save_pretrained(folder)
            model = auto_class.from_pretrained(folder, *args, **kwargs)
            model.config._name_or_path = model.name_or_path = model_id
            return model

    LocalModel.__name__ = LocalModel.__qualname__ = f"Local{auto_class.__name__}"
    return LocalModel


# --- the test classes ---------------------------------------------------------------------------------------------
TestDenseLoraCustomModels = type(
    "TestDenseLoraCustomModels",
    (custom.TestPeftCustomModel,),
    adapt_class(
        custom.TestPeftCustomModel,
        {
            "test_adapter_dtype_autocast": {CUSTOM_ARGNAMES: DTYPE_CASES},
            **{name: {CUSTOM_ARGNAMES: MERGEABLE_CASES} for name in MERGE_TESTS},
        },
    ),
)

_multiple_argnames = ("test_name", "tuner_method", "config_cls", "config_kwargs_1", "config_kwargs_2")
TestDenseLoraMultipleActiveAdapters = type(
    "TestDenseLoraMultipleActiveAdapters",
    (custom.TestMultipleActiveAdapters,),
    adapt_class(
        custom.TestMultipleActiveAdapters,
        {
            name: {_multiple_argnames: MULTIPLE_ACTIVE_MERGEABLE}
            for name in (
                "test_merge_layers_multi",
                "test_multiple_active_adapters_merge_and_unmerge",
                "test_sequential_merge_matches_batch_merge",
                "test_unmerge_after_sequential_merge_restores_base",
            )
        },
    ),
)

_decoder_namespace = adapt_class(
    decoder.TestDecoderModels,
    {name: {("config_cls", "config_kwargs"): DECODER_MERGEABLE_CONFIGS} for name in DECODER_MERGE_TESTS},
)
# peft's helpers of the mixed-adapter-batch tests, with DenseLoRA in their whitelists (decoder and encoder-decoder)
MIXED_BATCH_HELPERS = {
    "_test_mixed_adapter_batches": _with_whitelist(
        common.PeftCommonTester._test_mixed_adapter_batches, ("LoraConfig", "RoadConfig")
    ),
    "_test_generate_with_mixed_adapter_batches_and_beam_search": _with_whitelist(
        common.PeftCommonTester._test_generate_with_mixed_adapter_batches_and_beam_search, ("LoraConfig",)
    ),
}
_decoder_namespace.update(transformers_class=local_stand_in(AutoModelForCausalLM), **MIXED_BATCH_HELPERS)
TestDenseLoraDecoderModels = type(
    "TestDenseLoraDecoderModels", (decoder.TestDecoderModels,), _decoder_namespace
)

TestDenseLoraSequenceClassification = type(
    "TestDenseLoraSequenceClassification",
    (seq_cls.TestSequenceClassificationModels,),
    {
        **adapt_class(
            seq_cls.TestSequenceClassificationModels,
            everywhere={("config_cls", "config_kwargs"): SEQ_CLS_CONFIGS},
        ),
        "transformers_class": local_stand_in(AutoModelForSequenceClassification),
    },
)
TestDenseLoraFeatureExtraction = type(
    "TestDenseLoraFeatureExtraction",
    (feature.TestPeftFeatureExtractionModel,),
    {
        **adapt_class(
            feature.TestPeftFeatureExtractionModel,
            {"test_merge_layers": {("config_cls", "config_kwargs"): FEATURE_EXTRACTION_CONFIGS[1:]}},
            everywhere={
                ("config_cls", "config_kwargs"): FEATURE_EXTRACTION_CONFIGS,
                ("model_id",): [LOCAL_BERT_ID],
            },
        ),
        "transformers_class": local_stand_in(AutoModel, LOCAL_BERT_ID, LOCAL_BERT_CONFIG),
    },
)
TestDenseLoraEncoderDecoder = type(
    "TestDenseLoraEncoderDecoder",
    (seq2seq.TestEncoderDecoderModels,),
    {
        **adapt_class(
            seq2seq.TestEncoderDecoderModels,
            {"test_merge_layers": {("config_cls", "config_kwargs"): SEQ2SEQ_CONFIGS[1:]}},
            everywhere={("config_cls", "config_kwargs"): SEQ2SEQ_CONFIGS, ("model_id",): [LOCAL_BART_ID]},
        ),
        "transformers_class": local_stand_in(AutoModelForSeq2SeqLM, LOCAL_BART_ID, LOCAL_BART_CONFIG),
        **MIXED_BATCH_HELPERS,
    },
)
TestDenseLoraConfig = type(
    "TestDenseLoraConfig", (config_tests.TestPeftConfig,), adapt_class(config_tests.TestPeftConfig)
)
# An adapter added next to another must not adapt the first one's modules, even when a regex reaches them: the
# per-layer M (a ParameterDict on the adapted layer) and the shared W_e/W_d (owned by the tuner).
SELF_TARGETING_CONFIGS = [
    (DenseLoraConfig, {"target_modules": "l1.*", "r": 4}),
    (DenseLoraConfig, {"target_modules": "(l1|denselora_encoder|denselora_decoder).*", "r": 4}),
    (DenseLoraConfig, {"target_modules": ".*(l1|denselora_M).*", "r": 4, "activation": "identity"}),
]
TestDenseLoraAdapterTargeting = type(
    "TestDenseLoraAdapterTargeting",
    (other.TestAdapterTargeting,),
    adapt_class(
        other.TestAdapterTargeting, everywhere={("config_cls", "config_kwargs"): SELF_TARGETING_CONFIGS}
    ),
)
