"""PiSSA and OLoRA at attach time: B, A come out of the base weight W0, and the base keeps W_res = W0 - s B A.

    attach:  W0 ──► (A0, B0) = factors(W0)   (ops.residual_init)
             base.weight <- W_res = W0 - s B0 A0,   lora_A <- A0,   lora_B <- B0     so the output is unchanged
    train:   W_res + s B A   (= W0 + s (B A - B0 A0): what io.residual writes with convert_to_lora=True)

The adapter keeps A0, B0 as non-persistent buffers `initial_A`, `initial_B` for that conversion, and
`original_fingerprint` (ops.residual_init.weight_fingerprint of W0) that saved files use to recognise the
unmodified base.
Linear and GPT-2 Conv1D layers only. LoftQ (lorakit.loftq) is applied here too: its base keeps NF4 Q instead.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import LoraConfig
from .errors import ConfigError
from .layer_kinds import kind_of
from .layers import LoraLayer
from .loftq import apply_loftq_init
from .ops.residual_init import residual_factors, subtract_low_rank_, weight_fingerprint

RESIDUAL_KINDS = ("linear", "conv1d_gpt2")  # weight (d, k) or (k, d): the layout is a transpose away
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLayer) else module


def check_residual_targets(model: nn.Module, config: LoraConfig, paths: list[str]) -> None:
    """Refuse, before any weight changes, a PiSSA / OLoRA attach that some target cannot take.

    Raises:
        ConfigError: a layer type other than Linear / GPT-2 Conv1D, a rank above min(d, k), a weight that is
            not fp32 / fp16 / bf16, or a layer with merged adapters (its weight is not W0).
    """
    for path in paths:
        module = model.get_submodule(path)
        base = _base_of(module)
        kind = kind_of(base)
        if kind is None:
            continue  # attach_at's check_supported names the unsupported type
        if kind.quantized:
            raise ConfigError(
                f"module {path!r}: init={config.init!r} on a quantised layer ({type(base).__name__}) is not "
                f"supported: the factors would come from an already-quantised W0; attach with init={config.init!r} "
                f"to the full-precision model first and then call lorakit.quantize (QPiSSA: only the residual "
                f"is quantised)"
            )
        if kind.name not in RESIDUAL_KINDS:
            raise ConfigError(
                f"module {path!r}: init={config.init!r} needs a Linear or GPT-2 Conv1D layer, found "
                f"{type(base).__name__} ({kind.name}); exclude it (exclude_modules) or use init='kaiming'"
            )
        k, d = kind.dims(base)
        r = config.rank_for(path)
        if r > min(d, k):
            raise ConfigError(
                f"module {path!r}: init={config.init!r} needs r <= min(out, in) = {min(d, k)}, found r={r}"
            )
        if base.weight.dtype not in _FLOAT_DTYPES:
            raise ConfigError(
                f"module {path!r}: init={config.init!r} needs a float32 / float16 / bfloat16 weight, found "
                f"{base.weight.dtype}"
            )
        if isinstance(module, LoraLayer) and module.merged:
            raise ConfigError(
                f"module {path!r}: init={config.init!r} on a layer with merged adapters {module.merged}; "
                f"unmerge() first"
            )


@torch.no_grad()
def apply_residual_init(base_layer: nn.Module, adapter: nn.Module, config: LoraConfig) -> None:
    """Fill `adapter`'s A, B from `base_layer`'s weight (PiSSA or OLoRA) and leave the residual in the weight.

    The factors are computed in fp32 and stored in the adapter's dtype; the residual is formed from the
    stored factors (W_res = W0 - s B A, summed in fp32, cast to the weight's dtype), so that
    W_res + s B A reproduces W0 as closely as the dtypes allow. init="loftq": lorakit.loftq.apply_loftq_init.
    """
    if config.init == "loftq":
        apply_loftq_init(base_layer, adapter, config)
        return
    kind = adapter.kind
    weight = base_layer.weight
    w0 = kind.to_weight_layout(weight.detach()).float()  # (d, k): Linear as stored, Conv1D transposed back
    method = "olora" if config.init == "olora" else "pissa"
    lora_A, lora_B = residual_factors(w0, adapter.r, adapter.scale, method, config.pissa_niter)
    adapter.original_fingerprint = weight_fingerprint(w0)  # before w0, a view of the weight, changes
    adapter.lora_A.copy_(lora_A)
    adapter.lora_B.copy_(lora_B)
    if kind.fan_in_fan_out:  # stored (k, d): W_resᵀ = W0ᵀ - s Aᵀ Bᵀ
        subtract_low_rank_(weight, adapter.lora_A.t(), adapter.lora_B.t(), adapter.scale)
    else:
        subtract_low_rank_(weight, adapter.lora_B, adapter.lora_A, adapter.scale)
    adapter.register_buffer("initial_A", adapter.lora_A.detach().clone(), persistent=False)
    adapter.register_buffer("initial_B", adapter.lora_B.detach().clone(), persistent=False)
