"""Variant registry: one file per variant, registered once; the contract tests run over every entry.

A variant is an nn.Module holding one adapter's tensors for one layer, with:
  add_to_output(base_layer, x, out) -> out + the adapter's contribution (`needs_base_output` variants also
      get base_out=, the base layer's own output)
  fused_forward(base_layer, x) -> the whole adapted layer in one op, or None
  delta_weight(base_layer) -> W' - W0 in the base weight's layout, fp32
  merge_into(base_layer) / unmerge_from(base_layer) -> write W' into the weight / restore W0
  peft_tensors() -> {PEFT key suffix: tensor}, what goes into / comes out of adapter files
"""

from __future__ import annotations

from ..config import LoraConfig
from .dora import DoraAdapter
from .lora import LoraAdapter

VARIANTS: dict[str, type[LoraAdapter]] = {"lora": LoraAdapter, "dora": DoraAdapter}


def variant_for(config: LoraConfig) -> type[LoraAdapter]:
    """The adapter class for `config` (`config.variant`: "dora" with use_dora=True, else "lora")."""
    return VARIANTS[config.variant]


__all__ = ["VARIANTS", "DoraAdapter", "LoraAdapter", "variant_for"]
