"""Adapter diagnostics during training, per adapted layer and summarised:

* update ratio  ||s B A||_F / ||W0||_F: how far the adapter has moved the weight (computed in low-rank form:
  ||s B A||_F^2 = s^2 · sum((BᵀB) ⊙ (A Aᵀ)), r x r matrices, never a d x k one);
* gradient ratio ||∇A||_F / ||∇B||_F: the balance LoRA+ (Hayou et al. 2024) argues should not be 1:1.

`check` turns values outside a sane range into warnings (heuristics, documented in README).
"""

from __future__ import annotations

import statistics

import torch
from torch import nn

from ..distributed.fsdp import whole
from ..model import lora_layers

MAX_UPDATE_RATIO = 0.5  # ||sBA|| above half of ||W0||: the adapter is rewriting the layer; learning rate too high?
GRAD_RATIO_RANGE = (1e-4, 1e4)  # |∇A| / |∇B| outside this: one factor is effectively not training


def delta_norm(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> float:
    """||s B A||_F from the factors: A (r, k...), B (d, r...)."""
    a = whole(lora_A.detach()).float().flatten(1)  # (r, k); an FSDP shard is gathered (every rank calls this)
    b = whole(lora_B.detach()).float().flatten(1)  # (d, r)
    squared = ((b.t() @ b) * (a @ a.t())).sum().clamp_min(0.0)
    return abs(scale) * squared.sqrt().item()


def weight_norms(model: nn.Module) -> dict[str, float]:
    """||W0||_F of every adapted layer (frozen: compute once per run)."""
    return {layer.path: _norm(layer.base_layer.weight) for layer in lora_layers(model)}


def _norm(tensor: torch.Tensor) -> float:
    """||tensor||_F; of a whole FSDP-sharded tensor, not of this rank's shard (a collective: every rank calls it)."""
    return whole(tensor.detach().float().norm()).item()


def layer_diagnostics(model: nn.Module, w0_norms: dict[str, float], name: str = "default") -> dict[str, dict]:
    """Per adapted layer: update_ratio and grad_ratio (None when a gradient is missing or zero)."""
    out: dict[str, dict] = {}
    for layer in lora_layers(model):
        if name not in layer.adapters:
            continue
        adapter = layer.adapters[name]
        w0 = w0_norms.get(layer.path) or float("nan")
        if adapter.abilities.low_rank:  # ||s B A|| from the factors
            ratio = delta_norm(adapter.lora_A, adapter.lora_B, adapter.scale) / w0
        else:  # DoRA, AdaLoRA, VeRA: the norm of the variant's own update ΔW
            with torch.no_grad():
                ratio = _norm(adapter.delta_weight(layer.base_layer)) / w0
        grad_ratio = None
        a, b = getattr(adapter, "lora_A", None), getattr(adapter, "lora_B", None)  # VeRA trains no A, B
        if a is not None and b is not None and a.grad is not None and b.grad is not None:
            gb, ga = _norm(b.grad), _norm(a.grad)
            if gb > 0:
                grad_ratio = ga / gb
        out[layer.path] = {"update_ratio": ratio, "grad_ratio": grad_ratio}
    return out


def summarise(layers: dict[str, dict]) -> dict[str, float | None]:
    """Median and max of each diagnostic over the layers."""
    summary: dict[str, float | None] = {}
    for key in ("update_ratio", "grad_ratio"):
        values = [v[key] for v in layers.values() if v[key] is not None]
        summary[f"{key}_median"] = statistics.median(values) if values else None
        summary[f"{key}_max"] = max(values) if values else None
        summary[f"{key}_min"] = min(values) if values else None
    return summary


def check(layers: dict[str, dict]) -> list[str]:
    """Warnings for layers whose diagnostics leave the sane range."""
    warnings: list[str] = []
    big = {p: v["update_ratio"] for p, v in layers.items() if v["update_ratio"] > MAX_UPDATE_RATIO}
    if big:
        worst = max(big, key=big.get)
        warnings.append(
            f"{len(big)} layer(s) have ||sBA||/||W0|| > {MAX_UPDATE_RATIO} (worst {worst}: {big[worst]:.2f}): "
            "the adapter is overwriting the pre-trained weight; consider a lower learning rate or alpha"
        )
    low, high = GRAD_RATIO_RANGE
    odd = {p: v["grad_ratio"] for p, v in layers.items()
           if v["grad_ratio"] is not None and not low <= v["grad_ratio"] <= high}
    if odd:
        worst = next(iter(odd))
        warnings.append(
            f"{len(odd)} layer(s) have |grad A|/|grad B| outside [{low:g}, {high:g}] (e.g. {worst}: "
            f"{odd[worst]:.2g}): one factor is barely training"
        )
    return warnings
