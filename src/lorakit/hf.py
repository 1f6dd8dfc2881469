"""Hugging Face model directories: load a local model + tokenizer, and merge adapters into a model that plain
transformers loads (text generation with adapters: lorakit.generation).

Everything here reads local directories only (`local_files_only=True`): a path that does not exist is an
error, never a Hub download.

    load_model_dir(path, task=None, ...)   -> (model, tokenizer)   the training loop and the CLI use it
    load_adapters(model, dirs)             -> ["a0", "a1", ...]    several adapters, all active (summed)
    merge_to_dir(model_dir, adapter_dirs, out, dtype=...) -> Path  base + adapters -> merged model directory
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from .errors import AdapterFileError, ConfigError, ModelDirError

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


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on: the given one, else CUDA when available, else the CPU.

    Raises:
        ConfigError: a device string torch does not understand, or CUDA asked for on a machine without it.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"unknown device {device!r}: {err}") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available on this machine")
    return resolved


# -- loading ---------------------------------------------------------------------------------------------
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


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer of a local model directory; pad_token = eos_token when it has none.

    Raises:
        ModelDirError: missing directory, no config.json or tokenizer files, or a tokenizer that fails to load.
    """
    import transformers

    directory = check_model_dir(path)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any failure becomes one clear line
        raise ModelDirError(f"model directory {directory}: the tokenizer could not be loaded: {_one_line(err)}") from err
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_dir(
    path: str | Path,
    task: str | None = None,
    num_labels: int | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    with_tokenizer: bool = True,
) -> tuple[nn.Module, Any]:
    """Load a model and its tokenizer from a local Hugging Face directory (never the Hub).

    Args:
        path: the directory (config.json, weights, tokenizer files).
        task: "causal-lm" | "classification" (PEFT's "CAUSAL_LM" / "SEQ_CLS" also accepted), or None / "auto":
            from the config's `architectures` (*ForSequenceClassification -> classification, *ForCausalLM and
            *LMHeadModel -> causal-lm). Pass an adapter's task_type (`adapter_task(dir)`) to follow the adapter.
        num_labels: classification only: the number of labels (a head of another size is created anew).
        dtype: torch dtype, "fp32" / "bf16" / "fp16", "auto" (the dtype stored in the directory), or None (fp32).
        device: where to put the model (None: stays on the CPU).
        with_tokenizer: also load (and require) the tokenizer; otherwise the second item is None.

    Returns:
        (model in eval mode, tokenizer or None). The tokenizer gets pad_token = eos_token when it has none.

    Raises:
        ModelDirError: missing directory, no config.json, no tokenizer files, or a load that fails.
        ConfigError: an unknown task or dtype, or a config that names no task when `task` is None.
    """
    import transformers

    directory = check_model_dir(path, tokenizer=with_tokenizer)
    task = normalize_task(task)
    torch_dtype = parse_dtype(dtype)
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any failure becomes one clear line
        raise ModelDirError(f"model directory {directory}: config.json could not be read: {_one_line(err)}") from err
    if task is None:
        task = task_from_config(config)
    if task is None:
        raise ConfigError(
            f"model directory {directory}: cannot tell the task from config.json (architectures="
            f"{getattr(config, 'architectures', None)}); pass task='causal-lm' or 'classification'"
        )
    kwargs: dict[str, Any] = {"local_files_only": True}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if task == "classification":
        auto_cls = transformers.AutoModelForSequenceClassification
        if num_labels is not None and num_labels != getattr(config, "num_labels", None):
            kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
    else:
        if num_labels is not None:
            raise ConfigError(f"num_labels={num_labels} only applies to task 'classification', not {task!r}")
        auto_cls = transformers.AutoModelForCausalLM
    try:
        model = auto_cls.from_pretrained(directory, **kwargs)
    except Exception as err:  # noqa: BLE001
        raise ModelDirError(
            f"model directory {directory}: could not load it as a {task} model ({auto_cls.__name__}): {_one_line(err)}"
        ) from err
    tokenizer = load_tokenizer(directory) if with_tokenizer else None
    if device is not None:
        model.to(resolve_device(device))
    model.eval()
    return model, tokenizer


