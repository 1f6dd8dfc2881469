"""PEFT's adapter layout, both ways.

    <dir>/adapter_config.json          {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": [...], ...}
    <dir>/adapter_model.safetensors    base_model.model.<module>.lora_A.weight  (r, k)
                                       base_model.model.<module>.lora_B.weight  (d, r)
                                       base_model.model.<module>.lora_embedding_A / _B  (embeddings)
                                       base_model.model.<module>.weight / .bias (modules_to_save)
                                       base_model.model.<module>.bias           (bias="all" / "lora_only")
An adapter not named "default" is saved in <dir>/<name>/, as PEFT does.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .. import model as M
from ..config import LoraConfig
from ..errors import AdapterFileError, AdapterNameError, ConfigError, ShapeMismatchError
from ..layers import LoraLayer, SavedModule
from ..names import check_adapter_name
from ..targeting import is_target, iter_candidate_modules, output_head_names
from ..variants import variant_for
from . import checks, residual, vllm
from .files import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    publish_files,
    read_config,
    read_weights,
    write_json,
    write_safetensors,
)
from .format import PREFIX, WRAPPER_INFIXES, is_ignored, module_paths


def adapter_dir(path: str | Path, name: str) -> Path:
    """Where adapter `name` lives under `path`: `path` itself for "default", else `path/name`."""
    return Path(path) if name == "default" else Path(path) / name


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under PEFT's file keys (the tensors themselves, not copies)."""
    config = M.get_config(model, name)
    state: dict[str, torch.Tensor] = {}
    for layer in M.lora_layers(model):
        if name in layer.adapters:
            for suffix, tensor in layer.adapters[name].peft_tensors().items():
                state[f"{PREFIX}{layer.path}.{suffix}"] = tensor
    state.update(variant_for(config).shared_file_tensors(model, name))
    for saved in M.saved_modules(model):
        if name in saved.copies:
            for pname, tensor in saved.copies[name].state_dict(keep_vars=True).items():
                state[f"{PREFIX}{saved.path}.{pname}"] = tensor
    state.update(_bias_state(model, config))
    return state


def _bias_state(model: nn.Module, config: LoraConfig) -> dict[str, torch.Tensor]:
    """The trainable biases bias="all" / "lora_only" save, keyed as PEFT keys them."""
    if config.bias == "none":
        return {}
    state: dict[str, torch.Tensor] = {}
    for pname, param in model.named_parameters():
        if not pname.endswith("bias") or any(w in pname for w in WRAPPER_INFIXES):
            continue
        owner_path = pname.rsplit(".", 1)[0]
        if config.bias == "lora_only" and not owner_path.endswith(".base_layer"):
            continue
        state[PREFIX + pname] = param
    return state


def _file_targets(model: nn.Module, config: LoraConfig, name: str) -> LoraConfig:
    """The config as written to the file: target_modules such that PEFT's matching finds exactly the
    modules this adapter is on (short names when they suffice, full paths otherwise)."""
    wrapped = {layer.path for layer in M.lora_layers(model) if name in layer.adapters}
    target = config.target_modules
    if target == "all-linear":
        target = sorted({path.rsplit(".", 1)[-1] for path in wrapped})
    candidate = config.replace(target_modules=target)
    heads = output_head_names(model)
    found = {p for p, m in iter_candidate_modules(model) if is_target(candidate, p, m, heads)}
    if found != wrapped:
        candidate = config.replace(target_modules=sorted(wrapped), layers_to_transform=None, layers_pattern=None)
    return candidate


