"""Plain LoRA (Hu et al. 2021, arXiv 2106.09685): the adapter holds A (r, k) and B (d, r); B starts at zero.

    out = base(x) + s · B A dropout(x),    ΔW = s · B A  (merged into W0 by `merge`)
"""

from __future__ import annotations

import torch
from torch import nn

from ..layer_kinds import LayerKind
from ..ops.lora import init_lora_A, lora_delta_weight


@torch.no_grad()
def add_into(weight: torch.Tensor, delta: torch.Tensor, sign: float) -> None:
    """weight += sign · delta, the sum taken in fp32 (in place for an fp32 weight), cast to the weight's dtype."""
    if weight.dtype == delta.dtype:
        weight.add_(delta, alpha=sign)
    else:
        weight.copy_(weight.float().add_(delta, alpha=sign))


class LoraAdapter(nn.Module):
    """One LoRA adapter on one layer: parameters `lora_A`, `lora_B`; scale s and dropout p."""

    needs_base_output = False  # add_to_output works on any running sum (it adds s B A dropout(x) in place)
    swap_slot = None  # lorakit.swap.SwapSlot once padded / swapped: the true rank and the gain folded into B

    def __init__(
        self,
        kind: LayerKind,
        base_layer: nn.Module,
        r: int,
        scale: float,
        dropout: float,
        init: str,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        shape_a, shape_b = kind.shapes(base_layer, r)
        device = base_layer.weight.device
        self.kind = kind
        self.r = r
        self.scale = scale
        self.dropout = dropout if kind.uses_dropout else 0.0
        self.lora_A = nn.Parameter(torch.empty(shape_a, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(shape_b, dtype=dtype, device=device))
        if kind.name == "embedding":  # PEFT: embedding A starts at zero, B random (normal), same zero delta
            nn.init.normal_(self.lora_B)
            with torch.no_grad():
                self.lora_A.zero_()
        else:
            init_lora_A(self.lora_A, init, r)
        if init == "random":  # B random too: a non-zero start, for tests of the math
            with torch.no_grad():
                init_lora_A(self.lora_A, "kaiming", r)
                self.lora_B.normal_(0.0, 0.02)

    def add_to_output(self, base_layer: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out + s · B A dropout(x); dropout only in training mode."""
        p = self.dropout if self.training else 0.0
        return self.kind.add_delta(base_layer, x, out, self.lora_A, self.lora_B, self.scale, p)

    def fused_forward(self, base_layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """base(x) + this adapter in one op where the layer kind has one; None otherwise."""
        if self.kind.fused is None:
            return None
        p = self.dropout if self.training else 0.0
        return self.kind.fused(base_layer, x, self.lora_A, self.lora_B, self.scale, p)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        """s · B A in fp32, in the layout of `base_layer.weight`."""
        return self.kind.to_weight_layout(lora_delta_weight(self.lora_A, self.lora_B, self.scale))

    def rebase(self, kind: LayerKind) -> None:
        """The base layer was replaced by one of another kind with the same shape (e.g. quantised to NF4)."""
        self.kind = kind

    def merge_into(self, base_layer: nn.Module) -> None:
        """W0 += ΔW (the sum in fp32, cast to the weight's dtype)."""
        add_into(base_layer.weight, self.delta_weight(base_layer), 1.0)

    def unmerge_from(self, base_layer: nn.Module) -> None:
        """W0 -= ΔW, undoing merge_into."""
        add_into(base_layer.weight, self.delta_weight(base_layer), -1.0)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """This adapter's tensors under PEFT's key suffixes (after lorakit.swap: the true rank, B / gain)."""
        key_a, key_b = self.kind.peft_keys
        lora_A, lora_B, slot = self.lora_A, self.lora_B, self.swap_slot
        if slot is not None:  # zero-padded to a declared max rank, the scale ratio folded into B (see swap.py)
            lora_A, lora_B = lora_A[: slot.rank], lora_B[:, : slot.rank]
            lora_B = lora_B if slot.gain == 1.0 else lora_B / slot.gain
        return {key_a: lora_A, key_b: lora_B}

    def extra_repr(self) -> str:
        return f"kind={self.kind.name}, r={self.r}, scale={self.scale:g}, dropout={self.dropout:g}"
