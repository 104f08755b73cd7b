"""Batched generation for the LLM-Adapters evaluation protocol, fast and faithful.

The published scripts (LLM-Adapters ``evaluate.py`` / ``commonsense_evaluate.py`` and the DoRA and DenseLoRA
copies) generate one prompt at a time with 4-beam search; their ``batch_size > 1`` path pads without an
attention mask and is wrong. This module generates many prompts at once, correctly:

* prompts are LEFT-padded and the attention mask is passed, so every row sees exactly its own tokens;
* batches are formed from prompts sorted by token length, so little compute goes to padding;
* the KV cache is on, and a row leaves the batch (its KV cache rows too) as soon as it ends: at EOS, or
  optionally as soon as its *score* can no longer change (:func:`first_match_is_final`);
* the prompts' common token prefix (the instruction template) is prefilled once for the whole batch;
* beam search (the published protocol) goes through ``model.generate`` unchanged.

The response of a row is computed as the protocol does: decode prompt + generated tokens, split on
``"### Response:"`` and keep the part after the first marker, stripped. Padding and everything after EOS are
dropped by position before decoding, and special tokens are skipped, so the text is what a batch-1 run
decodes no matter which token pads. (LLM-Adapters' math script decodes without ``skip_special_tokens``; the
only special tokens in a batch-1 output are BOS, before the marker, and EOS/pad after the answer, and
neither contains a digit or a capital A-E for the LLaMA/SmolLM2 vocabularies, so scores are unaffected.)

Batch composition matters for the numbers: padded rows go through differently shaped matmuls and may
differ from batch-1 greedy in the last bits, which can flip a near-tie. The batch *plan*
(:func:`plan_batches`) is therefore a pure function of the prompt lengths and the batch size, so a resumed
or multi-process run generates every row in exactly the same batch as a single uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

RESPONSE_MARKER = "### Response:"

# Characters at the end of a decoded text that later tokens may still rewrite: an incomplete UTF-8
# sequence decodes to up to three replacement characters, and `clean_up_tokenization_spaces` may drop
# one space before new punctuation. Text further from the end than this is final.
_UNSTABLE_TAIL_CHARS = 4


def response_from_text(text: str) -> str:
    """The protocol's response: the text after the first ``### Response:`` up to a second one, stripped.

    LLM-Adapters takes ``split("### Response:")[1]``; the prompt holds exactly one marker, so only a marker
    the model writes itself bounds the response. (The DoRA/DenseLoRA commonsense copy takes ``[-1]``
    instead; the two agree unless the model writes the marker, see docs/evaluation.md.)
    """
    parts = text.split(RESPONSE_MARKER)
    if len(parts) < 2:
        raise ValueError(
            f"decoded text has no '{RESPONSE_MARKER}' marker; was it built with the eval prompt?"
        )
    return parts[1].strip()


def plan_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Split example indices into batches of similar prompt length, longest first.

    Longest first makes an out-of-memory batch size fail in the first seconds, not hours in. The sort is
    stable (ties keep index order) so the plan depends only on `lengths` and `batch_size`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def first_match_is_final(extract: Callable[[str], str], max_option_chars: int) -> Callable[[str, bool], bool]:
    """A test "the extracted option can no longer change" for first-match extractors.

    `extract` returns the FIRST match of a set of literal option strings (each at most `max_option_chars`
    long) in the stripped response, or "". Once that match starts at least `max_option_chars` plus the
    unstable tail before the end of the text, it is final: every earlier start position was already
    checked against whole option lengths of text that will not change, and text appended later cannot
    move a leftmost match that already exists. A match that is a prefix of a longer word ("answer1" in
    "answer10") is no exception: the regex extracts "answer1" from "answer10" too.
    """
    margin = max_option_chars + _UNSTABLE_TAIL_CHARS

    def is_final(response: str, bounded: bool) -> bool:
        if bounded:  # a second marker closed the response: nothing can be appended to it
            return True
        option = extract(response)
        if not option:
            return False
        return len(response) - response.find(option) >= margin + len(option)

    return is_final


def marker_is_final(response: str, bounded: bool) -> bool:
    """For extractors that read the whole response (math): only a closing marker makes it final."""
    return bounded


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS ids as a batch-1 ``generate`` would stop on them: the model's generation config, else the tokenizer's."""
    configured = model.generation_config.eos_token_id
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        return []
    return [configured] if isinstance(configured, int) else list(configured)


