"""Hugging Face model directories: load a model + tokenizer (through lorakit.loading: a directory or a model ID),
and merge adapters into a model that plain transformers loads (text generation with adapters: lorakit.generation).

    load_model_dir(path, task=None, ...)   -> (model, tokenizer)   the training loop and the CLI use it
    load_adapters(model, dirs)             -> ["a0", "a1", ...]    several adapters, all active (summed)
    merge_to_dir(model_dir, adapter_dirs, out, dtype=...) -> Path  base + adapters -> merged model directory
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import AdapterFileError, ConfigError, MergeError, ModelDirError  # noqa: F401 - ModelDirError: re-exported
from .io.publish import publishing
from .loading.hub import resolve_model
from .loading.load import load_model, load_tokenizer
from .loading.options import (  # noqa: F401 - re-exported: lorakit.hf is where the CLI and tests find them
    DTYPES,
    TASKS,
    TOKENIZER_FILES,
    adapter_task,
    check_model_dir,
    checkpoint_dtype,
    model_dir_task,
    normalize_task,
    parse_dtype,
    resolve_device,
    task_from_config,
)
from .names import check_out_not_input


def load_model_dir(
    path: str | Path,
    task: str | None = None,
    num_labels: int | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    with_tokenizer: bool = True,
    quantize: str | None = None,
) -> tuple[nn.Module, Any]:
    """A model and its tokenizer from a local Hugging Face directory or a model ID (lorakit.load_model).

    Args:
        path: the directory (config.json, weights, tokenizer files), or a model ID `org/name[@revision]`.
        task: "causal-lm" | "classification" (PEFT's "CAUSAL_LM" / "SEQ_CLS" also accepted), or None / "auto":
            from the config's `architectures`. Pass an adapter's task_type (`adapter_task(dir)`) to follow it.
        num_labels: classification only: the number of labels (a head of another size is created anew).
        dtype: torch dtype, "fp32" / "bf16" / "fp16", or "auto" / None (the checkpoint's own dtype).
        device: where to put the model (None: the CPU; "auto": CUDA when available).
        with_tokenizer: also load (and require) the tokenizer; otherwise the second item is None.
        quantize: None or "nf4" (QLoRA base, quantised while it is read).

    Returns:
        (model in eval mode, tokenizer or None). The tokenizer gets pad_token = eos_token when it has none.

    Raises:
        ModelDirError: missing directory or ID, no config.json, no tokenizer files, or a load that fails.
        ConfigError: an unknown task or dtype, or a config that names no task when `task` is None.
    """
    directory = check_model_dir(resolve_model(path), tokenizer=with_tokenizer)
    model = load_model(directory, dtype=dtype, quantize=quantize, device=device, task=normalize_task(task) or "auto",
                       num_labels=num_labels)
    tokenizer = load_tokenizer(directory) if with_tokenizer else None
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


def _check_merged_finite(model: nn.Module, dtype: torch.dtype) -> None:
    """Raise MergeError naming the first floating tensor of the merged `model` with NaN or inf (after the cast)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise MergeError(f"the merged model's {name!r} has {bad} value(s) that are inf or NaN in "
                             f"{str(dtype).removeprefix('torch.')}; nothing written")


def merge_to_dir(
    model_dir: str | Path,
    adapter_dirs: str | Path | Sequence[str | Path],
    out: str | Path,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    quantize: str | None = None,
) -> Path:
    """Merge adapters into a base model and save a plain transformers model directory (safetensors + config +
    tokenizer) that loads without lorakit and computes what base + adapters compute.

    The base is loaded in fp32, the adapters (several are summed) are merged with merge_and_unload(safe=True),
    and the result is cast to `dtype` ("fp32" / "bf16" / "fp16"; default: the dtype in the base config, fp32 if
    it names none). With `quantize="nf4"` the base is loaded in NF4 and the adapters are merged into its
    dequantised weights: the weights a QLoRA adapter was trained against. Everything is written to a temporary
    directory next to `out`, synced, and swapped in with one rename (io.publish): a kill at any instant leaves the
    old `out` or the new one, whole. Another process writing `out` meanwhile is refused (io.lock).

    Raises:
        ConfigError: `out` is not empty (and not `force`), or is a file; an unknown dtype.
        DirectoryLockedError: another live process is writing `out` (its lock file and pid are named).
        ConfigError: `out` is, contains or lies inside the model directory or an adapter directory.
        ModelDirError / AdapterFileError: bad directories. MergeError: a delta with NaN or inf, or a merged weight
            that is inf or NaN in the output dtype (fp16 overflows above 65504); nothing is written then.
    """
    from .model import check_merge, merge_and_unload

    dirs = [adapter_dirs] if isinstance(adapter_dirs, (str, Path)) else list(adapter_dirs)
    if not dirs:
        raise ConfigError("merge needs at least one adapter directory")
    out = Path(out)
    _check_out_dir(out, force)
    target = parse_dtype(dtype)
    if target == "auto":
        target = None
    model_dir = check_model_dir(resolve_model(model_dir))
    for adapter_dir in dirs:
        if not Path(adapter_dir).is_dir():
            raise AdapterFileError(f"adapter directory {adapter_dir} does not exist")
    check_out_not_input(out, [("--model", model_dir), *(("--adapter", d) for d in dirs)])  # before loading
    model, tokenizer = load_model_dir(model_dir, task=adapter_task(dirs[0]), dtype=torch.float32, quantize=quantize)
    if target is None:
        target = checkpoint_dtype(model_dir)
    load_adapters(model, dirs)
    if quantize is None:
        check_merge(model, dtype=target)  # W0 + ΔW finite in the dtype written (fp16: |w| <= 65504), before merging
    model = merge_and_unload(model, safe=True)
    model.to(target)
    _check_merged_finite(model, target)  # whatever else the cast made inf / NaN (quantised bases, the other weights)
    # one rename publishes the whole directory (io.publish: a kill leaves the old `out` or the new one, whole);
    # out's lock (io.lock) refuses a second writer; no file of an old `out` is carried into the merged model
    with publishing(out, carry=False, lock=True, purpose="lorakit merge") as tmp:
        _check_out_dir(out, force)  # under the lock: nothing appeared there meanwhile
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


