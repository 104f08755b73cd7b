"""Running the study: named phases, each resumable, each through the same commands a user would type.

1. data      training mixes, validation sets, clean held-out slices (``RUNS/data``)
2. sweep     learning-rate sweep runs (``finetune.py``), their validation answer loss, the chosen rates
3. train     every reported run (``finetune.py``)
4. heldout   validation and test answer losses of every run and of the base model (``heldout.json``)
5. accuracy  generation accuracy on the test slices (``commonsense_evaluate.py`` / ``math_evaluate.py``)

A finished step is never redone: a run folder with a completed ``summary.json`` is trained, a ``heldout.json``
written for the same data is evaluated, and the evaluation CLIs resume by themselves. Rerunning the study command
after a kill therefore continues where it stopped. Every command is appended to ``RUNS/commands.log``.
"""

from __future__ import annotations

import datetime as dt
import gc
import hashlib
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import load_records, load_test_records
from ..runtime import DenseLoRAError, write_json_atomic
from .data import build_heldout, build_training, slices_as_dicts, training_sources
from .plan import METHODS, Method, Profile, Run, main_runs, select_learning_rates, sweep_runs

REPO_ROOT = Path(__file__).resolve().parents[2]
EVALUATORS = {"commonsense": "commonsense_evaluate.py", "math": "math_evaluate.py"}
BASE = "base"  # the folder of the base model's evaluation


class StudyError(DenseLoRAError):
    """A study that cannot run as asked; the message is one line."""


@dataclass(frozen=True)
class Study:
    model: str  # alias, hub id or folder
    devices: str  # "cpu" or a CUDA device list such as "0" or "0,1,2,3"
    profile: Profile
    runs_dir: Path
    families: tuple[str, ...] = ("commonsense", "math")
    methods: tuple[Method, ...] = METHODS
    dry_run: bool = False

    @property
    def data_dir(self) -> Path:
        return self.runs_dir / "data"

    @property
    def heldout_root(self) -> Path:
        """The DENSELORA_DATA root the evaluation CLIs read the test slices from."""
        return self.data_dir / "heldout"

    def run_dir(self, run: Run | str, family: str = "commonsense") -> Path:
        if isinstance(run, str):
            return self.runs_dir / family / run
        return self.runs_dir / run.family / run.name

    @property
    def eval_dtype(self) -> str:
        return "bfloat16" if self.profile.precision == "bf16" else "float32"


# ------------------------------------------------------------------------------------------------------------
# Processes and files
# ------------------------------------------------------------------------------------------------------------


