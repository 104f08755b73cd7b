"""One training run: the adapter config, the model, TrainingArguments and the run itself, phase by phase.

The recipe is the one the DenseLoRA authors ran (an unmodified LLM-Adapters ``finetune.py``): the
LLM-Adapters training prompt (labels on the whole text unless ``--train_on_inputs False`` masks the prompt,
LLM-Adapters' default), a seeded 120-record validation split,
AdamW with 100 linear-warmup steps then a linear decay, evaluation and checkpoints every 80 steps and
the checkpoint with the lowest validation loss as the result. The phases run in an order that checks
everything it can without the model first (flags, batch arithmetic, folder, resume target, data,
tokenization) and writes the output folder only once the model and adapter exist, so a failing run
leaves nothing behind. The transformers ``Trainer`` runs the loop, so one process, ``torchrun`` (DDP)
and ``accelerate launch`` (FSDP2) all use the same code path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import (
    LoraConfig,
    PeftConfig,
    PeftModel,
    VeraConfig,
    get_peft_model,
    prepare_model_for_kbit_training,
)
from transformers import PreTrainedTokenizerBase, Trainer, TrainingArguments, set_seed

from dense_lora import DenseLoraConfig
from dense_lora.data import DataError, load_records, make_collator, subset, tokenize_records, train_val_split
from dense_lora.models import emulated_bf16_warning, load_base_model, load_tokenizer
from dense_lora.packing import choose_collator
from dense_lora.runtime import is_main_process, versions, world_size, write_json_atomic

from .callbacks import MetricsLog, StopOnSigterm, any_process
from .config import TrainConfig, TrainError, gradient_accumulation_steps
from .run_dir import (
    ADAPTER_INIT_DIR,
    METRICS_FILE,
    RUN_CONFIG_FILE,
    SUMMARY_FILE,
    adapter_sha256,
    check_checkpoint,
    check_output_dir,
    check_resume_fits,
    checkpoints,
    clear_previous_run,
    resolve_resume,
    tokens_seen_at,
)
from .trainer import RecipeTrainer

# Exit status of a run stopped by SIGTERM after saving a checkpoint: EX_TEMPFAIL ("try again later"), so a
# job wrapper can tell "resume me" (75) from success (0) and from failure (anything else).
INTERRUPTED_EXIT_CODE = 75
# Above this share of the base model an adapter is no longer parameter-efficient; the run says so.
LARGE_ADAPTER_SHARE_PCT = 50.0


# --------------------------------------------------------------------------------------------------
# Adapter and model
# --------------------------------------------------------------------------------------------------


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


def _base_dtype(config: TrainConfig) -> str:
    """Frozen base weights in the mixed-precision dtype; trainable weights are always float32 masters."""
    return "bfloat16" if config.bf16 else "float16" if config.fp16 else "float32"


def _load_base(config: TrainConfig) -> Any:
    """The frozen base model, placed at load time when quantized (bitsandbytes needs that)."""
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
    return model


def build_model(config: TrainConfig) -> PeftModel:
    """Load the base, prepare it for k-bit training if quantized, and attach the adapter."""
    model = _load_base(config)
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
    try:
        examples = tokenize_records(
            tokenizer,
            records,
            config.cutoff_len,
            config.train_on_inputs,
            progress=f"tokenizing {part}" if is_main_process() else None,
        )
    except DataError as error:
        raise TrainError(f"{part} set: {error}") from None
    return Dataset.from_list(examples)


# --------------------------------------------------------------------------------------------------
# Trainer settings and measurements
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
            torch_compile=config.torch_compile,
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


def state_step(trainer: Trainer) -> int:
    """The optimizer step the Trainer has reached (0 before training began)."""
    return int(getattr(trainer.state, "global_step", 0) or 0)


def best_eval_loss(history: Iterable[Mapping[str, Any]]) -> float | None:
    """The lowest validation loss the Trainer logged (None without validation)."""
    losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    return min(losses) if losses else None


# --------------------------------------------------------------------------------------------------
# The run, phase by phase
# --------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """What the phases of one run hand on to the next ones."""

    config: TrainConfig
    processes: int
    accumulation: int
    resume: str | None
    output_dir: Path
    train_set: Dataset | None = None
    val_set: Dataset | None = None
    counts: dict[str, float] = field(default_factory=dict)
    packed: bool = False
    tokens_before: int = 0  # input tokens counted by the run this one resumes
    step_before: int = 0  # the step it resumes from


def run(config: TrainConfig) -> dict[str, Any]:
    """Train one adapter; returns the summary (also written to summary.json). Raises TrainError on bad input.

    Everything that can be checked without the model (flags, batch arithmetic, output folder, resume
    target, data, tokenization) is checked first; the output folder is only written once the model and
    adapter exist, so a failing run leaves nothing behind.
    """
    stopper = StopOnSigterm()
    with stopper.listening():  # a SIGTERM while data or the model load stops the run between phases
        state = _setup(config)
        tokenizer = _data(state)
        args = training_arguments(config, state.accumulation, has_validation=state.val_set is not None)
        model, collator = _model(state, tokenizer, args)
        if any_process(stopper.requested, args.device):  # every rank stops, even if one got the signal
            return _stopped_before_training(state)
        trainer = RecipeTrainer(
            model=model,
            args=args,
            train_dataset=state.train_set,
            eval_dataset=state.val_set,
            data_collator=collator,
            callbacks=[MetricsLog(state.output_dir / METRICS_FILE), stopper],
        )
        result, wall = _train(state, trainer, model)
        return _summary(state, trainer, result, wall, interrupted=stopper.stopped)


def _stopped_before_training(state: _Run) -> dict[str, Any]:
    """A SIGTERM came before the first step: nothing of this run was written, so there is nothing to save; the
    status says interrupted (exit 75), and rerunning the command starts (or resumes) the run."""
    if is_main_process():
        print(
            "note: SIGTERM before training began; nothing was written: rerun the same command",
            file=sys.stderr,
        )
    return {"status": "interrupted", "global_step": None, "resumed_from": state.resume}


def _setup(config: TrainConfig) -> _Run:
    """Checks that need neither data nor model: batch arithmetic, precision, folder, resume target, wandb."""
    processes = world_size()
    accumulation = gradient_accumulation_steps(config, processes)
    if config.fp16 and not torch.cuda.is_available():
        raise TrainError("--fp16 needs a CUDA GPU (float16 mixed precision does not run on CPU); use --bf16")
    check_output_dir(config)
    resume = resolve_resume(config)
    bf16_on_cpu = config.bf16 and not torch.cuda.is_available() and is_main_process()
    if bf16_on_cpu and (warning := emulated_bf16_warning("train without --bf16 on this machine")):
        print(f"warning: {warning}", file=sys.stderr)
    if config.wandb_project:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise TrainError("--wandb_project needs the wandb package (pip install wandb)") from None
        os.environ["WANDB_PROJECT"] = config.wandb_project
    return _Run(config, processes, accumulation, resume, Path(config.output_dir).expanduser())


def _data(state: _Run) -> PreTrainedTokenizerBase:
    """Load, split and tokenize the records (state.train_set / val_set); returns the tokenizer."""
    config = state.config
    train_records, val_records = load_training_records(config)
    try:
        tokenizer = load_tokenizer(
            config.base_model, padding_side=config.padding_side, trust_remote_code=config.trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise TrainError(f"cannot load the tokenizer of --base_model {config.base_model}: {error}") from None
    state.train_set = tokenize_split(train_records, tokenizer, config, "training")
    state.val_set = tokenize_split(val_records, tokenizer, config, "validation") if val_records else None
    return tokenizer


def _model(state: _Run, tokenizer: PreTrainedTokenizerBase, args: TrainingArguments) -> tuple[PeftModel, Any]:
    """The model with its adapter and the batch collator (packed where attention allows), checked against
    the checkpoint it resumes; counts its parameters and warns when the adapter is not parameter-efficient."""
    config = state.config
    model = build_model(config)
    state.counts = counts = parameter_counts(model)
    collator, packing_note = choose_collator(model, make_collator(tokenizer), config.packing)
    if packing_note and is_main_process():
        print(f"note: {packing_note}", file=sys.stderr)
    state.packed = config.packing and packing_note is None
    if (
        state.packed
    ):  # a packed row has no padding (and no attention mask to count it by): every token is real
        args.include_num_input_tokens_seen = "all"
    if state.resume is not None:
        check_resume_fits(model, state.resume)
    if counts["trainable_share_pct"] > LARGE_ADAPTER_SHARE_PCT and is_main_process():
        print(
            f"warning: the adapter trains {counts['trainable_params']:,} parameters, "
            f"{counts['trainable_share_pct']:.0f}% of the base model's {counts['base_params']:,}: --lora_r "
            f"{config.lora_r} is not parameter-efficient",
            file=sys.stderr,
        )
    return model, collator


def _open_run_folder(state: _Run, trainer: Trainer, model: PeftModel) -> bool:
    """Claim the output folder (run_config.json, the adapter's start); True if this run created it."""
    config, output_dir = state.config, state.output_dir
    new_folder = not (output_dir / RUN_CONFIG_FILE).is_file() or config.overwrite
    if trainer.is_world_process_zero():
        if config.overwrite:
            clear_previous_run(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(output_dir / RUN_CONFIG_FILE, config.fingerprint(), sort_keys=True)
        if state.resume is None:
            model.save_pretrained(str(output_dir / ADAPTER_INIT_DIR))
    trainer.accelerator.wait_for_everyone()
    return new_folder


def _train(state: _Run, trainer: Trainer, model: PeftModel) -> tuple[Any, float]:
    """Run the Trainer; a resume that fails before its first step is one line, and leaves no new folder."""
    new_folder = _open_run_folder(state, trainer, model)
    resume, output_dir = state.resume, state.output_dir
    state.tokens_before = tokens_seen_at(resume)  # before training: checkpoint rotation may delete it
    state.step_before = 0 if resume is None else check_checkpoint(Path(resume))
    started = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except Exception as error:
        if (
            resume is None
            or isinstance(error, torch.OutOfMemoryError)
            or state_step(trainer) > check_checkpoint(Path(resume))
        ):
            raise  # not a resume problem (a step ran, or memory): a real failure keeps its traceback
        if new_folder and trainer.is_world_process_zero() and not checkpoints(output_dir):
            clear_previous_run(output_dir)  # leave no run_config.json that would block the folder
            with contextlib.suppress(OSError):
                output_dir.rmdir()
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise TrainError(
            f"cannot resume from {resume}: {type(error).__name__}: {first[:200]} (the checkpoint is damaged "
            "or from another run; resume from another checkpoint or pass --overwrite)"
        ) from None
    return result, time.perf_counter() - started


def _summary(state: _Run, trainer: Trainer, result: Any, wall: float, interrupted: bool) -> dict[str, Any]:
    """Save the final adapter unless interrupted, and write and return summary.json."""
    config, output_dir, progress = state.config, state.output_dir, trainer.state
    interrupted = interrupted and progress.global_step < progress.max_steps
    if not interrupted:
        trainer.save_model(str(output_dir))  # with load_best_model_at_end: the best checkpoint's adapter
    tokens_this_process = progress.num_input_tokens_seen - state.tokens_before
    summary = {
        "status": "interrupted" if interrupted else "completed",
        "method": config.method,
        "base_model": config.base_model,
        **state.counts,
        "global_step": progress.global_step,
        "max_steps": progress.max_steps,
        "world_size": state.processes,
        "gradient_accumulation_steps": state.accumulation,
        "packed": state.packed,
        "train_records": len(state.train_set),
        "validation_records": len(state.val_set) if state.val_set is not None else 0,
        # transformers averages the loss over the steps of this call only: after a resume, not the whole run's
        "train_loss": result.training_loss,
        "train_loss_steps": [state.step_before + 1, progress.global_step],
        "best_eval_loss": best_eval_loss(progress.log_history),
        "best_checkpoint": progress.best_model_checkpoint,
        "adapter_sha256": None if interrupted else adapter_sha256(output_dir),
        "resumed_from": state.resume,
        "tokens_seen": progress.num_input_tokens_seen,
        "wall_time_s": wall,
        "tokens_per_s": tokens_this_process / wall if wall > 0 else None,
        **peak_memory(),
        "config": dataclasses.asdict(config),
        "versions": versions(),
    }
    if trainer.is_world_process_zero():
        write_json_atomic(output_dir / SUMMARY_FILE, summary, sort_keys=True)
    return summary
