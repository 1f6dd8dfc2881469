"""The verbs on a whole model: attach, set_active, disabled, delete_adapter, merge, unmerge,
merge_and_unload, trainable_parameters. Adapters live in LoraLayer wrappers; the model keeps a small
`_lorakit` record of the configs and the active set. Threads: these verbs change shared state and must not run
while another thread runs a forward of the same model (concurrent forwards alone are fine: lorakit.mixed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import LoraConfig
from .errors import AdapterNameError, ConfigError, MergeError, TargetError
from .layer_kinds import check_supported, weight_dtype
from .layers import LoraLayer, SavedModule
from .names import check_adapter_name
from .residual import apply_residual_init, check_residual_targets
from .targeting import find_targets, iter_candidate_modules, matches_modules_to_save
from .variants import variant_for

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class _ModelRecord:
    """What lorakit remembers about a model: adapter configs (in attach order) and the active set."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    hook: Any = None  # forward hook on the input embeddings (gradient checkpointing support)


# What other modules add to a model that has adapters, registered by them (model.py imports none of them):
# lorakit.mixed (model(..., adapter_names=[...]) and generate) and lorakit.integrations.save_pretrained (PEFT's
# layout from model.save_pretrained). (install, uninstall) pairs, run on each attach / when the last adapter goes.
_EXTENSIONS: list[tuple[Callable[[nn.Module], None], Callable[[nn.Module], None]]] = []


def register_extension(install: Callable[[nn.Module], None], uninstall: Callable[[nn.Module], None]) -> None:
    """Run `install(model)` after every attach and `uninstall(model)` when a model's last adapter is deleted."""
    if (install, uninstall) not in _EXTENSIONS:
        _EXTENSIONS.append((install, uninstall))


def _record(model: nn.Module) -> _ModelRecord:
    record = model.__dict__.get("_lorakit")
    if record is None:
        record = _ModelRecord()
        model.__dict__["_lorakit"] = record
    return record


def lora_layers(model: nn.Module) -> Iterator[LoraLayer]:
    """Every LoraLayer in the model."""
    return (m for m in model.modules() if isinstance(m, LoraLayer))


def saved_modules(model: nn.Module) -> Iterator[SavedModule]:
    """Every modules_to_save wrapper in the model."""
    return (m for m in model.modules() if isinstance(m, SavedModule))


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters attached to `model`, in attach order."""
    return list(_record(model).configs)


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters applied in forward."""
    return list(_record(model).active)


def get_config(model: nn.Module, name: str = "default") -> LoraConfig:
    """The LoraConfig of adapter `name`."""
    _require(model, [name])
    return _record(model).configs[name]


def _require(model: nn.Module, names: list[str]) -> None:
    known = _record(model).configs
    for name in names:
        if not isinstance(name, str) or name not in known:  # a list or dict as a name is unknown, not a TypeError
            raise AdapterNameError(
                f"no adapter named {name!r} on this model; attached: {', '.join(known) or '(none)'}"
            )


def _replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def attach(model: nn.Module, config: LoraConfig, name: str = "default") -> nn.Module:
    """Attach a LoRA adapter named `name` to the modules `config` targets, in place; return `model`.

    Afterwards only adapter parameters (plus `modules_to_save` copies and the biases `config.bias` asks
    for) are trainable, and `name` is the active adapter. Works with transformers' gradient checkpointing
    with no extra call.

    Raises:
        AdapterNameError: `name` is taken. ConfigError: `name` is not a valid adapter name (lorakit.names: no
            '.', '/', '\\', ':', control characters, "__base__", empty or over 255 bytes).
        TargetError: no module matched (the message lists the closest names), or an unsupported type.
    """
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"attach() takes a lorakit.LoraConfig, got {type(config).__name__}")
    check_adapter_name(name, "attach(name=...)")
    if name in _record(model).configs:
        raise AdapterNameError(f"an adapter named {name!r} is already attached; delete_adapter() it first")
    return attach_at(model, config, name, find_targets(model, config))


