"""The study's results: one record per run, then tables (markdown and CSV), plots and a generated report.

Numbers are reported as they came out: every accuracy beside the chance and majority-class accuracy of the same
slice and beside the untuned base model; seeded methods as mean ± sample standard deviation over seeds with the
seed count; parameter counts as trained (``summary.json``). Averages over benchmarks are unweighted means, as in
the paper's "Avg." column.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..benchmarks import SHORT_NAMES
from ..runtime import write_csv_atomic, write_figure_atomic, write_text_atomic
from .plan import MATCH_FACTOR, METHODS, METHODS_BY_KEY, Method, Run, nearest_count
from .runner import BASE, Study, read_json


@dataclass
class RunResult:
    """What one folder of the study measured."""

    family: str
    key: str  # method key, or "base"
    label: str
    lr: float | None
    seed: int | None
    trainable: int
    share_pct: float
    validation_loss: float | None
    loss: dict[str, float] = field(default_factory=dict)  # held-out answer loss per test slice
    accuracy: dict[str, float] = field(default_factory=dict)  # accuracy (0-1) per test slice
    wall_s: float | None = None
    tokens_per_s: float | None = None
    steps: int | None = None

    def mean_loss(self, datasets: Sequence[str]) -> float | None:
        return _mean([self.loss.get(name) for name in datasets])

    def mean_accuracy(self, datasets: Sequence[str]) -> float | None:
        return _mean([self.accuracy.get(name) for name in datasets])


def _mean(values: Sequence[float | None]) -> float | None:
    """Unweighted mean, or None unless every value is there (a partial mean misleads)."""
    return None if not values or any(v is None for v in values) else sum(values) / len(values)  # type: ignore[arg-type]


def load_result(folder: Path, family: str, method: Method | None, run: Run | None) -> RunResult | None:
    """The measurements of one run folder (None while it has no held-out loss yet)."""
    heldout = read_json(folder / "heldout.json")
    if heldout is None:
        return None
    summary = read_json(folder / "summary.json") or {}
    losses = heldout["losses"]
    result = RunResult(
        family=family,
        key=method.key if method else BASE,
        label=method.label if method else "base model (no adapter)",
        lr=run.lr if run else None,
        seed=run.seed if run else None,
        trainable=int(summary.get("trainable_params", 0)),
        share_pct=float(summary.get("trainable_share_pct", 0.0)),
        validation_loss=losses.get("validation", {}).get("loss"),
        loss={name: value["loss"] for name, value in losses.items() if name != "validation"},
        wall_s=summary.get("wall_time_s"),
        tokens_per_s=summary.get("tokens_per_s"),
        steps=summary.get("global_step"),
    )
    for file in sorted((folder / "eval").glob("*.json")):
        payload = read_json(file)
        if isinstance(payload, dict) and "accuracy" in payload and "dataset" in payload:
            result.accuracy[payload["dataset"]] = float(payload["accuracy"])
    return result


def collect(study: Study, runs: Sequence[Run]) -> list[RunResult]:
    results = [load_result(study.runs_dir / family / BASE, family, None, None) for family in study.families]
    results += [load_result(study.run_dir(run), run.family, run.method, run) for run in runs]
    return [result for result in results if result is not None]


# ------------------------------------------------------------------------------------------------------------
# Aggregation over seeds
# ------------------------------------------------------------------------------------------------------------


@dataclass
class Spread:
    """Mean ± sample standard deviation of one metric over the seeds of a method."""

    values: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def sd(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def text(self, digits: int, scale: float = 1.0) -> str:
        if not self.values:
            return "–"
        mean = f"{self.mean * scale:.{digits}f}"
        return mean if self.sd is None else f"{mean} ± {self.sd * scale:.{digits}f}"


def spread(values: Iterable[float | None]) -> Spread:
    return Spread([value for value in values if value is not None])


def welch_t(a: Spread, b: Spread) -> float | None:
    """Welch's t statistic of two seed samples (None without two values each)."""
    if len(a.values) < 2 or len(b.values) < 2:
        return None
    error = math.sqrt(a.sd**2 / len(a.values) + b.sd**2 / len(b.values))  # type: ignore[operator]
    return (a.mean - b.mean) / error if error > 0 else math.inf