def _model_device(model: PreTrainedModel) -> torch.device:
    return model.device if hasattr(model, "device") else torch.device("cpu")


def _encode_left_padded(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """input_ids and attention mask on the model's device, and each row's prompt ids without padding."""
    if tokenizer.padding_side != "left":
        raise ValueError(
            "batched generation needs a left-padding tokenizer (load_tokenizer(..., padding_side='left'))"
        )
    encoded = tokenizer(list(prompts), return_tensors="pt", padding=True)
    device = _model_device(model)
    prompt_rows = [
        ids[mask.bool()].tolist()
        for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)
    ]
    return encoded["input_ids"].to(device), encoded["attention_mask"].to(device), prompt_rows


def _response(tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], generated: list[int]) -> str:
    return response_from_text(tokenizer.decode(prompt_ids + generated, skip_special_tokens=True))


def shared_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix all rows share, leaving every row at least one token of its own."""
    if len(rows) < 2:
        return 0
    length = 0
    for column in zip(*rows, strict=False):
        if any(token != column[0] for token in column):
            break
        length += 1
    return min(length, min(map(len, rows)) - 1)


@torch.inference_mode()
def greedy_decode(
    model: PreTrainedModel,
    prompt_rows: Sequence[list[int]],
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_token_id: int,
    is_done: Callable[[int, list[int]], bool] | None = None,
) -> list[list[int]]:
    """Greedy decoding of a batch of token-id prompts; returns each row's generated tokens.

    Two things ``generate()`` does not do:

    * The prompts' common token prefix (the instruction template) is prefilled once and its KV cache shared by
      every row; each row's remainder is left-padded after it, which the attention mask and the positions
      (counted over unmasked tokens) make equivalent to the row alone.
    * A row leaves the batch, KV cache included, once it ends: at EOS (kept in its tokens), after
      ``max_new_tokens``, or when ``is_done(row, tokens)`` says so. ``generate()`` keeps feeding finished rows
      padding until the longest row ends, which on short answers is most of the work.

    Positions and the next token (argmax of float32 logits) are computed as ``generate()`` computes them, so each
    row's tokens are those of its own batch-1 run up to floating-point ties.
    """
    device = _model_device(model)
    cache, step_ids, attention_mask, position_ids = _prefill_shared_prefix(model, prompt_rows, pad_token_id)
    generated: list[list[int]] = [[] for _ in prompt_rows]
    rows = list(range(len(prompt_rows)))  # the original index of each row still in the batch
    for _ in range(max_new_tokens):
        logits = model(
            input_ids=step_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits
        next_ids = logits[:, -1].float().argmax(-1)
        keep = _append_and_keep(rows, next_ids.tolist(), generated, eos_ids, max_new_tokens, is_done)
        if not keep:
            break
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            rows = [rows[slot] for slot in keep]
            next_ids, attention_mask, position_ids = (
                next_ids[index],
                attention_mask[index],
                position_ids[index],
            )
        step_ids = next_ids[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
        position_ids = position_ids[:, -1:] + 1
    return generated


def _prefill_shared_prefix(
    model: PreTrainedModel, prompt_rows: Sequence[list[int]], pad_token_id: int
) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefill the rows' common prefix once into a KV cache repeated per row; the first step's inputs.

    Returns the cache and each row's remainder left-padded after the prefix, with the attention mask and the
    positions (counted over unmasked tokens, as ``generate()`` counts them).
    """
    from transformers import DynamicCache

    device = _model_device(model)
    cache = DynamicCache(config=model.config)
    prefix = shared_prefix_length(prompt_rows)
    if prefix:
        model(input_ids=torch.tensor([prompt_rows[0][:prefix]], device=device), cache=cache, use_cache=True)
        cache.batch_repeat_interleave(len(prompt_rows))
    width = max(len(row) for row in prompt_rows) - prefix
    step_ids = torch.tensor(
        [[pad_token_id] * (width - len(row) + prefix) + row[prefix:] for row in prompt_rows], device=device
    )
    attention_mask = torch.tensor(
        [[1] * prefix + [0] * (width - len(row) + prefix) + [1] * (len(row) - prefix) for row in prompt_rows],
        device=device,
    )
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min_(0)[:, prefix:]
    return cache, step_ids, attention_mask, position_ids