def _environment(study: Study, **extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env["CUDA_VISIBLE_DEVICES"] = "" if study.devices == "cpu" else study.devices
    return env


def _launcher(study: Study) -> list[str]:
    """python, or torchrun with one process per listed GPU (the global batch stays the same)."""
    count = 1 if study.devices == "cpu" else len(study.devices.split(","))
    return [sys.executable] if count == 1 else ["torchrun", "--nproc_per_node", str(count)]


def _execute(study: Study, command: Sequence[str], env: dict[str, str], what: str) -> None:
    """Log the command, then run it (not in a dry run); a failure stops the study with one line."""
    shown = " ".join(shlex.quote(part) for part in command)
    prefix = " ".join(
        f"{key}={shlex.quote(env[key])}" for key in ("CUDA_VISIBLE_DEVICES", "DENSELORA_DATA") if key in env
    )
    line = f"{prefix} {shown}".strip()
    print(f"[study] {what}: {line}", flush=True)
    if study.dry_run:
        return
    study.runs_dir.mkdir(parents=True, exist_ok=True)
    with (study.runs_dir / "commands.log").open("a") as log:
        log.write(f"# {dt.datetime.now().isoformat(timespec='seconds')} {what}\n{line}\n")
    done = subprocess.run(list(command), env=env, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise StudyError(f"{what} failed with exit status {done.returncode}: {line}")


def _write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, payload)


def read_json(path: Path) -> Any:
    """A JSON file's content, or None when the file is not there yet (a phase not run)."""
    return json.loads(path.read_text()) if path.is_file() else None


def _fingerprint(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------------
# Phase 1: data
# ------------------------------------------------------------------------------------------------------------


def prepare_data(study: Study) -> dict[str, Any]:
    """Build (or reuse) the data files; returns the manifest with every slice's baselines."""
    profile = study.profile
    # "baselines": where the chance/majority figures are computed; a manifest from before they were computed on
    # the scored records (and not on the whole loss slice) lacks it and is built again
    settings = {"profile": profile.name, "families": list(study.families), "baselines": "scored records"}
    manifest_file = study.data_dir / "manifest.json"
    manifest = read_json(manifest_file)
    if manifest and manifest.get("settings") == settings:
        return manifest
    manifest = {"settings": settings, "training": {}, "slices": []}
    for family in study.families:
        take_all = (profile.train_per_source if family == "commonsense" else profile.math_train) is None
        sources = training_sources(family, take_all)
        per_source = profile.train_per_source if family == "commonsense" else profile.math_train
        validation = profile.validation_per_source if family == "commonsense" else profile.math_validation
        manifest["training"][family] = build_training(family, sources, per_source, validation, study.data_dir)
        scored = _accuracy_limit(profile, family)
        limits = [profile.heldout_per_benchmark, scored]
        limit = None if None in limits else max(limits)
        slices = build_heldout(family, sources, limit, study.heldout_root, scored)
        manifest["slices"] += slices_as_dicts(slices)
    _write_json(manifest_file, manifest)
    return manifest


def _accuracy_limit(profile: Profile, family: str) -> int | None:
    return profile.accuracy_per_benchmark if family == "commonsense" else profile.math_accuracy_per_benchmark


# ------------------------------------------------------------------------------------------------------------
# Phases 2-3: training
# ------------------------------------------------------------------------------------------------------------


def is_trained(run_dir: Path) -> bool:
    summary = read_json(run_dir / "summary.json")
    return bool(summary) and summary.get("status") == "completed"


def train(study: Study, runs: Sequence[Run]) -> None:
    """Train every run that has no completed summary yet, one after the other."""
    for run in runs:
        run_dir = study.run_dir(run)
        if is_trained(run_dir):
            continue
        data = study.data_dir / f"train_{run.family}.json"
        flags = run.finetune_flags(study.profile, study.model, str(data), str(run_dir))
        command = [*_launcher(study), str(REPO_ROOT / "finetune.py"), *flags]
        _execute(study, command, _environment(study), f"train {run.family}/{run.name}")


# ------------------------------------------------------------------------------------------------------------
# Phase 4: held-out answer loss
# ------------------------------------------------------------------------------------------------------------


def heldout_sets(study: Study, family: str, test: bool) -> dict[str, list[dict[str, Any]]]:
    """The records each loss is computed on: the validation set, and (for reported runs) each test slice."""
    sets = {"validation": load_records(study.data_dir / f"validation_{family}.json")}
    if test:
        manifest = read_json(study.data_dir / "manifest.json")
        for item in manifest["slices"]:
            if item["family"] == family:
                file = study.heldout_root / "dataset" / item["dataset"] / "test.json"
                records = load_test_records(file)
                sets[item["dataset"]] = records[: study.profile.heldout_per_benchmark]
    return sets


def evaluate_heldout(study: Study, targets: Sequence[tuple[Path, str, bool]]) -> None:
    """Write ``heldout.json`` (answer loss per set) into each (folder, family, with test slices) target.

    The base model is loaded afresh for every adapter: attaching adapters in turn to one copy would leave the next
    evaluation depending on how cleanly the previous one was removed.
    """
    if study.dry_run:
        for folder, _, _ in targets:
            print(f"[study] held-out loss: {folder}", flush=True)
        return
    pending = []
    for folder, family, test in targets:
        # Each set is fingerprinted on its own: the sweep asks a folder for its validation loss only, the main
        # phase for the test slices too, and neither must recompute (or drop) what the other measured.
        sets = heldout_sets(study, family, test)
        keys = {name: _fingerprint([r["instruction"] for r in records]) for name, records in sets.items()}
        previous = read_json(folder / "heldout.json") or {}
        done = previous.get("set_fingerprints", {})
        todo = {name: records for name, records in sets.items() if done.get(name) != keys[name]}
        if todo:
            kept = {
                name: loss
                for name, loss in previous.get("losses", {}).items()
                if name in done and name not in todo
            }
            pending.append(
                (folder, todo, {name: done[name] for name in kept} | {n: keys[n] for n in todo}, kept)
            )
    if not pending:
        return
    from ..heldout import answer_loss
    from ..models import load_base_model, load_tokenizer

    tokenizer = load_tokenizer(study.model, padding_side="left")
    device = "cpu" if study.devices == "cpu" else "cuda:0"
    for folder, sets, fingerprints, kept in pending:
        print(f"[study] held-out loss: {folder}", flush=True)
        model = load_base_model(study.model, dtype=study.eval_dtype).to(device)
        if folder.name != BASE:
            from peft import PeftModel  # DenseLoRA is registered: this package is imported

            model = PeftModel.from_pretrained(model, str(folder))
        model.eval()
        losses = {
            name: answer_loss(model, tokenizer, records, cutoff_len=512).as_dict()
            for name, records in sets.items()
        }
        _write_json(folder / "heldout.json", {"set_fingerprints": fingerprints, "losses": kept | losses})
        del model
        gc.collect()


# ------------------------------------------------------------------------------------------------------------
# Phase 5: accuracy
# ------------------------------------------------------------------------------------------------------------


def evaluate_accuracy(study: Study, folder: Path, family: str) -> None:
    """Score the test slices with the evaluation CLI (which resumes by itself)."""
    manifest = read_json(study.data_dir / "manifest.json") or {"slices": []}
    datasets = [item["dataset"] for item in manifest["slices"] if item["family"] == family]
    limit = _accuracy_limit(study.profile, family)
    if not datasets or limit == 0:
        return
    command = [*_launcher(study), str(REPO_ROOT / EVALUATORS[family]), "--dataset", ",".join(datasets)]
    command += ["--base_model", study.model, "--output_dir", str(folder / "eval")]
    if folder.name != BASE:
        command += ["--lora_weights", str(folder)]
    command += ["--batch_size", str(study.profile.eval_batch_size), "--dtype", study.eval_dtype]
    if limit is not None:
        command += ["--limit", str(limit)]
    env = _environment(study, DENSELORA_DATA=str(study.heldout_root))
    _execute(study, command, env, f"accuracy {family}/{folder.name}")


# ------------------------------------------------------------------------------------------------------------
# The whole study
# ------------------------------------------------------------------------------------------------------------


def choose_learning_rates(study: Study) -> tuple[dict[str, float], list[Run]]:
    """Run the sweep (training and validation loss); returns the rate of every family and the sweep runs."""
    sweep = sweep_runs(study.profile, study.methods)
    train(study, sweep)
    evaluate_heldout(study, [(study.run_dir(run), run.family, False) for run in sweep])
    if study.dry_run:  # nothing was measured: show the plan with the first rate of each grid
        print(
            "[study] dry run: the runs below show the first rate of each grid; the sweep chooses", flush=True
        )
        return {
            **{group: grid[0] for group, grid in study.profile.sweep.items()},
            **study.profile.fixed_lr,
        }, sweep
    losses = {}
    for run in sweep:
        result = read_json(study.run_dir(run) / "heldout.json")
        if result:
            losses[run.name] = result["losses"]["validation"]["loss"]
    chosen = select_learning_rates(study.profile, losses, sweep)
    _write_json(study.runs_dir / "learning_rates.json", {"chosen": chosen, "validation_loss": losses})
    return chosen, sweep


def planned_runs(study: Study) -> list[Run]:
    """The reported runs without running anything: the rates chosen by a finished sweep, or the fixed ones."""
    chosen = (read_json(study.runs_dir / "learning_rates.json") or {}).get("chosen", {})
    return main_runs(study.profile, {**study.profile.fixed_lr, **chosen}, study.families, study.methods)


def run_study(study: Study) -> list[Run]:
    """Every phase in order; returns the reported runs (the sweep runs are in RUNS too)."""
    if study.dry_run:
        print(f"[study] dry run: {study.profile.name} profile, {study.model} on {study.devices}", flush=True)
    else:
        prepare_data(study)
    learning_rates, sweep = choose_learning_rates(study)
    runs = main_runs(study.profile, learning_rates, study.families, study.methods)
    swept = {run.name for run in sweep}
    for family in study.families:
        evaluate_heldout(study, [(study.runs_dir / family / BASE, family, True)])
    # Each run is trained and its held-out loss measured before the next starts, so a study stopped early has
    # complete loss results for every run it reached (main_runs orders them so those cover the whole grid first).
    # Generation accuracy, the slowest and (at small scale) the noisiest measure, comes after all of them.
    for run in runs:
        if not (study.dry_run and run.family == "commonsense" and run.name in swept):
            train(study, [run])
        evaluate_heldout(study, [(study.run_dir(run), run.family, True)])
    for family in study.families:
        evaluate_accuracy(study, study.runs_dir / family / BASE, family)
    for run in runs:
        evaluate_accuracy(study, study.run_dir(run), run.family)
    return runs
