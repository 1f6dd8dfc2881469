"""The quantised layer kinds, registered into lorakit.layer_kinds from here (the registry imports nothing of
lorakit.quant): lorakit's NF4Linear, and bitsandbytes' Linear4bit once bitsandbytes is imported.

Both have LINEAR's adapter geometry, a way to read the weight back (dequantize), the tensor holding the codes
(storage), how to re-quantise a merged weight (requantize) and the LoraLayer merge / unmerge by re-quantising.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import torch

from ..layer_kinds import LAYER_KINDS, LINEAR, BaseLayer, register_finder, register_kind, weight_dtype
from ..ops.lora import lora_linear
from .linear import NF4Linear
from .merge import merge_requantized, requantize_bnb, requantize_nf4, unmerge_requantized

Tensor = torch.Tensor


def _nf4_fused(base: BaseLayer, x: Tensor, a: Tensor, b: Tensor, s: float, p: float) -> Tensor | None:
    if type(base) is not NF4Linear:
        return None
    bias = None if base.bias is None else base.bias.to(base.compute_dtype)
    return lora_linear(x, base.dequantize, bias, a, b, s, p, weight_dtype=base.compute_dtype)


# NF4Linear has a fused op (W0 dequantised in forward and again in backward)
NF4_LINEAR = register_kind(NF4Linear, replace(
    LINEAR,
    name="nf4_linear",
    fused=_nf4_fused,
    dequantize=lambda m, dtype: m.dequantize(dtype),
    storage=lambda m: m.packed,
    requantize=requantize_nf4,
    merge_adapters=merge_requantized,
    unmerge_adapters=unmerge_requantized,
))


def _bnb_dequantize(module: BaseLayer, dtype: torch.dtype | None) -> Tensor:
    """bitsandbytes Linear4bit's weight (d, k), dequantised by bitsandbytes itself (what its forward multiplies by)."""
    import bitsandbytes.functional as bnb_f

    param = module.weight
    if getattr(param.quant_state, "packing_format_for_cpu", False):  # set by an eval-mode forward on an AVX512 CPU
        param.data, param.quant_state = bnb_f._convert_weight_packed_for_cpu_inverse(param.data, param.quant_state)
    weight = bnb_f.dequantize_4bit(param.data, param.quant_state)
    return weight.to(dtype or weight_dtype(module))


# bitsandbytes' Linear4bit runs its own forward, then the adapter
BNB_LINEAR4BIT = register_kind(None, replace(
    LINEAR,
    name="bnb_linear4bit",
    fused=None,
    dequantize=_bnb_dequantize,
    storage=lambda m: m.weight,
    requantize=requantize_bnb,
    merge_adapters=merge_requantized,
    unmerge_adapters=unmerge_requantized,
))


def _find_bitsandbytes() -> None:
    """Register bitsandbytes' Linear4bit once bitsandbytes is imported (a model holding one has imported it).

    lorakit never imports bitsandbytes itself; Linear4bit subclasses nn.Linear, so it must be known before a
    lookup would take it for a plain Linear."""
    bnb = sys.modules.get("bitsandbytes")
    linear4bit = getattr(getattr(bnb, "nn", None), "Linear4bit", None)
    if linear4bit is not None and linear4bit not in LAYER_KINDS:
        register_kind(linear4bit, BNB_LINEAR4BIT)


register_finder(_find_bitsandbytes)

__all__ = ["BNB_LINEAR4BIT", "NF4_LINEAR"]
