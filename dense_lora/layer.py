"""The DenseLoRA layer: a frozen Linear plus ``s * drop(act(W_d M drop(act(W_e drop(x)))))``.

``W_e`` and ``W_d`` are shared by every layer of one module type and are owned once by the model
(``DenseLoraModel``); a layer holds only a plain reference to that owner's containers, so the state dict, optimizers
and FSDP see each shared tensor exactly once. What a layer owns is its r x r matrix ``M`` (and, for modules in
``lora_modules``, a plain LoRA pair).
"""

from __future__ import annotations

import copy
import math
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn

from .config import DenseLoraConfig
from .fused import ACTIVATION_FUNCTIONS, fused_dense_add, fused_group_add, runs_base_itself

_reference_only = False


@contextmanager
def reference_implementation(enabled: bool = True) -> Iterator[None]:
    """Run DenseLoRA layers through the plain formula (``dense_delta``) instead of the fused fast path.

    For checking the fast path and for benchmarks; the two compute the same function and the same gradients.
    """
    global _reference_only
    previous, _reference_only = _reference_only, enabled
    try:
        yield
    finally:
        _reference_only = previous


def _plain_formula() -> bool:
    """Whether layers must compute through the plain formula: asked for (``reference_implementation``), or under a
    ``torch.func`` transform (grad, vmap, jvp, jacrev) or forward-mode AD, which the fused autograd functions (no
    ``setup_context``, ``vmap`` or ``jvp``) do not support and which trace the plain formula's ops exactly."""
    return _reference_only or torch._C._are_functorch_transforms_active() or fwAD._current_level >= 0


_one_call_per_layer = False


@contextmanager
def one_call_per_layer(enabled: bool = True) -> Iterator[None]:
    """Compute every DenseLoRA layer in its own call, never q/k/v together (``InputGroup``).

    For benchmarks and checks: the grouped and the per-layer paths compute the same values and gradients.
    """
    global _one_call_per_layer
    previous, _one_call_per_layer = _one_call_per_layer, enabled
    try:
        yield
    finally:
        _one_call_per_layer = previous


def supported_base_layer_types() -> tuple[type[nn.Module], ...]:
    """torch Linear, and bitsandbytes' 8-bit and 4-bit Linear (QLoRA-style bases)."""
    types: list[type[nn.Module]] = [nn.Linear]
    try:
        import bitsandbytes as bnb
    except ImportError:
        return tuple(types)
    return (*types, bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)


def init_tensor(
    shape: tuple[int, int], generator: torch.Generator | None, zeros: bool = False
) -> torch.Tensor:
    """A float32 CPU tensor with nn.Linear's default init (Kaiming-uniform, a=sqrt(5)), or zeros.

    Initialising on the CPU (then moving) lets a private CPU generator make the init reproducible on any device.
    """
    tensor = torch.empty(shape, dtype=torch.float32, device="cpu")
    if zeros:
        return nn.init.zeros_(tensor)
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)


def require_mergeable_base(base_layer: nn.Module) -> None:
    """A weight can be folded only into a plain ``nn.Linear`` (not a quantized one)."""
    if type(base_layer) is not nn.Linear:
        raise ValueError(
            f"cannot merge into a {type(base_layer).__name__} base layer; load the base model unquantized to merge"
        )


def nonlinear_merge_error(adapter: str, activation: str) -> ValueError:
    return ValueError(
        f"cannot merge DenseLoRA adapter '{adapter}': activation '{activation}' makes the update a non-linear "
        "function of x, not a weight matrix; only activation='identity' (the 'Only Matrix' variant) can be merged"
    )


def dense_delta(
    x: torch.Tensor,
    encoder: torch.Tensor,
    middle: torch.Tensor,
    decoder: torch.Tensor,
    activation: str,
    dropout: nn.Module,
    scaling: float,
) -> torch.Tensor:
    """The DenseLoRA update, written as the paper's formula (the reference every faster path is checked against)."""
    act = ACTIVATION_FUNCTIONS[activation] or (lambda t: t)
    hidden = dropout(act(F.linear(dropout(x), encoder)))
    return dropout(act(F.linear(F.linear(hidden, middle), decoder))) * scaling


