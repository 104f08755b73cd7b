"""Collect evaluation results of several runs into the paper's Table 1 layout beside the paper's figures.

    python -m dense_lora.report runs/denselora-r16 runs/lora-r32 --out reports/smollm2

Each RUN_DIR is a training output folder (``summary.json``, ``adapter_config.json``, adapter weights) whose
results the evaluation CLIs wrote to ``RUN_DIR/eval/<dataset>.json`` (or directly a folder of
``<dataset>.json`` files). One table per benchmark family present: a row per run with the method, the
trainable-parameter share, each benchmark's accuracy (%) and the average. The plot shows average accuracy
against trainable share on a log axis, the paper's efficiency picture.

Beside the user's figures sit the paper's (``dense_lora.paper``): for each run, the published row of the same
experiment (Table 1 or 2 by model, method and rank; Table 4 for the Freeze / Only-Matrix variants; Table 3/8
for other module sets; Table 7 for data fractions) and the difference ours − paper, per benchmark and on
average, in the markdown, the CSV and the console. A run the paper has no row for (another base model, rank or
variant) says "no published row" and why; nothing is made up. The run's experiment is read from
``run_config.json`` (the training flags), else ``summary.json``'s config, else ``adapter_config.json``.

Training curves: for every run whose folder holds the ``metrics.jsonl`` training wrote, train and eval loss
against step (and training tokens/s on a second panel) go to ``curves/<run>.png`` beside OUT.md, with a
summary line per run (last train loss, best eval loss, median tokens/s) in the markdown. A run folder with
curves but no evaluation results yet is reported too (curves only).

The share comes from ``summary.json`` (``trainable_share_pct``, or ``trainable_params / base_params``);
without a summary it is counted: adapter tensor sizes from the weights file over the base model's
parameter count, built on the meta device from the adapter's ``base_model_name_or_path``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dense_lora.benchmarks import ACCEPTED, BENCHMARKS, SHORT_NAMES
from dense_lora.cli import StrictArgumentParser
from dense_lora.paper import (
    CITATION,
    PAPER_BENCHMARKS,
    PaperRow,
    RunFacts,
    no_row_reason,
    published_row,
    variant,
)
from dense_lora.runtime import (
    DenseLoRAError,
    file_sha256,
    read_jsonl_undamaged,
    write_bytes_atomic,
    write_figure_atomic,
)

# finetune.py --method (dense_lora.training.config.METHODS) as the paper spells it
METHOD_NAMES = {"denselora": "DenseLoRA", "lora": "LoRA", "dora": "DoRA", "vera": "VeRA"}
RUN_CONFIG_FILE = "run_config.json"  # dense_lora.train's names; repeated so a report never imports training
SUMMARY_FILE = "summary.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
METRICS_FILE = "metrics.jsonl"


class ReportError(DenseLoRAError):
    """A run folder that cannot be reported; the message is one line."""


Series = list[tuple[float, float]]  # (step, value) pairs in logged order


@dataclass(frozen=True)
class Curves:
    """The series of one run's metrics.jsonl (dense_lora.train.MetricsLog): train and eval loss, tokens/s."""

    train_loss: Series
    eval_loss: Series
    tokens_per_s: Series

    def __bool__(self) -> bool:
        return bool(self.train_loss or self.eval_loss)


def read_curves(path: Path) -> Curves | None:
    """Loss and throughput against step from metrics.jsonl; None when the file is absent or holds no loss.

    MetricsLog writes one JSON object per Trainer log: training logs carry ``loss`` (and ``tokens_per_s``,
    measured since the previous log), evaluation logs ``eval_loss``, and the final log ``train_loss`` (the
    run's mean, not a point of the curve, so it is left out). A resumed run's file was already cut back to
    the checkpoint by MetricsLog, so each step appears once per kind. A line cut off by a kill is skipped.
    """
    if not path.is_file():
        return None
    train: Series = []
    evaluation: Series = []
    speed: Series = []
    for record in read_jsonl_undamaged(path):
        if not isinstance(record, dict) or not isinstance(record.get("step"), int | float):
            continue
        step = record["step"]
        if isinstance(record.get("loss"), int | float):
            train.append((step, float(record["loss"])))
            if isinstance(record.get("tokens_per_s"), int | float):
                speed.append((step, float(record["tokens_per_s"])))
        if isinstance(record.get("eval_loss"), int | float):
            evaluation.append((step, float(record["eval_loss"])))
    curves = Curves(train, evaluation, speed)
    return curves if curves else None


