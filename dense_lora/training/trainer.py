"""The Trainer ``finetune.py`` runs: transformers' Trainer, with the record of its arguments kept out of pickle.

transformers' ``Trainer._save`` writes ``training_args.bin`` (``torch.save`` of the whole TrainingArguments
object, a pickle that runs code when loaded) beside the final adapter and into every checkpoint. Nothing reads it
back: a resume reads ``trainer_state.json`` and the optimizer, scheduler and RNG states, all loaded with
``weights_only=True``. Here the same record is ``training_args.json`` (``TrainingArguments.to_json_string``) and
no pickle is left in a run folder.
"""

from __future__ import annotations

from pathlib import Path

from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from dense_lora.runtime import write_text_atomic

from .run_dir import TRAINING_ARGS_FILE


class RecipeTrainer(Trainer):
    """transformers' Trainer, except that every save records its TrainingArguments as JSON, not as a pickle."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:
            return
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        (folder / TRAINING_ARGS_NAME).unlink(missing_ok=True)
        write_text_atomic(folder / TRAINING_ARGS_FILE, self.args.to_json_string())