def attach_at(
    model: nn.Module, config: LoraConfig, name: str, paths: list[str], init_from_base: bool = True
) -> nn.Module:
    """attach() on an explicit list of module paths (used when loading a file: its keys name them).

    `init_from_base=False` skips PiSSA / OLoRA's factorisation of the base (a loaded file brings A and B, and
    its base already holds the residual).

    Raises:
        ConfigError: `name` is not a valid adapter name (checked before the model changes).
    """
    check_adapter_name(name)
    record = _record(model)
    fresh_model = not record.configs
    adapter_cls = variant_for(config)
    from_base = config.init_from_weights and init_from_base  # PiSSA / OLoRA / LoftQ: A, B computed from W0
    if from_base:
        check_residual_targets(model, config, paths)  # before any weight changes
    for path in paths if adapter_cls.kinds is not None else ():  # refused before the model changes
        module = model.get_submodule(path)
        kind = module.kind if isinstance(module, LoraLayer) else check_supported(module, path)
        if kind.name not in adapter_cls.kinds:
            raise TargetError(f"module {path!r} ({kind.name}) cannot take a {config.method} adapter (it "
                              f"supports {', '.join(sorted(adapter_cls.kinds))} layers); exclude it from the targets")
    shared = adapter_cls.prepare(model, config, name, paths)  # state all its layers share (VeRA), or None
    for path in paths:
        module = model.get_submodule(path)
        if not isinstance(module, LoraLayer):
            module = LoraLayer(module, check_supported(module, path), path)
            _replace_module(model, path, module)
        base = module.base_layer
        dtype = weight_dtype(base, module.kind) if config.adapter_dtype == "base" else _DTYPES[config.adapter_dtype]
        adapter = adapter_cls.build(module.kind, base, config, path, dtype, shared)
        if from_base:
            apply_residual_init(base, adapter, config)  # A, B from W0; the base keeps the residual (LoftQ: NF4 Q)
        adapter.train(model.training)
        module.adapters[name] = adapter
    if config.modules_to_save:
        for path, module in list(iter_candidate_modules(model)):
            if matches_modules_to_save(config.modules_to_save, path):
                if not isinstance(module, SavedModule):
                    module = SavedModule(module, path)
                    _replace_module(model, path, module)
                module.add_copy(name).train(model.training)
    if config.fan_in_fan_out is False and any(
        model.get_submodule(p).kind.fan_in_fan_out for p in paths
    ):
        config = config.replace(fan_in_fan_out=True)
    record.configs[name] = config
    _set_trainable(model, name, fresh_model)
    _install_checkpointing_hook(model)
    for install, _ in _EXTENSIONS:  # lorakit.mixed: adapter_names= in forward; save_pretrained in PEFT's layout
        install(model)
    set_active(model, [name])
    return model


def _set_trainable(model: nn.Module, name: str, freeze_base: bool) -> None:
    """Freeze the base (on first attach), make adapter `name` trainable, and the biases its config asks for."""
    config = _record(model).configs[name]
    if freeze_base:
        for param in model.parameters():
            param.requires_grad_(False)
    for layer in lora_layers(model):
        if name in layer.adapters:
            layer.adapters[name].requires_grad_(True)
            if config.lora_fa:
                lora_fa_frozen_factor(layer.adapters[name]).requires_grad_(False)
            if config.bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
                layer.base_layer.bias.requires_grad_(True)
    for saved in saved_modules(model):
        if name in saved.copies:
            saved.copies[name].requires_grad_(True)
    if config.bias == "all":
        for param_name, param in model.named_parameters():
            if param_name.endswith("bias") and not any(
                w in param_name for w in (".adapters.", ".copies.", ".original_module.")
            ):
                param.requires_grad_(True)


def lora_fa_frozen_factor(adapter: nn.Module) -> nn.Parameter:
    """The factor LoRA-FA (Zhang et al. 2023, arXiv 2308.03303) keeps frozen at its random init: A (r, k).

    Embeddings are the exception: there A starts at zero and B is the random one (PEFT's init), so B stays
    frozen and A trains; freezing a zero A would keep the update at zero forever.
    """
    return adapter.frozen_factor()


