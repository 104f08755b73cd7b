"""Batched generation for the LLM-Adapters evaluation protocol, fast and faithful.

The published scripts (LLM-Adapters ``evaluate.py`` / ``commonsense_evaluate.py`` and the DoRA and DenseLoRA
copies) generate one prompt at a time with 4-beam search; their ``batch_size > 1`` path pads without an
attention mask and is wrong. This module generates many prompts at once, correctly:

* prompts are LEFT-padded and the attention mask is passed, so every row sees exactly its own tokens;
* batches are formed from prompts sorted by token length, so little compute goes to padding;
* the KV cache is on and each row stops at EOS (``generate`` then feeds it padding until the batch ends);
* optionally a row also stops as soon as its *score* can no longer change (:class:`ResponseStopper`).

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

import torch
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

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


class ResponseStopper(StoppingCriteria):
    """Marks a row finished once ``is_final(response, bounded)`` holds for its decoded response so far.

    `bounded` tells whether the model already wrote a second ``### Response:`` (which ends the response
    for good). The row's finishing length is recorded so that the padding `generate` appends afterwards is
    cut off by position.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_rows: Sequence[list[int]],
        prompt_width: int,
        is_final: Callable[[str, bool], bool],
    ) -> None:
        self.tokenizer = tokenizer
        self.prompt_rows = prompt_rows
        self.prompt_width = prompt_width
        self.is_final = is_final
        self.stopped_at: list[int | None] = [None] * len(prompt_rows)

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object
    ) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row, prompt_ids in enumerate(self.prompt_rows):
            if self.stopped_at[row] is not None:
                done[row] = True
                continue
            generated = input_ids[row, self.prompt_width :].tolist()
            text = self.tokenizer.decode(prompt_ids + generated, skip_special_tokens=True)
            parts = text.split(RESPONSE_MARKER)
            if self.is_final(parts[1], len(parts) > 2):
                self.stopped_at[row] = len(generated)
                done[row] = True
        return done


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS ids as a batch-1 ``generate`` would stop on them: the model's generation config, else the tokenizer's."""
    configured = model.generation_config.eos_token_id
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        return []
    return [configured] if isinstance(configured, int) else list(configured)


def _cut(generated: list[int], eos_ids: Sequence[int], stopped_at: int | None) -> list[int]:
    """Generated tokens up to the first EOS (inclusive) or the stopper's cut, whichever comes first."""
    end = len(generated) if stopped_at is None else stopped_at
    for position, token in enumerate(generated[:end]):
        if token in eos_ids:
            return generated[: position + 1]
    return generated[:end]


def generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    num_beams: int = 1,
    is_final: Callable[[str, bool], bool] | None = None,
) -> list[str]:
    """Responses for one batch of prompts (greedy when `num_beams` is 1, else beam search).

    `is_final` enables per-row early stopping (greedy only: beam search ranks whole beams, so cutting a
    beam would change which one wins). Sampling is never used: the protocol's temperature/top-p/top-k
    settings are inert because it never sets ``do_sample``.
    """
    if tokenizer.padding_side != "left":
        raise ValueError(
            "batched generation needs a left-padding tokenizer (load_tokenizer(..., padding_side='left'))"
        )
    if is_final is not None and num_beams > 1:
        raise ValueError("early stopping is only exact for greedy decoding (num_beams=1)")
    encoded = tokenizer(list(prompts), return_tensors="pt", padding=True)
    device = model.device if hasattr(model, "device") else torch.device("cpu")
    input_ids = encoded["input_ids"].to(device)
    attention_mask = encoded["attention_mask"].to(device)
    width = input_ids.shape[1]
    prompt_rows = [
        ids[mask.bool()].tolist()
        for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)
    ]
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
    stopper = None if is_final is None else ResponseStopper(tokenizer, prompt_rows, width, is_final)
    with torch.inference_mode():
        sequences = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            stopping_criteria=StoppingCriteriaList([stopper] if stopper is not None else []),
        )
    responses = []
    for row, prompt_ids in enumerate(prompt_rows):
        generated = _cut(
            sequences[row, width:].tolist(), eos_ids, stopper.stopped_at[row] if stopper else None
        )
        responses.append(
            response_from_text(tokenizer.decode(prompt_ids + generated, skip_special_tokens=True))
        )
    return responses


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