def by_method(results: Sequence[RunResult], family: str) -> dict[str, list[RunResult]]:
    """Results of one family grouped by method key, in grid order (base model first)."""
    order = [BASE] + [method.key for method in METHODS]
    grouped: dict[str, list[RunResult]] = {}
    for key in order:
        members = [r for r in results if r.family == family and r.key == key]
        if members:
            grouped[key] = members
    return grouped


MATCHED = " (matched)"


def matched_lora(groups: dict[str, list[RunResult]]) -> str | None:
    """The LoRA method whose trainable count is nearest DenseLoRA r=32's, if within MATCH_FACTOR; else None.

    Decided from the counts the runs measured, so it holds on any base model (LoRA r=2 on SmolLM2, r=1 on
    LLaMA-3-8B)."""
    if "denselora-r32" not in groups or not groups["denselora-r32"][0].trainable:
        return None
    counts = {
        key: members[0].trainable
        for key, members in groups.items()
        if key in METHODS_BY_KEY and METHODS_BY_KEY[key].method == "lora" and members[0].trainable
    }
    nearest = nearest_count(groups["denselora-r32"][0].trainable, counts)
    return nearest[0] if nearest is not None and nearest[1] <= MATCH_FACTOR else None


def _label(key: str, members: Sequence[RunResult], matched: str | None) -> str:
    """A method's table label, marked when it is the parameter match (runs.csv written before the mark was
    computed carries it in the label already)."""
    label = members[0].label.removesuffix(MATCHED)
    return label + MATCHED if key == matched else label


# ------------------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int, scale: float = 1.0) -> str:
    return "–" if value is None else f"{value * scale:.{digits}f}"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def slice_names(manifest: dict[str, Any], family: str) -> list[str]:
    return [item["dataset"] for item in manifest["slices"] if item["family"] == family]


def summary_table(
    results: Sequence[RunResult], manifest: dict[str, Any], family: str
) -> tuple[list, list, list, list]:
    """Per method: trainable count, held-out loss and accuracy average (mean ± sd over seeds), then baselines.

    Returns the markdown header and rows, then the CSV header and rows (unrounded).
    """
    datasets = slice_names(manifest, family)
    header = [
        "Method",
        "Trainable",
        "Share (%)",
        "Seeds",
        "Held-out loss",
        "Accuracy avg (%)",
        *[SHORT_NAMES.get(name, name) for name in datasets],
    ]
    rows, csv_rows = [], []
    groups = by_method(results, family)
    matched = matched_lora(groups)
    for key, members in groups.items():
        loss = spread(member.mean_loss(datasets) for member in members)
        accuracy = spread(member.mean_accuracy(datasets) for member in members)
        per_dataset = [spread(member.accuracy.get(name) for member in members) for name in datasets]
        first = members[0]
        label = _label(key, members, matched)
        rows.append(
            [
                label,
                f"{first.trainable:,}" if first.trainable else "0",
                f"{first.share_pct:.3f}",
                str(len(members)),
                loss.text(4),
                accuracy.text(1, 100) + _partial(accuracy, len(members)),
                *[item.text(1, 100) for item in per_dataset],
            ]
        )
        csv_rows.append(
            [
                family,
                key,
                label,
                first.trainable,
                first.share_pct,
                len(members),
                loss.mean if loss.values else "",
                loss.sd or "",
                accuracy.mean if accuracy.values else "",
                accuracy.sd or "",
                *[item.mean if item.values else "" for item in per_dataset],
            ]
        )
    chance = {item["dataset"]: item["chance"] for item in manifest["slices"] if item["family"] == family}
    majority = {item["dataset"]: item["majority"] for item in manifest["slices"] if item["family"] == family}
    for label, values in (("chance (uniform guess)", chance), ("majority class of the slice", majority)):
        average = _mean([values[name] for name in datasets])
        rows.append(
            [label, "", "", "", "", _fmt(average, 1, 100), *[_fmt(values[n], 1, 100) for n in datasets]]
        )
        csv_rows.append(
            [family, label.split()[0], label, "", "", "", "", "", average, "", *[values[n] for n in datasets]]
        )
    csv_header = [*CSV_SUMMARY_HEADER, *[f"accuracy_{name}" for name in datasets]]
    return header, rows, csv_header, csv_rows