def set_trainable(model: nn.Module, name: str, trainable: bool) -> None:
    """Make adapter `name`'s parameters (and its modules_to_save copies) trainable or frozen.

    With `lora_fa=True` in its config, A stays frozen when the adapter is made trainable.
    """
    _require(model, [name])
    lora_fa = _record(model).configs[name].lora_fa
    for layer in lora_layers(model):
        if name in layer.adapters:
            layer.adapters[name].requires_grad_(trainable)
            if lora_fa:
                lora_fa_frozen_factor(layer.adapters[name]).requires_grad_(False)
    for saved in saved_modules(model):
        if name in saved.copies:
            saved.copies[name].requires_grad_(trainable)


def _install_checkpointing_hook(model: nn.Module) -> None:
    """Make the input embeddings' output require grad while gradient checkpointing is on, so that
    reentrant checkpointing of the first block still sees an input that requires grad."""
    record = _record(model)
    getter = getattr(model, "get_input_embeddings", None)
    if record.hook is not None or not callable(getter):
        return
    try:
        embeddings = getter()
    except (NotImplementedError, AttributeError):
        return
    if embeddings is None:
        return
    record.hook = embeddings.register_forward_hook(_InputsRequireGrad(model))


class _InputsRequireGrad:
    """Forward hook on the input embeddings: their output requires grad while `model` checkpoints activations.

    A plain object holding the root model (not a closure), so copy.deepcopy and pickle of the model work.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        if (torch.is_tensor(output) and not output.requires_grad and torch.is_grad_enabled()
                and _checkpointing_on(self.model)):
            output.requires_grad_(True)


def _checkpointing_on(model: nn.Module) -> bool:
    """Whether transformers' activation (gradient) checkpointing is enabled on `model`."""
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # newer name first
        if hasattr(type(model), attr):
            return bool(getattr(model, attr))
    return False


def set_active(model: nn.Module, names: str | list[str]) -> None:
    """Apply these adapters in forward (several are summed).

    Raises:
        AdapterNameError: a name that is not attached.
    """
    names = [names] if isinstance(names, str) else list(names)
    _require(model, names)
    _record(model).active = names
    for layer in lora_layers(model):
        layer.active = [n for n in names if n in layer.adapters]
    for saved in saved_modules(model):
        saved.active = next((n for n in names if n in saved.copies), None)


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes as the base model (merged adapters are taken out, then put back)."""
    layers = list(lora_layers(model))
    saved = list(saved_modules(model))
    remerge = {layer: list(layer.merged) for layer in layers if layer.merged}
    for layer in remerge:
        layer.unmerge()
    for module in layers + saved:
        module.disabled = True
    try:
        yield model
    finally:
        for module in layers + saved:
            module.disabled = False
        for layer, names in remerge.items():
            layer.merge(names)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` (unmerging it first if merged); a layer left with no adapter is unwrapped."""
    _require(model, [name])
    record = _record(model)
    for layer in list(lora_layers(model)):
        if name not in layer.adapters:
            continue
        if name in layer.merged:
            keep = [n for n in layer.merged if n != name]
            layer.unmerge()
            layer.merge(keep)
        del layer.adapters[name]
        layer.active = [n for n in layer.active if n != name]
        if len(layer.adapters) == 0:
            _replace_module(model, layer.path, layer.base_layer)
    for saved in list(saved_modules(model)):
        if name in saved.copies:
            del saved.copies[name]
            if saved.active == name:
                saved.active = None
            if len(saved.copies) == 0:
                _replace_module(model, saved.path, saved.original_module)
    del record.configs[name]
    record.active = [n for n in record.active if n != name]
    if not record.configs:
        _forget(model)


def _forget(model: nn.Module) -> None:
    record = model.__dict__.pop("_lorakit", None)
    if record is not None and record.hook is not None:
        record.hook.remove()
    for _, uninstall in _EXTENSIONS:  # a plain model forwards and saves as a plain model again
        uninstall(model)


