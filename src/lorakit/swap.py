"""Hot swap: replace a loaded adapter's weights from a file in place, with no new module and no new Parameter,
so a `torch.compile`d model keeps running its compiled code (issue 6).

    prepare_swap(model, max_rank)      A (r, k) -> [A; 0] (R, k),   B (d, r) -> [B | 0] (d, R)     same output
    swap_adapter(model, name, path)    A <- [A_f; 0],   B <- [g · B_f | 0],   DoRA: m <- m_f        in place

torch.compile guards on tensor shapes and on the Python numbers forward reads. The shapes never change: R is
declared in advance, as with PEFT's `prepare_model_for_compiled_hotswap(target_rank=...)`. Neither does the scale
s = alpha / r, a float on each adapter that dynamo specialises (a new value would recompile): the file's scale
s_f goes into B as the gain g = s_f / s, so that s · (g B_f) A_f = s_f B_f A_f. `peft_tensors()` divides the
gain out and slices the true rank again (`SwapSlot`), so save_adapter writes the file's rank and tensors.

Threads: a swap writes A, B (and DoRA's m) in place, module by module, with no lock. A forward running meanwhile in
another thread may see some modules swapped and others not, so swap (and prepare_swap) only between forwards: the
serving loop serialises them (e.g. one lock held by the swap and by each request's forward). Forwards alone, with
or without `adapter_names`, may run concurrently (lorakit.mixed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import model as M
from .config import LoraConfig
from .errors import AdapterFileError, ConfigError, MergeError, ShapeMismatchError
from .io.files import CONFIG_NAME, read_config, read_weights
from .io.format import PREFIX, is_ignored
from .io.peft import adapter_state
from .layers import LoraLayer
from .names import check_adapter_name
from .variants import LoraAdapter, variant_named


@dataclass
class SwapSlot:
    """What a prepared (padded) or swapped adapter holds beyond its tensors; set as `adapter.swap_slot`."""

    rank: int  # the true rank r: rows r.. of A and columns r.. of B are zero
    gain: float = 1.0  # B holds gain · B_true, so that adapter.scale · gain is the true scale (see module doc)


@dataclass
class _LayerUpdate:
    """One module's part of a validated swap: what to write into its adapter."""

    adapter: LoraAdapter
    base: nn.Module
    rank: int  # the file's rank for this module
    scale: float  # the file's scale for this module (alpha / r, or alpha / sqrt(r) with rsLoRA)
    dropout: float
    tensors: dict[str, torch.Tensor] | None  # {PEFT key suffix: file tensor}; None: absent from the file (zeroed)
    extras: dict[str, torch.Tensor]  # a variant's tensors beyond A and B (DoRA's m, as a view) to copy into


def _unwrap(model: nn.Module) -> nn.Module:
    """The model itself for a `torch.compile`d one (OptimizedModule keeps it as `_orig_mod`)."""
    return getattr(model, "_orig_mod", model)


def _layers(model: nn.Module, name: str) -> list[LoraLayer]:
    return [layer for layer in M.lora_layers(model) if name in layer.adapters]


def capacity(adapter: LoraAdapter) -> int:
    """The largest rank the adapter's tensors hold without changing shape (A's rows): R once prepared."""
    return adapter.lora_A.shape[0]


def true_rank(adapter: LoraAdapter) -> int:
    """The adapter's rank r (<= capacity): the rows of A that are not zero padding."""
    slot = adapter.swap_slot
    return capacity(adapter) if slot is None else slot.rank


