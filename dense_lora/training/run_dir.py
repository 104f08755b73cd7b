"""The output-folder policy: one run per folder, its checkpoints, resuming them, and what --overwrite clears.

Why one module: whether a folder may be written, which checkpoint a rerun continues and which files belong
to a run are one policy (never mix two runs in a folder; a rerun of a killed command continues it), and
every rule of it is checked here before a model is loaded.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from transformers.trainer import TRAINING_ARGS_NAME

from dense_lora.runtime import file_sha256, folder_problem, is_main_process

from .config import TrainConfig, TrainError, is_int

if TYPE_CHECKING:
    from peft import PeftModel

RUN_CONFIG_FILE = "run_config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# Written last by Trainer._save_checkpoint: a checkpoint folder without it was cut off mid-save.
TRAINER_STATE_FILE = "trainer_state.json"
# The adapter's weights before the first optimiser step, kept so `python -m dense_lora.analysis` can measure
# the increments training made (the paper's Figures 5-6) for any method.
ADAPTER_INIT_DIR = "adapter_init"
# Where the evaluators write this run's results by default (<output_dir>/eval): owned by the run, so
# --overwrite removes it with the adapter it scored.
EVAL_DIR = "eval"
# The final save's TrainingArguments, as JSON (``trainer.RecipeTrainer``).
TRAINING_ARGS_FILE = "training_args.json"


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint-<step> folder, complete or not, oldest first."""
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
    complete = [path for _, path in checkpoints(Path(output_dir)) if (path / TRAINER_STATE_FILE).is_file()]
    return complete[-1] if complete else None


def run_artifacts(output_dir: Path) -> list[Path]:
    """Files and folders a run writes into its output folder (what --overwrite removes, nothing else)."""
    names = (
        *ADAPTER_FILES,
        RUN_CONFIG_FILE,
        METRICS_FILE,
        SUMMARY_FILE,
        "README.md",
        ADAPTER_INIT_DIR,
        EVAL_DIR,
        TRAINING_ARGS_FILE,
        TRAINING_ARGS_NAME,  # transformers' pickle, written by earlier versions; --overwrite removes it too
    )
    return [output_dir / name for name in names if (output_dir / name).exists()] + [
        path for _, path in checkpoints(output_dir)
    ]


def clear_previous_run(output_dir: Path) -> None:
    """Remove a run's artifacts (--overwrite), leaving anything else in the folder alone."""
    for path in run_artifacts(output_dir):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def check_output_dir(config: TrainConfig) -> None:
    """Refuse a folder holding another run's adapter or checkpoints, unless --overwrite.

    A folder written by the same configuration is accepted (that is how a run is resumed); one whose
    run_config.json differs, or that holds an adapter or checkpoints without a run_config.json, is not.
    """
    output_dir = Path(config.output_dir).expanduser()
    problem = folder_problem(output_dir)
    if problem:
        raise TrainError(f"--output_dir {output_dir}: {problem}")
    if config.overwrite:
        return
    artifacts = run_artifacts(output_dir)
    if not artifacts:
        return
    saved_file = output_dir / RUN_CONFIG_FILE
    if not saved_file.is_file():
        raise TrainError(
            f"--output_dir {output_dir} already holds {artifacts[0].name} from another run; "
            "pass --overwrite to replace it or choose another folder"
        )
    saved = _saved_fingerprint(saved_file)
    current = json.loads(json.dumps(config.fingerprint()))  # same JSON types as the saved copy
    differing = sorted(key for key in set(saved) | set(current) if saved.get(key) != current.get(key))
    if differing:
        raise TrainError(
            f"--output_dir {output_dir} holds a different run (differs in {', '.join(differing)}); "
            "pass --overwrite to replace it or choose another folder"
        )


def _saved_fingerprint(saved_file: Path) -> dict:
    """A run_config.json in today's terms, whichever version of this code wrote it."""
    try:
        saved = json.loads(saved_file.read_text())
    except json.JSONDecodeError:
        raise TrainError(f"{saved_file} is not valid JSON; pass --overwrite to replace the run") from None
    if "adapter_name" in saved and "method" not in saved:  # written before --adapter_name became --method
        saved["method"] = saved.pop("adapter_name")
    # a run_config.json written before --packing existed is a padded run, one before --torch_compile an eager run
    return {"packing": False, "torch_compile": False, **saved}


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
        return _implicit_resume(config, explicit_no)
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


def _implicit_resume(config: TrainConfig, explicit_no: bool) -> str | None:
    """Without --resume_from_checkpoint (or with False): continue this run's newest checkpoint, or refuse."""
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


def check_checkpoint(path: Path) -> int:
    """The step of a checkpoint whose state and adapter files are readable; a damaged one is one line.

    Trainer would otherwise fail with a traceback deep inside ``train()``, after the model has loaded.
    """
    from dense_lora.evaluate import EvaluationError, check_safetensors

    state_file = path / TRAINER_STATE_FILE
    try:
        step = json.loads(state_file.read_text()).get("global_step")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        step = None
    if not is_int(step):
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

    from dense_lora.evaluate import check_safetensors

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


def tokens_seen_at(checkpoint: str | None) -> int:
    """Input tokens the Trainer had counted when it saved `checkpoint` (0 for a fresh run)."""
    if checkpoint is None:
        return 0
    return json.loads((Path(checkpoint) / TRAINER_STATE_FILE).read_text()).get("num_input_tokens_seen", 0)


def adapter_sha256(output_dir: Path) -> str | None:
    """sha256 of the final adapter's weights: the evaluators record the same hash with every result."""
    weights = output_dir / "adapter_model.safetensors"
    return file_sha256(weights) if weights.is_file() else None