def plot_curves(curves: Curves, title: str, path: Path) -> Curves:
    """Draw loss against step (and tokens/s on a second panel) as PNG; returns the series as drawn.

    The return value is read back from the figure's lines, so a caller (and the tests) can check that what
    is on the picture is what training logged.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if curves.tokens_per_s else 1
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    loss_axis = axes[0][0]
    drawn: dict[str, Series] = {"train_loss": [], "eval_loss": [], "tokens_per_s": []}
    lines = {}
    if curves.train_loss:
        (lines["train_loss"],) = loss_axis.plot(*zip(*curves.train_loss, strict=True), label="train loss")
    if curves.eval_loss:
        (lines["eval_loss"],) = loss_axis.plot(
            *zip(*curves.eval_loss, strict=True), marker="o", label="eval loss"
        )
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("loss")
    loss_axis.set_title(title)
    loss_axis.grid(True, alpha=0.3)
    loss_axis.legend()
    if curves.tokens_per_s:
        speed_axis = axes[0][1]
        (lines["tokens_per_s"],) = speed_axis.plot(*zip(*curves.tokens_per_s, strict=True), color="tab:green")
        speed_axis.set_xlabel("optimizer step")
        speed_axis.set_ylabel("training tokens / s")
        speed_axis.set_title("throughput")
        speed_axis.grid(True, alpha=0.3)
    for name, line in lines.items():
        drawn[name] = [(float(x), float(y)) for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True)]
    figure.tight_layout()
    write_figure_atomic(figure, path)
    plt.close(figure)
    return Curves(drawn["train_loss"], drawn["eval_loss"], drawn["tokens_per_s"])


def curve_files(runs: list[Run], folder: Path) -> dict[int, Path]:
    """One PNG name per run with curves: the folder name, with the parent's when two runs share it."""
    names = [run.path.resolve().name for run in runs]
    out = {}
    for index, run in enumerate(runs):
        if run.curves is None:
            continue
        name = names[index]
        if names.count(name) > 1:
            name = f"{run.path.resolve().parent.name}-{name}"
        if name in {path.stem for path in out.values()}:
            name = f"{name}-{index}"
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        out[index] = folder / f"{safe}.png"
    return out


