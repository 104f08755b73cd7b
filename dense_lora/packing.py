"""Padding-free training batches: the records of a micro-batch flattened into one row.

Padded micro-batches spend compute on pad tokens: on the commonsense training mix tokenised at cutoff 256, a
micro-batch of 4 is about 76% real tokens. Flattening the records into one ``(1, total)`` row with per-record
``position_ids`` removes the padding without changing what is computed:

* transformers 5 turns position ids that restart at 0 into a block-diagonal causal mask when no 2-D attention mask
  is given (``masking_utils.find_packed_sequence_indices``), for sdpa, eager and flex attention; the flash
  attention kernels read the same position ids. So each record attends only to itself, with the positions it
  would have had alone in a right-padded row.
* the first label of every record is -100: after the causal shift it is the target of the previous record's last
  token, which the padded path never trains either. So the set of (prediction, target) pairs is the right-padded
  path's, and Trainer's ``num_items_in_batch`` (it counts ``labels[..., 1:]``) is the same number: losses and
  gradients are the right-padded path's up to float rounding. (Left padding, LLM-Adapters' choice, shifts the
  positions of short records and trains a row's first real token from a pad: another computation, so
  ``--padding_side left`` trains padded, ``training/config.py``.)
* no ``attention_mask`` is returned: its presence is what would switch the position-id detection off.

Attention itself is the one place where a flattened row costs more than padding: the block-diagonal mask is dense,
so a row of T tokens computes T² scores where the padded batch computes B·L². :func:`varlen_sdpa_attention` runs
sdpa once per record instead (causal, no mask), which is cheaper than either; it is registered as the attention
implementation ``"sdpa_packed"`` and used by :func:`enable_packed_attention`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .data import IGNORE_INDEX

# Attention implementations that honour per-record position ids in a flattened row (transformers 5).
PACKING_ATTENTION = (
    "sdpa",
    "eager",
    "flex_attention",
    "flash_attention_2",
    "flash_attention_3",
    "sdpa_packed",
)
PACKED_SDPA = "sdpa_packed"


class PackedCollator:
    """Flatten a micro-batch into one row: ``input_ids``, ``labels`` and ``position_ids`` of shape ``(1, total)``.

    ``labels`` are each record's own labels with the first one set to -100 (see the module docstring for why that
    keeps the loss equal to the padded path's). Empty records are dropped, as the padded collator would give them
    no target either. Returns int64 tensors.
    """

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for feature in features:
            ids = list(feature["input_ids"])
            if not ids:
                continue
            own = list(feature["labels"]) if "labels" in feature else ids
            if len(own) != len(ids):
                raise ValueError(f"a record has {len(ids)} input ids but {len(own)} labels")
            input_ids += ids
            labels += [IGNORE_INDEX, *own[1:]]
            positions += range(len(ids))
        if not input_ids:
            raise ValueError("every record of the micro-batch is empty")

        def row(values: list[int]) -> torch.Tensor:
            return torch.tensor([values], dtype=torch.long)

        return {"input_ids": row(input_ids), "labels": row(labels), "position_ids": row(positions)}


def attention_implementation(model: nn.Module) -> str | None:
    """The attention implementation a (possibly peft-wrapped) model runs, as transformers records it."""
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "get_base_model"):
        config = getattr(model.get_base_model(), "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


def packing_unsupported_reason(model: nn.Module) -> str | None:
    """Why a flattened row would let records attend to each other in this model, or None when packing is safe.

    Packing relies on transformers' mask utilities reading record boundaries from position ids; an attention
    implementation outside :data:`PACKING_ATTENTION` (e.g. paged or a remote-code model's own) may ignore them,
    and a model without a config records no implementation at all.
    """
    implementation = attention_implementation(model)
    if implementation is None:
        return "the model does not say which attention implementation it uses"
    if implementation not in PACKING_ATTENTION:
        return (
            f"attention implementation {implementation!r} does not read record boundaries from position ids"
        )
    return None


def _record_lengths(position_ids: torch.Tensor) -> list[int] | None:
    """The length of each record in a single flattened row, or None for an ordinary (unpacked) batch."""
    if position_ids is None or position_ids.shape[0] != 1:
        return None
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if len(starts) <= 1 or starts[0] != 0:
        return None
    return [end - start for start, end in zip(starts, [*starts[1:], position_ids.shape[1]], strict=True)]


def _plain_causal(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    is_causal: bool | None,
    kwargs: Mapping[str, Any],
) -> bool:
    """Whether this attention call is what the per-record kernel computes: causal over the whole record, queries
    and keys of one length, and nothing added to the scores. A sliding window, bidirectional spans, logit
    soft-capping or a position bias go to transformers' sdpa, which honours them (or refuses them) itself."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    sliding = getattr(module, "sliding_window", None) or kwargs.get("sliding_window")
    extras = kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None
    return causal is not False and not sliding and not extras and query.shape[2] == key.shape[2]


def varlen_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """sdpa per record of a flattened row (causal, no mask); transformers' sdpa for every other batch and under
    ``torch.compile``.

    Why: a dense block-diagonal mask makes sdpa compute every score of the T x T row and mask most of them away;
    per record, the causal kernels compute only the lower triangle of each record's own block. The result is
    the same function (each record attends to itself, causally), so this is a pure speed choice.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # Under torch.compile, splitting per record would need the lengths on the host: a graph break in every layer,
    # and a recompilation for every new set of lengths. There transformers' block-diagonal mask (built in the
    # graph from the same position ids) computes the same function.
    lengths = None if torch.compiler.is_compiling() else _record_lengths(kwargs.get("position_ids"))
    if lengths is None or not _plain_causal(module, query, key, is_causal, kwargs):
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each kv head serves `groups` query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    # one split per tensor rather than a slice per record: the backward of a split is one concatenation, while
    # each slice's backward would write its gradient into a zeroed copy of the whole row
    outputs = [
        torch.nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout if module.training else 0.0, is_causal=True, scale=scaling
        )
        for q, k, v in zip(
            query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2), strict=True
        )
    ]
    # (batch, heads, seq, dim) -> (batch, seq, heads, dim), as transformers' attention functions return; the
    # concatenation is the one copy that makes it contiguous
    return torch.cat([output.transpose(1, 2) for output in outputs], dim=1), None


def _register() -> None:
    """Make ``"sdpa_packed"`` an attention implementation transformers can dispatch to (mask built as for sdpa)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, varlen_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)


def enable_packed_attention(model: nn.Module) -> bool:
    """Switch a model that runs sdpa to the per-record sdpa of :func:`varlen_sdpa_attention`; True if switched.

    Other implementations are left alone: eager and flex still honour boundaries (through the mask) and the
    flash kernels already run per record.
    """
    if attention_implementation(model) != "sdpa":
        return False
    _register()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(PACKED_SDPA)
    return True


def choose_collator(model: nn.Module, padded: Any, packing: bool) -> tuple[Any, str | None]:
    """The training collator for a run: packed when asked for and safe, else ``padded``; plus a note for the user.

    The note (None when nothing needs saying) explains why a run that asked for packing trains on padded batches.
    A model that keeps a KV cache in training would hide the record boundaries from transformers' mask
    utilities, so ``config.use_cache`` must be off (the training harness turns it off before this is called).
    """
    if not packing:
        return padded, None
    reason = packing_unsupported_reason(model)
    config = getattr(model, "config", None)
    if reason is None and getattr(config, "use_cache", False):
        reason = "the model keeps a KV cache in training (config.use_cache is on)"
    if reason is not None:
        return padded, f"packing is off: {reason}; training on padded batches instead"
    enable_packed_attention(model)
    return PackedCollator(), None
