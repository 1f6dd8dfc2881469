"""DoRA (Liu et al. 2024, arXiv 2402.09353): LoRA on the direction, a trained magnitude per output row.

    W' = m ⊙ (W0 + s B A) / ||W0 + s B A||_row,    out = c ⊙ (base(x) - b + s B A dropout(x)) + b,  c = m / n

m starts at the row norms of W0 + s B A (= ||W0||_row while B = 0), so training starts at the base model.
The norm n is a constant in backward and is computed from low-rank pieces (ops.dora.dora_norm). PEFT's
file keys: `lora_A.weight`, `lora_B.weight` and `lora_magnitude_vector` (one value per output row;
per embedding dimension for nn.Embedding, per output channel for convolutions).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..layer_kinds import LayerKind
from ..ops.dora import NORM_EPS, dora_linear, dora_merged_weight, dora_norm, row_norms_sq, weight_rows
from .lora import LoraAdapter
from .protocol import Abilities, BaseLayer


class DoraAdapter(LoraAdapter):
    """One DoRA adapter on one layer: `lora_A`, `lora_B` as LoRA, plus `lora_magnitude_vector` m (d,)."""

    name: ClassVar[str] = "dora"
    # the update is not s B A (the magnitude rescales rows): no factor-wise combine / SVD, no stacked mixed batches;
    # add_to_output needs the base layer's own output, not one with adapters added; vLLM has no DoRA
    abilities: ClassVar[Abilities] = Abilities(low_rank=False, mixed_batches=False, vllm=False, needs_base_output=True)
    file_keys: ClassVar[tuple[str, ...]] = (*LoraAdapter.file_keys, "lora_magnitude_vector")

    def __init__(
        self,
        kind: LayerKind,
        base_layer: BaseLayer,
        r: int,
        scale: float,
        dropout: float,
        init: str,
        dtype: torch.dtype,
    ) -> None:
        super().__init__(kind, base_layer, r, scale, dropout, init, dtype)
        self.layout = kind.weight_layout
        self._w0_sq: tuple[Any, torch.Tensor] | None = None  # ((version, data_ptr), ||W0_i||²)
        self._norm_cache: tuple[Any, torch.Tensor] | None = None  # (versions of W0, A, B and s, n): inference only
        self._merged_c: torch.Tensor | None = None  # c at merge time (unmerge divides by it)
        self._merged_rows: tuple[torch.Tensor, torch.Tensor] | None = None  # W0 rows where c was 0
        with torch.no_grad():
            norm = self.norm(base_layer, eps=0.0)  # a zero row gets m = 0 (and c = 0 / eps = 0 in forward)
        self.lora_magnitude_vector = nn.Parameter(norm.to(dtype))

    def __getstate__(self) -> dict[str, Any]:
        """pickle / torch.save / deepcopy: without the norm caches, whose keys are storage addresses and version
        counters of this process's tensors (a copy could match them by chance); recomputed on first use."""
        state = self.__dict__.copy()
        state["_w0_sq"] = state["_norm_cache"] = None
        return state

    def rebase(self, kind: LayerKind) -> None:
        """A new base of the same shape: new layout, and ||W0_i||² is recomputed from it on the next use."""
        super().rebase(kind)
        self.layout = kind.weight_layout
        self._w0_sq = None
        self._norm_cache = None

    # -- the norm n ------------------------------------------------------------------------------------
    def _base_weight(self, base_layer: BaseLayer) -> torch.Tensor:
        """W0: the weight, or for a quantised base (QLoRA) a dequantised copy in the compute dtype (freed after use)."""
        dequantize = self.kind.dequantize
        return base_layer.weight if dequantize is None else dequantize(base_layer, None)

    def _row_norms_sq(self, base_layer: BaseLayer, weight: torch.Tensor) -> torch.Tensor:
        source = weight if self.kind.storage is None else self.kind.storage(base_layer)  # quantised: the codes
        key = (source._version, source.data_ptr(), weight.dtype, weight.device)
        if self._w0_sq is None or self._w0_sq[0] != key:
            self._w0_sq = (key, row_norms_sq(weight, self.layout))
        return self._w0_sq[1]

    def norm(self, base_layer: BaseLayer, eps: float = NORM_EPS) -> torch.Tensor:
        """n = ||W0 + s B A||_row (fp32, no grad, clamped to >= eps), from low-rank pieces.

        Without autograd (inference) n is kept while W0, A, B and s are unchanged (their version counters and
        storage; writes through `.data` are not seen, as for ||W0||²), so repeated forwards of an eval model skip
        its A W0ᵀ GEMM."""
        weight = self._base_weight(base_layer)
        w0_sq = self._row_norms_sq(base_layer, weight)
        if torch.is_grad_enabled() or torch.compiler.is_compiling():  # a compiled graph computes it in place
            return dora_norm(w0_sq, weight, self.layout, self.lora_A, self.lora_B, self.scale, eps)
        a, b = self.lora_A, self.lora_B
        assert self._w0_sq is not None  # set by _row_norms_sq above
        key = (self._w0_sq[0], a._version, a.data_ptr(), b._version, b.data_ptr(), self.scale, eps)
        if self._norm_cache is None or self._norm_cache[0] != key:
            self._norm_cache = (key, dora_norm(w0_sq, weight, self.layout, a, b, self.scale, eps))
        return self._norm_cache[1]

    def _channel_view(self, c: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """c shaped to broadcast over `out`: along the last axis, or axis 1 for convolutions."""
        if self.kind.channel_axis == 1:
            return c.view(1, -1, *([1] * (out.dim() - 2)))
        return c

    # -- forward -----------------------------------------------------------------------------------------
    def fused_forward(self, base_layer: BaseLayer, x: torch.Tensor) -> torch.Tensor | None:
        """The whole DoRA Linear / GPT-2 Conv1D layer in one op (ops.dora.dora_linear); None elsewhere."""
        if self.kind.fused is None or not self.kind.is_linear or type(base_layer) not in _FUSABLE:
            return None
        p = self.dropout if self.training else 0.0
        return dora_linear(
            x, base_layer.weight, base_layer.bias, self.lora_A, self.lora_B, self.lora_magnitude_vector,
            self.norm(base_layer), self.scale, p, transposed=self.layout == "kd",
        )

    def add_to_output(
        self, base_layer: BaseLayer, x: torch.Tensor, out: torch.Tensor, base_out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """out + (c - 1) ⊙ (base(x) - b) + c ⊙ s B A dropout(x), PEFT's formula; base_out defaults to out."""
        base_out = out if base_out is None else base_out
        p = self.dropout if self.training else 0.0
        lora = self.kind.add_delta(base_layer, x, torch.zeros_like(out), self.lora_A, self.lora_B, self.scale, p)
        c = self._channel_view(self.lora_magnitude_vector / self.norm(base_layer), out)
        bias = getattr(base_layer, "bias", None) if not self.kind.lookup else None
        pure = base_out if bias is None else base_out - self._channel_view(bias, out)
        return (out + (c - 1) * pure + c * lora).to(out.dtype)

    # -- merging -----------------------------------------------------------------------------------------
    def delta_weight(self, base_layer: BaseLayer) -> torch.Tensor:
        """W' - W0 in fp32 and the weight's layout, W' = c ⊙_row (W0 + s B A)."""
        weight = self._base_weight(base_layer)
        merged, _ = dora_merged_weight(weight, self.layout, super().delta_weight(base_layer), self.lora_magnitude_vector)
        return merged - weight.float()

    @torch.no_grad()
    def merge_into(self, base_layer: BaseLayer) -> None:
        """W0 <- W' (fp32 arithmetic, cast to the weight's dtype); remembers c so that unmerge can undo it."""
        weight = base_layer.weight
        merged, c = dora_merged_weight(weight, self.layout, super().delta_weight(base_layer), self.lora_magnitude_vector)
        zero = (c == 0).nonzero().flatten()
        self._merged_rows = (zero, weight_rows(weight, self.layout)[zero].clone()) if zero.numel() else None
        self._merged_c = c
        weight.copy_(merged)

    @torch.no_grad()
    def unmerge_from(self, base_layer: BaseLayer) -> None:
        """W0 = W' / c - s B A, row by row (rows with c = 0 are restored from the copy kept at merge)."""
        weight = base_layer.weight
        c = self._merged_c
        if c is None:
            raise RuntimeError(f"DoRA unmerge_from on {self.kind.name}: the adapter was not merged (no merge_into)")
        rows = weight_rows(weight.float(), self.layout) / c.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
        restored = rows - weight_rows(super().delta_weight(base_layer), self.layout)
        if self._merged_rows is not None:
            zero, original = self._merged_rows
            restored[zero] = original.float()
        weight.copy_(restored.t() if self.layout == "kd" else restored.view(weight.shape))
        self._merged_c = self._merged_rows = None

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """LoRA's keys plus `lora_magnitude_vector` ((d,); PEFT stores a convolution's as (1, d, 1, ...))."""
        mag: torch.Tensor = self.lora_magnitude_vector
        if self.kind.channel_axis == 1:
            mag = mag.view(1, -1, *([1] * (self.lora_A.dim() - 2)))
        return {**super().peft_tensors(), "lora_magnitude_vector": mag}

    @torch.no_grad()
    def reset_extras(self, base_layer: BaseLayer) -> None:
        """m = ||W0||_row: with B = 0 the adapter is the base layer (lorakit.swap, for a module a file lacks)."""
        self.lora_magnitude_vector.copy_(self.norm(base_layer, eps=0.0))

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """LoRA's groups, and the magnitude m in "other"."""
        return {**super().param_groups(), "other": [self.lora_magnitude_vector]}

    def extra_repr(self) -> str:
        return "dora, " + super().extra_repr()


_FUSABLE: tuple[type, ...] = (nn.Linear,)
try:
    from transformers.pytorch_utils import Conv1D as _HFConv1D

    _FUSABLE = (nn.Linear, _HFConv1D)
except ImportError:  # pragma: no cover
    pass
