"""A model directory's safetensors checkpoint, read key by key: which files, how to open them without mmap, and
how a checkpoint key maps to the model's name (transformers' renames, the base-model prefix). Used by stream.py.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ModelDirError

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.bin.index.json")  # refused: loading them runs pickle code


# -- the checkpoint's files ------------------------------------------------------------------------------
def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a model directory: the shards named by model.safetensors.index.json, in order,
    else model.safetensors.

    Raises:
        ModelDirError: a pickle checkpoint (.bin / .pt) only, an index naming a shard that is missing, an
            unreadable index, or no weights at all.
    """
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = list(dict.fromkeys(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ModelDirError(f"{index}: not a readable safetensors index (expected a JSON object with a "
                                f"'weight_map'): {type(err).__name__}: {err}") from err
        missing = [name for name in shards if not (directory / name).is_file()]
        if missing:
            raise ModelDirError(f"{index} names shard(s) that are not in {directory}: {', '.join(missing)}")
        return [directory / name for name in shards]
    if (directory / SAFETENSORS_NAME).is_file():
        return [directory / SAFETENSORS_NAME]
    pickles = sorted(p for pattern in PICKLE_PATTERNS for p in directory.glob(pattern))
    if pickles:
        raise ModelDirError(f"{pickles[0]}: a PyTorch pickle checkpoint; loading in NF4 reads safetensors only. "
                            f"Convert it once: transformers' from_pretrained({str(directory)!r}) then "
                            f"save_pretrained(new_dir) writes model.safetensors")
    raise ModelDirError(f"model directory {directory} has no weights: expected {SAFETENSORS_NAME} or "
                        f"{SAFETENSORS_INDEX}")


@contextlib.contextmanager
def open_safetensors(file: Path) -> Iterator[Any]:
    """safetensors.safe_open on the CPU, reading with pread (not mmap: mapped pages would stay resident).

    Raises:
        ModelDirError: a file safetensors cannot open (truncated, not safetensors).
    """
    from safetensors import SafetensorError, safe_open

    try:
        try:
            handle = safe_open(str(file), framework="pt", device="cpu", backend="pread")
        except TypeError:  # safetensors < 0.8 has no backend argument: memory-mapped
            handle = safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as err:
        raise ModelDirError(f"{file}: not a readable safetensors file: {err}") from err
    with handle as reader:
        yield reader


# -- checkpoint keys -> the model's names ----------------------------------------------------------------
def key_renamer(model: nn.Module, expected: set[str]) -> Callable[[str], str]:
    """checkpoint key -> the model's key, with the renames transformers applies when loading this architecture
    (its conversion mapping: legacy names, per-model renames) and the base-model prefix added or stripped.

    Raises (from the returned function):
        ModelDirError: a key that transformers would convert (split, merge, transpose): not streamable.
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    present = dict.fromkeys(expected, True)
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers < 5: no conversion mapping, only the prefix
        return lambda key: _with_prefix(key, prefix, expected)
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]

    def rename(key: str) -> str:
        found, pattern = rename_source_key(key, renamings, converters, prefix or None, present)
        if pattern is not None:
            raise ModelDirError(f"checkpoint key {key!r} needs transformers' weight conversion for "
                                f"{type(model).__name__} ({pattern}); NF4 streaming cannot load it: load "
                                f"without quantize and call lorakit.quantize(model, 'nf4')")
        return found if found in expected or key not in expected else key

    return rename


def _with_prefix(key: str, prefix: str, expected: set[str]) -> str:
    if key in expected or not prefix:
        return key
    if key.startswith(prefix + ".") and key[len(prefix) + 1:] in expected:
        return key[len(prefix) + 1:]
    return f"{prefix}.{key}" if f"{prefix}.{key}" in expected else key


def label_dim_mismatch(expected: tuple[int, ...], found: tuple[int, ...], labels: int, saved_labels: int) -> bool:
    """Whether `found` differs from `expected` only where a size-`saved_labels` dimension became `labels`: a
    classification head saved for another number of labels (re-initialised, as ignore_mismatched_sizes does)."""
    if labels == saved_labels or len(expected) != len(found) or expected == found:
        return False
    return all(e == f or (e, f) == (labels, saved_labels) for e, f in zip(expected, found))