def lora_delta(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, dropout: nn.Module, scaling: float
):
    """A plain LoRA update, for the modules a mixed-granularity config leaves to LoRA."""
    return F.linear(F.linear(dropout(x), lora_a), lora_b) * scaling


class SharedWeights:
    """The owner's shared encoder/decoder containers, held without registering them as submodules of the layer.

    ``encoders[adapter][module_type]`` is W_e and ``decoders[adapter][module_type]`` is W_d. Looking them up at
    forward time (rather than keeping the Parameter objects) lets wrappers that swap parameters (FSDP) work.
    """

    def __init__(self, encoders: nn.ModuleDict, decoders: nn.ModuleDict) -> None:
        self.encoders = encoders
        self.decoders = decoders

    def get(self, adapter: str, module_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoders[adapter][module_type], self.decoders[adapter][module_type]


class InputGroup:
    """Sibling layers that read one input tensor (an attention block's q, k and v): one fused call serves them all.

    The model forms groups from module names known to read the same input (``SAME_INPUT_MODULES``). The first
    member called with a new ``x`` computes every eligible member's output in one ``fused_group_add`` and returns
    its own; the others are kept, keyed on that tensor object and its version counter, and handed out when their
    layers are called with it in the same state (``_member_state``: adapter, dropout, weight versions; a weight
    updated in place or another adapter set in between makes the member run alone). A member called with anything
    else runs alone. With dropout each member keeps its own masks (of x, the hidden and the output), drawn for all
    of them from one seed. (Under ``torch.inference_mode`` tensors have no version counter, and writes through
    ``.data`` or a NumPy view do not bump it, so such a write to x between the members' calls goes unseen; models
    compute q, k and v from one x without writing to it.)

    Kept outputs serve one round of calls: a member that was already served, or computed them, calling again with
    the same x starts a new round, which computes afresh (a step that calls q twice, then the next step on the same
    x, or a checkpointed region replayed with its own inputs, never gets the previous round's outputs).

    Which path a call takes depends only on the calls before it in the same forward, so gradient checkpointing's
    recomputation takes the same paths and saves the same tensors. The one state change, giving up on a group
    whose members turn out to read different tensors (cross-attention's q against k/v), is made only outside
    saved-tensor hooks, never inside a checkpointed region whose forward is replayed later.
    """

    def __init__(self, members: list[Linear]) -> None:
        self.members = members
        self.enabled = True
        # (x, its version, grad mode, ids of the members computed, {id(member): (its output not yet served,
        # _member_state when computed)})
        self._pending: (
            tuple[weakref.ref, int, bool, frozenset[int], dict[int, tuple[torch.Tensor, tuple]]] | None
        ) = None

    def __deepcopy__(self, memo: dict) -> InputGroup:
        """The copied members, grouped afresh: outputs kept for a tensor of the original are not copied."""
        return InputGroup([copy.deepcopy(member, memo) for member in self.members])

    def __getstate__(self) -> dict[str, Any]:
        return {"members": self.members, "enabled": self.enabled, "_pending": None}

    def output(self, member: Linear, x: torch.Tensor, adapter: str) -> torch.Tensor | None:
        """``member``'s output for ``x``, from the group; None when the member must run alone."""
        if _one_call_per_layer or torch.compiler.is_compiling():
            return None  # compiled: one call per layer, the graph holds no state between layers
        pending, self._pending = self._pending, None
        if pending is not None:
            ref, version, grad_enabled, computed, outputs = pending
            same_x = ref() is x and version == _version(x) and grad_enabled == torch.is_grad_enabled()
            if same_x and id(member) in outputs:
                kept = outputs.pop(id(member))
                self._pending = pending if outputs else None
                if kept[1] != _member_state(member, adapter):
                    return None  # its adapter or weights changed since
                return kept[0] if member.groupable(x, adapter) else None
            if same_x and id(member) not in computed:
                self._pending = pending
                return None  # left out of the group (another adapter state): alone, the others still served
            if not same_x and outputs and self._may_stand_down():
                self.enabled = False  # kept outputs nobody asked for: these members read different tensors
            # With the same x, a member already served (or the one that computed them) asking again means a new
            # round (the next step, a checkpoint's replay) has begun: what was kept belongs to the last one, and
            # is dropped. Either way the group computes afresh below.
        if not self.enabled or not member.groupable(x, adapter):
            return None
        p = member.dropout_p(adapter)
        members = [
            m for m in self.members if m is member or (m.groupable(x, adapter) and m.dropout_p(adapter) == p)
        ]
        if len(members) < 2:
            return None
        outs = fused_group_add(
            [m.get_base_layer() for m in members],
            x,
            *zip(*(m.adapter_weights(adapter, x.device) for m in members), strict=True),
            member.activation[adapter],
            [m.scaling[adapter] for m in members],
            p,
        )
        kept = {
            id(m): (out, _member_state(m, adapter))
            for m, out in zip(members, outs, strict=True)
            if m is not member
        }
        computed = frozenset(id(m) for m in members)
        self._pending = (weakref.ref(x), _version(x), torch.is_grad_enabled(), computed, kept)
        return outs[members.index(member)]

    def _may_stand_down(self) -> bool:
        """Whether the group may turn itself off now (a cross-attention q reads another tensor than k and v).

        Never in a forward that may be replayed: after turning off, the replay would compute q alone, with other
        dropout masks than the forward it replays, and backward would take the gradient of another function.
        Replays are checkpointing's: non-reentrant runs under saved-tensor hooks; reentrant runs its first
        forward without autograd in training mode and replays it inside backward."""
        if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
            return False
        if torch._C._current_graph_task_id() != -1:  # inside backward
            return False
        return torch.is_grad_enabled() or not self.members[0].training


def _member_state(member: Linear, adapter: str) -> tuple | None:
    """What a member's output depends on besides x: its adapter and dropout in effect, and the tensors it computes
    with, each by storage and version counter (an optimizer step or ``load_state_dict`` writes them in place and
    bumps the version; ``.to()`` and ``.data =`` give them new storage). None for an adapter that is not a
    DenseLoRA one on this layer (a LoRA module of a mixed config): never grouped."""
    if adapter not in member.denselora_M:
        return None
    base = member.get_base_layer()
    encoder, decoder = member.shared.get(adapter, member.module_type)
    tensors = (base.weight, base.bias, encoder, member.denselora_M[adapter], decoder)
    return (adapter, member.dropout_p(adapter), *(_Seen(t) for t in tensors if t is not None))


class _Seen:
    """A tensor's storage address and version counter at one moment, equal to another ``_Seen`` of the same
    storage and version. It holds the storage, so while a kept output remembers it, no new storage can take
    its address (two swaps through ``.data`` could otherwise land back on it)."""

    __slots__ = ("address", "storage", "version")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.storage = tensor.untyped_storage()
        self.address, self.version = tensor.data_ptr(), _version(tensor)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Seen) and (self.address, self.version) == (other.address, other.version)

    __hash__ = None  # mutable identity: compared, never hashed