@torch.no_grad()
def pad_factors(
    lora_A: torch.Tensor, lora_B: torch.Tensor, rank: int, max_rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """([A[:rank]; 0], [B[:, :rank] | 0]) of rank `max_rank`, new tensors: B' A' = B A exactly.

    B A = sum over i < r of B[:, i] A[i]: the added rank-one terms are zero. A: (r', k, *kernel) -> (max_rank, ...);
    B: (d, r', 1...) -> (d, max_rank, 1...).
    """
    padded_A = lora_A.new_zeros((max_rank, *lora_A.shape[1:]))
    padded_B = lora_B.new_zeros((lora_B.shape[0], max_rank, *lora_B.shape[2:]))
    padded_A[:rank].copy_(lora_A[:rank])
    padded_B[:, :rank].copy_(lora_B[:, :rank])
    return padded_A, padded_B


def _check_swappable(model: nn.Module, name: str, verb: str) -> LoraConfig:
    """Adapter `name`'s config, if its tensors may be replaced in place.

    Raises:
        AdapterNameError: unknown name. MergeError: merged into a base weight.
        ConfigError: a PiSSA / OLoRA adapter (its base holds the residual W0 - s B0 A0, tied to its own A0, B0).
    """
    config = M.get_config(model, name)
    if not variant_named(config.method).abilities_for(config).hot_swap:
        raise ConfigError(f"{verb}: adapter {name!r} is a {config.method} adapter, which cannot be swapped in place "
                          f"(its tensors are not a padded low-rank pair); load_adapter() each file under its own name")
    if config.residual_init:
        raise ConfigError(
            f"{verb}: adapter {name!r} has init={config.init!r}: its base weights hold the residual W0 - s B0 A0 "
            f"of its own initial factors, so they cannot be padded or replaced in place; save it with "
            f"convert_to_lora=True and load that file onto the unmodified base model first"
        )
    for layer in _layers(model, name):
        if name in layer.merged:
            raise MergeError(
                f"{verb}: adapter {name!r} is merged into the weight of module {layer.path!r}; unmerge(model) first"
            )
    return config


def prepare_swap(model: nn.Module, max_rank: int, names: str | list[str] | None = None) -> nn.Module:
    """Give adapters room for any rank up to `max_rank`, so that `swap_adapter` can later bring in a file of
    another rank without changing a tensor's shape. Call it before `torch.compile` and before building an optimizer.

    Pads A with zero rows and B with zero columns, so the output is unchanged. The Parameter objects stay (their
    `.data` is replaced, their `.grad` dropped), as does the scale s = alpha / r of the true rank r, and r is
    recorded: `save_adapter` still writes rank-r tensors and r. Calling it again re-pads to the new `max_rank`.

    Args:
        model: the model (or its `torch.compile` wrapper) with the adapters attached or loaded.
        max_rank: the largest rank of any file swapped in later (rank_pattern included).
        names: the adapters to prepare; default every adapter.

    Raises:
        ConfigError: `max_rank` is not a positive integer or is below a module's current rank; a PiSSA / OLoRA
            adapter. MergeError: an adapter is merged. AdapterNameError: an unknown name.
    """
    model = _unwrap(model)
    names = M.adapter_names(model) if names is None else [names] if isinstance(names, str) else list(names)
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank <= 0:
        raise ConfigError(f"prepare_swap: max_rank must be a positive integer, got {max_rank!r}")
    for name in names:  # check everything before changing anything
        check_adapter_name(name, "prepare_swap(names=...)")
        _check_swappable(model, name, "prepare_swap")
        for layer in _layers(model, name):
            rank = true_rank(layer.adapters[name])
            if rank > max_rank:
                raise ConfigError(
                    f"prepare_swap: adapter {name!r} on module {layer.path!r} has rank {rank}, above "
                    f"max_rank={max_rank}"
                )
    for name in names:
        for layer in _layers(model, name):
            adapter = layer.adapters[name]
            rank = true_rank(adapter)
            padded = pad_factors(adapter.lora_A.detach(), adapter.lora_B.detach(), rank, max_rank)
            for param, value in zip((adapter.lora_A, adapter.lora_B), padded):
                param.data = value
                param.grad = None
            gain = adapter.swap_slot.gain if adapter.swap_slot is not None else 1.0
            adapter.swap_slot = SwapSlot(rank=rank, gain=gain)
    return model


def swap_adapter(model: nn.Module, name: str, path: str | Path) -> nn.Module:
    """Replace the weights of loaded adapter `name` with those of the adapter files in `path`, in place.

    No module or Parameter is created or replaced, so a `torch.compile`d model (pass it or the model inside)
    is not recompiled. The file may have any rank up to the adapter's capacity (its rank, or the `max_rank` of
    `prepare_swap`), another alpha, rsLoRA, rank_pattern / alpha_pattern: A and B are copied zero-padded and the
    scale ratio is folded into B (see the module docstring). Modules of the adapter that the file does not adapt
    are set to zero (their output is the base layer's; DoRA: m = ||W0||_row), as PEFT's `hotswap_adapter` does.
    modules_to_save copies and trained biases are copied too. The model's stored config becomes the file's
    (keeping the adapter's own `adapter_dtype` and `lora_fa`), so `save_adapter` writes the file's rank and r.
    The adapter stays active or inactive, trainable or frozen as it was.

    Everything is checked before anything is copied: on an error the adapter is unchanged.

    Raises:
        AdapterNameError: no adapter `name`. MergeError: it is merged. ConfigError: it is a PiSSA / OLoRA adapter,
            or `name` is not a valid adapter name (lorakit.names; checked before any file is read).
        AdapterFileError: missing or corrupt files; a file that adapts a module adapter `name` is not on, lacks
            a tensor, has a key the adapter cannot take, or differs in use_dora / bias / a PiSSA / OLoRA init.
        ShapeMismatchError: a rank above the adapter's capacity, or a tensor of the wrong shape (module, tensor,
            found and expected shape).
    """
    model = _unwrap(model)
    check_adapter_name(name, "swap_adapter(name=...)")
    old = _check_swappable(model, name, "swap_adapter")
    directory, config = _read_config(Path(path), name)
    _check_configs(old, config, directory, name)
    tensors = read_weights(directory)
    updates, copies = _plan(model, name, config, tensors, directory)
    _apply(updates, copies)
    fan_in_fan_out = any(layer.kind.fan_in_fan_out for layer in _layers(model, name))
    M._record(model).configs[name] = config.replace(
        adapter_dtype=old.adapter_dtype, lora_fa=old.lora_fa, fan_in_fan_out=fan_in_fan_out or config.fan_in_fan_out
    )
    return model


def _read_config(path: Path, name: str) -> tuple[Path, LoraConfig]:
    """(directory, config) of the adapter at `path` (or `path/name`, as save_adapter lays out a named adapter)."""
    directory = path
    if not (directory / CONFIG_NAME).is_file() and (directory / name / CONFIG_NAME).is_file():
        directory = directory / name
    try:
        return directory, LoraConfig.from_peft_dict(read_config(directory), where=str(directory / CONFIG_NAME))
    except AdapterFileError:
        raise
    except Exception as err:  # ConfigError or a field of the wrong type
        raise AdapterFileError(f"{directory / CONFIG_NAME}: {err}") from err


def _check_configs(old: LoraConfig, new: LoraConfig, where: Path, name: str) -> None:
    """The file's config fields a swap cannot change: the variant, the init's base, the biases the adapter owns."""
    if new.method != old.method:
        raise AdapterFileError(
            f"{where}: method {new.method!r} in the file (use_dora={new.use_dora}), but adapter {name!r} has method "
            f"{old.method!r} (use_dora={old.use_dora}); a swap keeps the adapter's variant: load_adapter() this file "
            f"under another name instead"
        )
    if new.residual_init:
        raise AdapterFileError(
            f"{where}: init_lora_weights={new.init!r} without conversion needs its own residual base model; swap "
            f"in a file saved with save_adapter(..., convert_to_lora=True)"
        )
    if new.bias != old.bias:
        raise AdapterFileError(
            f"{where}: bias={new.bias!r} in the file, but adapter {name!r} has bias={old.bias!r}; a swap cannot "
            f"change which base biases the adapter trains"
        )


def _plan(
    model: nn.Module, name: str, config: LoraConfig, tensors: dict[str, torch.Tensor], where: Path
) -> tuple[list[_LayerUpdate], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Validate the whole file against adapter `name`; return the per-module updates and the other copies
    (modules_to_save, biases, a targeted embedding's base weight) as (target, source) pairs."""
    tensors = {k: v for k, v in tensors.items() if not is_ignored(k)}
    layers = _layers(model, name)
    updates: list[_LayerUpdate] = []
    module_keys: set[str] = set()
    for layer in layers:
        current = layer.adapters[name].peft_tensors()  # {PEFT key suffix: tensor}, as save_adapter writes them
        keys = {suffix: f"{PREFIX}{layer.path}.{suffix}" for suffix in current}
        module_keys.update(keys.values())
        found = {suffix: tensors[key] for suffix, key in keys.items() if key in tensors}
        updates.append(_layer_update(layer, name, config, current, found, where))
    copies = {k: v for k, v in adapter_state(model, name).items() if k not in module_keys}  # copies, biases
    for layer in layers:  # PEFT also saves a targeted embedding's full base weight; load_adapter copies it
        key = f"{PREFIX}{layer.path}.base_layer.weight"
        if key in tensors:
            copies[key] = layer.base_layer.weight
    unexpected = [k for k in tensors if k not in module_keys and k not in copies]
    if unexpected:
        raise AdapterFileError(
            f"{where}: key {unexpected[0]!r} ({len(unexpected)} such key(s)) has no tensor in adapter {name!r}: a "
            f"swap replaces tensors in place and cannot adapt another module or add a modules_to_save copy; "
            f"load_adapter() the file under another name instead"
        )
    absent = [k for k in copies if k not in tensors]
    if absent:
        raise AdapterFileError(f"{where}: missing tensor {absent[0]!r} ({len(absent)} missing in all)")
    for key, target in copies.items():
        _check_shape(where, key, tensors[key], tuple(target.shape), "")
    return updates, [(target, tensors[key]) for key, target in copies.items()]


def _layer_update(
    layer: LoraLayer, name: str, config: LoraConfig, current: dict[str, torch.Tensor],
    found: dict[str, torch.Tensor], where: Path,
) -> _LayerUpdate:
    """Check one module's tensors in the file (all of them, or none: the module is then zeroed) against its
    adapter, whose tensors are `current` (from peft_tensors)."""
    adapter = layer.adapters[name]
    if found and len(found) != len(current):
        missing = next(s for s in current if s not in found)
        raise AdapterFileError(f"{where}: module {layer.path!r} has {sorted(found)} but no {missing!r} in the file")
    rank = config.rank_for(layer.path)
    room = capacity(adapter)
    if rank > room:
        absent = "" if found else ", which the file does not adapt (it would be set to zero)"
        raise ShapeMismatchError(
            f"{where}: module {layer.path!r}{absent}: the file's rank {rank} is above the largest rank adapter "
            f"{name!r} holds there, {room}; declare it in advance with prepare_swap(model, max_rank={rank}) before "
            f"torch.compile"
        )
    key_a, key_b = adapter.kind.peft_keys
    shape_a, shape_b = adapter.kind.shapes(layer.base_layer, rank)
    for suffix, tensor in found.items():  # a variant's extra tensor (DoRA's m) keeps the shape it has now
        expected = {key_a: shape_a, key_b: shape_b}.get(suffix, tuple(current[suffix].shape))
        _check_shape(where, f"{PREFIX}{layer.path}.{suffix}", tensor, tuple(expected), f" (rank {rank})")
    dropout = config.dropout if adapter.kind.uses_dropout else 0.0
    extras = {s: current[s] for s in found if s not in (key_a, key_b)}
    return _LayerUpdate(adapter, layer.base_layer, rank, config.scaling_for(layer.path), dropout, found or None,
                        extras)


def _check_shape(where: Path, key: str, tensor: torch.Tensor, expected: tuple[int, ...], note: str) -> None:
    if tuple(tensor.shape) != expected:
        raise ShapeMismatchError(
            f"{where}: module {key[len(PREFIX):].rsplit('.', 2 if key.endswith('.weight') else 1)[0]!r}: tensor "
            f"{key.rsplit('.', 2)[-2:]} has shape {tuple(tensor.shape)}, adapter expects {expected}{note}"
        )


@torch.no_grad()
def _apply(updates: list[_LayerUpdate], copies: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write a validated swap: A, B zero-padded with the gain folded into B, extra tensors, then the copies."""
    for update in updates:
        adapter, rank = update.adapter, update.rank
        key_a, key_b = adapter.kind.peft_keys
        gain = update.scale / adapter.scale  # adapter.scale stays: the float forward reads never changes
        lora_A, lora_B = adapter.lora_A, adapter.lora_B
        if update.tensors is None:  # a module the file does not adapt: zero, the base layer's output
            lora_A.zero_()
            lora_B.zero_()
        else:
            lora_A[rank:].zero_()
            lora_B[:, rank:].zero_()
            file_B = update.tensors[key_b]
            if gain != 1.0:
                file_B = file_B.to(torch.promote_types(file_B.dtype, torch.float32)) * gain
            lora_A[:rank].copy_(update.tensors[key_a])
            lora_B[:, :rank].copy_(file_B)
        adapter.swap_slot = SwapSlot(rank=rank, gain=gain)
        adapter.r = rank
        adapter.dropout = update.dropout
        _write_extras(adapter, update)
    for target, source in copies:
        target.copy_(source)


def _write_extras(adapter: LoraAdapter, update: _LayerUpdate) -> None:
    """A variant's tensors beyond A and B (DoRA's magnitude m): the file's, or, for a module absent from the file,
    the value that makes it the base layer (DoRA: m = ||W0||_row, the norm with B = 0)."""
    if update.tensors is not None:
        for suffix, target in update.extras.items():
            target.copy_(update.tensors[suffix])  # a view of the parameter (DoRA: m shaped as PEFT stores it)
    else:
        adapter.reset_extras(update.base)
