"""Can this adapter directory be served on this model? Checked in full before the registry changes anything, against
a table of the model's adaptable modules taken once, so that no check ever walks the model while the engine thread
changes it.

    check_adapter_dir(dir, table, max_lora_rank) -> AdapterSpec   config + the safetensors header (no tensor read)
    read_tensors(spec)                           -> {key: tensor}  every tensor read into CPU memory and checked

Servable means: a PEFT LoRA file (lorakit.LoraConfig.from_peft_dict reads its config) whose variant can take part
in a mixed batch (plain LoRA: DoRA, VeRA, AdaLoRA, Delta-LoRA and lora_bias change the update and are refused by
name), on Linear, GPT-2 Conv1D or Embedding layers the model has, with the shapes its config's ranks give, every
rank <= max_lora_rank, finite values, and nothing that would change the shared base model (trained biases,
modules_to_save copies, an embedding's full weight, a PiSSA / OLoRA residual base).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import LorakitError
from ..io.checks import rank_field
from ..io.files import CONFIG_NAME, read_config, read_weights
from ..io.format import PREFIX, is_ignored, module_paths
from ..io.vllm import read_shapes
from ..layer_kinds import check_supported
from ..layers import LoraLayer, SavedModule
from ..targeting import iter_candidate_modules
from ..variants import variant_for
from .params import ServeError

ModuleTable = dict[str, nn.Module]  # module path -> the model's own (unwrapped) layer at that path


@dataclass(frozen=True)
class AdapterSpec:
    """A checked adapter directory: what the registry keeps of it between loads."""

    directory: Path  # absolute
    config: LoraConfig  # as read at registration (a later edit of the file's config is not picked up)
    modules: tuple[str, ...]  # the module paths the file adapts, in file order
    shapes: dict[str, tuple[int, ...]]  # every tensor the file must hold: PEFT key -> shape
    rank: int  # the largest rank over its modules


def module_table(model: nn.Module) -> ModuleTable:
    """{path: layer} of every module an adapter may name, lorakit's wrappers replaced by the layer they wrap."""
    table: ModuleTable = {}
    for path, module in iter_candidate_modules(model):
        if isinstance(module, LoraLayer):
            module = module.base_layer
        elif isinstance(module, SavedModule):
            module = module.original_module
        table[path] = module
    return table


def refuse(directory: Path | str, reason: str) -> ServeError:
    """The 400 every check raises: the directory, then what is wrong with it."""
    return ServeError(400, f"adapter {directory}: {reason}", param="lora_path", code="invalid_adapter")


def check_adapter_dir(directory: str | Path, table: ModuleTable, max_lora_rank: int) -> AdapterSpec:
    """Check a directory's config and weights header against the model (`table`) without reading a tensor.

    Raises:
        ServeError: 400, naming the directory and the problem: missing directory or files, a config
            lorakit cannot read, a variant or option a mixed batch cannot serve, a module the model lacks or that
            cannot be routed per row, a shape that does not fit, a rank above `max_lora_rank`.
    """
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise refuse(directory, "no such directory" if not directory.exists() else "not a directory")
    try:
        config = LoraConfig.from_peft_dict(read_config(directory), where=CONFIG_NAME)
        header = read_shapes(directory)
        paths = module_paths(list(header[0]), directory, variant_for(config).shared_keys) if header else []
    except LorakitError as err:  # the message names the file and the field or key
        raise refuse(directory, str(err)) from err
    except (ValueError, TypeError, KeyError, AttributeError) as err:  # a config field of a type nothing checked
        raise refuse(directory, f"{CONFIG_NAME}: {err}") from err
    _check_servable(directory, config)
    if header is None:
        raise refuse(directory, "no adapter_model.safetensors (or adapter_model.bin)")
    if not paths:
        raise refuse(directory, "the weights file holds no LoRA tensors (lora_A / lora_B)")
    for path in paths:
        _check_module(directory, table, path)
    rank = max(config.rank_for(p) for p in paths)
    if rank > max_lora_rank:
        worst = next(p for p in paths if config.rank_for(p) == rank)
        raise refuse(directory, f"rank {rank} ({rank_field(config, worst)}, module {worst!r}) is above the "
                                f"server's --max-lora-rank {max_lora_rank}")
    found = {k: tuple(s) for k, s in header[0].items() if not is_ignored(k)}
    expected: dict[str, tuple[int, ...]] = {}
    for path in paths:
        for suffix, want in _file_shapes(config, path, table[path]).items():
            key = f"{PREFIX}{path}.{suffix}"
            if key not in found:
                raise refuse(directory, f"module {path!r}: tensor {key!r} is missing")
            if found[key] != want:
                raise refuse(directory, f"module {path!r}: tensor {suffix!r} has shape {found[key]}, but "
                                        f"{rank_field(config, path)}={config.rank_for(path)} on this layer of the "
                                        f"model needs {want}")
            expected[key] = want
    extra = sorted(set(found) - set(expected))
    if extra:
        raise refuse(directory, f"tensor {extra[0]!r} ({len(extra)} beyond the LoRA factors) would change the shared "
                                "base model (a trained bias or an embedding's full weight); it cannot be served "
                                "beside other adapters")
    return AdapterSpec(directory, config, tuple(paths), expected, rank)


