"""How dense are the weight increments? The paper's Figures 1, 5 and 6, made quantitative.

The paper shows heat maps of LoRA's increments ΔA, ΔB and DenseLoRA's ΔM on random slices the size of M and
states that "M exhibits a dense update pattern". This module measures it on any training run, from the adapter
at step 0 and the adapter at the end:

    python -m dense_lora.analysis runs/denselora-r32 runs/lora-r2 --out results/analysis

For every adapted matrix it computes the increment Δ = final - initial and, per kind of matrix (DenseLoRA: M,
W_e, W_d; LoRA/DoRA: A, B), averaged over the matrices of that kind:

* **near-zero share**: the fraction of entries with |Δ| below 10% of the largest |Δ| of the same matrix, i.e. the
  pale cells of a heat map drawn on the matrix's own colour scale (the reading of the paper's figures);
* **participation ratio** (Σ|Δ|)² / (n·ΣΔ²): 1 when every entry moved by the same amount, about 0.64 for Gaussian
  noise, k/n when only k of n entries moved; insensitive to the scale of Δ;
* **relative change** ‖Δ‖ / ‖initial‖ (absent for matrices that start at zero, such as LoRA's B).

It also draws the heat maps: ΔM of one module beside same-size (r x r) random slices of ΔA and ΔB from the LoRA
runs given, each on its own symmetric colour scale.

The initial adapter is ``adapter_init/`` in the run folder (saved by finetune.py at step 0); runs without it are
rebuilt from their recorded config and seed (this loads the base model).
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from dense_lora.runtime import DenseLoRAError, write_csv_atomic, write_figure_atomic, write_text_atomic

from .cli import StrictArgumentParser

INIT_FOLDER = "adapter_init"
NEAR_ZERO_FRACTION = 0.1  # of the matrix's largest |Δ|
# Which matrix of an adapter a state-dict key holds, by method.
_KINDS = (
    ("M", re.compile(r"denselora_M")),
    ("W_e", re.compile(r"denselora_encoder")),
    ("W_d", re.compile(r"denselora_decoder")),
    ("A", re.compile(r"lora_A|denselora_A")),
    ("B", re.compile(r"lora_B|denselora_B")),
    ("magnitude", re.compile(r"lora_magnitude_vector")),
)


class AnalysisError(DenseLoRAError):
    """A run folder that cannot be analysed; the message is one line."""


@dataclass(frozen=True)
class MatrixStats:
    run: str
    kind: str
    key: str
    shape: tuple[int, ...]
    near_zero_share: float
    participation_ratio: float
    relative_change: float | None


def matrix_kind(key: str) -> str | None:
    return next((kind for kind, pattern in _KINDS if pattern.search(key)), None)


def near_zero_share(delta: torch.Tensor, fraction: float = NEAR_ZERO_FRACTION) -> float:
    magnitude = delta.abs()
    peak = float(magnitude.max())
    return 1.0 if peak == 0 else float((magnitude < fraction * peak).float().mean())


def participation_ratio(delta: torch.Tensor) -> float:
    magnitude = delta.abs().double()
    squares = float((magnitude**2).sum())
    return 0.0 if squares == 0 else float(magnitude.sum() ** 2 / (magnitude.numel() * squares))


def increments(initial: dict[str, torch.Tensor], final: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """final - initial for every adapter matrix of both (float32); refuses adapters that do not match."""
    if set(initial) != set(final):
        missing = sorted(set(initial) ^ set(final))
        raise AnalysisError(f"initial and final adapters hold different tensors (e.g. '{missing[0]}')")
    return {
        key: final[key].float() - initial[key].float()
        for key in final
        if matrix_kind(key) is not None and final[key].dim() == 2
    }


def statistics(
    run: str, initial: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor]
) -> list[MatrixStats]:
    rows = []
    for key, delta in deltas.items():
        start = float(initial[key].float().norm())
        rows.append(
            MatrixStats(
                run=run,
                kind=matrix_kind(key) or "?",
                key=key,
                shape=tuple(delta.shape),
                near_zero_share=near_zero_share(delta),
                participation_ratio=participation_ratio(delta),
                relative_change=float(delta.norm()) / start if start > 0 else None,
            )
        )
    return rows


def summarise(rows: list[MatrixStats]) -> list[dict[str, object]]:
    """Mean of each statistic per (run, kind)."""
    groups: dict[tuple[str, str], list[MatrixStats]] = defaultdict(list)
    for row in rows:
        groups[(row.run, row.kind)].append(row)
    table = []
    for (run, kind), members in groups.items():
        changes = [m.relative_change for m in members if m.relative_change is not None]
        table.append(
            {
                "run": run,
                "kind": kind,
                "matrices": len(members),
                "shape": "x".join(map(str, members[0].shape)),
                "near_zero_share": sum(m.near_zero_share for m in members) / len(members),
                "participation_ratio": sum(m.participation_ratio for m in members) / len(members),
                "relative_change": sum(changes) / len(changes) if changes else None,
            }
        )
    return table


# ------------------------------------------------------------------------------------------------------------
# Loading a run's adapters
# ------------------------------------------------------------------------------------------------------------


def _adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    file = folder / "adapter_model.safetensors"
    if not file.is_file():
        raise AnalysisError(f"{folder}: no adapter_model.safetensors")
    return load_file(str(file))


def rebuild_initial(run_dir: Path) -> dict[str, torch.Tensor]:
    """The adapter at step 0 of a run without ``adapter_init/``: the same base, config and seed, rebuilt.

    DenseLoRA initialises from its own seeded generator; LoRA/DoRA from the global RNG, which finetune.py seeds
    with the run's seed right before creating the adapter, in the base model's dtype. Both are repeated here.
    """
    from peft import PeftConfig, get_peft_model, get_peft_model_state_dict
    from transformers import set_seed

    from .models import load_base_model

    run_config = run_dir / "run_config.json"
    if not run_config.is_file():
        raise AnalysisError(
            f"{run_dir}: neither {INIT_FOLDER}/ nor run_config.json to rebuild the initial adapter"
        )
    settings = json.loads(run_config.read_text())
    config = PeftConfig.from_pretrained(str(run_dir))
    config.inference_mode = False
    dtype = "bfloat16" if settings.get("bf16") else "float16" if settings.get("fp16") else "float32"
    model = load_base_model(settings["base_model"], dtype=dtype)
    set_seed(int(settings.get("seed", 42)))
    state = get_peft_model_state_dict(get_peft_model(model, config))
    return {key: value.detach().float().cpu() for key, value in state.items()}


def load_run(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(initial, final) adapter tensors of a run folder."""
    if not run_dir.is_dir():
        raise AnalysisError(f"{run_dir}: not a folder")
    final = _adapter_weights(run_dir)
    init_dir = run_dir / INIT_FOLDER
    initial = _adapter_weights(init_dir) if init_dir.is_dir() else rebuild_initial(run_dir)
    return initial, final


