"""What the study runs: sizes per profile, the grid of adapters, seeds and learning rates.

The grid tests the paper's claims on one base model:

* the efficiency frontier: DenseLoRA at several ranks against peft LoRA at several ranks, including LoRA at the
  trainable-parameter count of DenseLoRA r=32 (LoRA r=2 on SmolLM2: 414,720 vs 374,784), DoRA and VeRA;
* the paper's variants: Freeze (shared encoder/decoder frozen, r=128 as in Table 4) and Only Matrix (no activation);
* seeds for the headline comparisons (DenseLoRA r=32, LoRA at the same count, LoRA at the paper's r=32).

Learning rates: at paper scale each method trains at its published rate. A scaled-down run (a few dozen steps
instead of ~21,000) cannot assume those rates transfer. A profile with a ``sweep`` trains a small grid per method
family on one seed and keeps, for every member of the family, the rate with the lowest *validation* answer loss
(records held out from the training files, never the test slices the results are reported on). The ``cpu``
profile has no room for a sweep and trains every method at one untuned rate; ``cpu-lr`` is its learning-rate
check: the same sizes, the matched pair swept over four rates, the best rate of each trained with three seeds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Method:
    """One adapter configuration of the grid, trained with finetune.py."""

    key: str  # run-folder name stem, e.g. "denselora-r32"
    label: str  # how tables name it
    method: str  # finetune.py --method
    r: int
    lr_group: str  # the family whose swept (or published) learning rate it trains with
    flags: tuple[str, ...] = ()  # further finetune.py flags (the variants)
    headline: bool = False  # trained with every seed of the profile (the others: its first seed)
    sweep: bool = False  # the member of its family the learning-rate sweep runs on
    math: bool = False  # also trained on the arithmetic set


METHODS: tuple[Method, ...] = (
    Method(
        "denselora-r32", "DenseLoRA r=32", "denselora", 32, "denselora", headline=True, sweep=True, math=True
    ),
    # LoRA r=2 matches DenseLoRA r=32's trainable count on SmolLM2 (1.11x); on LLaMA-3-8B it is 1.83x and r=1
    # matches (0.92x): the report marks "(matched)" from the counts the runs measured (aggregate.matched_lora)
    Method("lora-r2", "LoRA r=2", "lora", 2, "lora", headline=True, sweep=True, math=True),
    Method("lora-r32", "LoRA r=32", "lora", 32, "lora", math=True),
    Method("denselora-r8", "DenseLoRA r=8", "denselora", 8, "denselora"),
    Method("denselora-r16", "DenseLoRA r=16", "denselora", 16, "denselora"),
    Method("denselora-r64", "DenseLoRA r=64", "denselora", 64, "denselora"),
    Method("lora-r1", "LoRA r=1", "lora", 1, "lora"),
    Method("lora-r8", "LoRA r=8", "lora", 8, "lora"),
    Method("dora-r2", "DoRA r=2", "dora", 2, "lora"),
    Method("vera-r256", "VeRA r=256", "vera", 256, "vera", sweep=True),
    Method("freeze-r128", "Freeze r=128", "denselora", 128, "denselora", ("--train_shared", "False")),
    Method("onlymatrix-r32", "Only Matrix r=32", "denselora", 32, "denselora", ("--activation", "identity")),
)
METHODS_BY_KEY = {method.key: method for method in METHODS}
# The LoRA ranks that can match DenseLoRA r=32's trainable count (r=2 on SmolLM2, r=1 on LLaMA-3-8B).
MATCH_CANDIDATES = ("lora-r1", "lora-r2")
# A LoRA run is DenseLoRA r=32's parameter match when their trainable counts are within this factor.
MATCH_FACTOR = 1.25


def nearest_count(target: int, counts: Mapping[str, int]) -> tuple[str, float] | None:
    """The key whose count is nearest ``target`` by ratio, and that ratio as a factor >= 1 (None: no counts).

    Ratios, not differences: a count twice the target is as far as one half of it."""
    distances = {name: abs(math.log(count / target)) for name, count in counts.items()}
    if not distances:
        return None
    key = min(distances, key=lambda name: (distances[name], name))
    return key, math.exp(distances[key])


def with_matched_headline(methods: Sequence[Method], matched: str | None) -> tuple[Method, ...]:
    """The plan's methods with the seeds and the math runs of the matched LoRA given to ``matched``.

    The plan gives them to LoRA r=2, the match on SmolLM2; on a model where another candidate rank matches
    (``matched``: from the trainable counts), that one gets them, when both are in the plan."""
    keys = {method.key for method in methods}
    if matched is None or matched == "lora-r2" or not set(MATCH_CANDIDATES) <= keys:
        return tuple(methods)
    return tuple(
        dataclasses.replace(method, headline=method.key == matched, math=method.key == matched)
        if method.key in MATCH_CANDIDATES
        else method
        for method in methods
    )


@dataclass(frozen=True)
class Profile:
    """Sizes and schedule of one study scale. Counts are records; None means every record available."""

    name: str
    train_per_source: int | None  # commonsense training records per training set of the mix
    math_train: int | None
    validation_per_source: int  # validation records per training set (learning-rate selection)
    math_validation: int
    heldout_per_benchmark: int | None  # test records per benchmark for the held-out answer loss
    accuracy_per_benchmark: int | None  # test records per benchmark for generation accuracy
    math_accuracy_per_benchmark: int | None
    epochs: float
    warmup_steps: int
    batch_size: int = 16
    micro_batch_size: int = 16
    cutoff_len: int = 256
    dropout: float = 0.05
    precision: str = "bf16"  # finetune.py --bf16 (bf16 autocast and a bf16 frozen base), or "fp32"
    eval_batch_size: int = 32
    seeds: tuple[int, ...] = (42, 43, 44)
    sweep: Mapping[str, tuple[float, ...]] = field(default_factory=dict)  # learning rates tried per family
    fixed_lr: Mapping[str, float] = field(default_factory=dict)  # families without a sweep


PROFILES: dict[str, Profile] = {
    # About two hours on a 2-core CPU shared with other work, SmolLM2-135M at ~25 s per step of 8 records: 48
    # training records (12 per set) for 2 epochs = 12 steps of 8 per run. Batch 8 instead of 16 gives twice the
    # updates for the same compute, which a run this short needs. No learning-rate sweep fits this budget: DenseLoRA
    # and LoRA/DoRA train at the same untuned rate, VeRA at the ten times higher rate it is usually run with.
    "cpu": Profile(
        name="cpu",
        train_per_source=12,
        math_train=48,
        validation_per_source=8,
        math_validation=16,
        heldout_per_benchmark=24,
        accuracy_per_benchmark=16,
        math_accuracy_per_benchmark=8,
        epochs=2,
        warmup_steps=1,  # ~10% of the 12 steps; the paper's 100 is ~0.5% of its ~21,000
        batch_size=8,
        micro_batch_size=8,
        eval_batch_size=16,
        fixed_lr={"denselora": 2e-3, "lora": 2e-3, "vera": 1e-2},
    ),
    # The cpu profile's learning-rate check (about an hour and a half): the matched pair, DenseLoRA r=32 and LoRA
    # r=2, at the cpu profile's sizes, swept on seed 42 from its rate upwards in steps of 3x (a 12-step run gains
    # from larger steps); the rate with the lowest validation loss of each trains three seeds for the test slices.
    # A longer CPU study for a quiet machine: 96 records per run, a two-point sweep on the matched pair.
    "cpu-long": Profile(
        name="cpu-long",
        train_per_source=24,
        math_train=96,
        validation_per_source=16,
        math_validation=32,
        heldout_per_benchmark=32,
        accuracy_per_benchmark=32,
        math_accuracy_per_benchmark=16,
        epochs=2,
        warmup_steps=2,
        batch_size=8,
        micro_batch_size=8,
        eval_batch_size=16,
        sweep={"denselora": (1e-3, 3e-3), "lora": (1e-3, 3e-3)},
        fixed_lr={"vera": 1e-2},
    ),
    # The paper's recipe on the full training files (commonsense_170k / math_10k when present) and test sets.
    "paper": Profile(
        name="paper",
        train_per_source=None,
        math_train=None,
        validation_per_source=30,
        math_validation=120,
        heldout_per_benchmark=500,
        accuracy_per_benchmark=None,
        math_accuracy_per_benchmark=None,
        epochs=2,
        warmup_steps=100,
        micro_batch_size=4,
        fixed_lr={"denselora": 3e-4, "lora": 1e-4, "vera": 1e-2},
    ),
    # Minutes: checks the whole pipeline (used by the tests with a tiny model).
    "smoke": Profile(
        name="smoke",
        train_per_source=8,
        math_train=8,
        validation_per_source=2,
        math_validation=4,
        heldout_per_benchmark=4,
        accuracy_per_benchmark=2,
        math_accuracy_per_benchmark=1,
        epochs=1,
        warmup_steps=0,
        batch_size=4,
        micro_batch_size=4,
        precision="fp32",
        eval_batch_size=4,
        seeds=(42,),
        sweep={"denselora": (1e-3,), "lora": (1e-3,), "vera": (1e-2,)},
    ),
}

# The cpu profile's learning-rate check (about an hour and a half): the matched pair, DenseLoRA r=32 and LoRA r=2, at
# the cpu profile's sizes, swept on seed 42 from its rate upwards in steps of 3x (a 12-step run gains from larger
# steps); the rate with the lowest validation loss of each trains three seeds for the test slices.
PROFILES["cpu-lr"] = dataclasses.replace(
    PROFILES["cpu"],
    name="cpu-lr",
    sweep={"denselora": (2e-3, 6e-3, 1.8e-2, 5.4e-2), "lora": (2e-3, 6e-3, 1.8e-2, 5.4e-2)},
    fixed_lr={"vera": 1e-2},
)


@dataclass(frozen=True)
class Run:
    """One training run of the study: a method on a family's data with one learning rate and seed."""

    family: str  # "commonsense" or "math"
    method: Method
    lr: float
    seed: int
    is_sweep: bool = False  # trained to choose a learning rate

    @property
    def name(self) -> str:
        return f"{self.method.key}_lr{self.lr:g}_s{self.seed}"

    def finetune_flags(self, profile: Profile, base_model: str, data_path: str, output_dir: str) -> list[str]:
        """The finetune.py arguments of this run: the paper's recipe at the profile's scale."""
        values = {
            "base_model": base_model,
            "data_path": data_path,
            "output_dir": output_dir,
            "method": self.method.method,
            "lora_r": self.method.r,
            "lora_alpha": 2 * self.method.r,
            "lora_dropout": profile.dropout,
            "learning_rate": self.lr,
            "num_epochs": profile.epochs,
            "batch_size": profile.batch_size,
            "micro_batch_size": profile.micro_batch_size,
            "warmup_steps": profile.warmup_steps,
            "cutoff_len": profile.cutoff_len,
            "val_set_size": 0,  # the study's own validation and test sets are scored after training
            "save_step": 100_000,  # no intermediate checkpoints: runs are minutes long
            "logging_steps": 1,
            "seed": self.seed,
        }
        flags = [
            part
            for name, value in values.items()
            for part in (f"--{name}", f"{value:g}" if isinstance(value, float) else str(value))
        ]
        flags += self.method.flags
        if profile.precision == "bf16":
            flags.append("--bf16")
        return flags