def _partial(metric: Spread, seeds: int) -> str:
    """Says over how many of a method's seeds a mean is taken when some have not measured it (yet)."""
    return f" ({len(metric.values)} of {seeds} seeds)" if 0 < len(metric.values) < seeds else ""


CSV_SUMMARY_HEADER = [
    "family",
    "key",
    "method",
    "trainable",
    "share_pct",
    "seeds",
    "heldout_loss_mean",
    "heldout_loss_sd",
    "accuracy_mean",
    "accuracy_sd",
]


def runs_table(results: Sequence[RunResult], manifest: dict[str, Any]) -> tuple[list, list]:
    """Every run, one row: the raw numbers behind the summaries (CSV only)."""
    header = [
        "family",
        "key",
        "method",
        "lr",
        "seed",
        "trainable",
        "share_pct",
        "steps",
        "wall_s",
        "tokens_per_s",
        "validation_loss",
        "heldout_loss_mean",
        "accuracy_mean",
    ]
    all_sets = sorted({item["dataset"] for item in manifest["slices"]})
    header += [f"loss_{name}" for name in all_sets] + [f"accuracy_{name}" for name in all_sets]
    rows = []
    for result in results:
        datasets = slice_names(manifest, result.family)
        rows.append(
            [
                result.family,
                result.key,
                result.label,
                result.lr,
                result.seed,
                result.trainable,
                result.share_pct,
                result.steps,
                result.wall_s,
                result.tokens_per_s,
                result.validation_loss,
                result.mean_loss(datasets),
                result.mean_accuracy(datasets),
                *[result.loss.get(n, "") for n in all_sets],
                *[result.accuracy.get(n, "") for n in all_sets],
            ]
        )
    return header, rows


def sweep_table(learning_rates: dict[str, Any]) -> tuple[list, list]:
    header = ["Run", "Validation answer loss"]
    rows = [[name, f"{loss:.4f}"] for name, loss in sorted(learning_rates.get("validation_loss", {}).items())]
    return header, rows


def comparison_lines(results: Sequence[RunResult], manifest: dict[str, Any]) -> list[str]:
    """The headline contrasts in words, with the seed spread and Welch's t (|t| < 2: within the noise)."""
    datasets = slice_names(manifest, "commonsense")
    groups = by_method(results, "commonsense")
    matched = matched_lora(groups)
    lines = []
    if matched is None and "denselora-r32" in groups:
        lines.append(
            f"- No LoRA run has DenseLoRA r=32's trainable count within {MATCH_FACTOR}x: there is no "
            "parameter-matched contrast (add the LoRA rank that matches on this model, e.g. lora-r1 or lora-r2)"
        )
    for key, other in (("denselora-r32", matched), ("denselora-r32", "lora-r32")):
        if key not in groups or other not in groups or (other == "lora-r32" and matched == "lora-r32"):
            continue
        for metric, digits, scale, getter in (
            ("held-out loss", 4, 1.0, lambda r: r.mean_loss(datasets)),
            ("accuracy avg (%)", 1, 100.0, lambda r: r.mean_accuracy(datasets)),
        ):
            a, b = spread(map(getter, groups[key])), spread(map(getter, groups[other]))
            if not a.values or not b.values:
                continue
            t = welch_t(a, b)
            verdict = (
                ""
                if t is None
                else f", Welch t = {t:+.2f} ({'beyond' if abs(t) >= 2 else 'within'} the seed noise)"
            )
            lines.append(
                f"- {_label(key, groups[key], matched)} vs {_label(other, groups[other], matched)}: {metric} "
                f"{a.text(digits, scale)} vs {b.text(digits, scale)} (difference {(a.mean - b.mean) * scale:+.{digits}f}{verdict}); "
                f"trainable {groups[key][0].trainable:,} vs {groups[other][0].trainable:,}"
            )
    return lines


