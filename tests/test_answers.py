"""Answer extraction: the LLM-Adapters scorer (default) and the strict reading."""

from __future__ import annotations

import json
import math

import pytest

from dense_lora.answers import EXTRACTIONS, dataset_kind, extract_answer, is_correct
from dense_lora.data import ALL_DATASETS, COMMONSENSE_DATASETS, load_test_records

# --------------------------------------------------------------------------------------------------
# Commonsense
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "text", "expected"),
    [
        ("boolq", "the correct answer is true", "true"),
        ("boolq", "  false, not true  ", "false"),  # first match wins
        ("boolq", "The correct answer is True", ""),  # case-sensitive pattern
        ("boolq", "that is untrue", "true"),  # no word boundaries in the protocol
        ("piqa", "the correct answer is solution2", "solution2"),
        ("social_i_qa", "the correct answer is answer3", "answer3"),
        ("social_i_qa", "answer4 or maybe answer1", "answer4"),  # LLM-Adapters' five-option pattern
        ("ARC-Challenge", "answer2 then answer1", "answer2"),
        ("ARC-Easy", "the correct answer is answer5", "answer5"),
        ("openbookqa", "I think answer4.", "answer4"),
        ("hellaswag", "the correct answer is ending3", "ending3"),
        ("winogrande", "the correct answer is option1", "option1"),
        ("winogrande", "no idea", ""),
        ("piqa", "", ""),
    ],
)
def test_commonsense_default_takes_first_match(dataset: str, text: str, expected: str) -> None:
    assert extract_answer(dataset, text) == expected
    if expected:
        assert is_correct(dataset, text, expected)


def test_commonsense_label_compared_exactly() -> None:
    assert is_correct("boolq", "the correct answer is false", "false")
    assert not is_correct("boolq", "the correct answer is false", "true")
    assert not is_correct("winogrande", "nothing", "option1")


@pytest.mark.parametrize(
    ("dataset", "text", "default", "strict"),
    [
        ("boolq", "that is untrue, so the answer is false", "true", "false"),
        ("piqa", "solution1 looks odd; the correct answer is solution2", "solution1", "solution2"),
        (
            "ARC-Easy",
            "answer1 and answer2 are wrong. The answer is answer3, not answer4",
            "answer1",
            "answer3",
        ),
        ("winogrande", "option2", "option2", "option2"),  # no marker: first whole-word option
        ("hellaswag", "ending10", "ending1", ""),
    ],
)
def test_commonsense_strict(dataset: str, text: str, default: str, strict: str) -> None:
    assert extract_answer(dataset, text) == default
    assert extract_answer(dataset, text, "strict") == strict


# --------------------------------------------------------------------------------------------------
# Numeric math
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "text", "expected"),
    [
        ("gsm8k", "7 - 3 = 4 crayons. The answer is 4.", 4.0),
        ("AddSub", "first 3, then 12, finally 10", 10.0),  # last number
        ("MultiArith", "The total is 1,234 apples.", 1234.0),  # commas removed
        ("SingleEq", "He owes -5 dollars", -5.0),
        ("SVAMP", "Each gets 2.75 pies.", 2.75),
        ("mawps", "The answer is 5.", 5.0),
        ("gsm8k", "I cannot tell.", math.inf),
        ("gsm8k", "", math.inf),
    ],
)
def test_math_default_takes_last_number(dataset: str, text: str, expected: float) -> None:
    assert extract_answer(dataset, text) == expected


def test_math_comma_removal_is_global_in_default() -> None:
    # LLM-Adapters deletes every comma, so a list "3,4" reads as 34; strict only joins digit groups.
    assert extract_answer("gsm8k", "numbers 3,4") == 34.0
    assert extract_answer("gsm8k", "I have 3, then 4") == 4.0
    assert extract_answer("gsm8k", "so 1,234,567 in all", "strict") == 1234567.0


def test_math_tolerance_is_0_001() -> None:
    assert is_correct("gsm8k", "The answer is 18.0005", "18.0")
    assert is_correct("gsm8k", "The answer is 17.9991", "18")
    assert not is_correct("gsm8k", "The answer is 18.002", "18.0")
    assert is_correct("SVAMP", "The answer is 1.8333", "1.8333333333333335")
    assert is_correct("AddSub", "The answer is -10.", "-10.0")
    assert is_correct("MultiArith", "The answer is 576", 576)
    assert not is_correct("gsm8k", "no number", "0")
    with pytest.raises(ValueError, match="not a number"):
        is_correct("gsm8k", "4", "four")


@pytest.mark.parametrize(
    ("text", "default", "strict"),
    [
        ("The answer is 42. Check: 6 * 7 = 42, plus 1 is 43", 43.0, 42.0),
        ("Work: 3 + 4 = 7\n#### 7\nI used 2 steps", 2.0, 7.0),
        ("So we get \\boxed{12} after 3 steps", 3.0, 12.0),
        ("He paid $1,050 on day 3", 3.0, 3.0),  # no marker: last number in both
        ("The answer is 5. Then the answer is 6.", 6.0, 6.0),  # last marker wins in strict
        ("Nothing here.", math.inf, math.inf),
    ],
)
def test_math_strict_prefers_marked_number(text: str, default: float, strict: float) -> None:
    assert extract_answer("gsm8k", text) == default
    assert extract_answer("gsm8k", text, "strict") == strict


