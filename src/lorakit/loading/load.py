"""`lorakit.load_model` and `lorakit.load_tokenizer`: one way in for every command. A local directory or a
Hugging Face model ID, the checkpoint's own dtype by default (transformers' `dtype="auto"`), and QLoRA's NF4
base read straight from the safetensors files, one tensor at a time, with no full-precision copy of the model.

    model = lorakit.load_model("org/name@rev", quantize="nf4")        # NF4 linears, the rest in bf16
    tokenizer = lorakit.load_tokenizer("org/name@rev")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ModelDirError
from .hub import parse_model_id, resolve_model
from .options import (
    HEAD_NAMES,
    check_model_dir,
    checkpoint_dtype,
    declared_vocab_size,
    normalize_task,
    one_line,
    parse_dtype,
    resolve_device,
    task_from_config,
)

QUANTIZE = ("nf4",)


def load_tokenizer(name_or_path: str | Path) -> Any:
    """The tokenizer of a model directory or model ID; pad_token = eos_token when it has none.

    Raises:
        ModelDirError: no such directory / ID, no tokenizer files, a tokenizer that fails to load, or one with
            more tokens than config.json's vocab_size (ids the model cannot embed).
    """
    import transformers

    directory = check_model_dir(resolve_model(name_or_path))
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any failure becomes one clear line
        raise ModelDirError(f"model {name_or_path}: the tokenizer could not be loaded: {one_line(err)}") from err
    declared = declared_vocab_size(directory)
    if declared is not None and len(tokenizer) > declared:
        raise ModelDirError(f"model {name_or_path}: the tokenizer has {len(tokenizer)} tokens but config.json's "
                            f"vocab_size is {declared}: token ids >= {declared} have no embedding; resize the "
                            f"model's embeddings (model.resize_token_embeddings(len(tokenizer))) and save it again")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | Path,
    *,
    dtype: str | torch.dtype | None = "auto",
    quantize: str | None = None,
    device: str | torch.device | None = "auto",
    task: str | None = "causal-lm",
    num_labels: int | None = None,
    compute_dtype: str | torch.dtype | None = None,
) -> nn.Module:
    """Load a transformers model for fine-tuning with lorakit (eval mode, every parameter frozen or not as
    transformers leaves it; attach adapters next).

    Args:
        name_or_path: a local model directory, or a Hugging Face model ID `org/name[@revision]`, looked up in
            the Hugging Face cache (`HF_HUB_CACHE` / `HF_HOME`) and downloaded when not there and the network
            allows (`HF_HUB_OFFLINE=1`: never).
        dtype: "auto" (the checkpoint's own dtype, from config.json or else its weights: a bf16 checkpoint
            stays bf16), "fp32" / "bf16" / "fp16" or a torch.dtype. With quantize: the dtype of everything
            that is not quantised (embeddings, norms, heads).
        quantize: None, or "nf4": every Linear except the output and classification heads is stored in 4-bit
            NormalFloat (QLoRA) as it is read from the safetensors files, so loading never holds the model in
            full precision (peak: about the NF4 model plus one tensor).
        device: "auto" (CUDA when available, else the CPU), "cpu", "cuda", "cuda:1", or a torch.device.
        task: "causal-lm" (default), "classification", or "auto" / None (from config.json's architectures).
        num_labels: classification: the number of labels (a head of another size is created anew).
        compute_dtype: quantize only: the dtype NF4 layers compute in (default: `dtype` as resolved).

    Returns:
        The model, in eval mode, on `device`.

    Raises:
        ModelDirError: no such directory or model ID (the ID and the cache searched are named), no
            config.json, or a checkpoint that does not load.
        ConfigError: an unknown dtype, quantize, task or device; num_labels for a causal LM.
    """
    import transformers

    if quantize is not None and quantize not in QUANTIZE:
        raise ConfigError(f"load_model: unknown quantize {quantize!r}; expected None or one of: {', '.join(QUANTIZE)}")
    directory = check_model_dir(resolve_model(name_or_path), tokenizer=False)
    target = torch.device("cpu") if device is None else resolve_device(device)
    torch_dtype = parse_dtype(dtype)
    if torch_dtype in (None, "auto"):
        torch_dtype = checkpoint_dtype(directory)
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as err:  # noqa: BLE001
        raise ModelDirError(f"model {name_or_path}: config.json could not be read: {one_line(err)}") from err
    task = normalize_task(task) or task_from_config(config)
    if task is None:
        raise ConfigError(f"model {name_or_path}: cannot tell the task from config.json (architectures="
                          f"{getattr(config, 'architectures', None)}); pass task='causal-lm' or 'classification'")
    auto_cls, kwargs = _auto_class(task, config, num_labels)
    if quantize == "nf4":
        model = _load_nf4(directory, auto_cls, config, torch_dtype, compute_dtype, target, name_or_path)
    else:
        if compute_dtype is not None:
            raise ConfigError("load_model: compute_dtype applies only with quantize='nf4'")
        if target.type != "cpu":
            kwargs["device_map"] = {"": str(target)}  # straight to the device, no copy on the CPU first
        try:
            model = auto_cls.from_pretrained(directory, local_files_only=True, dtype=torch_dtype, **kwargs)
        except Exception as err:  # noqa: BLE001
            raise ModelDirError(f"model {name_or_path}: could not load it as a {task} model ({auto_cls.__name__}) "
                                f"from {directory}: {one_line(err)}") from err
    if not Path(name_or_path).expanduser().exists():  # loaded by model ID: adapters name the ID, as from the hub
        model.config._name_or_path = model.name_or_path = parse_model_id(str(name_or_path)).repo_id
    model.eval()
    return model


def _auto_class(task: str, config: Any, num_labels: int | None) -> tuple[Any, dict[str, Any]]:
    """The transformers Auto class of `task`, and the keyword arguments a new head size needs."""
    import transformers

    if task == "classification":
        kwargs: dict[str, Any] = {}
        if num_labels is not None and num_labels != getattr(config, "num_labels", None):
            config.num_labels = num_labels  # the streaming loader builds from this config
            kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
        return transformers.AutoModelForSequenceClassification, kwargs
    if num_labels is not None:
        raise ConfigError(f"num_labels={num_labels} only applies to task 'classification', not {task!r}")
    return transformers.AutoModelForCausalLM, {}


def _load_nf4(directory: Path, auto_cls: Any, config: Any, dtype: torch.dtype,
              compute_dtype: str | torch.dtype | None, device: torch.device, name: Any) -> nn.Module:
    """QLoRA's base: NF4 linears quantised while the checkpoint is read (lorakit.loading.stream)."""
    from ..quant.linear import check_compute_dtype
    from .stream import load_nf4_streaming

    compute = parse_dtype(compute_dtype) if compute_dtype is not None else dtype
    if not isinstance(compute, torch.dtype):
        raise ConfigError(f"load_model: compute_dtype must be fp32, bf16 or fp16; got {compute_dtype!r}")
    check_compute_dtype(compute, device)
    heads = _head_names(auto_cls, config)

    def skip(path: str) -> bool:  # the output head and a classification head stay in `dtype`
        return path in heads or path.rpartition(".")[2] in HEAD_NAMES

    try:
        return load_nf4_streaming(directory, auto_cls, config, dtype=dtype, compute_dtype=compute,
                                  device=device, skip=skip)
    except (ModelDirError, ConfigError):
        raise
    except Exception as err:  # noqa: BLE001
        raise ModelDirError(f"model {name}: could not load it in NF4 from {directory}: {one_line(err)}") from err


def _head_names(auto_cls: Any, config: Any) -> set[str]:
    """Paths of the model's output head, from a skeleton that holds no memory."""
    from accelerate import init_empty_weights

    from ..targeting import output_head_names

    with init_empty_weights(include_buffers=True):
        skeleton = auto_cls.from_config(config)
    return output_head_names(skeleton)