def _append_and_keep(
    rows: Sequence[int],
    tokens: Sequence[int],
    generated: list[list[int]],
    eos_ids: Sequence[int],
    max_new_tokens: int,
    is_done: Callable[[int, list[int]], bool] | None,
) -> list[int]:
    """Append each running row's new token; return the batch slots of the rows that go on."""
    keep = []
    for slot, (row, token) in enumerate(zip(rows, tokens, strict=True)):
        generated[row].append(token)
        ended = token in eos_ids or len(generated[row]) == max_new_tokens
        if not ended and not (is_done is not None and is_done(row, generated[row])):
            keep.append(slot)
    return keep


def generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    num_beams: int = 1,
    is_final: Callable[[str, bool], bool] | None = None,
) -> list[str]:
    """Responses for one batch of prompts: greedy (:func:`greedy_decode`) when `num_beams` is 1, else beam search.

    `is_final` enables per-row early stopping (greedy only: beam search ranks whole beams, so cutting a
    beam would change which one wins). Sampling is never used: the protocol's temperature/top-p/top-k
    settings are inert because it never sets ``do_sample``.
    """
    if num_beams > 1:
        if is_final is not None:
            raise ValueError("early stopping is only exact for greedy decoding (num_beams=1)")
        return generate_with_transformers(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, num_beams=num_beams
        )
    prompt_rows = tokenizer(list(prompts))["input_ids"]

    def is_done(row: int, tokens: list[int]) -> bool:
        parts = tokenizer.decode(prompt_rows[row] + tokens, skip_special_tokens=True).split(RESPONSE_MARKER)
        return is_final(parts[1], len(parts) > 2)

    eos_ids = _eos_ids(model, tokenizer)
    generated = greedy_decode(
        model,
        prompt_rows,
        max_new_tokens=max_new_tokens,
        eos_ids=eos_ids,
        pad_token_id=tokenizer.pad_token_id or 0,  # any id: padding is masked
        is_done=is_done if is_final is not None else None,
    )
    return [_response(tokenizer, ids, tokens) for ids, tokens in zip(prompt_rows, generated, strict=True)]


def generate_with_transformers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    num_beams: int = 1,
) -> list[str]:
    """Responses from ``model.generate`` (beam search for the published protocol; greedy as a reference)."""
    input_ids, attention_mask, prompt_rows = _encode_left_padded(model, tokenizer, prompts)
    eos_ids = _eos_ids(model, tokenizer)
    config = GenerationConfig(
        do_sample=False,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_ids or None,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        use_cache=True,
    )
    with torch.inference_mode(), _without_model_generation_defaults(model):
        sequences = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config
        )
    width = input_ids.shape[1]
    responses = []
    for row, prompt_ids in enumerate(prompt_rows):
        generated = sequences[row, width:].tolist()
        ends = [position for position, token in enumerate(generated) if token in eos_ids]
        responses.append(_response(tokenizer, prompt_ids, generated[: ends[0] + 1] if ends else generated))
    return responses


@contextmanager
def _without_model_generation_defaults(model: PreTrainedModel) -> Iterator[None]:
    """Generation settings that are the protocol's alone, whatever model the run uses.

    transformers 5 fills every field the config passed to ``generate`` leaves unset from the model's own
    ``generation_config`` (e.g. an instruct model's ``repetition_penalty``), which changes beam search and makes
    it disagree with the greedy loop, which reads none of them. The model's config is set aside for the call."""
    owner = (
        model.get_base_model() if hasattr(model, "get_base_model") else model
    )  # a PeftModel's transformers model
    saved = owner.generation_config
    owner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        owner.generation_config = saved


def generate_planned(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batches: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    num_beams: int = 1,
    is_final: Callable[[str, bool], bool] | None = None,
) -> Iterator[list[tuple[int, str]]]:
    """Run the given batches of prompt indices in order, yielding ``[(index, response), ...]`` per batch.

    Yielding per batch lets the caller write results as they arrive; a run killed between batches loses
    at most the batch in flight.
    """
    for batch in batches:
        responses = generate_batch(
            model,
            tokenizer,
            [prompts[i] for i in batch],
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            is_final=is_final,
        )
        yield list(zip(batch, responses, strict=True))