def read_tensors(spec: AdapterSpec) -> dict[str, torch.Tensor]:
    """Every tensor of `spec`'s file, in CPU memory, checked: exactly the keys and shapes `spec` expects, floating
    point, finite. Runs in register() and in the registry's loader thread.

    Raises:
        ServeError: 400: unreadable or corrupt weights, or a file that changed since it was registered.
    """
    try:
        tensors = {k: v for k, v in read_weights(spec.directory).items() if not is_ignored(k)}
    except LorakitError as err:
        raise refuse(spec.directory, str(err)) from err
    missing = sorted(set(spec.shapes) - set(tensors))
    extra = sorted(set(tensors) - set(spec.shapes))
    if missing or extra:
        key = (missing or extra)[0]
        raise refuse(spec.directory, f"tensor {key!r} is {'missing' if missing else 'unexpected'} (the file changed "
                                     "since it was registered?)")
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != spec.shapes[key]:
            raise refuse(spec.directory, f"tensor {key!r} has shape {tuple(tensor.shape)}, expected "
                                         f"{spec.shapes[key]} (the file changed since it was registered?)")
        if not tensor.is_floating_point():
            raise refuse(spec.directory, f"tensor {key!r} has dtype {tensor.dtype}, expected a floating-point one")
        if not bool(torch.isfinite(tensor).all()):
            raise refuse(spec.directory, f"tensor {key!r} holds NaN or infinite values")
    return tensors


def _check_servable(directory: Path, config: LoraConfig) -> None:
    """Refuse, by name, what a mixed batch cannot serve or what would change the shared base."""
    variant = variant_for(config)
    if not variant.abilities_for(config).mixed_batches:
        what = "lora_bias=true" if config.lora_bias else f"method {config.method!r} (peft_type {variant.peft_type})"
        raise refuse(directory, f"{what} cannot be served: its update is not a plain s·B·A, so rows of one batch "
                                "cannot use different adapters; serve plain LoRA adapters")
    if config.residual_init:
        raise refuse(directory, f"init {config.init!r}: the adapter needs the residual base it was trained on; save "
                                "it with convert_to_lora=True (a plain LoRA on the original weights) and serve that")
    if config.bias != "none":
        raise refuse(directory, f"bias={config.bias!r}: trained biases live in the shared base model; serve "
                                "adapters with bias='none'")
    if config.modules_to_save:
        raise refuse(directory, f"modules_to_save={config.modules_to_save}: full module copies cannot be routed "
                                "per row")


def _check_module(directory: Path, table: ModuleTable, path: str) -> None:
    """The model has `path` and a mixed batch can route it (Linear, GPT-2 Conv1D, Embedding without max_norm)."""
    if path not in table:
        raise refuse(directory, f"the file adapts module {path!r}, which this model does not have (was it trained "
                                "on another model?)")
    module = table[path]
    try:
        kind = check_supported(module, path)
    except LorakitError as err:
        raise refuse(directory, str(err)) from err
    if not (kind.is_linear or kind.lookup):
        raise refuse(directory, f"module {path!r} ({kind.name}) cannot take a different adapter per row: served "
                                "adapters may adapt Linear, GPT-2 Conv1D and Embedding layers")
    if kind.lookup and getattr(module, "max_norm", None) is not None:
        raise refuse(directory, f"module {path!r}: an embedding with max_norm cannot be served per row")


def _file_shapes(config: LoraConfig, path: str, module: nn.Module) -> dict[str, tuple[int, ...]]:
    """{key suffix: shape} of the tensors a file of `config` holds for `module` at `path` (integers only)."""
    shapes = variant_for(config).file_shapes(check_supported(module, path), module, config, path)
    return {suffix: tuple(shape) for suffix, shape in shapes.items()}
