"""DenseLoraConfig: the peft config of DenseLoRA, with field names that mirror LoraConfig."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from peft import PeftConfig
from peft.utils import PeftType

from .fused import ACTIVATION_FUNCTIONS

ACTIVATIONS = tuple(ACTIVATION_FUNCTIONS)

# The paper adapts Q, K, V, Up and Down (QKVUD). Families whose projections carry these names get them by default.
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
TARGET_MODULES_BY_MODEL_TYPE = {
    model_type: DEFAULT_TARGET_MODULES
    for model_type in (
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "olmo",
        "olmo2",
    )
}

# Sibling Linear modules that read one input tensor (the layers compute them in one call: ``layer.InputGroup``).
SAME_INPUT_MODULES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("gate_proj", "up_proj"))

# Fields that decide what an adapter computes: a saved config missing one of them cannot be trusted to mean
# what it meant at training time, so loading it is refused rather than filled in with today's defaults.
REQUIRED_SAVED_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "activation", "train_shared")


@dataclass
class DenseLoraConfig(PeftConfig):
    """Configuration of a DenseLoRA adapter (Mu et al., ACL 2025, arXiv 2505.23808).

    Every targeted Linear computes ``y = W0 x + s * drop(act(W_d M drop(act(W_e drop(x)))))`` with ``s = lora_alpha / r``.
    ``W_e`` (r x in) and ``W_d`` (out x r) are shared by all layers of one module type (the last name component,
    e.g. ``q_proj``); ``M`` (r x r) belongs to one module of one layer.

    Dropout sits where the authors' layer puts it: on the input, after the encoder activation and after the decoder
    activation (the same probability ``lora_dropout`` each time).

    Initialisation. With ``train_shared=True`` (the paper's default) ``W_e`` and ``M`` are Kaiming-uniform and
    ``W_d`` is zero, so the adapted model starts as the base and every weight trains.

    ``train_shared=False`` is the paper's "Freeze" (Table 4), whose init the paper does not state. Freezing the default
    init would freeze ``W_d`` at zero: the update would stay zero and ``M`` would get no gradient, so "Freeze" would
    report the base model. Here Freeze instead keeps ``W_e`` and ``W_d`` as *frozen random* tensors (Kaiming-uniform,
    drawn from ``init_seed``) and starts ``M`` at zero: the adapted model still equals the base at step 0, and
    ``dL/dM = s * W_d^T g act(W_e x)^T`` is non-zero, so ``M`` learns while ``W_e``/``W_d`` never change. The frozen
    tensors are buffers (not parameters without grad), saved in the adapter file so a Freeze adapter reloads exactly;
    only the ``M`` matrices count as trainable (``layers * r * r`` per module type).
    ``init_weights=False`` makes the update non-zero from the start (random ``W_d``, or random ``M`` for Freeze).
    """

    r: int = field(
        default=16, metadata={"help": "Rank: the width of the shared encoder/decoder and of each M."}
    )
    lora_alpha: float = field(
        default=32, metadata={"help": "Scaling numerator: the update is scaled by alpha / r."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability (applied three times)."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Names (matched on the last name components) or one regex of the Linear modules to adapt. "
            "Default for LLaMA-family models: q_proj, k_proj, v_proj, up_proj, down_proj."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules never to adapt."}
    )
    activation: Literal["gelu", "identity", "relu", "silu", "tanh"] = field(
        default="gelu",
        metadata={
            "help": "Activation after the encoder and after the decoder. 'identity' is the paper's 'Only Matrix'."
        },
    )
    train_shared: bool = field(
        default=True,
        metadata={
            "help": "Train the shared encoder/decoder. False is the paper's 'Freeze': W_e and W_d are frozen random "
            "buffers and M starts at zero, so only M trains (see the class docstring)."
        },
    )
    lora_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Mixed granularity (paper Table 3): targeted modules whose name ends with one of these get a plain "
            "per-layer LoRA update (B A, rank r) instead of the shared DenseLoRA one, inside the same adapter."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "Start the adapted model as the base: zero W_d (and LoRA's B), or zero M when train_shared=False."
        },
    )
    init_seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed of a private generator for the adapter's initialisation (None: torch's global RNG)."
        },
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Layer indices to adapt."}
    )
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained and saved in full."}
    )
    bias: Literal["none"] = field(default="none", metadata={"help": "Biases are never trained by DenseLoRA."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.DENSELORA
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"DenseLoraConfig: r must be a positive integer, got {self.r!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"DenseLoraConfig: lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"DenseLoraConfig: activation must be one of {list(ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.bias != "none":
            raise ValueError(f"DenseLoraConfig: bias must be 'none', got {self.bias!r}")
        self.target_modules = _as_set(self.target_modules)
        self.exclude_modules = _as_set(self.exclude_modules)
        if self.lora_modules is not None:
            if isinstance(self.lora_modules, str):
                raise ValueError("DenseLoraConfig: lora_modules must be a list of module names, not a string")
            self.lora_modules = sorted(set(self.lora_modules))

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    @classmethod
    def from_peft_type(cls, **kwargs: Any) -> PeftConfig:
        """Build from a saved ``adapter_config.json``; a missing method field is an error, not a default.

        Unknown fields get peft's forward-compatible treatment (a warning naming them, then ignored), and a JSON
        without ``peft_type`` peft's TypeError. A DenseLoRA config without one of REQUIRED_SAVED_FIELDS is refused:
        filling it with today's defaults could compute something other than what was trained.
        """
        if kwargs.get("peft_type") in (PeftType.DENSELORA, PeftType.DENSELORA.value):
            missing = [name for name in REQUIRED_SAVED_FIELDS if name not in kwargs]
            if missing:
                raise ValueError(f"DenseLoRA adapter config is missing required fields {missing}")
        return super().from_peft_type(**kwargs)


def _as_set(value: list[str] | set[str] | str | None) -> set[str] | str | None:
    """peft matches list targets as sets; keep a regex string as is."""
    if value is None or isinstance(value, str):
        return value
    return set(value)
