"""Merging adapters into quantised base layers (NF4Linear, bitsandbytes Linear4bit): lossy, so never silent.

    merge_and_unload:          W = dequant(W_q) + Σ s B A  ──► a dense nn.Linear in the compute dtype (or `dtype`)
    merge(requantize=True):    W_q <- quantize(dequant(W_q) + Σ s B A), and the error it introduces is reported:
                                 max |Ŵ - W|,   ||Ŵ - W||_F / ||W||_F,   ||Ŵ - W||_F / ||Σ s B A||_F
                               (Ŵ = dequant of the new codes; the last ratio is the share of the update lost)
    unmerge:                   the codes kept from before the merge are put back, bit for bit.

A 4-bit grid cannot hold a small update exactly: the step between NF4 values is about 0.1-0.3 x the block's
absmax, while s B A is usually far smaller, so re-quantising can round much of the adapter away (QLoRA,
Dettmers et al. 2023, arXiv 2305.14314). Dense merging keeps the update exactly; only W0's own quantisation
error stays in the weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import MergeError
from ..layer_kinds import kind_of, weight_dtype
from ..layers import LoraLayer
from .nf4 import dequantize_nf4, quantize_nf4

Restore = Callable[[], None]


class LossyMergeWarning(UserWarning):
    """An adapter was merged into a quantised base: the result is not W0 + ΔW of the full-precision model."""


def requantization_error(exact: torch.Tensor, requantized: torch.Tensor, delta: torch.Tensor) -> dict[str, float]:
    """How far the re-quantised weight Ŵ is from the exact merge W = dequant(W_q) + ΔW (all fp32).

    Returns {"max_abs_error": max |Ŵ - W|, "rel_fro_error": ||Ŵ - W||_F / ||W||_F,
    "update_rel_error": ||Ŵ - W||_F / ||ΔW||_F} (inf when ΔW = 0 and Ŵ != W).
    """
    diff = (requantized.float() - exact.float()).flatten()
    err = torch.linalg.vector_norm(diff).item()
    norm_w = torch.linalg.vector_norm(exact.float()).item()
    norm_delta = torch.linalg.vector_norm(delta.float()).item()
    return {
        "max_abs_error": diff.abs().max().item() if diff.numel() else 0.0,
        "rel_fro_error": err / norm_w if norm_w > 0 else 0.0,
        "update_rel_error": err / norm_delta if norm_delta > 0 else (0.0 if err == 0 else float("inf")),
    }


# -- one requantiser per quantised layer kind: replace the codes by those of `weight`, return (Ŵ, restore) --------
def requantize_nf4(layer: Any, weight: torch.Tensor) -> tuple[torch.Tensor, Restore]:
    old = layer.state
    new = quantize_nf4(weight, layer.blocksize, old.double_quant)
    layer.replace_state(new)
    return dequantize_nf4(new, torch.float32), lambda: layer.replace_state(old)


def requantize_bnb(layer: nn.Module, weight: torch.Tensor) -> tuple[torch.Tensor, Restore]:
    import bitsandbytes.functional as bnb_f

    param = layer.weight
    old_data, old_state = param.data, param.quant_state
    packed, state = bnb_f.quantize_4bit(
        weight.to(old_state.dtype), blocksize=old_state.blocksize, compress_statistics=old_state.nested,
        quant_type=old_state.quant_type, quant_storage=param.data.dtype,
    )
    param.data, param.quant_state = packed, state

    def restore() -> None:
        param.data, param.quant_state = old_data, old_state

    return bnb_f.dequantize_4bit(packed, state).float(), restore


def _summed_delta(layer: Any, names: list[str]) -> torch.Tensor:
    """Σ over `names` of each adapter's ΔW (fp32, (d, k)), each taken against the current base weight."""
    deltas = [layer.adapters[name].delta_weight(layer.base_layer) for name in names]
    return torch.stack(deltas).sum(0) if len(deltas) > 1 else deltas[0]


@torch.no_grad()
def merge_requantized(layer: Any, names: list[str]) -> dict[str, float] | None:
    """Merge adapters `names` into the quantised base of LoraLayer `layer` by re-quantising W_q + Σ ΔW.

    Keeps the codes from before the first merge (unmerge_requantized puts them back exactly) and returns
    `requantization_error` (None when there was nothing to merge).

    Raises:
        MergeError: a quantised layer type lorakit cannot re-quantise.
    """
    names = [n for n in names if n in layer.adapters and n not in layer.merged]
    if not names:
        return None
    requantize = layer.kind.requantize  # the layer kind's (lorakit.quant.kinds)
    if requantize is None:
        raise MergeError(f"module {layer.path!r}: cannot re-quantise a {type(layer.base_layer).__name__} base")
    delta = _summed_delta(layer, names)
    exact = layer.kind.dequantize(layer.base_layer, torch.float32) + delta  # (d, k)
    requantized, restore = requantize(layer.base_layer, exact)
    if "_quant_restore" not in layer.__dict__:  # a second merge on top keeps the codes of the very first
        layer.__dict__["_quant_restore"] = restore
    layer.merged.extend(names)
    return requantization_error(exact, requantized, delta)