# ------------------------------------------------------------------------------------------------------------
# Heat maps
# ------------------------------------------------------------------------------------------------------------


def heatmap_slices(
    deltas: dict[str, torch.Tensor], module: str, layer: int, size: int, seed: int
) -> dict[str, torch.Tensor]:
    """Same-size (size x size) slices of one module's increments: ΔM whole, random rows/columns of ΔA/ΔB."""
    generator = torch.Generator().manual_seed(seed)
    chosen = {}
    for key, delta in deltas.items():
        if f".layers.{layer}." not in key or f".{module}." not in key:
            continue
        kind = matrix_kind(key)
        rows = torch.randperm(delta.shape[0], generator=generator)[:size].sort().values
        cols = torch.randperm(delta.shape[1], generator=generator)[:size].sort().values
        if kind in ("M", "A", "B"):
            chosen[kind] = delta[rows][:, cols]
    return chosen


def draw_heatmaps(panels: list[tuple[str, torch.Tensor]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
    for axis, (title, matrix) in zip(axes[0], panels, strict=True):
        limit = float(matrix.abs().max()) or 1.0
        image = axis.imshow(matrix.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
        share = near_zero_share(matrix)
        axis.set_title(f"{title}\nnear-zero {share:.0%}", fontsize=8)
        axis.set_xticks([])
        axis.set_yticks([])
        figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    figure.tight_layout()
    write_figure_atomic(figure, path)
    plt.close(figure)


# ------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------


def _markdown(table: list[dict[str, object]]) -> str:
    lines = [
        "| Run | Matrix | Count | Shape | Near-zero share | Participation ratio | Relative change |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for row in table:
        change = row["relative_change"]
        lines.append(
            f"| {row['run']} | Δ{row['kind']} | {row['matrices']} | {row['shape']} | {row['near_zero_share']:.3f} | "
            f"{row['participation_ratio']:.3f} | {'–' if change is None else f'{change:.4f}'} |"
        )
    return "\n".join(lines)


def analyse(run_dirs: list[Path], out: Path, module: str, layer: int | None, seed: int) -> str:
    out.mkdir(parents=True, exist_ok=True)
    rows: list[MatrixStats] = []
    panels: list[tuple[str, torch.Tensor]] = []
    for run_dir in run_dirs:
        initial, final = load_run(run_dir)
        deltas = increments(initial, final)
        rows += statistics(run_dir.name, initial, deltas)
        layers = sorted({int(m.group(1)) for key in deltas if (m := re.search(r"\.layers\.(\d+)\.", key))})
        if not layers:
            continue
        chosen_layer = layer if layer is not None else layers[len(layers) // 2]
        size = next((d.shape[0] for k, d in deltas.items() if matrix_kind(k) == "M"), None)
        size = size or min(d.shape[0] for k, d in deltas.items() if matrix_kind(k) == "A")
        for kind, matrix in heatmap_slices(deltas, module, chosen_layer, size, seed).items():
            panels.append((f"{run_dir.name}: Δ{kind} ({module}, layer {chosen_layer})", matrix))
    table = summarise(rows)
    header = list(table[0]) if table else ["run"]
    write_csv_atomic(out / "increments.csv", header, [[row[name] for name in header] for row in table])
    command = " ".join(
        ["python -m dense_lora.analysis", *map(str, run_dirs), "--out", str(out), "--module", module]
    )
    text = _markdown(table)
    write_text_atomic(
        out / "increments.md",
        f"# Increments of training (ΔM, ΔW_e, ΔW_d; ΔA, ΔB)\n\nReproduce: `{command}`\n\n{text}\n",
    )
    if panels:
        draw_heatmaps(panels, out / "increments_heatmaps.png")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = StrictArgumentParser(prog="python -m dense_lora.analysis", description=__doc__.splitlines()[0])
    parser.add_argument(
        "run_dirs", nargs="+", type=Path, help="training output folders (adapter + adapter_init/)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("analysis"), help="folder for the tables and heat maps"
    )
    parser.add_argument("--module", default="q_proj", help="module whose increments the heat maps show")
    parser.add_argument(
        "--layer", type=int, default=None, help="layer of the heat maps (default: the middle one)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random slices")
    args = parser.parse_args(argv)
    try:
        print(analyse(args.run_dirs, args.out, args.module, args.layer, args.seed))
    except (AnalysisError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}/increments.md, increments.csv, increments_heatmaps.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
