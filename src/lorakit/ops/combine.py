"""Combining LoRA updates as pure functions: exact weighted sums of factors, and merges of full deltas.

    linear:           ΔW = Σ_i w_i s_i B_i A_i, kept exact by concatenating the factors (rank Σ_i r_i)
    svd:              the same sum, truncated to rank r by SVD (Eckart-Young: the best rank-r approximation)
    magnitude_prune:  Σ_i w_i trim(ΔW_i)                      trim: keep the ⌊density · n⌋ largest |values|
    ties:             TIES-Merging (Yadav et al. 2023, arXiv 2306.01708): trim, elect a sign, disjoint mean
    dare_linear:      DARE (Yu et al. 2023, arXiv 2311.03099): Σ_i w_i drop(ΔW_i), drop = keep w.p. density, / density
    dare_ties:        DARE's drop, then TIES' sign election and disjoint mean

A merged full delta becomes a LoRA adapter again through `svd_truncate` (PEFT's `*_svd` combinations).
Every function computes in fp32 and returns fp32 tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import ConfigError, ShapeMismatchError

Tensor = torch.Tensor

METHODS = ("linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # these need a density in (0, 1]


# -- exact: concatenated factors -------------------------------------------------------------------------
def linear_factors(terms: Sequence[tuple[Tensor, Tensor, float, float]]) -> tuple[Tensor, Tensor]:
    """Factors (A, B) with B A = Σ_i w_i s_i B_i A_i exactly: no cross terms between adapters.

    Each term is (A_i (r_i, k, *kernel), B_i (d, r_i, 1...), s_i, w_i). With c_i = sqrt(|w_i s_i|):

        A = [c_1 A_1; c_2 A_2; ...]                 (Σ r_i, k, *kernel)
        B = [sgn(w_1 s_1) c_1 B_1, ...]             (d, Σ r_i, 1...)
        B A = Σ_i sgn(w_i s_i) c_i² B_i A_i = Σ_i w_i s_i B_i A_i

    so the combined adapter's own scale is 1 (alpha = r). The magnitude is split evenly between the factors, as
    PEFT does, and the sign sits on B. PEFT's `linear` instead sums the scaled A_i and the scaled B_i separately
    (same rank), whose product carries the cross terms c_i c_j B_i A_j, i != j (PEFT issue 3004).

    Raises:
        ConfigError: no terms, or a weight or scale that is not finite.
        ShapeMismatchError: factors that do not belong to one base layer (different d, k or kernel).
    """
    if not terms:
        raise ConfigError("linear_factors needs at least one (A, B, scale, weight) term")
    first_a, first_b = terms[0][0], terms[0][1]
    factors_a, factors_b = [], []
    for i, (lora_a, lora_b, scale, weight) in enumerate(terms):
        _check_factor_pair(i, lora_a, lora_b, first_a, first_b)
        coeff = float(weight) * float(scale)
        if not math.isfinite(coeff):
            raise ConfigError(f"term {i}: weight {weight!r} times scale {scale!r} is not finite")
        root = math.sqrt(abs(coeff))
        factors_a.append(lora_a.float() * root)
        factors_b.append(lora_b.float() * math.copysign(root, coeff))
    return torch.cat(factors_a, dim=0), torch.cat(factors_b, dim=1)


def _check_factor_pair(i: int, lora_a: Tensor, lora_b: Tensor, first_a: Tensor, first_b: Tensor) -> None:
    if lora_a.shape[0] != lora_b.shape[1]:
        raise ShapeMismatchError(f"term {i}: A is {tuple(lora_a.shape)} and B is {tuple(lora_b.shape)}: ranks differ")
    same_in = lora_a.shape[1:] == first_a.shape[1:]
    if not same_in or lora_b.shape[0] != first_b.shape[0] or lora_b.shape[2:] != first_b.shape[2:]:
        raise ShapeMismatchError(
            f"term {i}: factors A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} do not fit the base layer of "
            f"term 0 (A {tuple(first_a.shape)}, B {tuple(first_b.shape)}): expected the same input and output sizes"
        )


# -- SVD truncation ----------------------------------------------------------------------------------------
def _split_singular(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor, float, float]:
    """A = sqrt(S_r) V_rᵀ, B = U_r sqrt(S_r), and the energies (Σ_{i<r} σ_i², Σ_i σ_i²)."""
    root = s[:rank].sqrt()
    lora_b = u[:, :rank] * root  # (d, r)
    lora_a = root[:, None] * vh[:rank]  # (r, k)
    energy = s.double().square()
    return lora_a.contiguous(), lora_b.contiguous(), float(energy[:rank].sum()), float(energy.sum())


def truncate_delta(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, float, float]:
    """svd_truncate's factors and the absolute energies (kept Σ_{i<r} σ_i², total ||ΔW||_F²)."""
    _check_rank(rank)
    matrix = delta.float().flatten(1)  # (d, k · kernel)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return _split_singular(u, s, vh, min(rank, s.numel()))


