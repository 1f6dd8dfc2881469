"""Files of PiSSA / OLoRA adapters, whose training left the base holding W_res = W0 - s B0 A0 (lorakit.residual).

Two ways to save one (`save_adapter(..., convert_to_lora=...)`):

* converted (the default, `convert_to_lora=True`): a plain LoRA of rank 2r relative to the ORIGINAL weights, as PEFT's
  `save_pretrained(path_initial_model_for_weight_conversion=...)` writes it:

      W_res + s B A = W0 + s (B A - B0 A0) = W0 + s [B | -B0] [A ; A0]
      A' = [A ; A0] (2r, k),  B' = [B | -B0] (d, 2r),  r' = 2r,  alpha' = 2 alpha (rsLoRA: sqrt(2) alpha)

  so s' = alpha' / r' = s, and `init_lora_weights: true`. PEFT, vLLM and lorakit load it onto the base model.
* unconverted (`convert_to_lora=False`): A, B as trained, `init_lora_weights: "pissa"` etc., and safetensors metadata saying that the
  file needs the residual base, with a fingerprint per module (ops.residual_init.weight_fingerprint: the fp32
  Frobenius norm and a few fixed random probes) of the residual weight and, when known, of the original one.
  Loading refuses a model whose weights match the original better, or match neither.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .. import model as M
from ..config import LoraConfig
from ..errors import AdapterFileError, ConfigError
from ..layer_kinds import kind_of
from ..layers import LoraLayer
from ..ops.residual_init import weight_fingerprint
from .files import WEIGHTS_NAME

RESIDUAL_KEY = "lorakit.residual_base"  # metadata: the init that left a residual base ("pissa", "olora", ...)
FINGERPRINT_KEY = "lorakit.residual_fingerprint"  # metadata: JSON {module: {"residual": [...], "original": [...]}}
FINGERPRINT_RTOL = 1e-2  # tolerance, relative to ||W_res||_F (a bf16 / fp16 copy of the residual base still matches)


def _adapter_layers(model: nn.Module, name: str) -> list[LoraLayer]:
    return [layer for layer in M.lora_layers(model) if name in layer.adapters]


def unmerged_fingerprint(module: nn.Module) -> list[float]:
    """weight_fingerprint of a layer's base weight in the (d, k) layout, without the deltas of merged adapters."""
    base = module.base_layer if isinstance(module, LoraLayer) else module
    kind = kind_of(base)
    weight = base.weight.detach().float()
    for merged in module.merged if isinstance(module, LoraLayer) else []:
        weight = weight - module.adapters[merged].delta_weight(base)
    return weight_fingerprint(kind.to_weight_layout(weight) if kind is not None else weight)


# -- saving ------------------------------------------------------------------------------------------------
def converted_config(config: LoraConfig) -> LoraConfig:
    """The config of the rank-2r plain LoRA: r, rank_pattern doubled; alpha, alpha_pattern times 2 (rsLoRA:
    times sqrt(2)) so that every module keeps its scale s; init "kaiming" (PEFT's `init_lora_weights: true`)."""
    factor = math.sqrt(2.0) if config.use_rslora else 2.0
    return config.replace(
        init="kaiming",
        r=2 * config.r,
        alpha=factor * config.alpha,
        rank_pattern={key: 2 * rank for key, rank in config.rank_pattern.items()},
        alpha_pattern={key: factor * alpha for key, alpha in config.alpha_pattern.items()},
    )


def _converted_tensors(model: nn.Module, name: str, prefix: str) -> dict[str, torch.Tensor]:
    """{file key: A' or B'} for every layer of adapter `name`, relative to the original weights.

    Raises:
        ConfigError: a layer whose adapter has no initial factors (it was loaded from a file, not attached).
    """
    tensors: dict[str, torch.Tensor] = {}
    for layer in _adapter_layers(model, name):
        adapter = layer.adapters[name]
        initial_A, initial_B = getattr(adapter, "initial_A", None), getattr(adapter, "initial_B", None)
        if initial_A is None or initial_B is None:
            raise ConfigError(
                f"adapter {name!r} on module {layer.path!r}: convert_to_lora=True needs the initial A0, B0 of the "
                f"PiSSA / OLoRA init (True is save_adapter's default), which only an adapter attached in this "
                f"session has (this one was loaded from an unconverted file); save it with convert_to_lora=False"
            )
        key_a, key_b = adapter.kind.peft_keys
        lora_A, lora_B = adapter.lora_A.detach(), adapter.lora_B.detach()
        tensors[f"{prefix}{layer.path}.{key_a}"] = torch.cat([lora_A, initial_A], dim=0).cpu().contiguous()
        tensors[f"{prefix}{layer.path}.{key_b}"] = torch.cat([lora_B, -initial_B], dim=1).cpu().contiguous()
    return tensors