# --------------------------------------------------------------------------------------------------
# AQuA
# --------------------------------------------------------------------------------------------------


def test_aqua_default_takes_first_capital_letter() -> None:
    text = "A train travels 60 km in 1.5 hours, so its speed is 40 km/h. The answer is C"
    assert extract_answer("AQuA", text) == "A"  # the protocol's known weakness
    assert extract_answer("AQuA", text, "strict") == "C"
    assert not is_correct("AQuA", text, "C")
    assert is_correct("AQuA", text, "C", extraction="strict")
    assert extract_answer("AQuA", "the answer is (D).") == "D"
    assert extract_answer("AQuA", "no idea") == ""


@pytest.mark.parametrize(
    ("text", "strict"),
    [
        ("The answer is (B).", "B"),
        ("Answer: E", "E"),
        ("so the correct answer is option D because it fits", "D"),
        ("The speed doubles.\nB\n", "B"),
        ("Computing gives 62 m, which is (C)", "C"),
        ("Answer Choices: (A) 60 (B) 61 (C) 62", ""),  # an echoed choice list names several letters
        ("Because Alice And Bob Differ Entirely", ""),  # capitals inside sentences never count
        ("A car is faster. Each step is Easy.", ""),
    ],
)
def test_aqua_strict_only_reads_answer_positions(text: str, strict: str) -> None:
    assert extract_answer("aqua", text, "strict") == strict


# --------------------------------------------------------------------------------------------------
# Names, kinds, options
# --------------------------------------------------------------------------------------------------


def test_dataset_names_are_case_insensitive() -> None:
    assert extract_answer("arc-easy", "answer2") == extract_answer("ARC-Easy", "answer2") == "answer2"
    assert extract_answer("GSM8K", "=4") == 4.0
    assert extract_answer("aqua", "B") == "B"
    assert is_correct("BOOLQ", "true", "true")


def test_unknown_dataset_or_extraction_lists_valid_values() -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'squad'; valid names: boolq, piqa, .*AQuA"):
        extract_answer("squad", "x")
    with pytest.raises(ValueError, match=r"unknown extraction 'loose'; valid: llm-adapters, strict"):
        extract_answer("boolq", "true", "loose")


def test_dataset_kind() -> None:
    assert [dataset_kind(name) for name in COMMONSENSE_DATASETS] == ["commonsense"] * 8
    assert {dataset_kind(name) for name in ALL_DATASETS if name not in COMMONSENSE_DATASETS} == {"math"}
    assert dataset_kind("aqua") == "math" and dataset_kind("arc-challenge") == "commonsense"


# --------------------------------------------------------------------------------------------------
# Real test sets: each record's own answer, written as the LLM-Adapters training outputs write it
# --------------------------------------------------------------------------------------------------


def _reference_response(dataset: str, answer: str) -> str:
    if dataset_kind(dataset) == "commonsense":
        return f"the correct answer is {answer}"
    if dataset == "AQuA":
        return f"The answer is ({answer})."
    return f"The answer is {answer}."


@pytest.mark.parametrize("extraction", EXTRACTIONS)
@pytest.mark.parametrize("dataset", ALL_DATASETS)
def test_every_real_answer_scores_correct(real_data, dataset: str, extraction: str) -> None:
    records = load_test_records(real_data(f"dataset/{dataset}/test.json"))
    wrong = [
        r["answer"]
        for r in records
        if not is_correct(dataset, _reference_response(dataset, r["answer"]), r["answer"], extraction)
    ]
    assert not wrong, f"{len(wrong)} of {len(records)} answers not recovered, e.g. {wrong[:5]}"


def test_hellaswag_file_is_supported(monkeypatch, tmp_path) -> None:
    """hellaswag is not in ../shared/data; a file in LLM-Adapters' format must load and score."""
    from dense_lora.data import DATA_ENV_VAR, benchmark_test_file

    record = {
        "instruction": "Please choose the correct ending to complete the given sentence: A man sits. "
        "\n\nEnding1: he stands. Ending2: he sleeps. Ending3: he sings. Ending4: he runs."
        "\n\nAnswer format: ending1/ending2/ending3/ending4",
        "input": "",
        "output": "the correct answer is ending2",
        "answer": "ending2",
    }
    folder = tmp_path / "dataset" / "hellaswag"
    folder.mkdir(parents=True)
    (folder / "test.json").write_text(json.dumps([record]), encoding="utf-8")
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path))
    [loaded] = load_test_records(benchmark_test_file("HellaSwag"))
    for extraction in EXTRACTIONS:
        assert is_correct("hellaswag", loaded["output"], loaded["answer"], extraction)
