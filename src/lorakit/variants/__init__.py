"""Variant registry: one file per variant, registered once here; the contract tests run over every entry.

The protocol every variant declares and implements is lorakit.variants.protocol (Abilities, Option, Adapter);
the registry is lorakit.variants.registry. A variant is an nn.Module holding one adapter's tensors for one layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .adalora import AdaloraAdapter
from .delta_lora import DeltaLoraAdapter
from .dora import DoraAdapter
from .lora import LoraAdapter
from .protocol import Abilities, Adapter, Option, TrainingHook, VariantClass
from .registry import VARIANTS, register_variant, variant_named, variants_for_peft_type
from .vera import VeraAdapter

if TYPE_CHECKING:
    from ..config import LoraConfig

register_variant(LoraAdapter)
register_variant(DoraAdapter)
register_variant(VeraAdapter)
register_variant(DeltaLoraAdapter)
register_variant(AdaloraAdapter)


def variant_for(config: LoraConfig) -> VariantClass:
    """The adapter class `config` builds (`config.method`: "lora", "dora" with use_dora=True, ...)."""
    return variant_named(config.method)


__all__ = ["VARIANTS", "Abilities", "Adapter", "DoraAdapter", "LoraAdapter", "Option", "TrainingHook",
           "VariantClass", "register_variant", "variant_for", "variant_named", "variants_for_peft_type"]