def _fingerprint(model: nn.Module, name: str) -> dict[str, dict[str, list[float] | None]]:
    return {
        layer.path: {
            "residual": unmerged_fingerprint(layer),
            "original": getattr(layer.adapters[name], "original_fingerprint", None),
        }
        for layer in _adapter_layers(model, name)
    }


def prepare_save(
    model: nn.Module, name: str, config: LoraConfig, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
    convert_to_lora: bool, prefix: str,
) -> tuple[LoraConfig, dict[str, torch.Tensor], dict[str, str]]:
    """What save_adapter writes for adapter `name`: (config, tensors, safetensors metadata).

    Unchanged for an adapter whose init does not touch the base (convert_to_lora is then a no-op: the file is
    already a plain LoRA relative to the original weights). For PiSSA / OLoRA: the rank-2r conversion with
    `convert_to_lora=True`, otherwise the residual-base marker and fingerprint in the metadata.

    Raises:
        ConfigError: convert_to_lora=True for an adapter that was loaded from an unconverted file.
    """
    if not config.residual_init:
        return config, tensors, metadata
    if convert_to_lora:
        return converted_config(config), {**tensors, **_converted_tensors(model, name, prefix)}, metadata
    marked = {**metadata, RESIDUAL_KEY: config.init, FINGERPRINT_KEY: json.dumps(_fingerprint(model, name))}
    return config, tensors, marked


# -- loading -----------------------------------------------------------------------------------------------
def read_metadata(directory: Path) -> dict[str, str]:
    """The safetensors metadata of the adapter in `directory` ({} for a legacy .bin or none)."""
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise AdapterFileError(f"{path} is corrupt or truncated: {err}") from err


def _refusal(directory: Path, path: str, init: str, why: str) -> AdapterFileError:
    return AdapterFileError(
        f"{directory}: this {init} adapter was saved without conversion and needs the residual base model it was "
        f"trained on (W0 - s B0 A0, e.g. saved together with the adapter); module {path!r}: {why}. Load it onto "
        f"that residual base, or save the adapter again with save_adapter(..., convert_to_lora=True) for the "
        f"original base model"
    )


def check_load(model: nn.Module, config: LoraConfig, directory: Path, paths: list[str]) -> dict[str, Any] | None:
    """Check, before anything is attached, that `model` holds the residual base an unconverted PiSSA / OLoRA
    file needs; return the file's fingerprint (None for other inits, or a file without one).

    Raises:
        AdapterFileError: a module whose weights are closer to the original (unmodified) base than to the
            residual one, or further than FINGERPRINT_RTOL from the residual; a malformed fingerprint.
    """
    if not config.residual_init:
        return None
    metadata = read_metadata(directory)
    if FINGERPRINT_KEY not in metadata:
        warnings.warn(
            f"{directory}: init_lora_weights={config.init!r} without lorakit's residual fingerprint (written by "
            f"another tool?): the model must already hold the residual base; this cannot be checked",
            stacklevel=3,
        )
        return None
    try:
        fingerprint = json.loads(metadata[FINGERPRINT_KEY])
        expected = {path: torch.tensor(fingerprint[path]["residual"], dtype=torch.float64) for path in paths}
        original = {path: fingerprint[path].get("original") for path in paths}
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as err:
        raise AdapterFileError(f"{directory / WEIGHTS_NAME}: malformed {FINGERPRINT_KEY} metadata ({err!r})") from err
    for path in paths:
        found = torch.tensor(unmerged_fingerprint(model.get_submodule(path)), dtype=torch.float64)
        if found.shape != expected[path].shape:
            raise AdapterFileError(f"{directory / WEIGHTS_NAME}: malformed {FINGERPRINT_KEY} entry for {path!r}")
        off = (found - expected[path]).abs().max().item()
        if original[path] is not None:
            off_original = (found - torch.tensor(original[path], dtype=torch.float64)).abs().max().item()
            if off_original < off:
                raise _refusal(directory, path, config.init, (
                    f"its weights match the unmodified base (fingerprint off by {off_original:.3g}), not the "
                    f"residual base (off by {off:.3g})"
                ))
        if off > FINGERPRINT_RTOL * expected[path][0].item():
            raise _refusal(directory, path, config.init, (
                f"its weights differ from the residual base's (weight norm {found[0].item():.6g}, expected "
                f"{expected[path][0].item():.6g}; fingerprint off by {off:.3g})"
            ))
    return fingerprint


def after_load(model: nn.Module, name: str, fingerprint: dict[str, Any] | None) -> None:
    """Carry the file's fingerprint of the original base over to the loaded adapter (for saving it again)."""
    if fingerprint is None:
        return
    for layer in _adapter_layers(model, name):
        entry = fingerprint.get(layer.path) or {}
        layer.adapters[name].original_fingerprint = entry.get("original")
