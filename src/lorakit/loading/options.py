"""The small facts of loading a model: tasks ("causal-lm" / "classification") and how they are spelled, dtype
names, the device, the checks of a local model directory, and the dtype a checkpoint declares.

Pure helpers with no model state; lorakit.loading.load and lorakit.hf use them.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..errors import ConfigError, ModelDirError

TASKS = ("causal-lm", "classification")
# how a task may be spelled: lorakit's names, PEFT's task_type, TrainConfig's "auto"
_TASK_ALIASES = {
    "causal-lm": "causal-lm", "causal_lm": "causal-lm", "causallm": "causal-lm", "lm": "causal-lm",
    "classification": "classification", "seq_cls": "classification", "seq-cls": "classification",
    "sequence-classification": "classification",
}
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
HEAD_NAMES = ("classifier", "score")  # classification heads: new, trained in full, never quantised


# -- tasks and dtypes ------------------------------------------------------------------------------------
def normalize_task(task: str | None) -> str | None:
    """"causal-lm" | "classification" from lorakit's or PEFT's spelling ("CAUSAL_LM", "SEQ_CLS"); None for
    None / "auto".

    Raises:
        ConfigError: an unknown task.
    """
    if task is None or str(task).lower() == "auto":
        return None
    found = _TASK_ALIASES.get(str(task).lower())
    if found is None:
        raise ConfigError(f"unknown task {task!r}; expected one of: auto, {', '.join(TASKS)} (or PEFT's CAUSAL_LM / SEQ_CLS)")
    return found


def model_dir_task(path: str | Path) -> str | None:
    """The task config.json's `architectures` declares for the model directory `path` (None if unknown or unreadable)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        data = json.loads((Path(path) / "config.json").read_text())
        return task_from_config(SimpleNamespace(architectures=data.get("architectures")))
    return None


def task_from_config(config: Any) -> str | None:
    """The task a transformers config's `architectures` implies: *ForSequenceClassification -> classification,
    *ForCausalLM / *LMHeadModel -> causal-lm; None when it says nothing."""
    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith("ForSequenceClassification"):
            return "classification"
        if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
            return "causal-lm"
    return None


def adapter_task(adapter_dir: str | Path) -> str | None:
    """The task named by an adapter's `task_type` in adapter_config.json (None if absent or unknown)."""
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        task_type = json.loads(path.read_text()).get("task_type")
    except (OSError, ValueError, AttributeError):
        return None
    try:
        return normalize_task(task_type)
    except ConfigError:
        return None


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """torch dtype from "fp32" / "bf16" / "fp16" (or the long names, or a torch.dtype); "auto" and None pass.

    Raises:
        ConfigError: an unknown name.
    """
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    found = DTYPES.get(str(dtype).lower())
    if found is None:
        raise ConfigError(f"unknown dtype {dtype!r}; expected one of: fp32, bf16, fp16")
    return found


DEVICE_TYPES = ("cpu", "cuda", "mps")  # what `--device` may name (auto: cuda when available, else cpu)


def parse_device_name(device: str | torch.device | None) -> torch.device | None:
    """The torch.device a `--device` value names, checked for syntax only (None for None / "auto"); whether the
    device exists on this machine is resolve_device's question.

    Raises:
        ConfigError: a string torch does not parse ("tpu"), or a device type lorakit does not run on ("meta").
    """
    if device is None or device == "auto":
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ConfigError(f"unknown device {str(device)!r}; expected auto, {', '.join(DEVICE_TYPES)} or cuda:N") from err
    if resolved.type not in DEVICE_TYPES:
        raise ConfigError(f"device {str(device)!r} is not one lorakit runs on; expected auto, "
                          f"{', '.join(DEVICE_TYPES)} or cuda:N")
    return resolved


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on: the given one, else CUDA when available, else the CPU.

    Raises:
        ConfigError: a device string torch does not understand, or CUDA (or a CUDA index) asked for on a machine
            without it, or MPS without MPS.
    """
    resolved = parse_device_name(device)
    if resolved is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {str(device)!r} asked for, but CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ConfigError(f"device {str(device)!r} asked for, but this machine has {count} CUDA device(s) "
                              f"(cuda:0 to cuda:{count - 1})")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {str(device)!r} asked for, but MPS is not available on this machine")
    return resolved


def check_model_dir(path: str | Path, tokenizer: bool = True) -> Path:
    """`path` as a Path after checking it is a local model directory (config.json, and tokenizer files when
    `tokenizer`).

    Raises:
        ModelDirError: the directory is missing, or lacks config.json or the tokenizer files.
    """
    directory = Path(path)
    if not directory.exists():
        raise ModelDirError(f"model directory {directory} does not exist")
    if not directory.is_dir():
        raise ModelDirError(f"model directory {directory} is not a directory")
    if not (directory / "config.json").is_file():
        raise ModelDirError(f"model directory {directory} has no config.json: not a Hugging Face model directory")
    if tokenizer and not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ModelDirError(
            f"model directory {directory} has no tokenizer files ({' / '.join(TOKENIZER_FILES)})"
        )
    return directory


def declared_vocab_size(directory: Path) -> int | None:
    """config.json's top-level `vocab_size` of a model directory (None when absent, nested or unreadable)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        size = json.loads((Path(directory) / "config.json").read_text()).get("vocab_size")
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            return size
    return None


def checkpoint_dtype(directory: Path) -> torch.dtype:
    """The dtype a checkpoint is stored in, as transformers' `dtype="auto"` finds it: config.json's `dtype`
    (or `torch_dtype`), else the first floating-point tensor of its safetensors files, else fp32."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        data = json.loads((directory / "config.json").read_text())
        name = data.get("dtype") or data.get("torch_dtype")
        if isinstance(name, str) and name.lower() in DTYPES:
            return DTYPES[name.lower()]
    for file in sorted(directory.glob("*.safetensors")):
        with contextlib.suppress(OSError, ValueError, KeyError, AttributeError):
            for entry in _safetensors_header(file).values():
                found = _SAFETENSORS_FLOATS.get(entry.get("dtype") if isinstance(entry, dict) else None)
                if found is not None:
                    return found
    return torch.float32


_SAFETENSORS_FLOATS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _safetensors_header(file: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, offsets); reads only the header."""
    with open(file, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        if not 0 < size < 100_000_000:
            raise ValueError(f"{file}: not a safetensors file")
        return json.loads(handle.read(size))


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__
