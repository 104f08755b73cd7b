"""Batched generation: left padding, planning, early stopping; on a tiny LLaMA and on real SmolLM2 + test data."""

from __future__ import annotations

import re

import pytest
from helpers import make_tiny_llama

from dense_lora import answers
from dense_lora.data import generate_eval_prompt, load_test_records
from dense_lora.evaluate import MAX_OPTION_CHARS
from dense_lora.generation import (
    first_match_is_final,
    generate_batch,
    generate_with_transformers,
    greedy_decode,
    plan_batches,
    response_from_text,
    shared_prefix_length,
)
from dense_lora.models import load_tokenizer


def test_plan_is_longest_first_stable_and_complete():
    plan = plan_batches([3, 9, 3, 7, 9], batch_size=2)
    assert plan == [[1, 4], [3, 0], [2]]
    with pytest.raises(ValueError):
        plan_batches([1], 0)


def test_response_is_text_between_first_and_second_marker():
    assert response_from_text("prompt ### Response:\n   the answer is true  ") == "the answer is true"
    assert response_from_text("p ### Response: a ### Response: b") == "a"
    with pytest.raises(ValueError):
        response_from_text("no marker")


def test_option_bound_covers_every_protocol_pattern():
    for pattern in answers.OPTION_PATTERNS.values():
        assert max(len(option) for option in pattern.split("|")) <= MAX_OPTION_CHARS


def test_first_match_rule():
    final = first_match_is_final(lambda text: str(answers.extract_answer("ARC-Easy", text)), MAX_OPTION_CHARS)
    assert not final("the answer is answer1", False)  # too close to the end: could still be rewritten
    assert final("the answer is answer1 because it is right", False)
    assert final("answer10 is not an option but extracts as answer1 anyway....", False)
    assert not final("nothing yet, but a long text without any option", False)
    assert final("anything", True)  # a second response marker closes the response


