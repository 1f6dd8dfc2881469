"""PEFT's file format, in one place: the names lorakit reads and writes (and load, save, swap, analysis, combine and
the checks use).

    <dir>/adapter_config.json          the config (lorakit.LoraConfig.to_peft_dict / from_peft_dict)
    <dir>/adapter_model.safetensors    base_model.model.<module path>.<suffix> per layer: each variant's `file_keys`
                                       (lora_A.weight, lora_B.weight, lora_embedding_A / _B, lora_magnitude_vector,
                                       lora_E, vera_lambda_b, ...), modules_to_save weights, trained biases; and the
                                       variant's `shared_keys` (VeRA's projections) outside that prefix
    <dir>/<name>/...                   an adapter not named "default"
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from ..errors import AdapterFileError
from ..layer_kinds import LAYER_KINDS
from ..variants.registry import file_key_suffixes
from .files import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME

PREFIX = "base_model.model."  # every per-layer key starts with it
# parameters inside these belong to an adapter or a modules_to_save wrapper, not to the base model
WRAPPER_INFIXES = (".adapters.", ".copies.", ".original_module.")
# keys PEFT writes that lorakit does not need: the frozen original / PEFT's in-memory copy names
IGNORED_INFIXES = (".modules_to_save.", ".original_module.")


def module_key(path: str, suffix: str) -> str:
    """The file key of tensor `suffix` (e.g. "lora_A.weight") of the layer at module `path`."""
    return f"{PREFIX}{path}.{suffix}"


def split_key(key: str) -> tuple[str, str] | None:
    """(module path, suffix) of a per-layer key one of the registered variants writes, else None."""
    if not key.startswith(PREFIX):
        return None
    for suffix in file_key_suffixes():  # longest first: "lora_B.bias" before "bias"-like tails
        if key.endswith(f".{suffix}"):
            return key[len(PREFIX):-len(suffix) - 1], suffix
    return None


def module_paths(keys: Collection[str], where: Path, shared: Collection[str] = ()) -> list[str]:
    """The module paths a file's keys name, in file order (keys in `shared`: tensors shared by all layers).

    Raises:
        AdapterFileError: a key outside PEFT's prefix that is not a shared one (not a PEFT adapter file).
    """
    paths: list[str] = []
    for key in keys:
        if not key.startswith(PREFIX):
            if key in shared:
                continue
            raise AdapterFileError(f"{where}: key {key!r} does not start with {PREFIX!r}: not a PEFT LoRA file")
        found = split_key(key)
        if found is not None and found[0] not in paths:
            paths.append(found[0])
    return paths


def factor_suffixes() -> dict[str, tuple[str, str]]:
    """{".<A or B key>": ("A" | "B", layer kind name)} for the low-rank pair of every registered layer kind (what
    analysis reads as a LoRA factor)."""
    out: dict[str, tuple[str, str]] = {}
    for kind in LAYER_KINDS.values():
        for factor, suffix in zip(("A", "B"), kind.peft_keys, strict=True):
            out.setdefault(f".{suffix}", (factor, "embedding" if kind.lookup else "linear"))
    return out


def is_ignored(key: str) -> bool:
    """Keys PEFT writes that lorakit does not load (the frozen original of a modules_to_save module)."""
    return any(infix in key for infix in IGNORED_INFIXES)


__all__ = ["CONFIG_NAME", "IGNORED_INFIXES", "LEGACY_WEIGHTS_NAME", "PREFIX", "WEIGHTS_NAME", "WRAPPER_INFIXES",
           "factor_suffixes", "is_ignored", "module_key", "module_paths", "split_key"]
