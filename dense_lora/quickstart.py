"""The quickstart: DenseLoRA on the real SmolLM2-135M-Instruct, a few hundred real records, minutes on a CPU.

It runs the same code as the paper scripts (``dense_lora.train`` for training, ``dense_lora.evaluate`` for
scoring), only smaller: training on the first records of the ARC-Easy and ARC-Challenge training sets (parts of
commonsense_170k) and scoring the first examples of their test sets before and after. The learning rate is
higher than the paper's 3e-4 and the loss covers only the answers (``train_on_inputs=False``) because the run
is a dozen optimizer steps instead of thousands.

What it prints is meant to be read honestly: a 135M model after a dozen steps learns the answer format and little
else, so next to each accuracy stand the accuracy of guessing (chance) and of always giving the most frequent
answer (majority), and the held-out loss on the answer tokens (``dense_lora.heldout``), which is where the
learning shows at this scale.

    python -m dense_lora.quickstart [--train_per_dataset 96] [--eval_limit 48] [--max_new_tokens 128]
                                    [--output_dir runs/quickstart]
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from . import evaluate, train
from .data import load_records
from .heldout import answer_loss
from .models import load_base_model, load_tokenizer, smollm2_path
from .runtime import DenseLoRAError, folder_problem, write_text_atomic
from .study.data import baselines

DATASETS = ("ARC-Easy", "ARC-Challenge")


def training_subset(per_dataset: int) -> list[dict[str, Any]]:
    """The first `per_dataset` records of each dataset's train.json."""
    return [
        record for name in DATASETS for record in load_records(f"dataset/{name}/train.json")[:per_dataset]
    ]


def write_records(path: Path, records: list[dict[str, Any]]) -> None:
    """``records`` as one LLM-Adapters JSON file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(records))


def score(
    base_model: str,
    adapter: str | None,
    output_dir: Path,
    limit: int,
    batch_size: int,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """Accuracy per dataset on the first `limit` test examples, with the LLM-Adapters evaluation protocol
    (``max_new_tokens``: None for the evaluation default)."""
    results = evaluate.run(
        "commonsense",
        list(DATASETS),
        base_model,
        lora_weights=adapter,
        batch_size=batch_size,
        limit=limit,
        output_dir=str(output_dir),
        overwrite=True,
        max_new_tokens=max_new_tokens,
    )
    return {result["dataset"]: result for result in results}


def heldout_losses(base_model: str, adapter: str | None, limit: int) -> dict[str, float]:
    """Mean NLL of the answer tokens of each dataset's first `limit` test records (teacher-forced)."""
    model = load_base_model(base_model, dtype="float32")
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    tokenizer = load_tokenizer(base_model, padding_side="left")
    return {
        name: answer_loss(
            model, tokenizer, load_records(f"dataset/{name}/test.json")[:limit], cutoff_len=256
        ).mean
        for name in DATASETS
    }


def reference_baselines(limit: int) -> dict[str, tuple[float, float]]:
    """(chance, majority) accuracy of each dataset's first `limit` test records: the numbers to beat."""
    return {name: baselines(load_records(f"dataset/{name}/test.json")[:limit], name) for name in DATASETS}


