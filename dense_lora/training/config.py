"""TrainConfig: every setting of a run, checked on construction, and its conversion from CLI flags.

Why the checks live here: a run must refuse impossible input before anything is loaded or written, and
the messages name the flags (``--lora_r ...``) because the CLI prints them as the one line a user sees.
``dense_lora.cli`` reads this file's TrainConfig fields statically (with :mod:`ast`) to build
``finetune.py``'s flags, so the field annotations are also the flags' types.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dense_lora import DEFAULT_TARGET_MODULES
from dense_lora.config import ACTIVATIONS
from dense_lora.runtime import DenseLoRAError

METHODS = ("denselora", "lora", "dora", "vera")
ADAPTER_NAMES = METHODS  # the name of --method before it was renamed; kept for callers that import it
# Config fields that do not change what a run computes, so two runs differing only in them are the same run.
BOOKKEEPING_FIELDS = ("output_dir", "resume_from_checkpoint", "overwrite", "wandb_project", "adapter_name")
POSITIVE_INT_FIELDS = (
    "batch_size",
    "micro_batch_size",
    "cutoff_len",
    "eval_step",
    "save_step",
    "lora_r",
    "logging_steps",
    "save_total_limit",
)
NON_NEGATIVE_INT_FIELDS = ("val_set_size", "warmup_steps", "seed")


class TrainError(DenseLoRAError):
    """An input or setup problem the user can fix; the CLI prints it as one line and exits with status 2."""


@dataclass
class TrainConfig:
    """Every setting of a run. Field names are the CLI flags; defaults are the LLM-Adapters ones."""

    base_model: str = ""
    data_path: str = "ft-training_set/commonsense_170k.json"
    output_dir: str = "./denselora-out"
    method: str = "denselora"
    # Deprecated spelling of --method: in peft an adapter name names an adapter, not a method.
    adapter_name: str | None = None
    # training hyperparameters
    batch_size: int = 16
    micro_batch_size: int = 4
    num_epochs: float = 3
    max_steps: int = -1
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    cutoff_len: int = 256
    val_set_size: int = 120
    eval_step: int = 80
    save_step: int = 80
    save_total_limit: int = 3
    logging_steps: int = 10
    load_best_model_at_end: bool = True
    train_on_inputs: bool = True
    group_by_length: bool = False
    # padding-free micro-batches (dense_lora/packing.py); off by itself where attention cannot honour boundaries,
    # and off when --padding_side left is given without it (config_from_flags)
    packing: bool = True
    padding_side: str = "right"
    data_fraction: float = 1.0
    seed: int = 42
    # adapter hyperparameters
    lora_r: int = 32
    lora_alpha: float | None = None
    lora_dropout: float = 0.05
    target_modules: Sequence[str] | str | None = None
    activation: str = "gelu"
    train_shared: bool = True
    lora_modules: Sequence[str] | str | None = None
    # precision, memory and infrastructure
    bf16: bool = False
    fp16: bool = False
    load_8bit: bool = False
    load_4bit: bool = False
    use_gradient_checkpointing: bool = False
    # torch.compile the model (the Trainer's torch_compile): minutes of compilation first; slower than eager on CPU
    # (measured in docs/training.md); part of what a run computes (compiled dropout draws other masks)
    torch_compile: bool = False
    trust_remote_code: bool = False
    resume_from_checkpoint: str | bool | None = None
    overwrite: bool = False
    wandb_project: str | None = None

    def __post_init__(self) -> None:
        """Normalise CLI values (fire passes '1e-4' as float, 'a,b' as a tuple) and reject impossible ones.

        The checks run in a fixed order, so a command with several mistakes always reports the same one.
        """
        _normalise(self)
        _check_counts(self)
        _check_rates(self)
        _check_alpha(self)
        _resolve_method(self)
        _check_choices(self)
        _check_checkpoint_cadence(self)

    def fingerprint(self) -> dict[str, Any]:
        """The fields that decide what a run computes: equal fingerprints mean a folder may be reused."""
        values = dataclasses.asdict(self)
        return {key: value for key, value in values.items() if key not in BOOKKEEPING_FIELDS}


# --------------------------------------------------------------------------------------------------
# The checks of TrainConfig.__post_init__, in the order it runs them
# --------------------------------------------------------------------------------------------------


def _normalise(config: TrainConfig) -> None:
    """Booleans from their text spellings, module lists from any of their spellings, default targets."""
    for item in dataclasses.fields(config):
        if item.type == "bool":
            setattr(config, item.name, _as_bool(getattr(config, item.name), item.name))
    config.target_modules = _name_list(config.target_modules, "target_modules")
    config.lora_modules = _name_list(config.lora_modules, "lora_modules")
    if config.target_modules is None:
        config.target_modules = list(DEFAULT_TARGET_MODULES)


def _check_counts(config: TrainConfig) -> None:
    """Sizes, steps and the seed are integers: positive, non-negative, or -1 for max_steps (use epochs)."""
    for name in POSITIVE_INT_FIELDS:
        require_positive_int(name, getattr(config, name))
    for name in NON_NEGATIVE_INT_FIELDS:
        value = getattr(config, name)
        _require(is_int(value) and value >= 0, f"--{name} must be a non-negative integer, got {value!r}")
    _require(
        is_int(config.max_steps) and (config.max_steps > 0 or config.max_steps == -1),
        f"--max_steps must be a positive integer or -1 (use num_epochs), got {config.max_steps!r}",
    )


def _check_rates(config: TrainConfig) -> None:
    """Finite real numbers in the ranges the optimiser and the adapter accept."""
    _require(
        _is_number(config.num_epochs) and config.num_epochs > 0,
        f"--num_epochs must be positive, got {config.num_epochs!r}",
    )
    _require(
        _is_number(config.learning_rate) and config.learning_rate > 0,
        f"--learning_rate must be positive, got {config.learning_rate!r}",
    )
    _require(
        _is_number(config.weight_decay) and config.weight_decay >= 0,
        f"--weight_decay must be non-negative, got {config.weight_decay!r}",
    )
    _require(
        _is_number(config.lora_dropout) and 0 <= config.lora_dropout < 1,
        f"--lora_dropout must be in [0, 1), got {config.lora_dropout!r}",
    )
    _require(
        _is_number(config.data_fraction) and 0 < config.data_fraction <= 1,
        f"--data_fraction must be in (0, 1], got {config.data_fraction!r}",
    )


def _check_alpha(config: TrainConfig) -> None:
    """lora_alpha defaults to the paper's 2r; whatever it is, it must be positive."""
    if config.lora_alpha is None:
        config.lora_alpha = 2 * config.lora_r
    _require(
        _is_number(config.lora_alpha) and config.lora_alpha > 0,
        f"--lora_alpha must be positive, got {config.lora_alpha!r}",
    )


