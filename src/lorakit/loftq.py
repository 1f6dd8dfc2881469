"""LoftQ at attach (`LoraConfig(init="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": n})`): A, B and an NF4 W0.

    attach:  W0 ──► (Q, A, B) = ops.loftq.loftq_factors(W0, r, s, n, NF4 round trip)
             base.weight <- Q (dequantised, in the weight's dtype),  lora_A <- A,  lora_B <- B
    then:    lorakit.quantize(model, double_quant=False) stores each Q as NF4Linear with no further error

As PEFT's `init_lora_weights="loftq"`, the base keeps the dequantised Q as a float weight (the saved base of a
LoftQ run is that model), quantised in 64-blocks with fp32 block scales (bitsandbytes' `compress_statistics=False`,
PEFT's choice), so that re-quantising Q gives the same codes and scales bit for bit. Linear and GPT-2 Conv1D layers
of a full-precision model (refusals: lorakit.residual.check_residual_targets); Q is blocked in the stored layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from .ops.loftq import loftq_factors
from .quant.nf4 import dequantize_nf4, quantize_nf4

if TYPE_CHECKING:
    from .config import LoraConfig
    from .variants.lora import LoraAdapter

LOFTQ_BLOCKSIZE = 64  # bitsandbytes' default for 4-bit, as PEFT's loftq_init uses


def nf4_round_trip(weight: torch.Tensor, blocksize: int = LOFTQ_BLOCKSIZE) -> torch.Tensor:
    """dequantise(quantise_nf4(W)) in fp32, fp32 block scales (no double quantisation): LoftQ's q(W)."""
    return dequantize_nf4(quantize_nf4(weight.float(), blocksize, double_quant=False), torch.float32)


def _in_stored_layout(
    to_layout: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """q acting on a (d, k) matrix but blocking it as the layer stores it ((k, d) for GPT-2's Conv1D); `to_layout`
    is the kind's to_weight_layout, its own inverse on the kinds LoftQ takes (identity or a transpose)."""
    return lambda m: to_layout(nf4_round_trip(to_layout(m).contiguous()))


@torch.no_grad()
def apply_loftq_init(base_layer: nn.Module, adapter: LoraAdapter, config: LoraConfig) -> None:
    """Set `adapter`'s A, B by LoftQ from `base_layer`'s weight W0 and leave the dequantised NF4 Q in the weight.

    Computed in fp32; A and B are stored in the adapter's dtype and Q in the weight's dtype.
    """
    kind = adapter.kind
    weight = base_layer.weight
    assert isinstance(weight, torch.Tensor)  # Linear / GPT-2 Conv1D (check_residual_targets refused the rest)
    w0 = kind.to_weight_layout(weight.detach()).float()  # (d, k)
    iters = config.loftq_config["loftq_iter"]
    q, lora_A, lora_B = loftq_factors(w0, adapter.r, adapter.scale, iters, _in_stored_layout(kind.to_weight_layout))
    adapter.lora_A.copy_(lora_A)
    adapter.lora_B.copy_(lora_B)
    weight.copy_(kind.to_weight_layout(q))
    adapter.reset_extras(base_layer)  # DoRA: m = ||Q + s B A||_row, so the layer starts at Q + s B A (as PEFT)


__all__ = ["LOFTQ_BLOCKSIZE", "apply_loftq_init", "nf4_round_trip"]
