"""DenseLoraModel: peft glue. Injects DenseLoRA layers and owns the shared encoder/decoder of each module type.

The shared weights live here, once: ``denselora_encoder[adapter][module_type]`` (W_e, r x in) and
``denselora_decoder[adapter][module_type]`` (W_d, out x r). In a ``PeftModel`` their state-dict keys are
``base_model.denselora_encoder.<adapter>.<type>``, saved as ``base_model.denselora_encoder.<type>``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _filter_state_dict_by_key_prefixes,
    _get_in_out_features,
    _get_tuner_state_dict_key_prefixes,
)
from peft.utils import AuxiliaryTrainingWrapper, PeftType, register_peft_method
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND
from torch import nn

from .config import SAME_INPUT_MODULES, TARGET_MODULES_BY_MODEL_TYPE, DenseLoraConfig
from .layer import (
    DenseLoraLayer,
    InputGroup,
    Linear,
    SharedWeights,
    init_tensor,
    nonlinear_merge_error,
    require_mergeable_base,
    supported_base_layer_types,
)


class DenseLoraModel(BaseTuner):
    """Creates a DenseLoRA model from a pretrained model; use it through ``peft.get_peft_model``."""

    prefix: str = "denselora_"
    tuner_layer_cls = DenseLoraLayer
    target_module_mapping = TARGET_MODULES_BY_MODEL_TYPE
    uses_shared_state = True

    def _pre_injection_hook(self, model: nn.Module, config: DenseLoraConfig, adapter_name: str) -> None:
        # Called once, before the first adapter is injected; later adapters add entries to the same containers.
        self.denselora_encoder = nn.ModuleDict()
        self.denselora_decoder = nn.ModuleDict()
        self.shared_weights = SharedWeights(self.denselora_encoder, self.denselora_decoder)

    def _prepare_model(self, peft_config: DenseLoraConfig, model: nn.Module) -> None:
        """Runs before every injection: check the targets exist and set up this adapter's init generator."""
        _check_targets_exist(peft_config, model)
        seed = peft_config.init_seed
        self._init_generator = None if seed is None else torch.Generator().manual_seed(seed)

    def _create_and_replace(
        self,
        peft_config: DenseLoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base_layer, supported_base_layer_types()):
            raise TypeError(
                f"DenseLoRA cannot adapt '{current_key}': {type(base_layer).__name__} is not supported "
                "(torch.nn.Linear, bitsandbytes Linear8bitLt or Linear4bit)"
            )
        in_features, out_features = _get_in_out_features(base_layer)
        if peft_config.r > min(in_features, out_features):
            raise ValueError(
                f"r={peft_config.r} is larger than '{current_key}' ({in_features} -> {out_features}); "
                f"r must be at most {min(in_features, out_features)}"
            )
        use_lora = _name_matches(current_key, peft_config.lora_modules or [])
        if not use_lora:
            device = base_layer.weight.device
            self._add_shared_weights(
                adapter_name, target_name, in_features, out_features, peft_config, current_key, device
            )
        if isinstance(target, DenseLoraLayer):
            target.update_layer(adapter_name, peft_config, use_lora, self._init_generator)
            return
        new_module = Linear(
            target,
            adapter_name,
            target_name,
            self.shared_weights,
            peft_config,
            use_lora,
            self._init_generator,
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _add_shared_weights(
        self,
        adapter_name: str,
        module_type: str,
        in_features: int,
        out_features: int,
        config: DenseLoraConfig,
        key: str,
        device: torch.device,
    ) -> None:
        """Create W_e/W_d the first time a module type is met; later layers of that type must have the same dims.

        Trained shared weights are Parameters (W_d zero when ``init_weights``). Frozen ones (``train_shared=False``,
        the paper's "Freeze") are persistent buffers with a random W_d: a frozen zero W_d would make the update, and
        M's gradient, zero forever; buffers keep them out of ``parameters()`` (optimizers, trainable counts) while
        the adapter file still carries them, so a saved Freeze adapter reloads exactly.
        """
        if adapter_name not in self.denselora_encoder:
            if config.train_shared:
                self.denselora_encoder[adapter_name] = nn.ParameterDict()
                self.denselora_decoder[adapter_name] = nn.ParameterDict()
            else:
                self.denselora_encoder[adapter_name] = BufferDict(persistent=True)
                self.denselora_decoder[adapter_name] = BufferDict(persistent=True)
        encoders, decoders = self.denselora_encoder[adapter_name], self.denselora_decoder[adapter_name]
        r = config.r
        if module_type in encoders:
            shared_dims = (encoders[module_type].shape[1], decoders[module_type].shape[0])
            if shared_dims != (in_features, out_features):
                raise ValueError(
                    f"'{key}' is {in_features} -> {out_features} but other '{module_type}' modules are "
                    f"{shared_dims[0]} -> {shared_dims[1]}; DenseLoRA shares W_e/W_d per module type, so all modules "
                    "of a type must have the same dims (exclude the odd ones with exclude_modules)"
                )
            return
        generator = self._init_generator
        encoder = init_tensor((r, in_features), generator).to(device)
        if not config.train_shared:
            encoders[module_type] = encoder
            decoders[module_type] = init_tensor((out_features, r), generator).to(device)
            return
        decoder = init_tensor((out_features, r), generator, zeros=config.init_weights)
        encoders[module_type] = nn.Parameter(encoder)
        decoders[module_type] = nn.Parameter(decoder.to(device))

    # --- trainability of the shared weights follows the adapter's own, and train_shared ------------------------------
    # peft sets, saves and restores requires_grad on the layers of the wrapped model (add/load/set/delete adapter,
    # set_requires_grad, inference mode, disable_adapter); the shared W_e/W_d live on the tuner, outside its reach.
    # Rather than mirror each of those paths, every one of them ends in _sync_shared_requires_grad, which makes each
    # adapter's shared weights exactly as trainable as its per-layer weights (M, or LoRA's A/B) are.

    def _sync_shared_requires_grad(self) -> None:
        trainable: dict[str, bool] = {}
        for module in self.model.modules():
            if isinstance(module, DenseLoraLayer):
                for container in (module.denselora_M, module.denselora_A, module.denselora_B):
                    for name, param in container.items():
                        trainable[name] = trainable.get(name, False) or param.requires_grad
        for name in self.denselora_encoder:
            requires_grad = trainable.get(name, False) and self.peft_config[name].train_shared
            for container in (self.denselora_encoder, self.denselora_decoder):
                container[name].requires_grad_(requires_grad)  # a no-op on Freeze's buffers

    def inject_adapter(self, *args: Any, **kwargs: Any) -> None:
        super().inject_adapter(*args, **kwargs)
        self._sync_shared_requires_grad()
        self._form_input_groups()

    def _form_input_groups(self) -> None:
        """Group the DenseLoRA layers of each parent module that read one input (``SAME_INPUT_MODULES``: q/k/v)."""
        for parent in self.model.modules():
            children = dict(parent.named_children())
            for family in SAME_INPUT_MODULES:
                members = [children[name] for name in family if isinstance(children.get(name), Linear)]
                if len({member.in_features for member in members}) != 1:
                    members = []  # not one input after all
                group = InputGroup(members) if len(members) > 1 else None
                for member in members:
                    object.__setattr__(member, "input_group", group)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._sync_shared_requires_grad()

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        self._sync_shared_requires_grad()

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._sync_shared_requires_grad()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for container in (self.denselora_encoder, self.denselora_decoder):
            if adapter_name in container:
                del container[adapter_name]
        self._sync_shared_requires_grad()

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """transformers' ``num_parameters`` of the base model plus the shared W_e/W_d, which live here, outside it.

        ``PeftModel.num_parameters()`` reaches this method before the base model's, whose count alone would leave the
        shared weights out (a buffer under Freeze, so counted by neither)."""
        shared = sum(
            weight.numel()
            for container in (self.denselora_encoder, self.denselora_decoder)
            for weight in container.parameters()
            if weight.requires_grad or not only_trainable
        )
        return (
            self.model.num_parameters(only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
            + shared
        )

    # --- dtype ------------------------------------------------------------------------------------------------------

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """peft's contract: adapter weights in the base layer's dtype, float16 and bfloat16 upcast to float32 unless
        ``autocast_adapter_dtype=False`` (a float64 base keeps float64 adapters, as LoRA's do).

        peft's own cast visits only the layers; the shared W_e/W_d of a module type take the dtype of that type's
        base layers. A quantized base counts as its compute dtype (4-bit), else float32 (8-bit), as in peft.
        """
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        shared_dtype: dict[str, torch.dtype] = {}
        for module in self.model.modules():
            if not isinstance(module, DenseLoraLayer):
                continue
            target = _adapter_dtype_of(module.get_base_layer())
            if autocast_adapter_dtype and target in (torch.float16, torch.bfloat16):
                target = torch.float32
            if adapter_name in module.denselora_M:
                shared_dtype.setdefault(module.module_type, target)
            for container in (module.denselora_M, module.denselora_A, module.denselora_B):
                if adapter_name in container and container[adapter_name].dtype != target:
                    old = container[adapter_name]
                    container[adapter_name] = nn.Parameter(
                        old.data.to(target), requires_grad=old.requires_grad
                    )
        for container in (self.denselora_encoder, self.denselora_decoder):
            if adapter_name not in container:
                continue
            tensors = container[adapter_name]
            for module_type, dtype in shared_dtype.items():
                if module_type not in tensors or tensors[module_type].dtype == dtype:
                    continue
                old = tensors[module_type]
                if isinstance(old, nn.Parameter):
                    tensors[module_type] = nn.Parameter(old.data.to(dtype), requires_grad=old.requires_grad)
                else:
                    tensors[module_type] = old.to(dtype)

    # --- mixed-adapter batches --------------------------------------------------------------------------------------

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """peft's ``adapter_names=`` (one adapter, or ``"__base__"``, per row) in forward and generate().

        As in peft's LoRA: the names reach each DenseLoRA layer and modules_to_save wrapper through a forward
        pre-hook for the duration of the call; with beam search each name is repeated for its beams, except in an
        encoder-decoder's encoder, which runs once on the rows as given.
        """
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        if not isinstance(adapter_names, (list, tuple)):
            raise TypeError(f"Got adapter names of type {type(adapter_names)}, expected a list of str.")
        known = set()
        for module in self.model.modules():
            if isinstance(module, DenseLoraLayer):
                known |= set(module.denselora_M) | set(module.denselora_A)
        unknown = {name for name in adapter_names if name != "__base__"} - known
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
        per_row = partial(_adapter_names_pre_forward_hook, adapter_names=list(adapter_names))
        per_beam, in_encoder = per_row, set()
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:
            beams = [name for name in adapter_names for _ in range(num_beams)]
            per_beam = partial(_adapter_names_pre_forward_hook, adapter_names=beams)
            encoder = _encoder_of(self.model)
            in_encoder = set(encoder.modules()) if encoder is not None else set()
        handles = [
            module.register_forward_pre_hook(per_row if module in in_encoder else per_beam, with_kwargs=True)
            for module in self.model.modules()
            if isinstance(module, (DenseLoraLayer, AuxiliaryTrainingWrapper))
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self._check_mergeable(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        if merge:
            self._check_mergeable(adapter_names)
        return super()._unload_and_optionally_merge(merge, progressbar, safe_merge, adapter_names)

    def _check_merge_allowed(self) -> None:
        super()._check_merge_allowed()
        self._check_mergeable(None)

    def _check_mergeable(self, adapter_names: list[str] | None) -> None:
        """Refuse before any layer is touched, so a failed merge never leaves a half-merged model: the adapters
        to merge (``adapter_names``, by default the active ones) must have no non-linear DenseLoRA layer, and every
        layer they adapt must sit on a plain Linear (not a quantized one). peft checks only the active adapters and
        then merges layer by layer, so an adapter named in ``merge_adapter(adapter_names=...)`` would get its
        plain-LoRA layers merged before its first DenseLoRA layer refused, and a base quantized in part (bitsandbytes'
        ``llm_int8_skip_modules``) would get its Linear layers merged before the first quantized one refused."""
        names = [
            name
            for name in (self.active_adapters if adapter_names is None else adapter_names)
            if name in self.peft_config  # else peft's own error for an unknown name
        ]
        for name in names:
            activation = self.peft_config[name].activation
            if (
                activation != "identity"
                and name in self.denselora_encoder
                and len(self.denselora_encoder[name]) > 0
            ):
                raise nonlinear_merge_error(name, activation)
        for module in self.model.modules():
            if isinstance(module, DenseLoraLayer) and any(module.adapts(name) for name in names):
                require_mergeable_base(module.get_base_layer())

    # --- loading: all or nothing ---------------------------------------------------------------------------------------

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: DenseLoraConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Map checkpoint keys to model keys, refusing any checkpoint that would load only partly.

        peft loads with ``strict=False`` and warns about missing keys; an adapter with a missing or misshapen tensor
        would then run with random weights, so every key and shape is checked before anything is loaded.
        """
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
        expected = _filter_state_dict_by_key_prefixes(model.state_dict(), prefixes)
        for key, tensor in remapped.items():
            if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
                raise ValueError(
                    f"adapter does not match the base model: '{key}' has shape {tuple(tensor.shape)} in the adapter "
                    f"but {tuple(expected[key].shape)} in the model"
                )
        missing = sorted(set(expected) - set(remapped))
        unexpected = sorted(k for k in remapped if k not in expected and cls.prefix in k)
        if missing or unexpected:
            details = [f"{len(missing)} missing (e.g. '{missing[0]}')"] if missing else []
            details += [f"{len(unexpected)} unexpected (e.g. '{unexpected[0]}')"] if unexpected else []
            raise ValueError(f"adapter does not match the base model: {', '.join(details)} DenseLoRA weights")
        return remapped


def _adapter_names_pre_forward_hook(
    module: nn.Module, args: tuple, kwargs: dict[str, Any], adapter_names: list[str]
) -> tuple[tuple, dict[str, Any]]:
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _adapter_dtype_of(base_layer: nn.Module) -> torch.dtype:
    """The dtype adapters of ``base_layer`` take before autocast: its weight's, or for a quantized (integer) weight
    its compute dtype (bitsandbytes 4-bit), else float32 (8-bit), as peft decides for its own methods."""
    dtype = base_layer.weight.dtype
    if dtype.is_floating_point:
        return dtype
    compute = getattr(base_layer, "compute_dtype", None)
    return compute if isinstance(compute, torch.dtype) and compute.is_floating_point else torch.float32


def _encoder_of(model: nn.Module) -> nn.Module | None:
    """An encoder-decoder's encoder; None for a decoder-only model (transformers 5's get_encoder returns the model
    itself when it has no encoder)."""
    get_encoder = getattr(model, "get_encoder", None)
    encoder = get_encoder() if callable(get_encoder) else None
    return None if encoder is model else encoder


def _name_matches(key: str, names: list[str] | set[str]) -> bool:
    return any(key == name or key.endswith(f".{name}") for name in names)


def _check_targets_exist(config: DenseLoraConfig, model: nn.Module) -> None:
    """Every requested target must exist: a typo ('up_prj') is an error listing the Linear names that do exist."""
    modules = [
        (key, module) for key, module in model.named_modules() if key and not key.endswith(".base_layer")
    ]
    keys = [key for key, _ in modules]
    linear_types = (*supported_base_layer_types(), DenseLoraLayer)
    linear_names = sorted(
        {key.rsplit(".", 1)[-1] for key, module in modules if isinstance(module, linear_types)}
    )
    targets = config.target_modules
    if targets == INCLUDE_LINEAR_LAYERS_SHORTHAND:  # peft expands it into this model's Linear layers later
        return
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, key) for key in keys):
            raise ValueError(
                f"target_modules regex {targets!r} matches no module; Linear modules: {linear_names}"
            )
        targeted = [key for key in keys if re.fullmatch(targets, key)]
        requested = list(config.lora_modules or [])
    else:
        targeted = [key for key in keys if _name_matches(key, targets or [])]
        requested = [*(targets or []), *(config.lora_modules or [])]
    unknown = sorted({name for name in requested if not any(_name_matches(key, [name]) for key in keys)})
    if unknown:
        raise ValueError(f"unknown target modules {unknown}; Linear modules in this model: {linear_names}")
    # lora_modules picks which targeted modules train plain LoRA; one that matches none of them would be ignored
    untargeted = sorted(
        name for name in config.lora_modules or [] if not any(_name_matches(key, [name]) for key in targeted)
    )
    if untargeted:
        shown = targets if isinstance(targets, str) else sorted(targets)
        raise ValueError(f"lora_modules {untargeted} match no module in target_modules {shown}")


def _add_peft_type(name: str) -> None:
    """Add a member to peft's PeftType enum, which ``register_peft_method`` requires and has no API to extend."""
    if name in PeftType.__members__:
        return
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._member_names_.append(name)
    PeftType._value2member_map_[name] = member


def register() -> None:
    """Make "DENSELORA" a peft method: get_peft_model, PeftModel.from_pretrained and PeftConfig all know it."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    _add_peft_type("DENSELORA")
    if PeftType.DENSELORA not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(
            name="denselora",
            config_cls=DenseLoraConfig,
            model_cls=DenseLoraModel,
            prefix=DenseLoraModel.prefix,
        )