def _resolve_method(config: TrainConfig) -> None:
    """Honour the deprecated --adapter_name (with a note) and require a known --method."""
    if config.adapter_name is not None:
        _require(
            config.method in ("denselora", config.adapter_name),
            "--adapter_name is the deprecated spelling of --method; pass only --method",
        )
        print("note: --adapter_name is deprecated; use --method", file=sys.stderr)
        config.method, config.adapter_name = config.adapter_name, None
    _require(
        config.method in METHODS,
        f"unknown --method {config.method!r}; choose one of {', '.join(METHODS)}",
    )


def _check_choices(config: TrainConfig) -> None:
    """One-of choices, mutually exclusive flags, required flags and DenseLoRA-only flags."""
    _require(
        config.padding_side in ("left", "right"),
        f"--padding_side must be 'left' or 'right', got {config.padding_side!r}",
    )
    _require(
        not (config.packing and config.padding_side == "left"),
        "--padding_side left asks for LLM-Adapters' left-padded batches and --packing has no padding: "
        "drop --packing True (left padding alone turns packing off) or pass --packing False",
    )
    _require(not (config.bf16 and config.fp16), "--bf16 and --fp16 are mutually exclusive")
    _require(
        not (config.load_8bit and config.load_4bit), "--load_8bit and --load_4bit are mutually exclusive"
    )
    resume = config.resume_from_checkpoint
    _require(
        not (config.overwrite and resume not in (None, "", False) and str(resume).lower() != "false"),
        "--overwrite deletes the checkpoints in --output_dir that --resume_from_checkpoint would continue: "
        "pass one of them",
    )
    _require(
        config.activation in ACTIVATIONS,
        f"unknown --activation {config.activation!r}; choose one of {', '.join(ACTIVATIONS)}",
    )
    _require(bool(config.base_model), "--base_model is required (a local HF folder, a hub id, or 'smollm2')")
    _require(bool(config.output_dir), "--output_dir is required")
    if config.method != "denselora":
        _require(
            config.activation == "gelu" and config.train_shared and not config.lora_modules,
            "--activation, --train_shared and --lora_modules only apply to --method denselora",
        )
    untargeted = sorted(set(config.lora_modules or ()) - set(config.target_modules))
    _require(
        not untargeted,
        f"--lora_modules {','.join(untargeted)} not in --target_modules ({','.join(config.target_modules)}): "
        "--lora_modules picks which of the targeted module types train plain LoRA",
    )