def main(
    output_dir: str = "runs/quickstart",
    train_per_dataset: int = 96,
    eval_limit: int = 48,
    eval_batch_size: int = 16,
    max_new_tokens: int | None = None,
    lora_r: int = 16,
    learning_rate: float = 2e-3,
    num_epochs: float = 1,
) -> None:
    """Fine-tune DenseLoRA on SmolLM2-135M-Instruct and print accuracy before and after.

    ``max_new_tokens`` caps each answer's generation (None: the evaluation default, 128, the paper's setting).
    An answer is scored once it is fixed, but a model that has not learnt the format yet writes to the cap, so
    on a CPU the two evaluations' decoding is most of the run; a smaller cap gives a quicker look, at the risk
    of cutting off late answers."""
    started = time.perf_counter()
    root = Path(output_dir)
    data_file = root / "train_subset.json"
    # Every flag is checked before anything is read, converted or written: the training ones by TrainConfig,
    # the counts here (evaluate.run would see the evaluation ones only after SmolLM2 is converted).
    problem = folder_problem(root)
    if problem:
        raise DenseLoRAError(f"--output_dir {root}: {problem}")
    config = training_config(root, data_file, lora_r, learning_rate, num_epochs)
    counts = {
        "train_per_dataset": train_per_dataset,
        "eval_limit": eval_limit,
        "eval_batch_size": eval_batch_size,
    }
    if max_new_tokens is not None:
        counts["max_new_tokens"] = max_new_tokens
    for flag, count in counts.items():
        train.require_positive_int(flag, count)
    records = training_subset(train_per_dataset)  # a missing data file stops the run here

    base_model = str(smollm2_path())
    config = dataclasses.replace(config, base_model=base_model)
    write_records(data_file, records)
    print(f"[quickstart] base model {base_model}; {len(records)} training records -> {data_file}", flush=True)

    before = score(base_model, None, root / "eval_before", eval_limit, eval_batch_size, max_new_tokens)
    loss_before = heldout_losses(base_model, None, eval_limit)
    summary = train.run(config)
    after = score(
        base_model, str(root / "adapter"), root / "eval_after", eval_limit, eval_batch_size, max_new_tokens
    )
    loss_after = heldout_losses(base_model, str(root / "adapter"), eval_limit)
    reference = reference_baselines(eval_limit)

    print_summary(lora_r, summary, root / "adapter", (before, after), (loss_before, loss_after), reference)
    print(f"total time {time.perf_counter() - started:.0f} s; adapter in {root / 'adapter'}")


def training_config(
    root: Path, data_file: Path, lora_r: int, learning_rate: float, num_epochs: float
) -> train.TrainConfig:
    """The quickstart's training run (checked on construction); the base model is SmolLM2, resolved later."""
    return train.TrainConfig(
        base_model="smollm2",
        data_path=str(data_file),
        output_dir=str(root / "adapter"),
        batch_size=16,
        micro_batch_size=8,
        num_epochs=num_epochs,
        learning_rate=learning_rate,
        warmup_steps=2,
        val_set_size=0,
        train_on_inputs=False,  # a few steps: spend them on the answers, not on the long shared prompt
        save_step=1000,
        eval_step=1000,
        logging_steps=1,
        lora_r=lora_r,
        bf16=torch.cuda.is_available(),
        overwrite=True,
    )


def print_summary(
    lora_r: int,
    summary: dict[str, Any],
    adapter_dir: Path,
    accuracy: tuple[dict[str, Any], dict[str, Any]],
    answer_loss: tuple[dict[str, float], dict[str, float]],
    reference: dict[str, tuple[float, float]],
) -> None:
    """The table a newcomer reads: accuracy and held-out answer loss before and after, beside the baselines."""
    before, after = accuracy
    loss_before, loss_after = answer_loss
    losses = [m["loss"] for m in map(json.loads, (adapter_dir / train.METRICS_FILE).open()) if "loss" in m]
    print()
    print(
        f"DenseLoRA r={lora_r} on SmolLM2-135M-Instruct: {summary['trainable_params']:,} trainable parameters "
        f"({summary['trainable_share_pct']:.3f}% of the base), {summary['global_step']} steps, "
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, {summary['wall_time_s']:.0f} s training"
    )
    print(
        "| dataset | examples | chance | majority | accuracy before | accuracy after | answer loss before | after |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in DATASETS:
        chance, majority = reference[name]
        print(
            f"| {name} | {after[name]['total']} | {chance:.3f} | {majority:.3f} | {before[name]['accuracy']:.3f} "
            f"| {after[name]['accuracy']:.3f} | {loss_before[name]:.3f} | {loss_after[name]:.3f} |"
        )
    print(
        "chance: guessing among the options; majority: always the most frequent answer. At this size the model "
        "learns the answer format first: the held-out answer loss shows the learning, accuracy near chance is expected."
    )


def cli(argv: list[str] | None = None) -> None:
    """``python -m dense_lora.quickstart``: strict flags (dense_lora.cli), errors as one line and exit status 2."""
    from .cli import QUICKSTART_HELP, fail, parse_or_exit, signature_flags

    flags = signature_flags("quickstart", "main", QUICKSTART_HELP)
    values = parse_or_exit(argv, flags, "python -m dense_lora.quickstart", __doc__ or "")
    try:
        main(**values)
    except (DenseLoRAError, FileNotFoundError) as error:  # TrainError, EvaluationError and the others
        fail(error)


if __name__ == "__main__":
    cli()