# ------------------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------------------


def _count_label(value: float, _position: object) -> str:
    """Tick labels for parameter counts: 40k, 1.5M."""
    return f"{value / 1e6:g}M" if value >= 1e6 else f"{value / 1e3:g}k"


FRONTIER_LINES = {
    "DenseLoRA": ("denselora-r8", "denselora-r16", "denselora-r32", "denselora-r64"),
    "LoRA": ("lora-r1", "lora-r2", "lora-r8", "lora-r32"),
}
FRONTIER_POINTS = ("dora-r2", "vera-r256", "freeze-r128", "onlymatrix-r32")


def plot_frontier(
    results: Sequence[RunResult], manifest: dict[str, Any], family: str, metric: str, path: Path
) -> bool:
    """Held-out loss or accuracy against trainable parameters (log x), one line per method family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = slice_names(manifest, family)
    getter = (lambda r: r.mean_loss(datasets)) if metric == "loss" else (lambda r: r.mean_accuracy(datasets))
    scale = 1 if metric == "loss" else 100
    groups = by_method(results, family)
    figure, axis = plt.subplots(figsize=(7, 4.5))
    plotted = _plot_methods(axis, groups, getter, scale)
    _plot_baselines(axis, groups, getter, scale, manifest, family, metric)
    _style_frontier_axes(axis, family, metric)
    figure.tight_layout()
    if plotted:
        write_figure_atomic(figure, path)
    plt.close(figure)
    return plotted


def _plot_methods(axis: Any, groups: dict[str, list[RunResult]], getter: Any, scale: float) -> bool:
    """The rank sweeps as lines with seed error bars, the single variants as squares; False if nothing to draw."""
    plotted = False
    for name, keys in FRONTIER_LINES.items():
        points = [(groups[k][0].trainable, spread(map(getter, groups[k]))) for k in keys if k in groups]
        points = [(x, s) for x, s in points if s.values]
        if points:
            axis.errorbar(
                [x for x, _ in points],
                [s.mean * scale for _, s in points],
                yerr=[(s.sd or 0) * scale for _, s in points],
                marker="o",
                capsize=3,
                label=name,
            )
            plotted = True
    for key in FRONTIER_POINTS:
        value = spread(map(getter, groups[key])) if key in groups else None
        if value is not None and value.values:
            axis.scatter(
                [groups[key][0].trainable],
                [value.mean * scale],
                marker="s",
                s=40,
                label=METHODS_BY_KEY[key].label,
                zorder=3,
            )
            plotted = True
    return plotted


def _plot_baselines(
    axis: Any,
    groups: dict[str, list[RunResult]],
    getter: Any,
    scale: float,
    manifest: dict[str, Any],
    family: str,
    metric: str,
) -> None:
    """The base model as a dashed line; for accuracy also the slices' mean chance and majority-class rates."""
    if BASE in groups and (value := getter(groups[BASE][0])) is not None:
        axis.axhline(value * scale, color="grey", linestyle="--", label="base model")
    if metric == "accuracy":
        for item, style in (("chance", ":"), ("majority", "-.")):
            average = _mean([entry[item] for entry in manifest["slices"] if entry["family"] == family])
            if average is not None:
                axis.axhline(average * 100, color="black", linestyle=style, linewidth=0.8, label=item)


def _style_frontier_axes(axis: Any, family: str, metric: str) -> None:
    from matplotlib import ticker

    axis.set_xscale("log")
    axis.margins(x=0.1)
    low, high = axis.get_xlim()
    axis.xaxis.set_major_formatter(ticker.FuncFormatter(_count_label))
    # Within one decade only minor ticks fall inside the axis: label them; over wider spans they would crowd.
    minor = ticker.FuncFormatter(_count_label) if high / low < 10 else ticker.NullFormatter()
    axis.xaxis.set_minor_formatter(minor)
    axis.set_xlabel("trainable parameters (log scale)")
    axis.set_ylabel(
        "held-out answer loss (nats/token)" if metric == "loss" else "accuracy, mean over slices (%)"
    )
    axis.set_title(f"{family}: {'held-out loss' if metric == 'loss' else 'accuracy'} vs trainable parameters")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)


