"""VeRA's math as pure functions (Kopiczko et al. 2024, arXiv 2310.11454): shared frozen random projections, trained
scaling vectors.

    x ──► W0 ─────────────────────────────────────────────► (+) ──► h      h = W0 x + Λ_b B Λ_d A dropout(x)
     └──► dropout ─► A[:, :k] (r×k) ─► ·λ_d ─► B[:d] (d×r) ─► ·λ_b ┘       ΔW = diag(λ_b) B diag(λ_d) A

A (r, k_max) and B (d_max, r) are drawn once per adapter from `projection_prng_key` (PEFT's draw, so a file without
them loads with the same values) and sliced for each layer; only λ_d (r,) and λ_b (d,) train. The update is the
LoRA pair (A[:, :k], diag(λ_b) B[:d] diag(λ_d)) with scale 1 and a frozen A: lorakit's LoRA ops run it (with A
frozen they keep h = A x, not x, for backward, as for LoRA-FA).
"""

from __future__ import annotations

import math

import torch


def kaiming_uniform_(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """PEFT's VeRA init in place: U(-b, b), b = sqrt(3) · sqrt(2) / sqrt(fan_in), fan_in = tensor.shape[1]."""
    std = math.sqrt(2.0) / math.sqrt(tensor.shape[1])  # gain / sqrt(fan_in), rounded as PEFT rounds it
    bound = math.sqrt(3.0) * std
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


def vera_projections(r: int, d_max: int, k_max: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, k_max), B (d_max, r)) in fp32 on the CPU, drawn from seed `seed` as PEFT draws them (A first)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    vera_A = kaiming_uniform_(torch.empty(r, k_max), generator)  # (r, k_max)
    vera_B = kaiming_uniform_(torch.empty(d_max, r), generator)  # (d_max, r)
    return vera_A, vera_B


def largest_dims(dims: list[tuple[int, int]]) -> tuple[int, int]:
    """(d_max, k_max) over the layers' (k, d): the shapes the shared projections are drawn with.

    Raises:
        ValueError: `dims` is empty.
    """
    if not dims:
        raise ValueError("no layer to size VeRA's projections from")
    return max(d for _, d in dims), max(k for k, _ in dims)


def vera_pair(vera_A: torch.Tensor, vera_B: torch.Tensor, lambda_d: torch.Tensor, lambda_b: torch.Tensor,
              k: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The LoRA pair of one layer: (A[:, :k] (r, k) a view, diag(λ_b) B[:d] diag(λ_d) (d, r)), differentiable in
    λ_d and λ_b; B A of the pair is the layer's ΔW."""
    a = vera_A[:, :k]  # (r, k): a view of the shared projection
    b = vera_B[:d] * lambda_b[:, None] * lambda_d[None, :]  # (d, r)
    return a, b


def vera_delta_weight(vera_A: torch.Tensor, vera_B: torch.Tensor, lambda_d: torch.Tensor, lambda_b: torch.Tensor,
                      k: int, d: int) -> torch.Tensor:
    """ΔW = diag(λ_b) B[:d] diag(λ_d) A[:, :k] in fp32, shaped (d, k)."""
    a, b = vera_pair(vera_A.float(), vera_B.float(), lambda_d.float(), lambda_b.float(), k, d)
    return b @ a


__all__ = ["kaiming_uniform_", "largest_dims", "vera_delta_weight", "vera_pair", "vera_projections"]
