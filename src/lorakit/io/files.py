"""Reading and writing adapter files safely.

A single file is written to a temporary file beside it (`.<file>.lorakit-tmp-<pid>-<hex8>.tmp`), flushed and renamed
over the old one; a directory of files is published all at once by io.publish. Reads never run pickle code: a
legacy `adapter_model.bin` is read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import AdapterFileError
from .publish import publishing, recover, sweep_leftovers, temp_name

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


def atomic_write(directory: Path, writers: dict[str, Callable[[Path], object]]) -> None:
    """Write several files into `directory` all-or-nothing per file: each writer fills a temporary path;
    the renames happen only after every file was written and synced. Files that must change together belong
    in one directory published by io.publish.publishing instead. Temporary files a killed writer left in
    `directory` (their pid no longer alive) are removed first."""
    directory.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(directory)
    temps: dict[str, Path] = {}
    try:
        for filename, write in writers.items():
            temps[filename] = directory / temp_name(filename, suffix=".tmp")
            temps[filename].touch(exist_ok=False)
            write(temps[filename])
            with open(temps[filename], "rb+") as handle:
                os.fsync(handle.fileno())
        for filename, tmp in temps.items():
            os.replace(tmp, directory / filename)
        temps.clear()
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)


def publish_files(
    directory: Path, writers: dict[str, Callable[[Path], None]], *, lock: bool | Path = True, carry: bool = True,
) -> None:
    """Write several files that belong together (an adapter's config and weights) as one directory that
    becomes visible at `directory` all at once (io.publish.publishing: a kill at any instant leaves the old
    set or the new one). Entries of the old directory that `writers` does not name are kept when `carry`.

    Raises:
        DirectoryLockedError: another live process is writing `directory` (or the directory `lock` names).
        ConfigError: `directory` exists and is not a directory.
    """
    with publishing(directory, carry=carry, lock=lock, purpose="save_adapter") as tmp:
        for filename, write in writers.items():
            write(tmp / filename)


def write_json(data: dict[str, Any]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    return write


def write_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        save_file(tensors, str(path), metadata=metadata)

    return write


def read_config(directory: Path) -> dict[str, Any]:
    """adapter_config.json as a dict.

    Raises:
        AdapterFileError: missing, unreadable or not a JSON object.
    """
    path = directory / CONFIG_NAME
    if not path.is_file():
        recover(directory)  # a save killed between the two renames of the fallback publication
    if not path.is_file():
        raise AdapterFileError(f"no {CONFIG_NAME} in {directory}: not an adapter directory")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The adapter tensors (safetensors, or a legacy .bin read without running pickle code).

    Raises:
        AdapterFileError: no weights file, or a corrupt one.
    """
    path = directory / WEIGHTS_NAME
    if path.is_file():
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise AdapterFileError(f"{path} is corrupt or truncated: {err}") from err
    legacy = directory / LEGACY_WEIGHTS_NAME
    if legacy.is_file():
        try:
            data = torch.load(str(legacy), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
            raise AdapterFileError(
                f"{legacy} could not be read safely (weights_only=True; no pickle code is run): {err}"
            ) from err
        if not isinstance(data, dict) or not all(torch.is_tensor(v) for v in data.values()):
            raise AdapterFileError(f"{legacy} does not hold a flat dict of tensors")
        return data
    raise AdapterFileError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {directory}")