def model_task(model: nn.Module) -> str | None:
    """"causal-lm" or "classification" for a loaded transformers model (from its class name), else None."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "classification"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal-lm"
    return task_from_config(getattr(model, "config", None))


def load_adapters(model: nn.Module, adapter_dirs: Sequence[str | Path]) -> list[str]:
    """Load each adapter directory as "a0", "a1", ... (frozen) and make all of them active (summed).

    Raises:
        AdapterFileError: a directory that does not exist or is not an adapter (and what load_adapter raises).
    """
    from .io import load_adapter
    from .model import set_active

    names = []
    for i, adapter_dir in enumerate(adapter_dirs):
        directory = Path(adapter_dir)
        if not directory.is_dir():
            raise AdapterFileError(f"adapter directory {directory} does not exist")
        name = f"a{i}"
        load_adapter(model, directory, name=name, trainable=False)
        names.append(name)
    if names:
        set_active(model, names)
    return names


# -- merging ---------------------------------------------------------------------------------------------
def _check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"output directory {out} is not empty; pass --force (force=True) to replace it")


def _fsync_tree(directory: Path) -> None:
    for file in directory.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def _replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished directory `tmp` at `out`; an existing `out` is moved aside first and deleted only
    once the new one is in place."""
    backup = None
    if out.is_dir():
        if any(out.iterdir()):
            backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            backup.rmdir()
            os.replace(out, backup)
        else:
            out.rmdir()
    try:
        os.replace(tmp, out)
    except OSError:
        if backup is not None and not out.exists():
            os.replace(backup, out)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def merge_to_dir(
    model_dir: str | Path,
    adapter_dirs: str | Path | Sequence[str | Path],
    out: str | Path,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
) -> Path:
    """Merge adapters into a base model and save a plain transformers model directory (safetensors + config +
    tokenizer) that loads without lorakit and computes what base + adapters compute.

    The base is loaded in fp32, the adapters (several are summed) are merged with merge_and_unload(safe=True),
    and the result is cast to `dtype` ("fp32" / "bf16" / "fp16"; default: the dtype in the base config, fp32 if
    it names none). Everything is written to a temporary directory next to `out`, synced, and renamed to `out`
    at the end: `out` is never left half-written.

    Raises:
        ConfigError: `out` is not empty (and not `force`), or is a file; an unknown dtype.
        ModelDirError / AdapterFileError: bad directories. MergeError: a delta with NaN or inf.
    """
    from .model import merge_and_unload

    dirs = [adapter_dirs] if isinstance(adapter_dirs, (str, Path)) else list(adapter_dirs)
    if not dirs:
        raise ConfigError("merge needs at least one adapter directory")
    out = Path(out)
    _check_out_dir(out, force)
    target = parse_dtype(dtype)
    if target == "auto":
        target = None
    check_model_dir(model_dir)
    for adapter_dir in dirs:
        if not Path(adapter_dir).is_dir():
            raise AdapterFileError(f"adapter directory {adapter_dir} does not exist")
    model, tokenizer = load_model_dir(model_dir, task=adapter_task(dirs[0]), dtype=torch.float32)
    if target is None:
        target = _config_dtype(Path(model_dir))
    load_adapters(model, dirs)
    model = merge_and_unload(model, safe=True)
    model.to(target)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _fsync_tree(tmp)
        _check_out_dir(out, force)  # nothing appeared there meanwhile
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _config_dtype(model_dir: Path) -> torch.dtype:
    """The dtype config.json records ("dtype", or the older "torch_dtype"); fp32 when it names none."""
    with contextlib.suppress(OSError, ValueError):
        data = json.loads((model_dir / "config.json").read_text())
        name = data.get("dtype") or data.get("torch_dtype")
        if isinstance(name, str) and name.lower() in DTYPES:
            return DTYPES[name.lower()]
    return torch.float32


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__
