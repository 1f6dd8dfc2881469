"""lorakit: low-rank adaptation (LoRA and its family) for PyTorch and Hugging Face transformers models."""

from . import mixed as _mixed  # noqa: F401  (registers model(..., adapter_names=...) with model.attach)
from .adapter_steps import training_hooks
from .combine import combine, merge_combination
from .config import LoraConfig
from .errors import (
    AdapterFileError,
    AdapterNameError,
    ConfigError,
    DataError,
    DirectoryLockedError,
    LorakitError,
    MergeError,
    ModelDirError,
    ShapeMismatchError,
    TargetError,
)
from .heap import tune_cpu_allocator
from .integrations import save_pretrained as _save_pretrained  # noqa: F401  (registers save_pretrained likewise)
from .io import load_adapter, save_adapter
from .io.vllm import VllmWarning, check_vllm
from .loading import load_model, load_tokenizer
from .model import (
    active_adapters,
    adapter_names,
    attach,
    check_merge,
    delete_adapter,
    disabled,
    get_config,
    merge,
    merge_and_unload,
    set_active,
    set_trainable,
    trainable_parameters,
    unmerge,
)
from .names import check_adapter_name
from .optim import loraplus_optimizer, loraplus_param_groups
from .quant import NF4Linear, quantize
from .quant.merge import LossyMergeWarning
from .swap import prepare_swap, swap_adapter

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """`lorakit.AdapterCheckpointCallback`, imported on first use (it imports transformers' Trainer machinery)."""
    if name in ("AdapterCheckpointCallback", "AdapterStepCallback"):
        from .integrations import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdapterCheckpointCallback", "AdapterStepCallback", "training_hooks", "AdapterFileError", "AdapterNameError", "ConfigError", "DataError", "LoraConfig", "LorakitError", "MergeError",
    "LossyMergeWarning", "ModelDirError", "NF4Linear", "quantize",
    "ShapeMismatchError", "TargetError", "active_adapters", "adapter_names", "attach", "delete_adapter",
    "disabled", "get_config", "load_adapter", "load_model", "load_tokenizer", "loraplus_optimizer", "loraplus_param_groups", "merge", "merge_and_unload", "save_adapter", "set_active",
    "set_trainable", "trainable_parameters", "unmerge",
    "combine", "merge_combination",
    "prepare_swap", "swap_adapter",
    "VllmWarning", "check_vllm",
    "tune_cpu_allocator",
    "DirectoryLockedError", "check_adapter_name", "check_merge",
]
