"""Variant registry: one file per variant, registered once; the contract tests run over every entry.

A variant is an nn.Module holding one adapter's tensors for one layer, with:
  add_to_output(base_layer, x, out) -> out + the adapter's contribution
  delta_weight(base_layer) -> ΔW in the base weight's layout, fp32 (merge adds it, unmerge subtracts it)
  peft_tensors() -> {PEFT key suffix: tensor}, what goes into / comes out of adapter files
"""

from __future__ import annotations

from ..config import LoraConfig
from .lora import LoraAdapter

VARIANTS: dict[str, type[LoraAdapter]] = {"lora": LoraAdapter}


def variant_for(config: LoraConfig) -> type[LoraAdapter]:
    """The adapter class for `config` (plain LoRA until other variants register here)."""
    return VARIANTS["lora"]


__all__ = ["VARIANTS", "LoraAdapter", "variant_for"]
