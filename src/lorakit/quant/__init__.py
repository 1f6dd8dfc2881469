"""Quantised base weights for QLoRA: NF4 storage (pure PyTorch, bit-compatible with bitsandbytes) and NF4Linear."""

from . import kinds as _kinds  # noqa: F401  (registers the quantised layer kinds in lorakit.layer_kinds)
from .linear import NF4Linear, check_compute_dtype, quantize
from .nf4 import (
    DYNAMIC_CODE,
    NF4_CODEBOOK,
    NF4State,
    dequantize_blockwise_8bit,
    dequantize_nf4,
    dynamic_map,
    quantize_blockwise_8bit,
    quantize_nf4,
)

__all__ = [
    "DYNAMIC_CODE", "NF4_CODEBOOK", "NF4Linear", "NF4State", "check_compute_dtype", "dequantize_blockwise_8bit",
    "dequantize_nf4", "dynamic_map", "quantize", "quantize_blockwise_8bit", "quantize_nf4",
]
