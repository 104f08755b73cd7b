"""The benchmarks, one record each: the single place that says what a benchmark is.

Every other module derives its lists from :data:`REGISTRY`: the data lists of :mod:`dense_lora.data`, the
answer patterns of :mod:`dense_lora.answers`, the families the evaluator accepts and the report's short
names. Adding a benchmark is one :class:`Benchmark` line here (plus its ``dataset/<name>/test.json``).

This module imports nothing heavy (no torch, no transformers): the report and the CLIs read it to check
names and lay out tables, which must take a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Family = Literal["commonsense", "math"]
AnswerKind = Literal["option", "letter", "number"]

FAMILIES: tuple[Family, ...] = ("commonsense", "math")
# LLM-Adapters' protocol readings (see dense_lora.answers): the FIRST capital A-E for AQuA, the LAST number
# (commas deleted) for the numeric sets.
LETTER_PATTERN = "A|B|C|D|E"
NUMBER_PATTERN = r"-?\d+\.?\d*"
_FIVE_ANSWERS = "answer1|answer2|answer3|answer4|answer5"


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: its file name, family, how its answer is read and how the report prints it.

    ``pattern`` is the regex LLM-Adapters reads the answer with: an alternation of literal option strings
    for ``option`` (commonsense) and ``letter`` (AQuA) answers, a number for ``number`` answers.
    ``in_paper`` is False for sets LLM-Adapters ships but DenseLoRA's tables leave out: they are accepted by
    name but not part of ``--dataset all``.
    """

    name: str
    family: Family
    answer: AnswerKind
    pattern: str
    short: str = ""
    in_paper: bool = True
    aliases: tuple[str, ...] = ()

    @property
    def short_name(self) -> str:
        """The column title in reports (the paper's abbreviation, else the name)."""
        return self.short or self.name

    @property
    def options(self) -> tuple[str, ...]:
        """The literal answer strings of an option or letter benchmark; () for numeric ones."""
        return () if self.answer == "number" else tuple(self.pattern.split("|"))


def _option(name: str, pattern: str, short: str) -> Benchmark:
    return Benchmark(name, "commonsense", "option", pattern, short)


def _number(name: str, short: str = "", in_paper: bool = True) -> Benchmark:
    return Benchmark(name, "math", "number", NUMBER_PATTERN, short, in_paper=in_paper)


# Order is LLM-Adapters' evaluation order, the order of ``--dataset all`` and of report columns: the paper's
# column order within a family except that its tables print ARC-e before ARC-c. social_i_qa has three
# options, but LLM-Adapters reads it with the five-option pattern, so a stray "answer4" is extracted (and wrong).
REGISTRY: tuple[Benchmark, ...] = (
    _option("boolq", "true|false", "BoolQ"),
    _option("piqa", "solution1|solution2", "PIQA"),
    _option("social_i_qa", _FIVE_ANSWERS, "SIQA"),
    _option("hellaswag", "ending1|ending2|ending3|ending4", "HellaS."),
    _option("winogrande", "option1|option2", "WinoG."),
    _option("ARC-Challenge", _FIVE_ANSWERS, "ARC-c"),
    _option("ARC-Easy", _FIVE_ANSWERS, "ARC-e"),
    _option("openbookqa", _FIVE_ANSWERS, "OBQA"),
    _number("AddSub"),
    _number("MultiArith", "MultiA."),
    _number("SingleEq"),
    _number("gsm8k", "GSM8K"),
    Benchmark("AQuA", "math", "letter", LETTER_PATTERN),
    _number("SVAMP"),
    _number("mawps", in_paper=False),  # in LLM-Adapters' dataset/ folder, not in DenseLoRA's tables
)
BY_NAME: dict[str, Benchmark] = {benchmark.name: benchmark for benchmark in REGISTRY}


def names(
    family: Family | None = None, *, in_paper: bool | None = None, answer: AnswerKind | None = None
) -> list[str]:
    """Benchmark names in registry order, filtered by family, table membership and answer kind."""
    return [
        benchmark.name
        for benchmark in REGISTRY
        if (family is None or benchmark.family == family)
        and (in_paper is None or benchmark.in_paper == in_paper)
        and (answer is None or benchmark.answer == answer)
    ]


def _lookup_table(benchmarks: Iterable[Benchmark]) -> dict[str, str]:
    table = {}
    for benchmark in benchmarks:
        for spelling in (benchmark.name, *benchmark.aliases):
            table[spelling.lower()] = benchmark.name
    return table


_BY_LOWER = _lookup_table(REGISTRY)


def canonical_name(name: str) -> str:
    """The canonical spelling of a benchmark name or alias, matched case-insensitively.

    Scripts and users write "arc-easy" or "ARC-Easy", "gsm8k" or "GSM8K"; the file layout and the scorer need
    one spelling. Raises ValueError listing the valid names.
    """
    canonical = _BY_LOWER.get(str(name).strip().lower())
    if canonical is None:
        raise ValueError(f"unknown dataset '{name}'; valid names: {', '.join(BY_NAME)}")
    return canonical


def lookup(name: str) -> Benchmark:
    """The record of a benchmark, by any spelling :func:`canonical_name` accepts."""
    return BY_NAME[canonical_name(name)]


# What the evaluator runs for ``--dataset all`` (the paper's tables) and what it accepts by name, per family.
BENCHMARKS: dict[Family, list[str]] = {family: names(family, in_paper=True) for family in FAMILIES}
ACCEPTED: dict[Family, list[str]] = {family: names(family) for family in FAMILIES}
OPTION_PATTERNS: dict[str, str] = {b.name: b.pattern for b in REGISTRY if b.answer == "option"}
SHORT_NAMES: dict[str, str] = {b.name: b.short_name for b in REGISTRY}
# Upper bound on an option's length for the commonsense early-stop margin
# (dense_lora.generation.first_match_is_final). The longest option today is "solution1" (9); the margin has
# always been 12, and is kept so early-stopped outputs stay identical to those of earlier runs (a resumed
# folder mixes both). A longer option added above raises it by itself.
MAX_OPTION_CHARS = max(12, *(len(option) for b in REGISTRY if b.answer == "option" for option in b.options))