def _tiny_setup(smollm2_dir, tmp_path):
    """A tiny random LLaMA sized to the real SmolLM2 tokenizer (so prompts tokenize for real)."""
    tokenizer = load_tokenizer(smollm2_dir, padding_side="left")
    model = make_tiny_llama(
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return model, tokenizer


def test_batched_greedy_equals_batch_one_generate_on_tiny_llama(smollm2_dir, tmp_path, real_data):
    """The row-dropping greedy loop on a left-padded batch gives what transformers' generate() gives per prompt."""
    model, tokenizer = _tiny_setup(smollm2_dir, tmp_path)
    records = load_test_records(real_data("dataset/piqa/test.json"))[:6]
    prompts = [generate_eval_prompt(r["instruction"]) for r in records]
    batched = generate_batch(model, tokenizer, prompts, max_new_tokens=12)
    single = [generate_with_transformers(model, tokenizer, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == single
    assert generate_with_transformers(model, tokenizer, prompts, max_new_tokens=12) == single


@pytest.mark.parametrize("num_beams", [1, 4])
def test_model_generation_config_does_not_change_the_protocol(smollm2_dir, tmp_path, num_beams):
    """Settings an instruct model ships in its generation_config (repetition penalty, n-gram ban) stay out of
    greedy and beam decoding alike, as in the published protocol; the model's config is restored after."""
    model, tokenizer = _tiny_setup(smollm2_dir, tmp_path)
    prompts = [generate_eval_prompt("Which is heavier, a kilo of iron or a kilo of feathers?")]
    plain = generate_with_transformers(model, tokenizer, prompts, max_new_tokens=12, num_beams=num_beams)
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.no_repeat_ngram_size = 1
    assert (
        generate_with_transformers(model, tokenizer, prompts, max_new_tokens=12, num_beams=num_beams) == plain
    )
    assert model.generation_config.no_repeat_ngram_size == 1


def test_greedy_decode_drops_rows_as_they_end():
    """Rows end at EOS (kept), at max_new_tokens or when is_done says so; the others carry on unchanged."""
    model = make_tiny_llama(vocab_size=64, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    rows = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14, 15, 16]]
    free = greedy_decode(model, rows, max_new_tokens=6, eos_ids=[], pad_token_id=0)
    assert [len(tokens) for tokens in free] == [6, 6, 6]
    # call a token that only row 1 writes EOS, and stop row 2 after two tokens: row 0 must not change
    eos = next(token for token in free[1] if token not in free[0] + free[2][:2])
    cut = greedy_decode(
        model,
        rows,
        max_new_tokens=6,
        eos_ids=[eos],
        pad_token_id=0,
        is_done=lambda row, t: row == 2 and len(t) == 2,
    )
    assert cut == [free[0], free[1][: free[1].index(eos) + 1], free[2][:2]]


def test_shared_prefix_is_prefilled_once_with_the_same_result():
    """Rows sharing a template prefix decode as they do alone (prefix KV computed once, then shared)."""
    model = make_tiny_llama(vocab_size=64, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    template = [1, 20, 21, 22, 23, 24]
    rows = [[*template, 5, 6, 7], [*template, 8, 9, 10, 11, 12], [*template, 13]]
    assert shared_prefix_length(rows) == 6
    assert shared_prefix_length([[1, 2], [1, 2, 3]]) == 1  # every row keeps a token of its own
    assert shared_prefix_length([[1, 2]]) == 0
    together = greedy_decode(model, rows, max_new_tokens=8, eos_ids=[], pad_token_id=0)
    alone = [greedy_decode(model, [row], max_new_tokens=8, eos_ids=[], pad_token_id=0)[0] for row in rows]
    assert together == alone


def test_beam_search_refuses_early_stop(smollm2_dir, tmp_path):
    model, tokenizer = _tiny_setup(smollm2_dir, tmp_path)
    with pytest.raises(ValueError, match="greedy"):
        generate_batch(
            model,
            tokenizer,
            [generate_eval_prompt("x")],
            max_new_tokens=2,
            num_beams=2,
            is_final=lambda r, b: b,
        )


def _smollm2(smollm2_dir):
    import torch

    from dense_lora.evaluate import load_model

    return load_model(
        str(smollm2_dir), None, dtype="float32", load_8bit=False, load_4bit=False, device=torch.device("cpu")
    )


@pytest.mark.slow
def test_early_stop_gives_the_full_decode_predictions_on_real_data(smollm2_dir, real_data):
    """Early stop vs 32-token decode on real boolq/piqa prompts with SmolLM2.

    The untuned model rarely writes the protocol's lowercase options, so besides the real extractors the
    rule is also exercised with words it does write ("answer", "question", ...): a first-match extractor
    of literal strings, exactly the kind the rule is proven for. Some rows must actually stop early.
    """
    model, tokenizer = _smollm2(smollm2_dir)
    prompts = []
    for name in ("boolq", "piqa"):
        records = load_test_records(real_data(f"dataset/{name}/test.json"))[:4]
        prompts += [generate_eval_prompt(r["instruction"]) for r in records]
    words = re.compile(r"answer|question|solution|true|false|The|is")

    def first_word(text: str) -> str:
        found = words.findall(text.strip())
        return found[0] if found else ""

    full = generate_batch(model, tokenizer, prompts, max_new_tokens=32)
    stopped = generate_batch(
        model,
        tokenizer,
        prompts,
        max_new_tokens=32,
        is_final=first_match_is_final(first_word, MAX_OPTION_CHARS),
    )
    assert [first_word(text) for text in stopped] == [first_word(text) for text in full]
    assert sum(len(s) < len(f) for s, f in zip(stopped, full, strict=True)) >= len(prompts) // 2
    for dataset, part in (("boolq", slice(0, 4)), ("piqa", slice(4, 8))):
        rule = first_match_is_final(lambda t, d=dataset: str(answers.extract_answer(d, t)), MAX_OPTION_CHARS)
        real = generate_batch(model, tokenizer, prompts[part], max_new_tokens=32, is_final=rule)
        assert [answers.extract_answer(dataset, t) for t in real] == [
            answers.extract_answer(dataset, t) for t in full[part]
        ]


@pytest.mark.slow
def test_batched_vs_batch_one_agreement_on_real_data(smollm2_dir, real_data):
    """Left-padded batches change matmul shapes, not the maths: responses should (almost) all agree."""
    model, tokenizer = _smollm2(smollm2_dir)
    records = load_test_records(real_data("dataset/ARC-Easy/test.json"))[:6]
    prompts = [generate_eval_prompt(r["instruction"]) for r in records]
    batched = generate_batch(model, tokenizer, prompts, max_new_tokens=16)
    single = [generate_with_transformers(model, tokenizer, [p], max_new_tokens=16)[0] for p in prompts]
    same = sum(b == s for b, s in zip(batched, single, strict=True))
    print(f"batched vs batch-1 identical responses: {same}/{len(prompts)}")
    assert same >= len(prompts) - 1
