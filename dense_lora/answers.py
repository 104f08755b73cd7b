"""Answer extraction and scoring for the LLM-Adapters benchmarks.

Two extractors, chosen by name (`EXTRACTIONS`):

``"llm-adapters"`` (default) reproduces the scorer of LLM-Adapters' ``commonsense_evaluate.py`` and
``evaluate.py`` (the DenseLoRA authors use the same copies), so accuracies are comparable with the
published tables:

* commonsense: the FIRST match of the dataset's option pattern in the stripped response, ``""`` when
  there is none, compared with the label by string equality. Patterns (case-sensitive, no word
  boundaries): boolq ``true|false``; piqa ``solution1|solution2``; social_i_qa, ARC-Challenge, ARC-Easy
  and openbookqa share ``answer1|...|answer5`` (social_i_qa has three options, but LLM-Adapters uses the
  five-option pattern for it too, so a stray "answer4" is extracted and scored wrong); hellaswag
  ``ending1|...|ending4``; winogrande ``option1|option2``.
* numeric math (AddSub, MultiArith, SingleEq, gsm8k, SVAMP, mawps): delete every comma, take the LAST
  match of ``-?\\d+\\.?\\d*`` as a float (``inf`` when there is none); correct when
  ``|prediction - float(label)| <= 0.001``.
* AQuA: the FIRST capital A-E anywhere in the stripped response, compared with the label letter. Any
  capital counts, so "A train leaves..." is read as option A: a known weakness of the protocol, kept
  for comparability.

``"strict"`` is a stricter reading for analysis, never for the headline numbers:

* commonsense: the option must be a whole word, and the first one after the LAST "answer is" /
  "the correct answer" marker wins; without a marker (or no option after it), the first whole-word
  option anywhere.
* numeric math: commas are removed only between digits; the first number inside the last
  ``\\boxed{...}`` wins, else the first number after the last ``####``, else the first number after the
  last "answer is", else the last number in the text.
* AQuA: only a letter in answer position counts: after the last "answer is" / "answer:" marker
  (optionally "option", optionally in parentheses, not followed by a letter), else a line that is only
  the letter ("B", "(B)", "B."), else a parenthesised "(B)" when the response names exactly one such
  letter (an echoed list of choices names several and yields nothing). A capital letter inside a word
  or a sentence-initial article is never an answer.
"""

from __future__ import annotations

import math
import re
from typing import Literal

from dense_lora import benchmarks

EXTRACTIONS = ("llm-adapters", "strict")
MATH_TOLERANCE = 0.001

# Derived from the benchmark registry (dense_lora.benchmarks), where each benchmark's pattern is written once.
OPTION_PATTERNS = benchmarks.OPTION_PATTERNS
_LETTER_DATASETS = tuple(benchmarks.names(answer="letter"))

_PROTOCOL_NUMBER = re.compile(benchmarks.NUMBER_PATTERN)
_STRICT_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_COMMONSENSE_MARKER = re.compile(r"\b(?:the\s+correct\s+answer|answer\s+is)\b", re.IGNORECASE)
_ANSWER_IS = re.compile(r"\banswer\s+is\b", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_LETTER_AFTER_MARKER = re.compile(
    r"(?i:\banswer)(?:\s+(?i:is))?\s*:?\s*(?:(?i:option)\s*)?(?:\(([A-E])\)|\b([A-E])(?![A-Za-z]))"
)
_LETTER_LINE = re.compile(r"^[ \t]*\(?([A-E])\)?\.?[ \t]*$", re.MULTILINE)
_LETTER_IN_PARENS = re.compile(r"\(([A-E])\)")


def dataset_kind(dataset: str) -> Literal["commonsense", "math"]:
    """Whether a benchmark is scored as commonsense (option labels) or math (numbers, AQuA letters)."""
    return benchmarks.lookup(dataset).family


def _check_extraction(extraction: str) -> None:
    if extraction not in EXTRACTIONS:
        raise ValueError(f"unknown extraction '{extraction}'; valid: {', '.join(EXTRACTIONS)}")


def _strict_option(pattern: str, text: str) -> str:
    option = re.compile(rf"\b(?:{pattern})\b")
    markers = list(_COMMONSENSE_MARKER.finditer(text))
    if markers:
        after = option.search(text, markers[-1].end())
        if after:
            return after.group(0)
    anywhere = option.search(text)
    return anywhere.group(0) if anywhere else ""


def _strict_number(text: str) -> float:
    text = re.sub(r"(?<=\d),(?=\d)", "", text)
    regions = []
    boxed = list(_BOXED.finditer(text))
    if boxed:
        regions.append(boxed[-1].group(1))
    hashes = text.rfind("####")
    if hashes >= 0:
        regions.append(text[hashes + 4 :])
    answer_is = list(_ANSWER_IS.finditer(text))
    if answer_is:
        regions.append(text[answer_is[-1].end() :])
    for region in regions:
        number = _STRICT_NUMBER.search(region)
        if number:
            return float(number.group(0))
    numbers = _STRICT_NUMBER.findall(text)
    return float(numbers[-1]) if numbers else math.inf


def _strict_letter(text: str) -> str:
    marked = list(_LETTER_AFTER_MARKER.finditer(text))
    if marked:
        return marked[-1].group(1) or marked[-1].group(2)
    lines = _LETTER_LINE.findall(text)
    if lines:
        return lines[-1]
    parenthesised = set(_LETTER_IN_PARENS.findall(text))
    return parenthesised.pop() if len(parenthesised) == 1 else ""


def extract_answer(dataset: str, text: str, extraction: str = "llm-adapters") -> str | float:
    """The prediction in a model response: an option string/letter ("" if none) or a float (inf if none).

    `dataset` is matched case-insensitively; `extraction` is one of `EXTRACTIONS` (see module docstring).
    """
    _check_extraction(extraction)
    name = benchmarks.canonical_name(dataset)
    strict = extraction == "strict"
    if name in OPTION_PATTERNS:
        if strict:
            return _strict_option(OPTION_PATTERNS[name], text)
        matches = re.findall(OPTION_PATTERNS[name], text.strip())
        return matches[0] if matches else ""
    if name in _LETTER_DATASETS:
        if strict:
            return _strict_letter(text)
        letters = re.findall(benchmarks.BY_NAME[name].pattern, text.strip())
        return letters[0] if letters else ""
    if strict:
        return _strict_number(text)
    numbers = _PROTOCOL_NUMBER.findall(text.replace(",", ""))
    return float(numbers[-1]) if numbers else math.inf


def is_correct(dataset: str, text: str, label: str | float, extraction: str = "llm-adapters") -> bool:
    """Score one response against its label the way LLM-Adapters does (or with the strict extractor).

    Option and letter datasets compare strings exactly; numeric datasets compare floats within 0.001.
    """
    prediction = extract_answer(dataset, text, extraction)
    if isinstance(prediction, str):
        return prediction == label
    try:
        target = float(label)
    except (TypeError, ValueError):
        raise ValueError(f"{dataset}: label {label!r} is not a number") from None
    return abs(prediction - target) <= MATH_TOLERANCE
