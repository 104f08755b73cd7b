"""``python -m dense_lora.study``: run the replication study (every phase, resumable), then write its results."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

from ..cli import StrictArgumentParser
from ..config import DEFAULT_TARGET_MODULES
from ..runtime import DenseLoRAError, versions, write_json_atomic, write_text_atomic
from .plan import MATCH_CANDIDATES, METHODS, METHODS_BY_KEY, PROFILES, nearest_count, with_matched_headline
from .runner import Study, StudyError, is_trained, planned_runs, run_study

FAMILIES = ("commonsense", "math")


def environment(study: Study, seconds: float) -> dict[str, Any]:
    """Machine, versions and the wall time of this invocation, for the results' provenance."""
    import torch

    cpu = next(
        (line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")),
        platform.processor(),
    )
    return {
        "model": study.model,
        "devices": study.devices,
        "profile": study.profile.name,
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s_this_invocation": round(seconds, 1),
        "machine": {
            "cpu": cpu,
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform(),
        },
        "versions": versions(),
    }


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def matched_lora_rank(model: str) -> str | None:
    """The LoRA candidate (plan.MATCH_CANDIDATES) whose trainable count on ``model`` is nearest DenseLoRA r=32's,
    counted on the meta device; None when the architecture cannot be read offline (a hub id)."""
    from ..params import count_trainable
    from ..published import published_config

    try:
        config = published_config(model)
    except (ValueError, OSError):
        return None
    targets = list(DEFAULT_TARGET_MODULES)
    dense = count_trainable(config, "denselora", 32, targets).trainable
    counts = {
        key: count_trainable(config, "lora", METHODS_BY_KEY[key].r, targets).trainable
        for key in MATCH_CANDIDATES
    }
    nearest = nearest_count(dense, counts)
    return None if nearest is None else nearest[0]


def parse(argv: list[str] | None) -> tuple[Study, Path, bool]:
    parser = StrictArgumentParser(prog="python -m dense_lora.study", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="smollm2", help="base model: alias (smollm2, llama3-8b), hub id or folder"
    )
    parser.add_argument("--devices", default="cpu", help="'cpu', or CUDA devices such as 0 or 0,1,2,3")
    parser.add_argument(
        "--profile", default="cpu", choices=sorted(PROFILES), help="sizes and schedule (plan.py)"
    )
    parser.add_argument("--families", default="commonsense,math", help="comma list of commonsense, math")
    parser.add_argument(
        "--methods", default="all", help="comma list of method keys (plan.py METHODS), or all"
    )
    parser.add_argument(
        "--runs_dir", type=Path, default=None, help="run folders (default runs/study-MODEL-PROFILE)"
    )
    parser.add_argument(
        "--results_dir", type=Path, default=None, help="tables, plots, report (default results/...)"
    )
    parser.add_argument("--dry_run", action="store_true", help="print every command of the plan, run nothing")
    parser.add_argument(
        "--report_only",
        action="store_true",
        help="train and evaluate nothing: write results/ from the runs finished so far (a study stopped early)",
    )
    args = parser.parse_args(argv)
    if not re.fullmatch(r"cpu|\d+(,\d+)*", args.devices):
        raise StudyError(
            f"--devices must be 'cpu' or CUDA device numbers such as 0 or 0,1,2,3, got {args.devices!r}"
        )
    families = tuple(dict.fromkeys(name.strip() for name in args.families.split(",") if name.strip()))
    if not families or any(name not in FAMILIES for name in families):
        raise StudyError(f"--families must list {' and/or '.join(FAMILIES)}, got {args.families!r}")
    if args.methods == "all":
        methods = METHODS
    else:
        keys = [key.strip() for key in args.methods.split(",") if key.strip()]
        unknown = [key for key in keys if key not in METHODS_BY_KEY]
        if unknown or not keys:
            raise StudyError(
                f"unknown --methods {unknown or args.methods!r}; known: {', '.join(METHODS_BY_KEY)}"
            )
        methods = tuple(method for method in METHODS if method.key in keys)
    profile = PROFILES[args.profile]
    swept = {method.lr_group for method in methods if method.sweep}
    for method in methods:
        if method.lr_group not in swept and method.lr_group not in profile.fixed_lr:
            sweeper = next(m.key for m in METHODS if m.sweep and m.lr_group == method.lr_group)
            raise StudyError(
                f"{method.key} trains at the rate swept on {sweeper}: add {sweeper} to --methods"
            )
    if "commonsense" not in families and any(profile.sweep.get(m.lr_group) for m in methods if m.sweep):
        raise StudyError(
            f"profile {args.profile} sweeps learning rates on the commonsense mix: add commonsense to --families"
        )
    if set(MATCH_CANDIDATES) <= {method.key for method in methods}:  # else there is no choice to make
        methods = with_matched_headline(methods, matched_lora_rank(args.model))
    stem = f"study-{Path(args.model).name.lower()}-{args.profile}"
    study = Study(
        model=args.model,
        devices=args.devices,
        profile=profile,
        # absolute: the training and evaluation commands run from the repository root, not from here
        runs_dir=(args.runs_dir or Path("runs") / stem).resolve(),
        families=families,
        methods=methods,
        dry_run=args.dry_run,
    )
    return study, (args.results_dir or Path("results") / stem).resolve(), args.report_only


def main(argv: list[str] | None = None) -> int:
    try:
        study, results_dir, report_only = parse(argv)
        started = time.perf_counter()
        if report_only and not (study.data_dir / "manifest.json").is_file():
            raise StudyError(f"--report_only: {study.runs_dir} holds no study (no data/manifest.json)")
        runs = planned_runs(study) if report_only else run_study(study)
        if study.dry_run:
            return 0
        from ..analysis import analyse
        from .aggregate import write_results

        env = environment(study, time.perf_counter() - started)
        write_results(study, runs, results_dir, env)
        analysed = [  # of a study stopped early (--report_only), the runs trained so far
            study.run_dir(run)
            for run in runs
            if run.family == "commonsense" and run.seed == runs[0].seed and is_trained(study.run_dir(run))
        ]
        if analysed:
            analyse(analysed, results_dir / "analysis", module="q_proj", layer=None, seed=0)
        log = study.runs_dir / "commands.log"
        if log.is_file():
            write_text_atomic(results_dir / "commands.log", log.read_text())
        write_json_atomic(results_dir / "environment.json", env)
    except DenseLoRAError as error:  # StudyError, and the analysis's and the report's one-line errors
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"[study] results in {results_dir}/REPORT.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