def svd_truncate(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """The best rank-r approximation of ΔW (d, k[, *kernel]) as LoRA factors, and the share of energy kept.

    With ΔW = U Σ Vᵀ (thin SVD): B = U_r Σ_r^½ (d, r), A = Σ_r^½ V_rᵀ (r, k · kernel), so B A is the rank-r
    truncation (Eckart & Young 1936: the closest rank-r matrix in Frobenius norm), and

        energy_kept = (σ_1² + ... + σ_r²) / Σ_i σ_i²        (1.0 for ΔW = 0)

    r is capped at min(d, k · kernel). Callers reshape A to (r, k, *kernel) for a convolution.

    Raises:
        ConfigError: rank is not a positive integer.
    """
    lora_a, lora_b, kept, total = truncate_delta(delta, rank)
    return lora_a, lora_b, energy_share(kept, total)


def truncate_factors(lora_a: Tensor, lora_b: Tensor, rank: int) -> tuple[Tensor, Tensor, float, float]:
    """svd_truncate of ΔW = B A (B (d, R), A (R, k · kernel)) from the factors, never forming the d x k matrix.

    Thin QR: B = Q_B R_B, Aᵀ = Q_A R_A, so ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ; with the core's SVD R_B R_Aᵀ = U Σ Vᵀ,
    ΔW = (Q_B U) Σ (Q_A V)ᵀ is an SVD of ΔW. Cost O((d + k) R²) instead of O(d k min(d, k)).
    Returns (A, B, kept energy, total energy) as `truncate_delta`.
    """
    _check_rank(rank)
    b2 = lora_b.float().flatten(1)  # (d, R)
    a2 = lora_a.float().flatten(1)  # (R, k · kernel)
    q_b, r_b = torch.linalg.qr(b2, mode="reduced")
    q_a, r_a = torch.linalg.qr(a2.t(), mode="reduced")
    u, s, vh = torch.linalg.svd(r_b @ r_a.t(), full_matrices=False)  # core (min(d, R), min(k, R))
    return _split_singular(q_b @ u, s, vh @ q_a.t(), min(rank, s.numel()))


def energy_share(kept: float, total: float) -> float:
    """kept / total, and 1.0 for an all-zero update (nothing to lose)."""
    return 1.0 if total <= 0.0 else min(1.0, kept / total)


def _check_rank(rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")


# -- sparsification ---------------------------------------------------------------------------------------
def check_density(density: float | None, method: str) -> float:
    """`density` as a float after checking it lies in (0, 1].

    Raises:
        ConfigError: no density, or one outside (0, 1] (the message names the method).
    """
    if density is None:
        raise ConfigError(f"method {method!r} needs a density in (0, 1] (the share of each delta kept), got None")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ConfigError(f"density for method {method!r} must be in (0, 1], got {density!r}")
    return float(density)


def trim_by_magnitude(delta: Tensor, density: float) -> Tensor:
    """TIES' trim step: keep the ⌊density · n⌋ entries of largest |value| (n = delta.numel()), zero the rest."""
    flat = delta.float().flatten()
    keep = int(density * flat.numel())
    if keep >= flat.numel():
        return flat.view(delta.shape).clone()
    out = torch.zeros_like(flat)
    if keep > 0:
        top = flat.abs().topk(keep, sorted=False).indices
        out[top] = flat[top]
    return out.view(delta.shape)


def dare_drop(delta: Tensor, density: float, generator: torch.Generator | None = None) -> Tensor:
    """DARE's drop-and-rescale: keep each entry with probability `density` and divide the kept ones by density,
    so E[result] = delta. The draw is `torch.rand(delta.shape, generator=generator) < density`, made on the
    generator's device (the CPU by default)."""
    if density >= 1.0:
        return delta.float().clone()
    device = generator.device if generator is not None else delta.device
    keep = torch.rand(delta.shape, generator=generator, device=device) < density
    return delta.float() * keep.to(delta.device) / density


def elect_sign_and_merge(weighted: Tensor) -> Tensor:
    """TIES' elect and disjoint-merge steps on weighted deltas stacked on dim 0 (n, ...):

        γ = sgn(Σ_i w_i τ_i)  (+1 where the sum is 0),     A = { i : sgn(w_i τ_i) = γ }  (zeros never count)
        merged = Σ_{i ∈ A} w_i τ_i / max(1, |A|)

    The paper elects from the task vectors τ_i and scales the mean by λ; with per-adapter weights, lorakit elects
    from the weighted vectors, so a negative weight (task negation) flips that adapter's vote too. PEFT elects from
    the unweighted τ_i and then averages the weighted ones.
    """
    elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)  # (...)
    agree = weighted.sign() == elected  # (n, ...)
    count = agree.sum(dim=0).clamp_min(1)
    return (weighted * agree).sum(dim=0) / count


def _check_deltas(deltas: Sequence[Tensor], weights: Sequence[float]) -> None:
    """One finite weight per delta, and deltas of one shape."""
    if not deltas:
        raise ConfigError("nothing to combine: no deltas given")
    if len(weights) != len(deltas):
        raise ConfigError(
            f"the weights list has {len(weights)} value(s) for {len(deltas)} delta(s); give one weight per delta"
        )
    for i, delta in enumerate(deltas):
        if delta.shape != deltas[0].shape:
            raise ShapeMismatchError(
                f"delta {i} has shape {tuple(delta.shape)}, delta 0 has {tuple(deltas[0].shape)}: "
                "deltas of different base shapes cannot be combined"
            )
    for i, weight in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"weight {i} must be a finite number, got {weight!r}")


