"""LoftQ (Li et al. 2023, arXiv 2310.08659, Algorithm 1): quantisation-aware LoRA factors, as pure tensor math.

    W (d, k) ──► Q_0 = q(W),  s B_0 A_0 = SVD_r(W - Q_0)
    for t = 1 .. T-1:  Q_t = q(W - s B_{t-1} A_{t-1}),  s B_t A_t = SVD_r(W - Q_t)
    result: the base holds Q_T (quantised), the adapter B_T, A_T, and Q + s B A ≈ W better than q(W) alone

`q` is any quantise-then-dequantise function (lorakit.loftq passes NF4). Unlike PEFT's `loftq_init`, which
factors W - Q as B A and so matches W only when s = alpha / r = 1, the factors here carry 1 / s, so that the
adapted layer Q x + s B A x approximates W x for every scale.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConfigError

LOFTQ_BITS = (4,)  # NF4 only: PEFT's 8-bit variant (bitsandbytes int8) has no lorakit storage
LOFTQ_DEFAULTS = {"loftq_bits": 4, "loftq_iter": 1}  # PEFT's LoftQConfig defaults


def check_loftq_config(value: Any, used: bool, where: str) -> dict[str, int]:
    """LoraConfig.loftq_config completed with PEFT's defaults, or {} when the init is not LoftQ (PEFT ignores it then).

    Raises:
        ConfigError: not a mapping, an unknown key, loftq_bits other than 4, loftq_iter not an integer >= 1.
    """
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping {{'loftq_bits': 4, 'loftq_iter': n}}, found "
                          f"{type(value).__name__} {value!r}")
    unknown = sorted(set(value) - set(LOFTQ_DEFAULTS))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (LoftQ's keys: loftq_bits, loftq_iter)")
    if not used:
        return {}
    out = {**LOFTQ_DEFAULTS, **value}
    bits, iters = out["loftq_bits"], out["loftq_iter"]
    if isinstance(bits, bool) or bits not in LOFTQ_BITS:
        raise ConfigError(f"{where}['loftq_bits'] must be 4 (NF4; lorakit has no 8-bit storage), found {bits!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ConfigError(f"{where}['loftq_iter'] must be an integer >= 1, found {iters!r}")
    return out


def low_rank_factors(residual: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, k), B (d, r)) with s · B A the best rank-r approximation of `residual` (d, k), in fp32.

    The singular values are split evenly: B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_rᵀ (PEFT's balance at s = 1).
    """
    u, sv, vh = torch.linalg.svd(residual.float(), full_matrices=False)  # (d, m), (m,), (m, k)
    root = (sv[:r] / scale).sqrt()  # (r,)
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]


def loftq_factors(
    weight: torch.Tensor, r: int, scale: float, iters: int, quantize: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ's alternation on W (d, k): (Q, A, B) in fp32 with Q = quantize(W - s B' A') of the previous factors.

    Args:
        weight: W (d, k), any float dtype (computed in fp32).
        r: the adapter's rank. scale: s = alpha / r (or alpha / sqrt(r)). iters: T >= 1 alternations.
        quantize: W -> dequantise(quantise(W)), same shape, fp32.
    """
    w = weight.float()
    target = w
    for step in range(iters):
        q = quantize(target)  # (d, k) on the quantisation grid
        lora_A, lora_B = low_rank_factors(w - q, r, scale)
        if step + 1 < iters:
            target = w - scale * (lora_B @ lora_A)
    return q, lora_A, lora_B


def approximation_error(weight: torch.Tensor, q: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                        scale: float) -> float:
    """||W - (Q + s B A)||_F in fp32: what LoftQ minimises (with B = 0: the plain quantisation error)."""
    return float(torch.linalg.matrix_norm(weight.float() - q.float() - scale * (lora_B.float() @ lora_A.float())))
