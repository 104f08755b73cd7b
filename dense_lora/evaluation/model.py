"""The model side of an evaluation: loading base model + adapter, checking the adapter fits, sizing batches.

The only part of the evaluator that needs torch and the model in memory; everything that can be checked
without them lives in :mod:`dense_lora.evaluation.settings`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dense_lora.data import generate_eval_prompt
from dense_lora.evaluation.settings import EvalSettings, EvaluationError, check_safetensors
from dense_lora.runtime import Processes

# Batch size when --batch_size is not given and there is no GPU to probe: on CPU the fast decoder gains little
# beyond 16 rows (measured on SmolLM2, docs/evaluation.md), and 16 keeps memory small on any machine.
CPU_DEFAULT_BATCH_SIZE = 16
# The largest batch the GPU probe tries; beyond it finished rows leave the batch so fast that more rows add
# little, and a smaller ceiling keeps the probe short.
GPU_MAX_BATCH_SIZE = 64


def load_model(
    base_model: str,
    lora_weights: str | None,
    *,
    dtype: str,
    load_8bit: bool,
    load_4bit: bool,
    device: torch.device,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Base model (optionally quantized) plus any peft adapter, in eval mode, and a left-padding tokenizer.

    Importing dense_lora registers DENSELORA with peft, so LoRA, DoRA and DenseLoRA folders all load
    through ``PeftModel.from_pretrained``. A shape mismatch (adapter trained on another base) surfaces
    as one line.
    """
    import dense_lora  # noqa: F401  (registers the DENSELORA peft type)
    from dense_lora.models import load_base_model, load_tokenizer

    quantized = load_8bit or load_4bit
    device_map = {"": device.index or 0} if device.type == "cuda" and quantized else None
    model = load_base_model(
        base_model,
        dtype=dtype,
        load_8bit=load_8bit,
        load_4bit=load_4bit,
        device_map=device_map,
        trust_remote_code=trust_remote_code,
    )
    if not quantized:
        model = model.to(device)
    if lora_weights is not None:
        model = _load_adapter(model, lora_weights, base_model)
    model.eval()
    return model, load_tokenizer(base_model, padding_side="left", trust_remote_code=trust_remote_code)


def _load_adapter(model: Any, lora_weights: str, base_model: str) -> Any:
    """Wrap `model` with the peft adapter in `lora_weights`, all of it or an error line."""
    from peft import PeftModel

    # peft's warnings about keys it could not place are held back: the check below turns a partial load
    # into one error line; any other warning is shown once the adapter is known to fit.
    with warnings.catch_warnings(record=True) as held:
        warnings.simplefilter("always")
        try:
            model = PeftModel.from_pretrained(model, lora_weights, is_trainable=False)
        except (ValueError, RuntimeError, KeyError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise EvaluationError(
                f"adapter {lora_weights} does not fit base model {base_model}: {first}"
            ) from None
    check_adapter_loaded(model, Path(lora_weights), base_model)
    for caught in held:
        warnings.warn_explicit(caught.message, caught.category, caught.filename, caught.lineno)
    return model


def check_adapter_loaded(model: Any, folder: Path, base_model: str) -> None:
    """All or nothing, for every peft method: every saved tensor found its place, and every adapter tensor came.

    peft loads with ``strict=False`` and only warns about keys it could not place, so a LoRA/DoRA/VeRA adapter
    trained on another base (other layer count or module names) would be evaluated half-applied. DenseLoRA
    refuses that in its own loader; this check holds the other methods to the same rule.
    """
    from peft import get_peft_model_state_dict

    saved = check_safetensors(folder / "adapter_model.safetensors")
    expected = {key: tuple(value.shape) for key, value in get_peft_model_state_dict(model).items()}
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    misshapen = sorted(key for key in set(saved) & set(expected) if saved[key] != expected[key])
    if missing or unexpected or misshapen:
        details = [f"{len(missing)} adapter tensors missing (e.g. '{missing[0]}')"] if missing else []
        details += (
            [f"{len(unexpected)} with no place in the model (e.g. '{unexpected[0]}')"] if unexpected else []
        )
        details += [f"{len(misshapen)} of another shape (e.g. '{misshapen[0]}')"] if misshapen else []
        raise EvaluationError(
            f"adapter {folder} does not fit base model {base_model}: {'; '.join(details)}; "
            "it was trained on another base model"
        )


def choose_batch_size(
    model: Any, tokenizer: Any, records: Sequence[dict[str, Any]], settings: EvalSettings, procs: Processes
) -> tuple[int, str]:
    """Batch size and how it was chosen when --batch_size is not given: a GPU probe, else the CPU default.

    All ranks use rank 0's choice, so the batch plan stays the same.
    """
    if procs.device.type != "cuda":
        return CPU_DEFAULT_BATCH_SIZE, f"auto: CPU default {CPU_DEFAULT_BATCH_SIZE}"
    size = GPU_MAX_BATCH_SIZE
    if procs.rank == 0:
        size = _probe_gpu(model, tokenizer, records, settings.max_new_tokens, procs.device)
    if procs.world > 1:
        shared = torch.tensor([size], device=procs.device)
        torch.distributed.broadcast(shared, src=0)
        size = int(shared.item())
    return size, f"auto: GPU probe (largest power of two up to {GPU_MAX_BATCH_SIZE} that fits)"


def _probe_gpu(
    model: Any, tokenizer: Any, records: Sequence[dict[str, Any]], max_new_tokens: int, device: torch.device
) -> int:
    """The largest power-of-two batch (up to GPU_MAX_BATCH_SIZE) whose worst case fits in GPU memory.

    One forward pass over `size` copies of the benchmark's longest prompt padded to its longest possible
    sequence (prompt + max_new_tokens) with the KV cache on needs at least the memory of any batch the decoder
    will run (the decoder keeps logits of one position only); the size halves until one fits.
    """
    prompts = [generate_eval_prompt(record["instruction"]) for record in records]
    longest = max(len(ids) for ids in tokenizer(prompts)["input_ids"])
    length = longest + max_new_tokens
    size = min(GPU_MAX_BATCH_SIZE, 1 << max(len(records) - 1, 0).bit_length())
    while size > 1:
        try:
            ids = torch.full((size, length), tokenizer.pad_token_id or 0, device=device)
            with torch.no_grad():
                model(input_ids=ids, use_cache=True, logits_to_keep=1)
            break
        except torch.cuda.OutOfMemoryError:
            size //= 2
        finally:
            torch.cuda.empty_cache()
    return size
