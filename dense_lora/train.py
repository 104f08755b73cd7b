"""Fine-tuning with the LLM-Adapters protocol: the public entry point of the training harness.

``finetune.py``, ``denselora-finetune``, the quickstart, the benchmarks, the tests and the docs import
training from here; the code lives in :mod:`dense_lora.training`, one module per job (``config``: the
settings and their checks, ``run_dir``: the output-folder policy, ``callbacks``: metrics and SIGTERM,
``run``: the run itself). This module only re-exports those names, so callers keep one import path.
"""

from __future__ import annotations

from dense_lora.training.callbacks import MetricsLog, StopOnSigterm
from dense_lora.training.config import (
    ADAPTER_NAMES,
    BOOKKEEPING_FIELDS,
    METHODS,
    TrainConfig,
    TrainError,
    config_from_flags,
    flags_help,
    gradient_accumulation_steps,
    require_positive_int,
)
from dense_lora.training.run import (
    INTERRUPTED_EXIT_CODE,
    LARGE_ADAPTER_SHARE_PCT,
    build_model,
    build_peft_config,
    load_training_records,
    parameter_counts,
    peak_memory,
    run,
    state_step,
    tokenize_split,
    training_arguments,
)
from dense_lora.training.run_dir import (
    ADAPTER_FILES,
    ADAPTER_INIT_DIR,
    CHECKPOINT_PATTERN,
    EVAL_DIR,
    METRICS_FILE,
    RUN_CONFIG_FILE,
    SUMMARY_FILE,
    TRAINER_STATE_FILE,
    adapter_sha256,
    check_checkpoint,
    check_output_dir,
    check_resume_fits,
    latest_checkpoint,
    resolve_resume,
)

__all__ = [
    "ADAPTER_FILES",
    "ADAPTER_INIT_DIR",
    "ADAPTER_NAMES",
    "BOOKKEEPING_FIELDS",
    "CHECKPOINT_PATTERN",
    "EVAL_DIR",
    "INTERRUPTED_EXIT_CODE",
    "LARGE_ADAPTER_SHARE_PCT",
    "METHODS",
    "METRICS_FILE",
    "RUN_CONFIG_FILE",
    "SUMMARY_FILE",
    "TRAINER_STATE_FILE",
    "MetricsLog",
    "StopOnSigterm",
    "TrainConfig",
    "TrainError",
    "adapter_sha256",
    "build_model",
    "build_peft_config",
    "check_checkpoint",
    "check_output_dir",
    "check_resume_fits",
    "config_from_flags",
    "flags_help",
    "gradient_accumulation_steps",
    "latest_checkpoint",
    "load_training_records",
    "parameter_counts",
    "peak_memory",
    "require_positive_int",
    "resolve_resume",
    "run",
    "state_step",
    "tokenize_split",
    "training_arguments",
]
