"""Saving a Delta-LoRA run (lorakit.variants.delta_lora): training moved the base, so the result is a merged model,
plus the low-rank part as a plain LoRA file relative to the CHANGED base (PEFT has no Delta-LoRA).

    <out>/model/     config.json + model.safetensors: W0' + s B A    (transformers alone loads it)
    <out>/adapter/   adapter_config.json + adapter_model.safetensors: plain LoRA ("LORA"), relative to W0'
    <out>/base/      only with with_base=True: W0', the base as training left it (what the adapter applies to)

W0' is the base weight after training (W0 moved by Delta-LoRA's updates). Each directory is published with one
rename (io.publish): a failure or a kill leaves the old directory or the new one, whole. The live model is not
changed: the merged weights are new tensors, written from the CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import model as M
from ..errors import ConfigError
from ..layer_kinds import kind_of
from ..names import check_adapter_name
from .peft import save_adapter
from .publish import publishing


def _key_renames(model: nn.Module, name: str) -> tuple[dict[str, str], tuple[str, ...]]:
    """({wrapper key prefix: the base model's prefix}, key prefixes to leave out) for the model's own key names:
    a LoraLayer's `base_layer.` goes, its adapters are left out; a modules_to_save wrapper gives adapter `name`'s
    copy (the original where `name` has none)."""
    renames: dict[str, str] = {}
    drop: list[str] = []
    for layer in M.lora_layers(model):
        renames[f"{layer.path}.base_layer."] = f"{layer.path}."
        drop.append(f"{layer.path}.adapters.")
    for saved in M.saved_modules(model):
        if name in saved.copies:
            renames[f"{saved.path}.copies.{name}."] = f"{saved.path}."
            drop.append(f"{saved.path}.original_module.")
        else:
            renames[f"{saved.path}.original_module."] = f"{saved.path}."
        drop.append(f"{saved.path}.copies.")
    return renames, tuple(drop)


def _dense_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a dequantised weight is written in: the input embedding's (the model's own float dtype)."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    weight = getattr(embedding, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32


@torch.no_grad()
def base_model_state(model: nn.Module, name: str = "default", merged: bool = True) -> dict[str, torch.Tensor]:
    """The base model's state dict under its own keys (no lorakit wrapper, no adapter): each weight adapter `name`
    is on holds W0' + s B A (`merged`) or W0' alone, as a new CPU tensor in the weight's dtype (the sum in fp32);
    every other tensor is the model's own (tied weights stay one tensor).

    A quantised base layer (QLoRA / LoftQ on NF4) is written dense: its weight dequantised (the values training
    saw), in the dtype of the model's input embedding, with its bias; its codes and statistics are left out.

    Raises:
        AdapterNameError: no adapter `name` on the model.
    """
    M.get_config(model, name)  # raises for an unknown name
    replaced: dict[int, torch.Tensor] = {}
    dense: dict[str, torch.Tensor] = {}  # "<path>.weight" / "<path>.bias" of quantised layers, written dense
    quantised: list[str] = []
    for layer in M.lora_layers(model):
        if name not in layer.adapters:
            continue
        base = layer.base_layer
        delta = layer.adapters[name].delta_weight(base)  # s B A, fp32, the weight's layout
        sign = float(merged) - float(name in layer.merged)  # a merged adapter is already in the weight
        if layer.kind.quantized:
            value = layer.kind.dequantize(base, torch.float32)
            dtype = _dense_dtype(model)
            dense[f"{layer.path}.weight"] = (value + sign * delta if sign else value).to(dtype).cpu()
            if getattr(base, "bias", None) is not None:
                dense[f"{layer.path}.bias"] = base.bias.detach().to(dtype).cpu()
            quantised.append(f"{layer.path}.base_layer.")
            continue
        weight = base.weight
        value = weight.detach().float()
        if sign:
            value = value + sign * delta
        replaced[id(weight)] = value.to(weight.dtype).cpu()
    handled = {f"{layer.path}.base_layer" for layer in M.lora_layers(model)}
    for path, module in model.named_modules():  # quantised layers without an adapter: dense as training saw them
        kind = kind_of(module)
        if kind is None or not kind.quantized or path in handled or any(path.startswith(h + ".") for h in handled):
            continue
        dtype = _dense_dtype(model)
        dense[f"{path}.weight"] = kind.dequantize(module, torch.float32).to(dtype).cpu()
        if getattr(module, "bias", None) is not None:
            dense[f"{path}.bias"] = module.bias.detach().to(dtype).cpu()
        quantised.append(f"{path}.")
    renames, drop = _key_renames(model, name)
    prefixes = sorted(renames, key=len, reverse=True)
    state: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if key.startswith(tuple(quantised)):  # codes and statistics: the dense weight replaces them
            continue
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is not None:
            key = renames[prefix] + key[len(prefix):]
        elif key.startswith(drop):
            continue
        state[key] = replaced.get(id(tensor), tensor.detach())
    state.update(dense)
    return state


def _save_model_dir(model: nn.Module, directory: Path, state: dict[str, torch.Tensor], tokenizer: Any) -> None:
    """transformers' own save_pretrained of `model`'s class with `state` (not the adapter-saving one lorakit
    installs on the instance), published with one rename."""
    with publishing(directory, carry=False, lock=True, purpose="lorakit save_delta_lora") as tmp:
        type(model).save_pretrained(model, tmp, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def save_delta_lora(model: nn.Module, out_dir: str | Path, name: str = "default", *, tokenizer: Any = None,
                    with_base: bool = False) -> Path:
    """Save a model trained with Delta-LoRA adapter `name`: `out_dir/model` (merged, W0' + s B A: loads with
    transformers' from_pretrained alone), `out_dir/adapter` (plain LoRA in PEFT's layout, relative to W0'), and with
    `with_base`, `out_dir/base` (W0', onto which lorakit.load_adapter or peft.PeftModel puts `out_dir/adapter`).

    Works for any adapter on a transformers model; for LoRA W0' is simply W0. The model is left as it was.

    Args:
        model: a transformers PreTrainedModel with adapter `name` attached (trained).
        out_dir: the run's output directory; its other entries are kept.
        name: the adapter (its file goes to `out_dir/adapter/<name>/` unless it is "default", as PEFT does).
        tokenizer: saved into `model/` (and `base/`) when given.
        with_base: also write W0' (doubles the disk used; the adapter file is only useful with it).

    Returns:
        `out_dir`.

    Raises:
        ConfigError: `model` is not a transformers PreTrainedModel (no save_pretrained of its class).
        AdapterNameError: no adapter `name` on the model.
        DirectoryLockedError: another process is writing one of the directories.
    """
    check_adapter_name(name, "save_delta_lora(name=...)")
    if not callable(getattr(type(model), "save_pretrained", None)):
        raise ConfigError(f"save_delta_lora: expected a transformers PreTrainedModel, got {type(model).__name__} "
                          "(save lorakit.io.delta_lora.base_model_state(model) with torch.save instead)")
    out = Path(out_dir)
    _save_model_dir(model, out / "model", base_model_state(model, name, merged=True), tokenizer)
    if with_base:
        _save_model_dir(model, out / "base", base_model_state(model, name, merged=False), tokenizer)
    save_adapter(model, out / "adapter", name, vllm_check=False)  # vLLM would apply it to the original base
    return out


__all__ = ["base_model_state", "save_delta_lora"]