def sweep_runs(
    profile: Profile, methods: Sequence[Method] = METHODS, family: str = "commonsense"
) -> list[Run]:
    """The learning-rate sweep: every rate of a family's grid on its sweep member, first seed."""
    return [
        Run(family, method, lr, profile.seeds[0], is_sweep=True)
        for method in methods
        if method.sweep
        for lr in profile.sweep.get(method.lr_group, ())
    ]


def select_learning_rates(
    profile: Profile, validation_loss: Mapping[str, float], sweep: Sequence[Run]
) -> dict[str, float]:
    """Per family: the published rate, or the swept rate with the lowest validation answer loss.

    ``validation_loss`` maps run names to their loss; a family whose sweep is unfinished gets no rate yet.
    """
    chosen = dict(profile.fixed_lr)
    for group in profile.sweep:
        tried = [
            (validation_loss[run.name], run.lr)
            for run in sweep
            if run.method.lr_group == group and run.name in validation_loss
        ]
        if tried and len(tried) == len(profile.sweep[group]):
            chosen[group] = min(tried)[1]
    return chosen


def main_runs(
    profile: Profile,
    learning_rates: Mapping[str, float],
    families: Sequence[str],
    methods: Sequence[Method] = METHODS,
) -> list[Run]:
    """Every run reported in the results: each method at its family's rate, headline methods with every seed."""
    runs = []
    for family in families:
        for method in methods:
            if family == "math" and not method.math:
                continue
            if method.lr_group not in learning_rates:
                continue
            seeds = profile.seeds if method.headline and family == "commonsense" else profile.seeds[:1]
            runs.extend(Run(family, method, learning_rates[method.lr_group], seed) for seed in seeds)
    # Every method's first seed before any method's second: a study cut short still covers the whole grid.
    order = {seed: index for index, seed in enumerate(profile.seeds)}
    return sorted(runs, key=lambda run: order[run.seed])
