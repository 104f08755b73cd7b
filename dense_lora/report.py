"""Collect evaluation results of several runs into the paper's Table 1 layout, a CSV and a plot.

    python -m dense_lora.report runs/denselora-r16 runs/lora-r32 --out reports/smollm2

Each RUN_DIR is a training output folder (``summary.json``, ``adapter_config.json``, adapter weights) whose
results the evaluation CLIs wrote to ``RUN_DIR/eval/<dataset>.json`` (or directly a folder of
``<dataset>.json`` files). One table per benchmark family present: a row per run with the method, the
trainable-parameter share, each benchmark's accuracy (%) and the average. The plot shows average accuracy
against trainable share on a log axis, the paper's efficiency picture.

The share comes from ``summary.json`` (``trainable_share_pct``, or ``trainable_params / base_params``);
without a summary it is counted: adapter tensor sizes from the weights file over the base model's
parameter count, built on the meta device from the adapter's ``base_model_name_or_path``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dense_lora.evaluate import ACCEPTED, BENCHMARKS

SHORT_NAMES = {
    "boolq": "BoolQ",
    "piqa": "PIQA",
    "social_i_qa": "SIQA",
    "hellaswag": "HellaS.",
    "winogrande": "WinoG.",
    "ARC-Easy": "ARC-e",
    "ARC-Challenge": "ARC-c",
    "openbookqa": "OBQA",
}
METHOD_NAMES = {"denselora": "DenseLoRA", "lora": "LoRA", "dora": "DoRA"}


class ReportError(Exception):
    """A run folder that cannot be reported; the message is one line."""


@dataclass
class Run:
    """What the report needs from one run folder."""

    path: Path
    method: str
    share_pct: float | None
    accuracy: dict[str, float] = field(default_factory=dict)  # dataset -> accuracy in %


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


def load_run(run_dir: Path) -> Run:
    """Read one run folder; raises ReportError when it holds no evaluation results."""
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a folder")
    results_dir = run_dir / "eval" if (run_dir / "eval").is_dir() else run_dir
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    adapter_file = run_dir / "adapter_config.json"
    adapter_config = json.loads(adapter_file.read_text()) if adapter_file.is_file() else {}
    if summary.get("method"):
        method = METHOD_NAMES.get(str(summary["method"]).lower(), str(summary["method"]))
    elif adapter_config:
        method = _method_from_adapter(adapter_config)
    else:
        method = "base model"
    rank = (summary.get("config") or {}).get("r") or adapter_config.get("r")
    if rank and method != "base model":
        method = f"{method} (r={rank})"
    share = _share_from_summary(summary)
    if share is None and adapter_config:
        share = _counted_share(run_dir, adapter_config)
    if share is None and not adapter_config:
        share = 0.0
    run = Run(path=run_dir, method=method, share_pct=share)
    for dataset in ACCEPTED["commonsense"] + ACCEPTED["math"]:
        result_file = results_dir / f"{dataset}.json"
        if result_file.is_file():
            run.accuracy[dataset] = 100.0 * float(json.loads(result_file.read_text())["accuracy"])
    if not run.accuracy:
        raise ReportError(f"{run_dir}: no <dataset>.json results (looked in {results_dir})")
    return run


def _columns(runs: list[Run], kind: str) -> list[str]:
    present = {dataset for run in runs for dataset in run.accuracy}
    return [dataset for dataset in ACCEPTED[kind] if dataset in present]


def average(run: Run, columns: list[str]) -> float | None:
    """Mean accuracy over the columns; None unless the run has every one (a partial mean misleads)."""
    values = [run.accuracy.get(column) for column in columns]
    return None if not values or None in values else sum(values) / len(values)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


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


def markdown(runs: list[Run]) -> str:
    parts = []
    for kind, (header, rows) in tables(runs).items():
        lines = [f"### {kind.capitalize()} reasoning (accuracy %)", ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        lines.extend("| " + " | ".join(row) + " |" for row in rows)
        parts.append("\n".join(lines))
    parts.append(
        "Avg. is shown only for runs with every benchmark of the table; runs: "
        + ", ".join(str(r.path) for r in runs)
    )
    return "\n\n".join(parts) + "\n"


def write_csv(runs: list[Run], path: Path) -> None:
    """One row per run and family, unrounded numbers, for further analysis."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "method", "trainable_share_pct", "kind", "dataset", "accuracy_pct"])
        for kind in BENCHMARKS:
            columns = _columns(runs, kind)  # the table's columns, so averages match the table
            for run in runs:
                if not any(column in run.accuracy for column in columns):
                    continue
                for dataset in columns:
                    if dataset in run.accuracy:
                        writer.writerow(
                            [run.path, run.method, run.share_pct, kind, dataset, run.accuracy[dataset]]
                        )
                mean = average(run, columns)
                writer.writerow(
                    [run.path, run.method, run.share_pct, kind, "average", "" if mean is None else mean]
                )


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
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dense_lora.report", description=__doc__.splitlines()[0])
    parser.add_argument(
        "run_dirs", nargs="+", type=Path, help="run folders (training output with eval/ results)"
    )
    parser.add_argument("--out", type=Path, default=Path("report"), help="writes OUT.md, OUT.csv and OUT.png")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(run_dir) for run_dir in args.run_dirs]
    except (ReportError, json.JSONDecodeError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    labels = [run.method for run in runs]
    for run in runs:  # two runs of one method (say, two ranks without a recorded r) need telling apart
        if labels.count(run.method) > 1:
            run.method = f"{run.method} [{run.path.name}]"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(runs)
    Path(f"{args.out}.md").write_text(text)
    write_csv(runs, Path(f"{args.out}.csv"))
    plot(runs, Path(f"{args.out}.png"))
    print(text)
    print(f"wrote {args.out}.md, {args.out}.csv, {args.out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
