"""Fine-tuning with the LLM-Adapters protocol: DenseLoRA and the LoRA / DoRA baselines in one harness.

The recipe is the one the DenseLoRA authors ran (an unmodified LLM-Adapters ``finetune.py``): the
LLM-Adapters training prompt, labels masked over the prompt, a seeded 120-record validation split,
AdamW with 100 linear-warmup steps then a linear decay, evaluation and checkpoints every 80 steps and
the checkpoint with the lowest validation loss as the result. What this module adds is what a
reference implementation needs around it: validation of every input before anything is loaded or
written, refusal to mix two runs in one output folder, SIGTERM-safe checkpointing with exact resume,
per-step metrics and a run summary.

The transformers ``Trainer`` runs the loop, so one process, ``torchrun`` (DDP) and ``accelerate
launch`` (FSDP2) all use the same code path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import resource
import shutil
import signal
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from datasets import Dataset
from peft import (
    LoraConfig,
    PeftConfig,
    PeftModel,
    VeraConfig,
    get_peft_model,
    prepare_model_for_kbit_training,
)
from tqdm.auto import tqdm
from transformers import (
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from dense_lora.runtime import DenseLoRAError, file_sha256

from . import DEFAULT_TARGET_MODULES, DenseLoraConfig, __version__
from .data import (
    DataError,
    check_trainable,
    load_records,
    make_collator,
    subset,
    tokenize_example,
    train_val_split,
)
from .models import load_base_model, load_tokenizer
from .packing import choose_collator

METHODS = ("denselora", "lora", "dora", "vera")
ADAPTER_NAMES = METHODS  # the name of --method before it was renamed; kept for callers that import it
# Exit status of a run stopped by SIGTERM after saving a checkpoint: EX_TEMPFAIL ("try again later"), so a
# job wrapper can tell "resume me" (75) from success (0) and from failure (anything else).
INTERRUPTED_EXIT_CODE = 75
RUN_CONFIG_FILE = "run_config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# Written last by Trainer._save_checkpoint: a checkpoint folder without it was cut off mid-save.
TRAINER_STATE_FILE = "trainer_state.json"
# Config fields that do not change what a run computes, so two runs differing only in them are the same run.
BOOKKEEPING_FIELDS = ("output_dir", "resume_from_checkpoint", "overwrite", "wandb_project", "adapter_name")
# The adapter's weights before the first optimiser step, kept so `python -m dense_lora.analysis` can measure
# the increments training made (the paper's Figures 5-6) for any method.
ADAPTER_INIT_DIR = "adapter_init"
# Where the evaluators write this run's results by default (<output_dir>/eval): owned by the run, so
# --overwrite removes it with the adapter it scored.
EVAL_DIR = "eval"
# Above this share of the base model an adapter is no longer parameter-efficient; the run says so.
LARGE_ADAPTER_SHARE_PCT = 50.0


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
    # padding-free micro-batches (dense_lora/packing.py); off by itself where attention cannot honour boundaries
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
    trust_remote_code: bool = False
    resume_from_checkpoint: str | bool | None = None
    overwrite: bool = False
    wandb_project: str | None = None

    def __post_init__(self) -> None:
        """Normalise CLI values (fire passes '1e-4' as float, 'a,b' as a tuple) and reject impossible ones."""
        for item in dataclasses.fields(self):
            if item.type == "bool":
                setattr(self, item.name, _as_bool(getattr(self, item.name), item.name))
        self.target_modules = _name_list(self.target_modules, "target_modules")
        self.lora_modules = _name_list(self.lora_modules, "lora_modules")
        if self.target_modules is None:
            self.target_modules = list(DEFAULT_TARGET_MODULES)
        for name in (
            "batch_size",
            "micro_batch_size",
            "cutoff_len",
            "eval_step",
            "save_step",
            "lora_r",
            "logging_steps",
            "save_total_limit",
        ):
            _require(
                _is_int(getattr(self, name)) and getattr(self, name) > 0,
                f"--{name} must be a positive integer, got {getattr(self, name)!r}",
            )
        for name in ("val_set_size", "warmup_steps", "seed"):
            _require(
                _is_int(getattr(self, name)) and getattr(self, name) >= 0,
                f"--{name} must be a non-negative integer, got {getattr(self, name)!r}",
            )
        _require(
            _is_int(self.max_steps) and (self.max_steps > 0 or self.max_steps == -1),
            f"--max_steps must be a positive integer or -1 (use num_epochs), got {self.max_steps!r}",
        )
        _require(
            _is_number(self.num_epochs) and self.num_epochs > 0,
            f"--num_epochs must be positive, got {self.num_epochs!r}",
        )
        _require(
            _is_number(self.learning_rate) and self.learning_rate > 0,
            f"--learning_rate must be positive, got {self.learning_rate!r}",
        )
        _require(
            _is_number(self.weight_decay) and self.weight_decay >= 0,
            f"--weight_decay must be non-negative, got {self.weight_decay!r}",
        )
        _require(
            _is_number(self.lora_dropout) and 0 <= self.lora_dropout < 1,
            f"--lora_dropout must be in [0, 1), got {self.lora_dropout!r}",
        )
        _require(
            _is_number(self.data_fraction) and 0 < self.data_fraction <= 1,
            f"--data_fraction must be in (0, 1], got {self.data_fraction!r}",
        )
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.lora_r  # the paper's alpha = 2r
        _require(
            _is_number(self.lora_alpha) and self.lora_alpha > 0,
            f"--lora_alpha must be positive, got {self.lora_alpha!r}",
        )
        if self.adapter_name is not None:
            _require(
                self.method in ("denselora", self.adapter_name),
                "--adapter_name is the deprecated spelling of --method; pass only --method",
            )
            print("note: --adapter_name is deprecated; use --method", file=sys.stderr)
            self.method, self.adapter_name = self.adapter_name, None
        _require(
            self.method in METHODS,
            f"unknown --method {self.method!r}; choose one of {', '.join(METHODS)}",
        )
        _require(
            self.padding_side in ("left", "right"),
            f"--padding_side must be 'left' or 'right', got {self.padding_side!r}",
        )
        _require(not (self.bf16 and self.fp16), "--bf16 and --fp16 are mutually exclusive")
        _require(
            not (self.load_8bit and self.load_4bit), "--load_8bit and --load_4bit are mutually exclusive"
        )
        _require(
            bool(self.base_model), "--base_model is required (a local HF folder, a hub id, or 'smollm2')"
        )
        _require(bool(self.output_dir), "--output_dir is required")
        if self.method != "denselora":
            _require(
                self.activation == "gelu" and self.train_shared and not self.lora_modules,
                "--activation, --train_shared and --lora_modules only apply to --method denselora",
            )
        if self.save_step % self.eval_step and self.load_best_model_at_end and self.val_set_size:
            raise TrainError(
                f"--save_step ({self.save_step}) must be a multiple of --eval_step ({self.eval_step}) to keep the best checkpoint"
            )

    def fingerprint(self) -> dict[str, Any]:
        """The fields that decide what a run computes: equal fingerprints mean a folder may be reused."""
        values = dataclasses.asdict(self)
        return {key: value for key, value in values.items() if key not in BOOKKEEPING_FIELDS}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
    return TrainConfig(**flags)


# --------------------------------------------------------------------------------------------------
# Processes, batches, adapters
# --------------------------------------------------------------------------------------------------


def world_size() -> int:
    """Number of training processes, as set by torchrun / accelerate launch (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def gradient_accumulation_steps(config: TrainConfig, processes: int) -> int:
    """batch_size is the global batch: micro_batch_size per process, times processes, times accumulation."""
    per_step = config.micro_batch_size * processes
    if config.batch_size % per_step:
        raise TrainError(
            f"--batch_size {config.batch_size} is not divisible by --micro_batch_size {config.micro_batch_size} "
            f"x {processes} process(es) = {per_step}"
        )
    return config.batch_size // per_step


def build_peft_config(config: TrainConfig) -> PeftConfig:
    """The adapter config for DenseLoRA, or real peft LoRA / DoRA / VeRA for the baselines, from the same flags."""
    common = dict(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        if config.method == "vera":
            # VeRA has no alpha; its frozen random projections come from the run's seed and are saved with
            # the adapter so a saved run reloads without regenerating them.
            return VeraConfig(
                r=config.lora_r,
                target_modules=list(config.target_modules),
                vera_dropout=config.lora_dropout,
                projection_prng_key=config.seed,
                save_projection=True,
                task_type="CAUSAL_LM",
            )
        if config.method == "denselora":
            return DenseLoraConfig(
                **common,
                activation=config.activation,
                train_shared=config.train_shared,
                lora_modules=config.lora_modules,
                init_seed=config.seed,
            )
        return LoraConfig(**common, bias="none", use_dora=config.method == "dora")
    except ValueError as error:
        raise TrainError(f"invalid adapter settings: {error}") from None


# --------------------------------------------------------------------------------------------------
# Output folder: one run per folder
# --------------------------------------------------------------------------------------------------


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), child)
        for child in output_dir.iterdir()
        if (m := CHECKPOINT_PATTERN.match(child.name))
    ]
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest *complete* checkpoint: one killed mid-save (no trainer_state.json yet) is skipped."""
    complete = [path for _, path in _checkpoints(Path(output_dir)) if (path / TRAINER_STATE_FILE).is_file()]
    return complete[-1] if complete else None


def _run_artifacts(output_dir: Path) -> list[Path]:
    """Files and folders a run writes into its output folder (what --overwrite removes, nothing else)."""
    names = (
        *ADAPTER_FILES,
        RUN_CONFIG_FILE,
        METRICS_FILE,
        SUMMARY_FILE,
        "README.md",
        ADAPTER_INIT_DIR,
        EVAL_DIR,
    )
    return [output_dir / name for name in names if (output_dir / name).exists()] + [
        path for _, path in _checkpoints(output_dir)
    ]


def check_output_dir(config: TrainConfig) -> None:
    """Refuse a folder holding another run's adapter or checkpoints, unless --overwrite.

    A folder written by the same configuration is accepted (that is how a run is resumed); one whose
    run_config.json differs, or that holds an adapter or checkpoints without a run_config.json, is not.
    """
    output_dir = Path(config.output_dir).expanduser()
    if output_dir.exists() and not output_dir.is_dir():
        raise TrainError(f"--output_dir {output_dir} exists and is not a folder")
    if config.overwrite:
        return
    artifacts = _run_artifacts(output_dir)
    if not artifacts:
        return
    saved_file = output_dir / RUN_CONFIG_FILE
    if not saved_file.is_file():
        raise TrainError(
            f"--output_dir {output_dir} already holds {artifacts[0].name} from another run; "
            "pass --overwrite to replace it or choose another folder"
        )
    try:
        saved = json.loads(saved_file.read_text())
    except json.JSONDecodeError:
        raise TrainError(f"{saved_file} is not valid JSON; pass --overwrite to replace the run") from None
    if "adapter_name" in saved and "method" not in saved:  # written before --adapter_name became --method
        saved["method"] = saved.pop("adapter_name")
    saved = {"packing": False, **saved}  # a run_config.json written before --packing existed is a padded run
    current = json.loads(json.dumps(config.fingerprint()))  # same JSON types as the saved copy
    differing = sorted(key for key in set(saved) | set(current) if saved.get(key) != current.get(key))
    if differing:
        raise TrainError(
            f"--output_dir {output_dir} holds a different run (differs in {', '.join(differing)}); "
            "pass --overwrite to replace it or choose another folder"
        )


def resolve_resume(config: TrainConfig) -> str | None:
    """Map --resume_from_checkpoint (a path, or True for the latest in output_dir) to a checkpoint folder.

    Without the flag, a folder that already holds complete checkpoints of this configuration (check_output_dir
    has compared run_config.json) is resumed from the newest, with a note on stderr: rerunning a killed
    command must continue it, as the evaluators do, never restart from step 0 and rotate the progress away.
    An explicit ``--resume_from_checkpoint False`` with such checkpoints present is refused for the same
    reason; --overwrite starts again deliberately.
    """
    value = config.resume_from_checkpoint
    explicit_no = value is False or str(value).lower() == "false"
    if value in (None, "") or explicit_no:
        found = None if config.overwrite else latest_checkpoint(config.output_dir)
        if found is None:
            return None
        check_checkpoint(found)
        if explicit_no:
            raise TrainError(
                f"--output_dir {config.output_dir} holds this run's checkpoints up to {found.name}; "
                "drop --resume_from_checkpoint False to continue them, or pass --overwrite to start again"
            )
        if is_main_process():
            print(
                f"note: resuming from {found} (the newest complete checkpoint of this run); "
                "pass --overwrite to start again",
                file=sys.stderr,
            )
        return str(found)
    if value is True or str(value).lower() == "true":
        found = latest_checkpoint(config.output_dir)
        if found is None:
            raise TrainError(f"--resume_from_checkpoint: no complete checkpoint in {config.output_dir}")
        check_checkpoint(found)
        return str(found)
    path = Path(str(value)).expanduser()
    if not (path / TRAINER_STATE_FILE).is_file():
        raise TrainError(
            f"--resume_from_checkpoint {path} is not a complete checkpoint (no {TRAINER_STATE_FILE})"
        )
    check_checkpoint(path)
    return str(path)


def check_checkpoint(path: Path) -> int:
    """The step of a checkpoint whose state and adapter files are readable; a damaged one is one line.

    Trainer would otherwise fail with a traceback deep inside ``train()``, after the model has loaded.
    """
    from .evaluate import EvaluationError, check_safetensors

    state_file = path / TRAINER_STATE_FILE
    try:
        step = json.loads(state_file.read_text()).get("global_step")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        step = None
    if not _is_int(step):
        raise TrainError(
            f"{state_file} is damaged (not the JSON state Trainer writes); delete {path} to resume from an "
            "earlier checkpoint, or pass --overwrite to start again"
        )
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise TrainError(f"checkpoint {path} has no adapter_model.safetensors; delete it or pass --overwrite")
    try:
        check_safetensors(weights)
    except EvaluationError as error:
        raise TrainError(f"checkpoint {path}: {error}") from None
    return step


def check_resume_fits(model: PeftModel, resume: str) -> None:
    """The checkpoint's adapter has exactly this run's tensors and shapes (another --lora_r, method or targets
    would otherwise fail inside Trainer with a traceback, or load only partly)."""
    from peft import get_peft_model_state_dict

    from .evaluate import check_safetensors

    saved = check_safetensors(Path(resume) / "adapter_model.safetensors")
    expected = {key: tuple(value.shape) for key, value in get_peft_model_state_dict(model).items()}
    differing = sorted(key for key in set(saved) | set(expected) if saved.get(key) != expected.get(key))
    if differing:
        key = differing[0]
        raise TrainError(
            f"--resume_from_checkpoint {resume} was saved by another adapter configuration ('{key}' is "
            f"{saved.get(key, 'absent')} there, {expected.get(key, 'absent')} here); resume it with the settings "
            "it was trained with, or start again"
        )


def adapter_sha256(output_dir: Path) -> str | None:
    """sha256 of the final adapter's weights: the evaluators record the same hash with every result."""
    weights = output_dir / "adapter_model.safetensors"
    return file_sha256(weights) if weights.is_file() else None


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON through a temporary file and os.replace, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def load_training_records(config: TrainConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Records of the train and validation parts: low-resource subset first, then the seeded split."""
    try:
        records = load_records(config.data_path)
        if config.data_fraction < 1:
            records = subset(records, config.data_fraction, seed=config.seed)
        return train_val_split(records, config.val_set_size, seed=config.seed)
    except (DataError, FileNotFoundError, ValueError) as error:
        raise TrainError(error) from None


def tokenize_split(
    records: Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase, config: TrainConfig, part: str
) -> Dataset:
    """Tokenize one part with the LLM-Adapters rules (progress bar on the main process only)."""
    examples = [
        tokenize_example(tokenizer, record, config.cutoff_len, config.train_on_inputs)
        for record in tqdm(records, desc=f"tokenizing {part}", disable=not is_main_process(), leave=False)
    ]
    try:
        check_trainable(examples)
    except DataError as error:
        raise TrainError(f"{part} set: {error}") from None
    return Dataset.from_list(examples)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def _base_dtype(config: TrainConfig) -> str:
    """Frozen base weights in the mixed-precision dtype; trainable weights are always float32 masters."""
    return "bfloat16" if config.bf16 else "float16" if config.fp16 else "float32"


def build_model(config: TrainConfig) -> PeftModel:
    """Load the base, prepare it for k-bit training if quantized, and attach the adapter."""
    device_map = None
    if config.load_8bit or config.load_4bit:
        # bitsandbytes layers must be placed at load time; each process takes its own GPU.
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device_map = {"": local_rank} if torch.cuda.is_available() else {"": "cpu"}
    try:
        model = load_base_model(
            config.base_model,
            dtype=_base_dtype(config),
            load_8bit=config.load_8bit,
            load_4bit=config.load_4bit,
            device_map=device_map,
            trust_remote_code=config.trust_remote_code,
        )
    except (OSError, ValueError) as error:
        raise TrainError(f"cannot load --base_model {config.base_model}: {error}") from None
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    if config.load_8bit or config.load_4bit:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.use_gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    set_seed(config.seed)  # LoRA/DoRA initialise from the global RNG: same seed, same start on every rank
    try:
        peft_model = get_peft_model(model, build_peft_config(config))
    except (ValueError, TypeError, KeyError) as error:
        raise TrainError(f"adapter does not fit {config.base_model}: {error}") from None
    for parameter in peft_model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()  # optimizer and GradScaler need float32 masters
    return peft_model


def parameter_counts(model: PeftModel) -> dict[str, float]:
    """Trainable and base parameter counts (peft's count, which unpacks 4-bit storage)."""
    trainable, total = model.get_nb_trainable_parameters()
    base = total - trainable
    return {
        "trainable_params": trainable,
        "base_params": base,
        "trainable_share_pct": 100.0 * trainable / base,
    }


# --------------------------------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------------------------------


class MetricsLog(TrainerCallback):
    """Append every Trainer log (loss, lr, eval loss) to metrics.jsonl, with tokens/s since the previous log.

    On resume, lines past the checkpoint's step (written by the run that was killed) are dropped first, so
    the file describes one consistent history.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last: tuple[float, int] | None = None

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if json.loads(line).get("step", 0) <= state.global_step
            ]
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        self._last = (time.perf_counter(), state.num_input_tokens_seen)

    def on_log(
        self, args: TrainingArguments, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        if "loss" in logs and self._last is not None:
            elapsed = now - self._last[0]
            record["tokens_per_s"] = (tokens - self._last[1]) / elapsed if elapsed > 0 else None
            self._last = (now, tokens)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


class StopOnSigterm(TrainerCallback):
    """On SIGTERM (a scheduler's pre-emption notice), finish the current optimizer step, save a checkpoint, stop.

    The handler only sets a flag; the Trainer saves and stops at the next step end, so the checkpoint is
    a consistent one that --resume_from_checkpoint continues exactly. Under DDP the flag is OR-reduced
    across processes every step, so all ranks stop at the same step even if only one got the signal.
    """

    def __init__(self) -> None:
        self.requested = False
        self.stopped = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def on_train_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if _any_process(self.requested, args.device):
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True


def _any_process(flag: bool, device: torch.device) -> bool:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def training_arguments(config: TrainConfig, accumulation: int, has_validation: bool) -> TrainingArguments:
    """TrainingArguments of the LLM-Adapters recipe, with the settings DDP and exact resume need spelled out."""
    evaluate = has_validation
    cpu_only = not torch.cuda.is_available()
    report_to = ["wandb"] if config.wandb_project else ["none"]
    try:
        return TrainingArguments(
            output_dir=config.output_dir,
            per_device_train_batch_size=config.micro_batch_size,
            per_device_eval_batch_size=config.micro_batch_size,
            gradient_accumulation_steps=accumulation,
            num_train_epochs=config.num_epochs,
            max_steps=config.max_steps,
            learning_rate=config.learning_rate,
            weight_decay=config.weight_decay,
            warmup_steps=config.warmup_steps,
            lr_scheduler_type="linear",
            optim="adamw_torch",
            bf16=config.bf16,
            fp16=config.fp16,
            logging_steps=config.logging_steps,
            eval_strategy="steps" if evaluate else "no",
            eval_steps=config.eval_step if evaluate else None,
            save_strategy="steps",
            save_steps=config.save_step,
            save_total_limit=config.save_total_limit,
            load_best_model_at_end=config.load_best_model_at_end and evaluate,
            metric_for_best_model="eval_loss" if evaluate else None,
            greater_is_better=False if evaluate else None,
            train_sampling_strategy="group_by_length" if config.group_by_length else "random",
            seed=config.seed,
            data_seed=config.seed,
            ddp_find_unused_parameters=False,
            # Without a GPU, accelerate must be told the run is CPU-only: only then does it set up DDP over gloo
            # for several processes (otherwise each would silently train alone) and allow bf16 autocast.
            use_cpu=cpu_only,
            ddp_backend="gloo" if cpu_only and world_size() > 1 else None,
            dataloader_pin_memory=not cpu_only,
            activation_checkpointing=config.use_gradient_checkpointing
            and not (config.load_8bit or config.load_4bit),
            activation_checkpointing_kwargs={"use_reentrant": False},
            include_num_input_tokens_seen="non_padding",
            remove_unused_columns=False,
            report_to=report_to,
            run_name=Path(config.output_dir).name if config.wandb_project else None,
            dataloader_num_workers=0,
        )
    except (ValueError, ImportError) as error:
        raise TrainError(f"invalid training settings: {error}") from None


def peak_memory() -> dict[str, Any]:
    """CUDA peak allocated memory when training on a GPU, else the process's peak resident set size."""
    if torch.cuda.is_available():
        return {
            "peak_memory_bytes": torch.cuda.max_memory_allocated(),
            "peak_memory_kind": "cuda_max_allocated",
        }
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_memory_bytes": rss_kib * 1024, "peak_memory_kind": "cpu_max_rss"}


def versions() -> dict[str, str]:
    import accelerate
    import datasets
    import peft
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "dense_lora": __version__,
    }


def state_step(trainer: Trainer) -> int:
    """The optimizer step the Trainer has reached (0 before training began)."""
    return int(getattr(trainer.state, "global_step", 0) or 0)


def _clear_previous_run(output_dir: Path) -> None:
    for path in _run_artifacts(output_dir):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _best_eval_loss(history: Iterable[Mapping[str, Any]]) -> float | None:
    losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    return min(losses) if losses else None


def run(config: TrainConfig) -> dict[str, Any]:
    """Train one adapter; returns the summary (also written to summary.json). Raises TrainError on bad input.

    Everything that can be checked without the model (flags, batch arithmetic, output folder, resume
    target, data, tokenization) is checked first; the output folder is only written once the model and
    adapter exist, so a failing run leaves nothing behind.
    """
    processes = world_size()
    accumulation = gradient_accumulation_steps(config, processes)
    if config.fp16 and not torch.cuda.is_available():
        raise TrainError("--fp16 needs a CUDA GPU (float16 mixed precision does not run on CPU); use --bf16")
    check_output_dir(config)
    resume = resolve_resume(config)
    if config.wandb_project:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise TrainError("--wandb_project needs the wandb package (pip install wandb)") from None
        os.environ["WANDB_PROJECT"] = config.wandb_project
    train_records, val_records = load_training_records(config)

    try:
        tokenizer = load_tokenizer(config.base_model, padding_side=config.padding_side)
    except (OSError, ValueError) as error:
        raise TrainError(f"cannot load the tokenizer of --base_model {config.base_model}: {error}") from None
    train_set = tokenize_split(train_records, tokenizer, config, "training")
    val_set = tokenize_split(val_records, tokenizer, config, "validation") if val_records else None
    args = training_arguments(config, accumulation, has_validation=val_set is not None)
    model = build_model(config)
    counts = parameter_counts(model)
    collator, packing_note = choose_collator(model, make_collator(tokenizer), config.packing)
    if packing_note and is_main_process():
        print(f"note: {packing_note}", file=sys.stderr)
    packed = config.packing and packing_note is None
    if packed:  # a packed row has no padding (and no attention mask to count it by): every token is real
        args.include_num_input_tokens_seen = "all"
    if resume is not None:
        check_resume_fits(model, resume)
    if counts["trainable_share_pct"] > LARGE_ADAPTER_SHARE_PCT and is_main_process():
        print(
            f"warning: the adapter trains {counts['trainable_params']:,} parameters, "
            f"{counts['trainable_share_pct']:.0f}% of the base model's {counts['base_params']:,}: --lora_r "
            f"{config.lora_r} is not parameter-efficient",
            file=sys.stderr,
        )

    output_dir = Path(config.output_dir).expanduser()
    metrics = MetricsLog(output_dir / METRICS_FILE)
    stopper = StopOnSigterm()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=collator,
        callbacks=[metrics, stopper],
    )
    new_folder = not (output_dir / RUN_CONFIG_FILE).is_file() or config.overwrite
    if trainer.is_world_process_zero():
        if config.overwrite:
            _clear_previous_run(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(output_dir / RUN_CONFIG_FILE, config.fingerprint())
        if resume is None:
            model.save_pretrained(str(output_dir / ADAPTER_INIT_DIR))
    trainer.accelerator.wait_for_everyone()

    started = time.perf_counter()
    tokens_before = 0
    if resume is not None:
        tokens_before = json.loads((Path(resume) / TRAINER_STATE_FILE).read_text()).get(
            "num_input_tokens_seen", 0
        )
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except Exception as error:
        if (
            resume is None
            or isinstance(error, torch.OutOfMemoryError)
            or state_step(trainer) > check_checkpoint(Path(resume))
        ):
            raise  # not a resume problem (a step ran, or memory): a real failure keeps its traceback
        if new_folder and trainer.is_world_process_zero() and not _checkpoints(output_dir):
            _clear_previous_run(output_dir)  # leave no run_config.json that would block the folder
            with contextlib.suppress(OSError):
                output_dir.rmdir()
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise TrainError(
            f"cannot resume from {resume}: {type(error).__name__}: {first[:200]} (the checkpoint is damaged "
            "or from another run; resume from another checkpoint or pass --overwrite)"
        ) from None
    wall = time.perf_counter() - started
    state = trainer.state
    interrupted = stopper.stopped and state.global_step < state.max_steps
    if not interrupted:
        trainer.save_model(str(output_dir))  # with load_best_model_at_end: the best checkpoint's adapter
    tokens_this_process = state.num_input_tokens_seen - tokens_before
    summary = {
        "status": "interrupted" if interrupted else "completed",
        "method": config.method,
        "base_model": config.base_model,
        **counts,
        "global_step": state.global_step,
        "max_steps": state.max_steps,
        "world_size": processes,
        "gradient_accumulation_steps": accumulation,
        "packed": packed,
        "train_records": len(train_set),
        "validation_records": len(val_set) if val_set is not None else 0,
        "train_loss": result.training_loss,
        "best_eval_loss": _best_eval_loss(state.log_history),
        "best_checkpoint": state.best_model_checkpoint,
        "adapter_sha256": None if interrupted else adapter_sha256(output_dir),
        "resumed_from": resume,
        "tokens_seen": state.num_input_tokens_seen,
        "wall_time_s": wall,
        "tokens_per_s": tokens_this_process / wall if wall > 0 else None,
        **peak_memory(),
        "config": dataclasses.asdict(config),
        "versions": versions(),
    }
    if trainer.is_world_process_zero():
        write_json_atomic(output_dir / SUMMARY_FILE, summary)
    return summary