def _stack_weighted(deltas: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """w_i ΔW_i stacked on dim 0 (n, ...), after checking the lengths and shapes agree."""
    _check_deltas(deltas, weights)
    return torch.stack([delta.float() * float(w) for delta, w in zip(deltas, weights)])


def task_arithmetic(deltas: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Σ_i w_i ΔW_i (Ilharco et al. 2023, task arithmetic); a negative weight subtracts (task negation)."""
    return _stack_weighted(deltas, weights).sum(dim=0)


def magnitude_prune(deltas: Sequence[Tensor], weights: Sequence[float], density: float) -> Tensor:
    """Σ_i w_i trim(ΔW_i): each delta keeps its ⌊density · n⌋ largest-magnitude entries, then a weighted sum."""
    density = check_density(density, "magnitude_prune")
    return task_arithmetic([trim_by_magnitude(d, density) for d in deltas], weights)


def ties(deltas: Sequence[Tensor], weights: Sequence[float], density: float) -> Tensor:
    """TIES-Merging (Yadav et al. 2023, section 3): trim each ΔW_i to `density` by magnitude, elect the sign of
    Σ_i w_i trim(ΔW_i) per entry, and average the weighted entries that agree with it (`elect_sign_and_merge`)."""
    density = check_density(density, "ties")
    trimmed = [trim_by_magnitude(d, density) for d in deltas]
    return elect_sign_and_merge(_stack_weighted(trimmed, weights))


def dare_linear(
    deltas: Sequence[Tensor], weights: Sequence[float], density: float, generator: torch.Generator | None = None
) -> Tensor:
    """DARE (Yu et al. 2023, section 4.1): Σ_i w_i drop(ΔW_i), each entry kept w.p. density and rescaled by
    1 / density. The masks are drawn in the order of `deltas` from `generator`."""
    density = check_density(density, "dare_linear")
    _check_deltas(deltas, weights)  # before any draw
    return task_arithmetic([dare_drop(d, density, generator) for d in deltas], weights)


def dare_ties(
    deltas: Sequence[Tensor], weights: Sequence[float], density: float, generator: torch.Generator | None = None
) -> Tensor:
    """DARE's drop-and-rescale, then TIES' sign election and disjoint mean (Yu et al. 2023, section 4.3)."""
    density = check_density(density, "dare_ties")
    _check_deltas(deltas, weights)
    dropped = [dare_drop(d, density, generator) for d in deltas]
    return elect_sign_and_merge(_stack_weighted(dropped, weights))


def combine_deltas(
    method: str,
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    density: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The merged delta of one module by `method` ("linear" and "svd" both give Σ_i w_i ΔW_i here).

    Raises:
        ConfigError: an unknown method, a density missing or outside (0, 1] for a sparsifying method,
            a weights list whose length differs from the deltas'.
        ShapeMismatchError: deltas of different shapes.
    """
    if method in ("linear", "svd"):
        return task_arithmetic(deltas, weights)
    if method == "magnitude_prune":
        return magnitude_prune(deltas, weights, density)
    if method == "ties":
        return ties(deltas, weights, density)
    if method == "dare_linear":
        return dare_linear(deltas, weights, density, generator)
    if method == "dare_ties":
        return dare_ties(deltas, weights, density, generator)
    raise ConfigError(f"unknown combination method {method!r}; expected one of {', '.join(METHODS)}")