def check_merge(model: nn.Module, names: list[str] | None = None, dtype: torch.dtype | None = None) -> None:
    """merge(safe=True)'s check, without merging: every delta of `names` (default: the active adapters) and every
    merged weight W0 + ΔW is finite in the weight's dtype and in `dtype` (the dtype the merged model will be cast to).

    Raises:
        MergeError: the first module with NaN or inf (the message names the module, the adapters and the dtype).
    """
    names = active_adapters(model) if names is None else list(names)
    _require(model, names)
    for layer in lora_layers(model):
        layer.check_finite([n for n in names if n in layer.adapters and n not in layer.merged], dtype)


def merge(
    model: nn.Module, names: list[str] | None = None, safe: bool = False, requantize: bool = False,
    dtype: torch.dtype | None = None,
) -> dict[str, dict[str, float]]:
    """Add the adapters' s · B A into the base weights (fp32 math, cast to the weight dtype).

    Args:
        names: adapters to merge; default the active ones.
        safe: check first that every delta, and every merged weight W0 + ΔW in the weight's dtype (and in `dtype`),
            is free of NaN/inf (check_merge), and merge nothing if one is not: an fp16 weight above 65504 is inf.
        dtype: with `safe`, also check the merged weights in this dtype (the one the caller will cast them to).
        requantize: allow merging into quantised (NF4, bitsandbytes 4-bit) bases by re-quantising W0 + s B A.
            Lossy, so off by default: merge_and_unload gives dense layers instead. unmerge restores the codes.

    Returns:
        {module path: error} for each re-quantised layer (quant.merge.requantization_error: max_abs_error,
        rel_fro_error, update_rel_error), with a LossyMergeWarning; empty when no base is quantised.

    Raises:
        MergeError: in safe mode, a delta or a merged weight with NaN or inf (the message names the module, the
            adapter and the dtype); a quantised base without requantize=True.
    """
    from .quant.merge import check_requantize_allowed, warn_requantized

    names = active_adapters(model) if names is None else list(names)
    _require(model, names)
    layers = list(lora_layers(model))
    if not requantize:
        check_requantize_allowed(layers, names)
    if safe:
        check_merge(model, names, dtype)
    check_merge_refusals(layers, names)
    report = {}
    for layer in layers:
        error = layer.merge(names)
        if error is not None:
            report[layer.path] = error
    if report:
        warn_requantized(report)
    return report


def check_merge_refusals(layers: list[LoraLayer], names: list[str]) -> None:
    """Before any weight changes: every unmerged adapter of `names` can merge into its base (Adapter.merge_refusal).

    Raises:
        MergeError: the first that cannot (module, adapter and the adapter's reason).
    """
    for layer in layers:
        for n in names:
            why = layer.adapters[n].merge_refusal(layer.base_layer) if n in layer.adapters else None
            if why is not None and n not in layer.merged:
                raise MergeError(f"module {layer.path!r}, adapter {n!r}: {why}; nothing was merged")


def unmerge(model: nn.Module) -> None:
    """Take every merged adapter out of the base weights again."""
    for layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module, safe: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
    """Merge the active adapters and return the model with its original module types (no lorakit left).

    modules_to_save are replaced by the active adapter's trained copy. Quantised layers (NF4Linear,
    bitsandbytes Linear4bit) become dense nn.Linear in their compute dtype, or `dtype`: W = dequant(W_q) + s B A
    for adapted ones, with a LossyMergeWarning (W0's quantisation error stays; quant.merge).

    Raises:
        MergeError: inside a disabled() block; with `safe`, a delta or merged weight with NaN or inf (see merge).
    """
    from .quant.merge import unload_quantized

    if any(layer.disabled for layer in lora_layers(model)):
        raise MergeError("merge_and_unload() inside a disabled() block: leave the block first")
    check_merge_refusals(list(lora_layers(model)), active_adapters(model))
    unload_quantized(model, active_adapters(model), dtype, safe)
    merge(model, safe=safe)
    for layer in list(lora_layers(model)):
        _replace_module(model, layer.path, layer.base_layer)
    for saved in list(saved_modules(model)):
        _replace_module(model, saved.path, saved.current())
    _forget(model)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared parameters are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total
