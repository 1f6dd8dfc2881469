"""Adapter files in PEFT's format (adapter_config.json + adapter_model.safetensors), both ways."""

from .peft import load_adapter, save_adapter

__all__ = ["load_adapter", "save_adapter"]
