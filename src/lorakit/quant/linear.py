"""NF4Linear: a frozen nn.Linear stored in NF4, dequantised on the fly (QLoRA, arXiv 2305.14314, section 3).

    x ──► cast to compute dtype ──► x W^T + b   with W = dequantize_nf4(state) made in forward and again in
                                                backward (grad_x = g W), never kept between steps

`quantize(model, "nf4")` swaps a model's nn.Linear layers for NF4Linear in place.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError, TargetError
from ..layer_kinds import check_supported
from ..layers import LoraLayer, SavedModule
from .nf4 import NF4State, dequantize_nf4, quantize_nf4

COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FP32_STATS = ("absmax_scale", "absmax_offset")  # stay fp32 whatever model.to(dtype) asks


class _NF4Matmul(torch.autograd.Function):
    """y = x W^T + b with W dequantised from NF4; backward gives grad_x = g W (W dequantised again), grad_b = sum g.

    Saves only a reference to the layer: no full-size tensor lives between forward and backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: NF4Linear) -> torch.Tensor:
        ctx.layer = layer
        ctx.has_bias = bias is not None
        weight = layer.dequantize()  # (out, in) in the compute dtype; freed when forward returns
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = ctx.layer.dequantize().to(grad_out.dtype)  # autocast: grad_out is bf16/fp16, W fp32
            grad_x = grad_out @ weight  # (..., out) @ (out, in)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None


class NF4Linear(nn.Module):
    """A Linear layer whose weight is held in NF4 (0.5 + 1/64 + 4/16384 bytes per weight with double quantisation).

    Buffers: `packed` (uint8), `absmax` (uint8 codes, or fp32 without double quantisation), `absmax_scale` and
    `absmax_offset` (fp32, kept fp32 by `model.to(dtype)`), and the `bias` parameter in the compute dtype (frozen).
    `in_features`, `out_features` and `bias` are those of nn.Linear. The output has the input's dtype.
    """

    def __init__(self, state: NF4State, bias: torch.Tensor | None, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if len(state.shape) != 2:
            raise ConfigError(f"NF4Linear: expected a 2-D weight state, found shape {tuple(state.shape)}")
        self.out_features, self.in_features = state.shape
        self.compute_dtype = compute_dtype
        self.blocksize = state.blocksize
        self.register_buffer("packed", state.packed)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("absmax_scale", state.absmax_scale)
        self.register_buffer("absmax_offset", state.absmax_offset)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16, blocksize: int = 64,
                    double_quant: bool = True) -> NF4Linear:
        """Quantise an nn.Linear's weight to NF4 (the bias is kept, cast to the compute dtype)."""
        return cls(quantize_nf4(linear.weight, blocksize, double_quant), linear.bias, compute_dtype)

    @property
    def state(self) -> NF4State:
        """The NF4 state (views of this layer's buffers)."""
        return NF4State(self.packed, self.absmax, self.absmax_scale, self.absmax_offset,
                        torch.Size((self.out_features, self.in_features)), self.blocksize)

    def replace_state(self, state: NF4State) -> None:
        """Hold `state` (same shape and blocksize) instead of the current codes: merge(requantize=True), unmerge.

        Raises:
            ConfigError: a state of another shape or blocksize.
        """
        if tuple(state.shape) != (self.out_features, self.in_features) or state.blocksize != self.blocksize:
            raise ConfigError(f"NF4Linear.replace_state: expected shape {(self.out_features, self.in_features)} and "
                              f"blocksize {self.blocksize}, found {tuple(state.shape)} and {state.blocksize}")
        self.packed, self.absmax = state.packed, state.absmax
        self.absmax_scale, self.absmax_offset = state.absmax_scale, state.absmax_offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight (out, in) in `dtype` (default: the compute dtype). Allocates a full-size tensor."""
        return dequantize_nf4(self.state, dtype or self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight in the compute dtype, for code that reads `.weight`. Allocates on every read
        and is not a Parameter: writing to it changes nothing."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return _NF4Matmul.apply(x.to(self.compute_dtype), bias, self).to(x.dtype)

    def _apply(self, fn, recurse: bool = True):
        # nn.Module.to(dtype) casts every float buffer: keep the fp32 statistics out of that, move them alongside
        kept = {name: self._buffers.pop(name) for name in _FP32_STATS}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, stat in kept.items():
                self._buffers[name] = None if stat is None else stat.to(self.packed.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={self.blocksize}, double_quant={self.absmax_scale is not None}, "
                f"compute_dtype={self.compute_dtype}")


def check_compute_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """Refuse a compute dtype NF4Linear does not support, or that this device cannot multiply in.

    Raises:
        ConfigError: a dtype outside float32/bfloat16/float16, or a matmul in it failing on `device`.
    """
    if dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"quantize: compute_dtype must be one of {COMPUTE_DTYPES}, found {dtype}")
    try:
        probe = torch.ones(2, 8, dtype=dtype, device=device)
        nn.functional.linear(probe, probe)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"quantize: compute_dtype {dtype} cannot be used on device {device} "
                          f"(a matmul in it fails: {exc}); choose another compute_dtype") from exc


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def quantize(model: nn.Module, fmt: str = "nf4", compute_dtype: torch.dtype = torch.bfloat16,
             skip: tuple[str, ...] | list[str] = ("lm_head",), blocksize: int = 64,
             double_quant: bool = True) -> nn.Module:
    """Replace every nn.Linear of `model` by an NF4Linear in place (QLoRA's base-model storage); returns `model`.

    A module is skipped when its path or a dotted suffix of it is in `skip` (the output head by default).
    Blocks run over the flattened weight, as in bitsandbytes, so any in_features works (no padding).
    Usually called before attaching adapters. On a model that already has adapters, the base layers under them
    are quantised and the adapters kept (modules_to_save copies stay full precision): this is how QPiSSA works
    (PiSSA, Meng et al. 2024): attach with init="pissa" on the full-precision model, then quantise, so that only
    the residual W0 - s B A is quantised.

    Raises:
        ConfigError: an unknown format, or a compute dtype that is unsupported or unusable on the layer's device.
        TargetError: the model is itself an nn.Linear, or an adapter is merged into a layer to quantise.
    """
    if fmt != "nf4":
        raise ConfigError(f"quantize: unknown format {fmt!r}; expected 'nf4'")
    if isinstance(model, nn.Linear):
        raise TargetError("quantize: expected a model that contains nn.Linear layers, found a bare nn.Linear; "
                          "use NF4Linear.from_linear for a single layer")
    kept = {id(m) for saved in model.modules() if isinstance(saved, SavedModule) for m in saved.modules()}
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and id(module) not in kept
               and not _skipped(name.removesuffix(".base_layer"), tuple(skip))
               and not isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear)]  # MHA reads its weight
    for name, _ in targets:
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if isinstance(parent, LoraLayer) and parent.merged:
            raise TargetError(f"quantize: module {parent.path!r} has merged adapters {parent.merged}; unmerge first")
    checked: set[torch.device] = set()
    for name, linear in targets:
        if linear.weight.device not in checked:
            check_compute_dtype(compute_dtype, linear.weight.device)
            checked.add(linear.weight.device)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        nf4 = NF4Linear.from_linear(linear, compute_dtype, blocksize, double_quant)
        setattr(parent, child, nf4)
        if isinstance(parent, LoraLayer):  # a base layer under adapters: they now act on an NF4 base
            parent.kind = check_supported(nf4, parent.path)  # lorakit.quant.kinds registered NF4Linear's kind
            for adapter in parent.adapters.values():
                adapter.rebase(parent.kind)
    return model
