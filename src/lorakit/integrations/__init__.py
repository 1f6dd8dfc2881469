"""lorakit inside the Hugging Face ecosystem: save_pretrained on a model with adapters (PEFT's layout), and the
Trainer callback that makes adapter-only checkpoints resumable (imported on first use: it needs transformers)."""

from __future__ import annotations

from typing import Any

from .save_pretrained import AdapterSavePretrained, trainable_state

__all__ = ["AdapterCheckpointCallback", "AdapterSavePretrained", "trainable_state"]


def __getattr__(name: str) -> Any:
    if name == "AdapterCheckpointCallback":
        from .trainer import AdapterCheckpointCallback

        return AdapterCheckpointCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
