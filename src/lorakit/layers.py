"""Wrappers that replace a module of the model: LoraLayer (named adapters on one base layer) and
SavedModule (PEFT's modules_to_save: a fully trainable copy per adapter, the original kept frozen).

Both forward unknown attributes (`weight`, `in_features`, ...) to the wrapped module, so code that reads
`model.q_proj.weight` keeps working.
"""

from __future__ import annotations

import copy
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from .errors import MergeError
from .layer_kinds import BaseLayer, LayerKind

# The per-row adapter choice of the mixed-batch forward running in this thread (or asyncio task), or None:
# lorakit.mixed sets it for one forward of one model. A context variable, not an attribute of the layers, so
# that forwards running at the same time in other threads never see it.
ROUTING: ContextVar[Any] = ContextVar("lorakit_mixed_routing", default=None)
MIXED_STACK = "_lorakit_mixed_stack"  # LoraLayer.__dict__ key of lorakit.mixed's stack cache (never pickled)


class _Wrapper(nn.Module):
    """Forward attribute lookups the wrapper does not have to the wrapped module."""

    _wrapped_attr = "base_layer"

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == self._wrapped_attr:
                raise
            return getattr(super().__getattr__(self._wrapped_attr), name)


def nonfinite_after_cast(weight: torch.Tensor, dtype: torch.dtype) -> int:
    """How many entries of `weight` are NaN or ±inf once cast to the floating dtype `dtype` (fp16 overflows to inf
    above 65504, bf16 above about 3.4e38)."""
    return int((~torch.isfinite(weight.to(dtype))).sum())


class LoraLayer(_Wrapper):
    """A base layer plus any number of named adapters; active ones are summed into its output.

    forward: out = base(x) + sum over active, unmerged adapters a of a's contribution.
    """

    base_layer: BaseLayer  # the wrapped module (its weight / bias are read as tensors: layer_kinds.BaseLayer)

    def __init__(self, base_layer: nn.Module, kind: LayerKind, path: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.kind = kind
        self.path = path  # the module's name in the model, for messages
        self.active: list[str] = []  # adapters applied in forward (those of the model's active set held here)
        self.merged: list[str] = []  # adapters currently added into base_layer.weight
        self.disabled = False

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        routing = ROUTING.get()
        if routing is not None and id(self) in routing.layer_ids:  # a mixed batch: each row its own adapter
            return routing.forward(self, x, *args, **kwargs)
        pending = [name for name in self.active if name not in self.merged]
        base = self.base_layer
        if len(pending) == 1 and not args and not kwargs and not base._forward_hooks and not base._forward_pre_hooks:
            out = self.adapters[pending[0]].fused_forward(base, x)  # base + adapter in one op, where it applies
            if out is not None:
                return out
        out = base(x, *args, **kwargs)
        adapters = [self.adapters[name] for name in pending]
        base_out = None
        if any(a.needs_base_output for a in adapters):  # DoRA rescales the base output itself
            base_out = out.clone() if len(adapters) > 1 else out  # others add into `out` in place
        for adapter in adapters:
            if adapter.needs_base_output:
                out = adapter.add_to_output(base, x, out, base_out=base_out)
            else:
                out = adapter.add_to_output(base, x, out)
        return out

    def __getstate__(self) -> dict[str, Any]:
        """pickle / torch.save / deepcopy: the layer without lorakit.mixed's stack cache (rebuilt on first use)."""
        state = self.__dict__.copy()
        state.pop(MIXED_STACK, None)
        return state

    @property
    def routing(self) -> Any:
        """The lorakit.mixed.Routing this layer follows in the current thread's forward, or None."""
        routing = ROUTING.get()
        return routing if routing is not None and id(self) in routing.layer_ids else None

    # -- merging -----------------------------------------------------------------------------------------
    def check_finite(self, names: list[str], dtype: torch.dtype | None = None) -> None:
        """Raise MergeError if an adapter's delta has NaN or inf, or if the merged weight W0 + Σ ΔW (summed in fp32)
        does once cast to the weight's dtype or to `dtype` (safe merge; e.g. above 65504 in fp16).

        Quantised bases are checked for their deltas only (their dense weight is made by quant.merge)."""
        deltas = []
        for name in names:
            delta = self.adapters[name].delta_weight(self.base_layer)
            if not torch.isfinite(delta).all():
                raise MergeError(f"adapter {name!r} on module {self.path!r} has NaN or inf in its delta; not merged")
            deltas.append(delta)
        weight = getattr(self.base_layer, "weight", None)
        if not deltas or self.kind.quantized or not torch.is_tensor(weight):
            return
        merged = weight.detach().float() + sum(deltas)
        for target in dict.fromkeys(t for t in (weight.dtype, dtype) if t is not None):
            bad = nonfinite_after_cast(merged, target)
            if bad:
                raise MergeError(
                    f"module {self.path!r}: W0 + ΔW of adapter(s) {names} has {bad} value(s) that are inf or NaN "
                    f"in {str(target).removeprefix('torch.')} (largest |value| {float(merged.abs().max()):.6g}; "
                    f"{str(target).removeprefix('torch.')} holds at most {torch.finfo(target).max:.6g}); not merged"
                )

    def merge(self, names: list[str]) -> dict[str, float] | None:
        """Merge each adapter into the base weight (LoRA: W0 += ΔW, computed in fp32, cast to the weight's dtype).

        A quantised base (QLoRA) is re-quantised once with all of them (lossy; quant.merge): returns the error
        that introduces. None for a float base."""
        if self.kind.merge_adapters is not None:  # a quantised base: the kind re-quantises (lorakit.quant.kinds)
            return self.kind.merge_adapters(self, names)
        for name in names:
            if name in self.merged or name not in self.adapters:
                continue
            self.adapters[name].merge_into(self.base_layer)
            self.merged.append(name)
        return None

    def unmerge(self) -> None:
        """Undo the merges, last merged first (a quantised base gets its codes from before the merge back)."""
        if self.kind.unmerge_adapters is not None:
            self.kind.unmerge_adapters(self)
            return
        while self.merged:
            self.adapters[self.merged.pop()].unmerge_from(self.base_layer)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, active={self.active}, merged={self.merged}"


class SavedModule(_Wrapper):
    """modules_to_save: the original module (frozen) and one trainable copy per adapter."""

    _wrapped_attr = "original_module"

    def __init__(self, original_module: nn.Module, path: str) -> None:
        super().__init__()
        self.original_module = original_module
        self.copies = nn.ModuleDict()
        self.path = path
        self.active: str | None = None
        self.disabled = False

    def add_copy(self, name: str) -> nn.Module:
        if name in self.copies:
            raise MergeError(f"module {self.path!r} already has a trainable copy for adapter {name!r}")
        clone = copy.deepcopy(self.original_module)
        for param in clone.parameters():
            param.requires_grad_(True)
        self.copies[name] = clone
        return clone

    def current(self) -> nn.Module:
        """The module forward uses: the active adapter's copy, or the original."""
        if self.disabled or self.active is None or self.active not in self.copies:
            return self.original_module
        return self.copies[self.active]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.current()(*args, **kwargs)