# ------------------------------------------------------------------------------------------------------------
# Writing everything
# ------------------------------------------------------------------------------------------------------------


def write_results(study: Study, runs: Sequence[Run], out: Path, environment: dict[str, Any]) -> str:
    """Tables (md + csv), plots and REPORT.md under `out`; returns the report text."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_json(study.data_dir / "manifest.json")
    results = collect(study, runs)
    sections = _report_header(study)
    for family in study.families:
        sections += _family_section(results, manifest, family, out)
    header, rows = runs_table(results, manifest)
    write_csv_atomic(out / "runs.csv", header, rows)
    lines = comparison_lines(results, manifest)
    if lines:
        sections += ["## Headline contrasts (commonsense)", "", *lines, ""]
    sections += _sweep_section(read_json(study.runs_dir / "learning_rates.json") or {}, out)
    sections += _slices_section(manifest)
    sections += ["## Environment", "", "```json", json.dumps(environment, indent=2), "```", ""]
    text = "\n".join(sections)
    write_text_atomic(out / "REPORT.md", text)
    return text


def _report_header(study: Study) -> list[str]:
    command = (
        f"python -m dense_lora.study --model {study.model} --devices {study.devices} --profile {study.profile.name} "
        f"--families {','.join(study.families)} --methods {','.join(m.key for m in study.methods)}"
    )
    return [
        f"# Replication study: {study.model}, profile `{study.profile.name}`",
        "",
        "Generated by `python -m dense_lora.study` from the run folders; see README.md beside it for the",
        "reading of these numbers, and `commands.log` for every command that produced them.",
        "",
        f"Reproduce: `{command}` (resumable; `--report_only` rewrites this report from the runs finished so far).",
        "",
    ]


def _family_section(
    results: Sequence[RunResult], manifest: dict[str, Any], family: str, out: Path
) -> list[str]:
    """One family's table (also as CSV) and its loss and accuracy plots."""
    header, rows, csv_header, csv_rows = summary_table(results, manifest, family)
    write_csv_atomic(out / f"{family}.csv", csv_header, csv_rows)
    section = [
        f"## {family.capitalize()}: held-out answer loss and accuracy",
        "",
        _markdown(header, rows),
        "",
    ]
    for metric in ("loss", "accuracy"):
        name = f"{family}_{metric}.png"
        if plot_frontier(results, manifest, family, metric, out / name):
            section += [f"![{family} {metric}]({name})", ""]
    return section


def _sweep_section(learning_rates: dict[str, Any], out: Path) -> list[str]:
    header, rows = sweep_table(learning_rates)
    if not rows:
        return []
    write_csv_atomic(out / "sweep.csv", header, rows)
    chosen = ", ".join(f"{k} {v:g}" for k, v in learning_rates.get("chosen", {}).items())
    return [
        "## Learning-rate sweep (validation answer loss; chosen: " + chosen + ")",
        "",
        _markdown(header, rows),
        "",
    ]


def _slices_section(manifest: dict[str, Any]) -> list[str]:
    """Every test slice with its size, the records dropped as seen in training, how many of its first records
    accuracy is measured on, and the baselines on those."""
    rows = [
        [
            item["family"],
            item["dataset"],
            str(item["records"]),
            str(item["excluded_overlap"]),
            str(item["scored"]),
            _fmt(item["chance"], 1, 100),
            _fmt(item["majority"], 1, 100),
        ]
        for item in manifest["slices"]
    ]
    header = [
        "Family",
        "Benchmark",
        "Records (loss)",
        "Dropped (in training data)",
        "Scored (accuracy)",
        "Chance (%)",
        "Majority (%)",
    ]
    return ["## Test slices", "", _markdown(header, rows), ""]