def unmerge_requantized(layer: Any) -> None:
    """Put back the codes the quantised base had before merge_requantized (bit for bit)."""
    restore = layer.__dict__.pop("_quant_restore", None)
    if restore is not None:
        restore()
    layer.merged.clear()


def _dense_linear(base: nn.Module, weight: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    """An nn.Linear holding `weight` (d, k) and the base's bias, in `dtype`, frozen like the base was."""
    bias = getattr(base, "bias", None)
    dense = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")  # no init, no RNG draw
    dense.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        dense.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=bias.requires_grad)
    return dense


@torch.no_grad()
def dense_merged(layer: Any, names: list[str], dtype: torch.dtype | None = None) -> nn.Linear:
    """The LoraLayer `layer` (quantised base) as one dense nn.Linear: W = dequant(W_q) + Σ ΔW of the adapters in
    `names` that are not merged yet, computed in fp32 and stored in `dtype` (default: the compute dtype)."""
    pending = [n for n in names if n in layer.adapters and n not in layer.merged]
    weight = layer.kind.dequantize(layer.base_layer, torch.float32)
    if pending:
        weight = weight + _summed_delta(layer, pending)
    return _dense_linear(layer.base_layer, weight, dtype or weight_dtype(layer.base_layer, layer.kind))


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, new)


def check_requantize_allowed(layers: list[Any], names: list[str]) -> None:
    """Refuse an in-place merge into a quantised base unless the caller asked for re-quantisation.

    Raises:
        MergeError: a layer among `layers` with a quantised base and an unmerged adapter among `names`.
    """
    for layer in layers:
        if layer.kind.quantized and any(n in layer.adapters and n not in layer.merged for n in names):
            raise MergeError(
                f"module {layer.path!r} is stored in 4 bits ({type(layer.base_layer).__name__}): merging into it "
                f"means re-quantising W0 + s B A, which rounds much of the update away. Use merge_and_unload(model) "
                f"for dense layers that hold W0 + s B A exactly, or merge(model, requantize=True) to re-quantise "
                f"and get the error it introduces"
            )


def warn_requantized(report: dict[str, dict[str, float]]) -> None:
    """One LossyMergeWarning summarising merge(requantize=True)'s per-layer errors."""
    worst = {key: max(entry[key] for entry in report.values()) for key in next(iter(report.values()))}
    warnings.warn(
        f"merge(requantize=True): {len(report)} quantised layer(s) were re-quantised with the adapters merged "
        f"(lossy): max |W_requantised - W| up to {worst['max_abs_error']:.3g}, relative Frobenius error up to "
        f"{worst['rel_fro_error']:.3g}, error up to {worst['update_rel_error']:.3g} x ||s B A||_F; the per-layer "
        f"errors are returned, and unmerge() restores the original codes exactly",
        LossyMergeWarning, stacklevel=3,
    )


def quantized_lora_layers(model: nn.Module) -> list[Any]:
    """The LoraLayers of `model` whose base is quantised."""
    return [m for m in model.modules() if isinstance(m, LoraLayer) and m.kind.quantized]


@torch.no_grad()
def unload_quantized(model: nn.Module, names: list[str], dtype: torch.dtype | None = None, safe: bool = False) -> int:
    """merge_and_unload's quantised part: each LoraLayer with a quantised base becomes a dense nn.Linear with the
    adapters `names` merged, then every other quantised layer of `model` is dequantised to nn.Linear too, so
    that no quantised module is left. Warns (LossyMergeWarning) when anything was quantised; returns the number
    of layers made dense. With `safe`, every adapted layer's delta is checked for NaN / inf before any change.

    Raises:
        MergeError: in safe mode, a delta with NaN or inf.
    """
    layers = quantized_lora_layers(model)
    if safe and layers:
        for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
            layer.check_finite([n for n in names if n in layer.adapters and n not in layer.merged])
    count = 0
    for layer in layers:
        _replace(model, layer.path, dense_merged(layer, names, dtype))
        count += 1
    for path, module in list(model.named_modules()):
        kind = kind_of(module)
        if kind is not None and kind.dequantize is not None:
            _replace(model, path, _dense_linear(module, kind.dequantize(module, torch.float32),
                                                dtype or weight_dtype(module, kind)))
            count += 1
    if count:
        _forget_hf_quantization(model)
        warnings.warn(
            f"merge_and_unload: {count} layer(s) were stored quantised (4-bit): the adapters were merged into their "
            f"dequantised weights, W = dequant(W_q) + s B A, and the layers are now dense nn.Linear in "
            f"{dtype or 'their compute dtype'}. This is lossy with respect to the full-precision base model: W0's "
            f"quantisation error stays in the weights (for W0 + s B A, merge the saved adapter into the original "
            f"model instead: `lorakit merge --model DIR --adapter DIR`).",
            LossyMergeWarning, stacklevel=3,
        )
    return count


def _forget_hf_quantization(model: nn.Module) -> None:
    """A transformers model loaded with BitsAndBytesConfig: drop what marks it as quantised, so that save_pretrained
    writes the dense weights (what transformers' own `HfQuantizer.remove_quantization_config` does)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
        return
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