def curves_markdown(runs: list[Run], files: dict[int, Path], relative_to: Path) -> str:
    """A summary line per run with curves (last train loss, best eval loss, median tokens/s) and the PNG links."""
    if not files:
        return ""
    lines = [
        "### Training curves",
        "",
        "| Run | Steps | Last train loss | Best eval loss (step) | Median tokens/s | Plot |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for index, path in files.items():
        run, curves = runs[index], runs[index].curves
        assert curves is not None
        steps = max(step for step, _ in curves.train_loss + curves.eval_loss)
        last = _fmt(curves.train_loss[-1][1], 4) if curves.train_loss else "–"
        best = min(curves.eval_loss, key=lambda point: point[1]) if curves.eval_loss else None
        best_text = "–" if best is None else f"{best[1]:.4f} ({best[0]:g})"
        speeds = sorted(value for _, value in curves.tokens_per_s)
        median = _fmt(speeds[len(speeds) // 2], 0) if speeds else "–"
        link = os.path.relpath(path, relative_to)
        lines.append(
            f"| {run.method} | {steps:g} | {last} | {best_text} | {median} | [{path.name}]({link}) |"
        )
    return "\n".join(lines)


@dataclass
class Run:
    """What the report needs from one run folder."""

    path: Path
    method: str
    share_pct: float | None
    accuracy: dict[str, float] = field(default_factory=dict)  # dataset -> accuracy in %
    facts: RunFacts | None = None  # the experiment, for the paper's row; None for a bare base model
    trained_on: str | None = None  # "commonsense" / "math" when the training data says so
    curves: Curves | None = None  # from metrics.jsonl, when training wrote one


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file, {} when absent; a malformed file is the user's to fix, so it is an error."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ReportError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ReportError(f"{path}: expected a JSON object")
    return value


def _method_from_adapter(config: dict[str, Any]) -> str:
    peft_type = str(config.get("peft_type", "")).lower()
    name = "dora" if peft_type == "lora" and config.get("use_dora") else peft_type
    return METHOD_NAMES.get(name, name or "adapter")


def _counted_share(run_dir: Path, adapter_config: dict[str, Any]) -> float | None:
    """Trainable share (%) counted from the adapter weights and the base architecture; None if impossible."""
    weights = run_dir / "adapter_model.safetensors"
    base = adapter_config.get("base_model_name_or_path")
    if not weights.is_file() or not base:
        return None
    from safetensors import safe_open

    from dense_lora.models import build_model_on_meta, published_config, resolve_model_path

    with safe_open(str(weights), framework="pt") as handle:
        trainable = sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())  # noqa: SIM118
    try:
        config = published_config(resolve_model_path(base))
    except (ValueError, OSError):
        return None
    total = sum(p.numel() for p in build_model_on_meta(config).parameters())
    return 100.0 * trainable / total


def _share_from_summary(summary: dict[str, Any]) -> float | None:
    if summary.get("trainable_share_pct") is not None:
        return float(summary["trainable_share_pct"])
    if summary.get("trainable_params") and summary.get("base_params"):
        return 100.0 * summary["trainable_params"] / summary["base_params"]
    return None


def _modules(value: Any) -> tuple[str, ...] | None:
    """Module names as training records them: a list, a comma string, or peft's regex string (kept whole)."""
    if value is None:
        return None
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return tuple(str(name) for name in value)


def _training_family(data_path: Any) -> str | None:
    """Which published table family the training data belongs to, judged from its file name."""
    name = Path(str(data_path or "")).name.lower()
    if "math" in name:
        return "math"
    return "commonsense" if "commonsense" in name else None


def run_facts(
    run_config: dict[str, Any], summary: dict[str, Any], adapter_config: dict[str, Any]
) -> RunFacts | None:
    """The experiment a run folder holds, for :func:`dense_lora.paper.published_row`; None without an adapter.

    The training flags (run_config.json, or summary.json's copy) are the record of what was run; an adapter
    downloaded without them still says its method, rank, modules and variant in adapter_config.json (its data
    fraction is then unknown and taken as the whole training set). ``family`` is a placeholder: the report
    asks for a row per benchmark family it shows.
    """
    flags = run_config or summary.get("config") or {}
    if not flags and not adapter_config and not summary.get("method"):
        return None
    # --method; adapter_name: how run folders written before --method spelt it
    declared = flags.get("method") or flags.get("adapter_name") or summary.get("method")
    if declared:
        name = str(declared).lower()
        method = METHOD_NAMES.get(name, name)
    else:
        method = _method_from_adapter(adapter_config)
    rank = flags.get("lora_r", flags.get("r", adapter_config.get("r")))
    base = (
        flags.get("base_model") or summary.get("base_model") or adapter_config.get("base_model_name_or_path")
    )
    targets = _modules(flags.get("target_modules")) or _modules(adapter_config.get("target_modules"))
    lora_modules = _modules(flags.get("lora_modules", adapter_config.get("lora_modules"))) or ()
    facts = RunFacts(
        base_model=str(base or ""),
        family="commonsense",
        method=method,
        r=int(rank) if rank is not None else None,
        activation=str(flags.get("activation", adapter_config.get("activation", "gelu"))),
        train_shared=bool(flags.get("train_shared", adapter_config.get("train_shared", True))),
        lora_modules=lora_modules,
        data_fraction=float(flags.get("data_fraction", 1.0)),
    )
    return dataclasses.replace(facts, target_modules=targets) if targets else facts


def _adapter_hash(run_dir: Path, summary: dict[str, Any]) -> str | None:
    """sha256 of the adapter the run folder holds (summary.json's, else hashed from the weights file)."""
    if summary.get("adapter_sha256"):
        return str(summary["adapter_sha256"])
    weights = run_dir / "adapter_model.safetensors"
    return file_sha256(weights) if weights.is_file() else None


def _scored_hash(result: dict[str, Any]) -> str | None:
    """sha256 of the adapter an evaluation result was computed with, where the evaluator recorded it."""
    adapter = result.get("adapter")
    nested = adapter.get("sha256") if isinstance(adapter, dict) else None
    return result.get("adapter_sha256") or nested


def load_run(run_dir: Path) -> Run:
    """Read one run folder; raises ReportError when it holds no evaluation results."""
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a folder")
    results_dir = run_dir / "eval" if (run_dir / "eval").is_dir() else run_dir
    summary = _read_json(run_dir / SUMMARY_FILE)
    adapter_config = _read_json(run_dir / ADAPTER_CONFIG_FILE)
    run_config = _read_json(run_dir / RUN_CONFIG_FILE)
    facts = run_facts(run_config, summary, adapter_config)
    if facts is not None:
        method = facts.method
        details = [f"r={facts.r}"] if facts.r is not None else []
        details += [name for name in (variant(facts),) if name]
        if details:
            method = f"{method} ({', '.join(details)})"
    else:
        method = "base model"
    share = _share_from_summary(summary)
    if share is None and adapter_config:
        share = _counted_share(run_dir, adapter_config)
    if share is None and facts is None:
        share = 0.0
    flags = run_config or summary.get("config") or {}
    run = Run(
        path=run_dir,
        method=method,
        share_pct=share,
        facts=facts,
        trained_on=_training_family(flags.get("data_path")),
    )
    held = _adapter_hash(run_dir, summary)
    for dataset in ACCEPTED["commonsense"] + ACCEPTED["math"]:
        result = _read_json(results_dir / f"{dataset}.json")
        if result:
            if "accuracy" not in result:
                raise ReportError(f"{results_dir / f'{dataset}.json'}: no 'accuracy' field")
            scored = _scored_hash(result)
            if held and scored and held != scored:
                raise ReportError(
                    f"{results_dir / f'{dataset}.json'}: scored adapter {scored[:12]}, but {run_dir} holds "
                    f"{held[:12]}; rerun the evaluation"
                )
            run.accuracy[dataset] = 100.0 * float(result["accuracy"])
    run.curves = read_curves(run_dir / METRICS_FILE)
    if not run.accuracy and run.curves is None:
        raise ReportError(
            f"{run_dir}: no <dataset>.json results (looked in {results_dir}) and no {METRICS_FILE}"
        )
    return run


def _columns(runs: list[Run], kind: str) -> list[str]:
    present = {dataset for run in runs for dataset in run.accuracy}
    return [dataset for dataset in ACCEPTED[kind] if dataset in present]


def average(run: Run, columns: list[str] | tuple[str, ...]) -> float | None:
    """Mean accuracy over the columns; None unless the run has every one (a partial mean misleads)."""
    values = [run.accuracy.get(column) for column in columns]
    return None if not values or None in values else sum(values) / len(values)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{value:+.1f}"


def _share_text(share: float | None) -> str:
    return "–" if share is None else f"{share:.3g}"


def tables(runs: list[Run]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Per family present: header and rows of strings (method, share, benchmarks..., average)."""
    out = {}
    for kind in BENCHMARKS:
        columns = _columns(runs, kind)
        if not columns:
            continue
        header = ["Method", "Params (%)", *[SHORT_NAMES.get(c, c) for c in columns], "Avg."]
        rows = [
            [
                run.method,
                _share_text(run.share_pct),
                *[_fmt(run.accuracy.get(c)) for c in columns],
                _fmt(average(run, columns)),
            ]
            for run in runs
            if any(c in run.accuracy for c in columns)
        ]
        out[kind] = (header, rows)
    return out


# ------------------------------------------------------------------------------------------------------------
# Beside the paper
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """One run against the paper's row of the same experiment, for one benchmark family."""

    kind: str
    run: Run
    row: PaperRow | None
    reason: str | None  # why there is no row; None when there is one

    @property
    def benchmarks(self) -> tuple[str, ...]:
        """The benchmarks the paper's average covers (Table 2: four math sets, not our six)."""
        if self.row is not None and self.row.scores:
            return tuple(name for name in PAPER_BENCHMARKS[self.kind] if name in self.row.scores)
        return PAPER_BENCHMARKS[self.kind]

    def paper(self, dataset: str) -> float | None:
        """The published accuracy (%) on one benchmark; None where the row prints only its average."""
        return None if self.row is None else self.row.scores.get(dataset)

    def diff(self, dataset: str) -> float | None:
        """Ours − paper in accuracy points; None unless both exist."""
        ours, theirs = self.run.accuracy.get(dataset), self.paper(dataset)
        return None if ours is None or theirs is None else ours - theirs

    @property
    def ours_avg(self) -> float | None:
        """Our mean over the paper's benchmarks, so the averages compared cover the same sets."""
        return average(self.run, self.benchmarks)

    @property
    def avg_diff(self) -> float | None:
        mine, theirs = self.ours_avg, None if self.row is None else self.row.avg
        return None if mine is None or theirs is None else mine - theirs

    @property
    def source(self) -> str:
        """Where the figures are printed, e.g. "Table 1, DenseLoRA r=32, llama3-8b"."""
        if self.row is None:
            return f"no published row: {self.reason}"
        return f"{self.row.table}, {self.row.label}, {self.row.model}"


def comparisons(runs: list[Run], kind: str) -> list[Comparison]:
    """For every run with results of this family: the published row of its experiment, or why there is none."""
    out = []
    for run in runs:
        if not any(dataset in run.accuracy for dataset in ACCEPTED[kind]):
            continue
        if run.facts is None:
            out.append(Comparison(kind, run, None, "a base model without an adapter (the paper prints none)"))
            continue
        facts = dataclasses.replace(run.facts, family=kind)
        if run.trained_on is not None and run.trained_on != kind:
            reason = f"trained on {run.trained_on} data; the paper's {kind} rows are {kind}-trained"
            out.append(Comparison(kind, run, None, reason))
            continue
        row = published_row(facts)
        out.append(Comparison(kind, run, row, None if row is not None else no_row_reason(facts)))
    return out


def _paper_columns(runs: list[Run], kind: str) -> list[str]:
    wanted = set(_columns(runs, kind)) | set(PAPER_BENCHMARKS[kind])
    return [dataset for dataset in ACCEPTED[kind] if dataset in wanted]


def paper_tables(runs: list[Run]) -> dict[str, tuple[list[str], list[list[str]], list[str]]]:
    """Per family present: header, rows (ours / paper / ours − paper per run) and the transcription notes."""
    out = {}
    for kind in BENCHMARKS:
        found = comparisons(runs, kind)
        if not found:
            continue
        columns = _paper_columns(runs, kind)
        header = ["Run", "Figures", "Params (%)", *[SHORT_NAMES.get(c, c) for c in columns], "Avg."]
        rows, notes = [], []
        for item in found:
            rows.append(
                [
                    item.run.method,
                    "ours",
                    _share_text(item.run.share_pct),
                    *[_fmt(item.run.accuracy.get(c)) for c in columns],
                    _fmt(item.ours_avg),
                ]
            )
            if item.row is None:
                rows.append(["", item.source, "–", *["–"] * len(columns), "–"])
                continue
            rows.append(
                [
                    "",
                    f"paper: {item.source}",
                    _share_text(item.row.params_percent),
                    *[_fmt(item.paper(c)) for c in columns],
                    _fmt(item.row.avg),
                ]
            )
            rows.append(
                ["", "ours − paper", "", *[_signed(item.diff(c)) for c in columns], _signed(item.avg_diff)]
            )
            if item.row.note and f"{item.source}: {item.row.note}" not in notes:
                notes.append(f"{item.source}: {item.row.note}")
        out[kind] = (header, rows, notes)
    return out


def _markdown_table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> list[str]:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join(["---"] * text_columns + ["---:"] * (len(header) - text_columns)) + "|")
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


def markdown(runs: list[Run]) -> str:
    """The report: our tables, then each run beside the paper's row of the same experiment."""
    parts = []
    for kind, (header, rows) in tables(runs).items():
        parts.append(
            "\n".join([f"### {kind.capitalize()} reasoning (accuracy %)", "", *_markdown_table(header, rows)])
        )
    parts.append(
        "Avg. is shown only for runs with every benchmark of the table; runs: "
        + ", ".join(str(r.path) for r in runs)
    )
    for kind, (header, rows, notes) in paper_tables(runs).items():
        benchmarks = ", ".join(SHORT_NAMES.get(name, name) for name in PAPER_BENCHMARKS[kind])
        lines = [f"### {kind.capitalize()} reasoning beside the paper ({CITATION})", ""]
        lines += _markdown_table(header, rows, text_columns=2)
        lines += [
            "",
            f"Avg. here is over the paper's benchmarks ({benchmarks}), ours only when all are present.",
        ]
        lines += [f"Transcription note, {note}" for note in notes]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


CSV_FIELDS = [
    "run",
    "method",
    "trainable_share_pct",
    "kind",
    "dataset",
    "accuracy_pct",
    "paper_source",
    "paper_params_pct",
    "paper_accuracy_pct",
    "ours_minus_paper",
    "paper_note",
]


def _csv_row(
    common: dict[str, Any], dataset: str, ours: float | None, theirs: float | None, diff: float | None
) -> dict[str, Any]:
    return {
        **common,
        "dataset": dataset,
        "accuracy_pct": "" if ours is None else ours,
        "paper_accuracy_pct": "" if theirs is None else theirs,
        "ours_minus_paper": "" if diff is None else diff,
    }


def _csv_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per run, family and benchmark (and average), with the paper's figure and the difference."""
    out = []
    for kind in BENCHMARKS:
        columns = _columns(runs, kind)  # the table's columns, so averages match the table
        by_run = {id(item.run): item for item in comparisons(runs, kind)}
        for run in runs:
            if id(run) not in by_run:
                continue
            item = by_run[id(run)]
            common = {
                "run": run.path,
                "method": run.method,
                "trainable_share_pct": run.share_pct,
                "kind": kind,
                "paper_source": item.source,
                "paper_params_pct": "" if item.row is None else item.row.params_percent,
                "paper_note": "" if item.row is None else item.row.note or "",
            }

            for dataset in columns:
                if dataset in run.accuracy:
                    out.append(
                        _csv_row(
                            common, dataset, run.accuracy[dataset], item.paper(dataset), item.diff(dataset)
                        )
                    )
            paper_avg = None if item.row is None else item.row.avg
            if set(columns) == set(item.benchmarks):
                out.append(_csv_row(common, "average", average(run, columns), paper_avg, item.avg_diff))
            else:  # the table's average and the paper's cover different benchmarks: one row each
                out.append(_csv_row(common, "average", average(run, columns), None, None))
                out.append(
                    _csv_row(common, "average_paper_benchmarks", item.ours_avg, paper_avg, item.avg_diff)
                )
    return out


def write_csv(runs: list[Run], path: Path) -> None:
    """One row per run, family and benchmark, unrounded numbers with the paper's beside them."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(_csv_rows(runs))
    write_bytes_atomic(path, buffer.getvalue().encode())


def plot(runs: list[Run], path: Path) -> None:
    """Average accuracy vs trainable share (log x); runs without a positive share cannot sit on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for kind, marker in (("commonsense", "o"), ("math", "s")):
        columns = _columns(runs, kind)
        points = [
            (run.share_pct, average(run, columns), run.method)
            for run in runs
            if columns and run.share_pct and average(run, columns) is not None
        ]
        if not points:
            continue
        axis.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, label=kind)
        for share, value, label in points:
            axis.annotate(label, (share, value), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axis.set_xscale("log")
    axis.margins(x=0.2)
    axis.set_xlabel("trainable parameters (% of base model, log scale)")
    axis.set_ylabel("average accuracy (%)")
    axis.set_title("Accuracy vs trainable parameters")
    axis.grid(True, which="both", alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend()
    figure.tight_layout()
    write_figure_atomic(figure, path)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = StrictArgumentParser(prog="python -m dense_lora.report", description=__doc__.splitlines()[0])
    parser.add_argument(
        "run_dirs",
        nargs="+",
        type=Path,
        help="run folders: training output with eval/ results and/or metrics.jsonl, or a folder of results",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("report"),
        help="prefix: writes OUT.md, OUT.csv, OUT.png and curves/<run>.png beside them "
        "(an existing folder means OUT/report.*)",
    )
    args = parser.parse_args(argv)
    out = args.out / "report" if args.out.is_dir() else args.out
    if out.parent.exists() and not out.parent.is_dir():
        print(f"error: --out {args.out}: {out.parent} is not a folder", file=sys.stderr)
        return 2
    try:
        runs = [load_run(run_dir) for run_dir in args.run_dirs]
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    labels = [run.method for run in runs]
    for run in runs:  # two runs of one method (say, two ranks without a recorded r) need telling apart
        if labels.count(run.method) > 1:
            run.method = f"{run.method} [{run.path.name}]"
    out.parent.mkdir(parents=True, exist_ok=True)
    files = curve_files(runs, out.parent / "curves")
    for index, path in files.items():
        path.parent.mkdir(exist_ok=True)
        curves = runs[index].curves
        assert curves is not None
        plot_curves(curves, runs[index].method, path)
    text = markdown(runs)
    if files:
        text += "\n" + curves_markdown(runs, files, out.parent) + "\n"
    write_bytes_atomic(Path(f"{out}.md"), text.encode())
    write_csv(runs, Path(f"{out}.csv"))
    plot(runs, Path(f"{out}.png"))
    print(text)
    written = [f"{out}.md", f"{out}.csv", f"{out}.png", *map(str, files.values())]
    print(f"wrote {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