def save_adapter(
    model: nn.Module, path: str | Path, name: str = "default", convert_to_lora: bool = True, *,
    vllm_check: bool = True, state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Save adapter `name` in PEFT's layout under `path` (a subfolder `name` unless it is "default").

    A PiSSA / OLoRA adapter (its init changed the base weights) is saved by default as a plain LoRA of rank 2r
    relative to the ORIGINAL weights, so that it loads onto the unmodified base in PEFT, vLLM and lorakit.
    `convert_to_lora=False` keeps PEFT's residual form instead: A, B as trained, `init_lora_weights: "pissa"`,
    marked as needing the residual base (see io.residual). For any other adapter the flag changes nothing.

    A file that vLLM would load but compute differently (a per-module scale from rank_pattern / alpha_pattern,
    an unconverted PiSSA / OLoRA file) is still written, with a `lorakit.io.vllm.VllmWarning` that names each
    module or field; `lorakit inspect DIR --check vllm` lists these and what vLLM refuses. `vllm_check=False`
    skips this for files that are not meant for serving (training checkpoints).

    `state_dict` (keyed as `model.state_dict()`; transformers' Trainer passes the gathered one under FSDP /
    DeepSpeed) supplies the adapter's values where it holds them; default: the model's own tensors.

    Atomic: the files are written into a temporary directory beside the target and swapped in with one rename
    (io.publish), so a failure or a kill -9 at any instant leaves the old adapter or the new one, whole; other
    entries of the directory (other adapters' sub-directories, a README) are kept. A second process saving into
    the same `path` at the same time is refused (io.lock). Returns the directory written.

    Raises:
        DirectoryLockedError: another live process is saving into `path` (the lock file and its pid are named).
        ConfigError: convert_to_lora=True for a PiSSA / OLoRA adapter that was loaded from an unconverted file
            (its initial factors are unknown); save it with convert_to_lora=False.
        AdapterNameError: no adapter `name` on the model.
    """
    check_adapter_name(name, "save_adapter(name=...)")  # a name, never a path: nothing written outside `path`
    config = _file_targets(model, M.get_config(model, name), name)
    config = variant_for(config).file_config(model, name, config)  # e.g. AdaLoRA's rank pattern, from its layers
    if config.base_model_name_or_path is None and getattr(model, "name_or_path", None):
        config = config.replace(base_model_name_or_path=str(model.name_or_path))  # as PEFT fills it in
    state = adapter_state(model, name)
    if state_dict is not None:
        state = values_in(model, state, state_dict)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    directory = adapter_dir(path, name)
    metadata = {"format": "pt", "producer": "lorakit"}
    config, tensors, metadata = residual.prepare_save(model, name, config, tensors, metadata, convert_to_lora, PREFIX)
    config_dict = config.to_peft_dict()
    publish_files(directory, {  # one rename makes config + weights visible together; `path`'s lock held
        WEIGHTS_NAME: write_safetensors(tensors, metadata),
        CONFIG_NAME: write_json(config_dict),
    }, lock=Path(path))
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    findings = vllm.silent_wrong(config_dict, shapes, metadata) if vllm_check else []
    if findings:
        warnings.warn(vllm.VllmWarning(
            f"{directory}: vLLM would load this adapter but compute differently from the trained model:\n"
            + "\n".join(f"  {finding.where}: {finding.message}" for finding in findings)
        ), stacklevel=2)
    return directory


def values_in(
    model: nn.Module, state: dict[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """`state` (PEFT file key -> live tensor) with each tensor replaced by its entry in `state_dict`, a dict keyed
    as `model.state_dict()`, where that holds one."""
    model_key = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
    return {k: state_dict.get(model_key.get(id(t), ""), t) for k, t in state.items()}


def load_adapter(
    model: nn.Module, path: str | Path, name: str = "default", trainable: bool = False
) -> nn.Module:
    """Load the adapter in `path` (PEFT's or lorakit's files) into `model` as adapter `name`.

    The modules named in the file get the adapter. If the model had no active adapter, `name` becomes
    active; otherwise the active set is unchanged (use set_active).

    Raises:
        AdapterFileError: missing or corrupt files, unknown peft_type, keys for modules the model lacks, or an
            unconverted PiSSA / OLoRA file on a model that does not hold its residual base.
        ShapeMismatchError: a tensor whose shape does not fit the model, or differs from the shape the config's
            `r` / `rank_pattern` gives (module, field, expected and found shape): checked on the file's header
            before anything is allocated. On any error the model is left as it was.
        AdapterNameError: `name` is already attached.
    """
    check_adapter_name(name, "load_adapter(name=...)")  # before any file is read or the model changes
    directory = Path(path)
    if not (directory / CONFIG_NAME).is_file() and (directory / name / CONFIG_NAME).is_file():
        directory = directory / name
    try:
        config = LoraConfig.from_peft_dict(read_config(directory), where=str(directory / CONFIG_NAME))
    except AdapterFileError:
        raise
    except ConfigError as err:  # the message already names the file
        raise AdapterFileError(str(err)) from err
    except Exception as err:  # a field of a type nothing checked
        raise AdapterFileError(f"{directory / CONFIG_NAME}: {err}") from err
    with checks.unchanged_on_failure(model, name):  # a failed load leaves the model as it was
        if name in M.adapter_names(model):
            raise AdapterNameError(f"an adapter named {name!r} is already attached; load it under another name")
        # shapes from the safetensors header, no tensor read yet (a legacy .bin is read whole, weights_only)
        header = vllm.read_shapes(directory) if (directory / WEIGHTS_NAME).is_file() else None
        tensors = read_weights(directory) if header is None else None
        shapes = header[0] if header is not None else {k: tuple(v.shape) for k, v in tensors.items()}
        paths = module_paths(list(shapes), directory, variant_for(config).shared_keys)
        known = {p for p, _ in iter_candidate_modules(model)}
        missing = [p for p in paths if p not in known]
        if missing:
            raise AdapterFileError(
                f"{directory}: the file has adapter weights for {len(missing)} module(s) this model does not have, "
                f"e.g. {missing[0]!r}; was it trained on another model?"
            )
        if not paths:
            raise AdapterFileError(f"{directory}: the weights file has no LoRA tensors (lora_A / lora_B)")
        checks.check_shapes(model, config, paths, shapes, directory)  # the config's ranks: before allocating
        tensors = read_weights(directory) if tensors is None else tensors
        fingerprint = residual.check_load(model, config, directory, paths)  # PiSSA / OLoRA: the residual base?
        previously_active = M.active_adapters(model)
        M.attach_at(model, config, name, paths, init_from_base=False)
        _copy_into(model, name, tensors, directory)
        residual.after_load(model, name, fingerprint)
        M.set_trainable(model, name, trainable)
        if previously_active:
            M.set_active(model, previously_active)
    return model


def _copy_into(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Copy file tensors into the adapter's parameters, checking every key and shape."""
    targets = adapter_state(model, name)
    for layer in M.lora_layers(model):  # PEFT also saves a targeted embedding's full base weight
        if name in layer.adapters and f"{PREFIX}{layer.path}.base_layer.weight" in tensors:
            targets[f"{PREFIX}{layer.path}.base_layer.weight"] = layer.base_layer.weight
    tensors = {k: v for k, v in tensors.items() if not is_ignored(k)}
    unexpected = [k for k in tensors if k not in targets]
    if unexpected:
        raise AdapterFileError(f"{where}: unexpected key {unexpected[0]!r} ({len(unexpected)} in all)")
    absent = [k for k in targets if k not in tensors]
    if absent:
        raise AdapterFileError(f"{where}: missing tensor {absent[0]!r} ({len(absent)} missing in all)")
    for key, target in targets.items():
        found = tensors[key]
        if tuple(found.shape) != tuple(target.shape):
            module = key[len(PREFIX):].rsplit(".", 2 if key.endswith(".weight") else 1)[0]
            raise ShapeMismatchError(
                f"{where}: module {module!r}: tensor {key.rsplit('.', 2)[-2:]} has shape {tuple(found.shape)}, "
                f"the model expects {tuple(target.shape)}"
            )
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(tensors[key])


def is_lora_module(module: nn.Module) -> bool:
    """True for lorakit's wrappers."""
    return isinstance(module, (LoraLayer, SavedModule))
