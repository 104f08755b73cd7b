"""Trainer callbacks of a run: per-step metrics to metrics.jsonl, and a SIGTERM that saves before stopping.

Why callbacks: the transformers Trainer owns the loop (one process, torchrun and accelerate alike), so what
a run adds to each step is hooked in here rather than written into a loop of its own.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainingArguments

from dense_lora.runtime import read_jsonl_undamaged, write_jsonl_atomic


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
            kept = [row for row in read_jsonl_undamaged(self.path) if row.get("step", 0) <= state.global_step]
            write_jsonl_atomic(self.path, kept)
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
    A run listens from its start (``listening``), so a SIGTERM while data or the model load is seen too and
    the run stops between phases rather than dying; used as a plain callback, it listens during training.
    """

    def __init__(self) -> None:
        self.requested = False
        self.stopped = False
        self._previous: Any = None
        self._installed = False
        self._installed_for_training = False

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def _install(self) -> bool:
        if self._installed:
            return False
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        self._installed = True
        return True

    def _restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    @contextlib.contextmanager
    def listening(self) -> Iterator[StopOnSigterm]:
        """Handle SIGTERM (set the flag) inside the block, and restore the previous handler after it."""
        installed = self._install()
        try:
            yield self
        finally:
            if installed:
                self._restore()

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self._installed_for_training = self._install()

    def on_train_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if self._installed_for_training:
            self._restore()

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if any_process(self.requested, args.device):
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every rank when any rank's flag is set (the flag itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