def _check_checkpoint_cadence(config: TrainConfig) -> None:
    """Keeping the best checkpoint needs a checkpoint at every step where validation may find a new best."""
    if config.save_step % config.eval_step and config.load_best_model_at_end and config.val_set_size:
        raise TrainError(
            f"--save_step ({config.save_step}) must be a multiple of --eval_step ({config.eval_step}) to keep the best checkpoint"
        )


# --------------------------------------------------------------------------------------------------
# Value readers
# --------------------------------------------------------------------------------------------------


def is_int(value: object) -> bool:
    """An int that is not a bool (True is an int to Python, not a step count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def require_positive_int(flag: str, value: object) -> None:
    """Refuse anything but a positive int for ``--flag`` (the quickstart checks its own counts with it too)."""
    _require(is_int(value) and value > 0, f"--{flag} must be a positive integer, got {value!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _as_bool(value: object, flag: str) -> bool:
    """fire turns `False` into a bool but leaves `false` / `no` as strings, which would read as true."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1"):
        return True
    if text in ("false", "no", "0"):
        return False
    raise TrainError(f"--{flag} must be true or false, got {value!r}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise TrainError(message)


def _name_list(value: Sequence[str] | str | None, flag: str) -> list[str] | None:
    """Accept a list, a tuple, a JSON list string or a comma-separated string of module names."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise TrainError(f"--{flag} is not a valid JSON list: {text}") from None
        else:
            value = [part.strip() for part in text.split(",")]
    names = [str(name).strip() for name in value if str(name).strip()]
    _require(bool(names), f"--{flag} names no module")
    return names


# --------------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------------


def flags_help() -> str:
    """One line per flag with its default, for ``finetune.py --help`` (fire cannot list ``**flags``)."""
    lines = [f"  --{item.name} (default: {item.default!r})" for item in dataclasses.fields(TrainConfig)]
    return "flags (docs/training.md explains each):\n" + "\n".join(lines)


def config_from_flags(flags: Mapping[str, Any]) -> TrainConfig:
    """Build a TrainConfig from CLI flags; an unknown flag is a one-line error listing the known ones."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(flags) - known)
    if unknown:
        raise TrainError(
            f"unknown flag(s) {', '.join('--' + name for name in unknown)}; known: {', '.join(sorted(known))}"
        )
    if flags.get("padding_side") == "left" and "packing" not in flags:
        # packing's equivalence is with right-padded batches; left padding asks for LLM-Adapters' own batches
        print("note: --padding_side left trains on padded batches (packing off)", file=sys.stderr)
        flags = {**flags, "packing": False}
    return TrainConfig(**flags)


def gradient_accumulation_steps(config: TrainConfig, processes: int) -> int:
    """batch_size is the global batch: micro_batch_size per process, times processes, times accumulation."""
    per_step = config.micro_batch_size * processes
    if config.batch_size % per_step:
        raise TrainError(
            f"--batch_size {config.batch_size} is not divisible by --micro_batch_size {config.micro_batch_size} "
            f"x {processes} process(es) = {per_step}"
        )
    return config.batch_size // per_step