def _version(tensor: torch.Tensor) -> int:
    """The tensor's version counter (bumped by in-place writes); inference tensors have none."""
    return -1 if tensor.is_inference() else tensor._version


class DenseLoraLayer(BaseTunerLayer):
    adapter_layer_names = ("denselora_M", "denselora_A", "denselora_B")
    other_param_names = ("r", "scaling", "activation", "denselora_dropout")

    def __init__(self, base_layer: nn.Module, module_type: str, shared: SharedWeights) -> None:
        self.base_layer = base_layer
        self.module_type = module_type
        # A plain attribute, not a submodule: the shared weights belong to the model, not to every layer.
        object.__setattr__(self, "shared", shared)
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.activation: dict[str, str] = {}
        self.denselora_dropout = nn.ModuleDict()
        self.denselora_M = nn.ParameterDict()
        self.denselora_A = nn.ParameterDict()
        self.denselora_B = nn.ParameterDict()
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())

    def update_layer(
        self, adapter_name: str, config: DenseLoraConfig, use_lora: bool, generator: torch.Generator | None
    ) -> None:
        r = config.r
        self.r[adapter_name] = r
        self.scaling[adapter_name] = config.scaling
        self.activation[adapter_name] = config.activation
        self.denselora_dropout[adapter_name] = (
            nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        )
        device = self.get_base_layer().weight.device
        if use_lora:
            lora_a = init_tensor((r, self.in_features), generator)
            lora_b = init_tensor((self.out_features, r), generator, zeros=config.init_weights)
            self.denselora_A[adapter_name] = nn.Parameter(lora_a.to(device))
            self.denselora_B[adapter_name] = nn.Parameter(lora_b.to(device))
        else:
            # Freeze (frozen random W_e/W_d) starts M at zero so the model starts as the base; see DenseLoraConfig
            zero_middle = config.init_weights and not config.train_shared
            middle = init_tensor((r, r), generator, zeros=zero_middle)
            self.denselora_M[adapter_name] = nn.Parameter(middle.to(device))
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def adapts(self, adapter: str) -> bool:
        """Whether ``adapter`` has weights on this layer: DenseLoRA's M or, in ``lora_modules``, LoRA's A/B."""
        return adapter in self.denselora_M or adapter in self.denselora_A

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW (out x in) of a linear adapter: s·B·A for LoRA modules, s·W_d·M·W_e for the identity activation."""
        if adapter in self.denselora_A:
            delta = self.denselora_B[adapter] @ self.denselora_A[adapter]
        else:
            if self.activation[adapter] != "identity":
                raise nonlinear_merge_error(adapter, self.activation[adapter])
            encoder, decoder = self.shared.get(adapter, self.module_type)
            # M is on this layer's device; the shared pair may sit on another GPU
            middle = self.denselora_M[adapter]
            delta = decoder.to(middle.device) @ middle @ encoder.to(middle.device)
        return delta * self.scaling[adapter]


class Linear(nn.Module, DenseLoraLayer):
    """A Linear (torch or bitsandbytes 8/4-bit) with DenseLoRA adapters."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        module_type: str,
        shared: SharedWeights,
        config: DenseLoraConfig,
        use_lora: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        DenseLoraLayer.__init__(self, base_layer, module_type, shared)
        object.__setattr__(self, "input_group", None)  # set by the model; a plain attribute, not a submodule
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, use_lora, generator)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None and not self.disable_adapters:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        adapters = self._adapters_in_effect()
        if self.merged or not adapters:
            return self.base_layer(x, *args, **kwargs)
        if self.input_group is not None and len(adapters) == 1 and not args and not kwargs:
            out = self.input_group.output(self, x, adapters[0])
            if out is not None:
                return out
        # The fused path can run the frozen Linear itself (one input gradient for both); others get its output.
        fuse_base = adapters[0] in self.denselora_M and not _plain_formula() and not args and not kwargs
        result = self.base_layer if fuse_base else self.base_layer(x, *args, **kwargs)
        for adapter in adapters:
            result = self._add_adapter_update(adapter, x, result)
        return result

    def _adapters_in_effect(self) -> list[str]:
        """The active adapters that adapt this layer (DenseLoRA or, in ``lora_modules``, LoRA), in order."""
        return [a for a in self.active_adapters if self.adapts(a)]

    def groupable(self, x: torch.Tensor, adapter: str) -> bool:
        """Whether this layer's output for ``x`` can be computed with its siblings' (``InputGroup``): ``adapter``
        is its only adapter in effect (enabled, not merged), a DenseLoRA one, over a frozen ``nn.Linear`` that the
        fused path may run itself (``runs_base_itself``: x's dtype and device, no hooks)."""
        if _plain_formula() or adapter not in self.denselora_M:
            return False
        if self.disable_adapters or self.merged:
            return False
        if self._adapters_in_effect() != [adapter]:
            return False
        return runs_base_itself(self.get_base_layer(), x)

    def dropout_p(self, adapter: str) -> float:
        """The adapter's dropout probability in effect: 0 in eval mode."""
        dropout = self.denselora_dropout[adapter]
        return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0

    def adapter_weights(
        self, adapter: str, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W_e, M, W_d) of a DenseLoRA adapter on ``device``."""
        encoder, decoder = self.shared.get(adapter, self.module_type)
        return encoder.to(device), self.denselora_M[adapter].to(device), decoder.to(device)

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        """peft's mixed-adapter batch: row i gets ``adapter_names[i]``'s update, or none for ``"__base__"``.

        Each adapter runs once on its own rows (the plain formula: inference only, peft refuses ``adapter_names``
        in training mode), so one batch can serve many DenseLoRA adapters over one base model.
        """
        if len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )
        result = self.base_layer(x, *args, **kwargs)
        for adapter in dict.fromkeys(adapter_names):
            if not self.adapts(adapter):
                continue  # "__base__", or an adapter that does not adapt this module
            rows = [i for i, name in enumerate(adapter_names) if name == adapter]
            result[rows] = result[rows] + self._adapter_delta(adapter, x[rows]).to(result.dtype)
        return result

    def _adapter_delta(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """The adapter's update alone, by the plain formula, in the input's dtype."""
        dtype, device = x.dtype, x.device
        dropout, scaling = self.denselora_dropout[adapter], self.scaling[adapter]
        if adapter in self.denselora_A:
            lora_a = self.denselora_A[adapter].to(device, dtype)
            return lora_delta(x, lora_a, self.denselora_B[adapter].to(device, dtype), dropout, scaling)
        encoder, decoder = self.shared.get(adapter, self.module_type)
        weights = (
            encoder.to(device, dtype),
            self.denselora_M[adapter].to(device, dtype),
            decoder.to(device, dtype),
        )
        return dense_delta(x, *weights, self.activation[adapter], dropout, scaling)

    def _add_adapter_update(
        self, adapter: str, x: torch.Tensor, result: torch.Tensor | nn.Module
    ) -> torch.Tensor:
        """result + the adapter's update, computed in the input's dtype (bf16/fp16 and autocast both work).

        ``result`` is the base layer's output, or the base layer itself for the fused DenseLoRA path.
        """
        dtype, device = x.dtype, x.device
        dropout = self.denselora_dropout[adapter]
        if adapter in self.denselora_A:
            lora_a = self.denselora_A[adapter].to(device, dtype)
            lora_b = self.denselora_B[adapter].to(device, dtype)
            return result + lora_delta(x, lora_a, lora_b, dropout, self.scaling[adapter]).to(result.dtype)
        encoder, decoder = self.shared.get(adapter, self.module_type)
        middle, activation, scaling = (
            self.denselora_M[adapter],
            self.activation[adapter],
            self.scaling[adapter],
        )
        if _plain_formula():
            weights = (encoder.to(device, dtype), middle.to(device, dtype), decoder.to(device, dtype))
            return result + dense_delta(x, *weights, activation, dropout, scaling).to(result.dtype)
        weights = self.adapter_weights(adapter, device)
        return fused_dense_add(result, x, *weights, activation, scaling, self.dropout_p(adapter))

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold linear adapters into W0 (identity activation or LoRA modules); others raise before anything changes."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base_layer = self.get_base_layer()
        require_mergeable_base(base_layer)
        deltas = {
            name: self.get_delta_weight(name)
            for name in adapter_names
            if name in self._all_available_adapter_names()
        }
        with torch.no_grad():
            for name, delta in deltas.items():
                merged = base_layer.weight.data + delta.to(base_layer.weight.dtype)
                if safe_merge and not torch.isfinite(merged).all():
                    # peft's wording, which tools match on
                    raise ValueError(
                        f"NaNs detected in the merged weights. The adapter {name} seems to be broken"
                    )
                base_layer.weight.data = merged
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.get_base_layer().weight
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                weight.data -= self.get_delta_weight(name).to(weight.dtype)

    def __repr__(self) -> str:
        return "denselora." + super().__repr__()
