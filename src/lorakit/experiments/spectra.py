"""The math of `lorakit experiment lora-vs-full` and `magnitude-direction`, as small pure functions (float64).

LoRA against full fine-tuning (Hu et al. 2021, section 7; the seeds' claim): full fine-tuning's update of one module
is ΔW* = W_full - W0 (d x k), LoRA's is s B A (rank <= r). By Eckart-Young-Mirsky no rank-r matrix is closer to ΔW*
in the Frobenius norm than its truncated SVD, so with σ_1 >= σ_2 >= ... the singular values of ΔW*

    bound_r(ΔW*) = min_{rank X <= r} ||ΔW* - X||_F = sqrt(Σ_{i>r} σ_i²)  <=  ||ΔW* - s B A||_F     (always)

The alignment of two m-dimensional subspaces with orthonormal bases U (d x m) and U* (d x m) is

    align(U, U*) = ||Uᵀ U*||_F² / m = (1/m) Σ_j cos² θ_j     (θ_j: the principal angles)

1 for the same subspace, 0 for orthogonal ones, about m / d for a random one (E ||Uᵀ U*||_F² = m² / d).

The magnitude-direction analysis ends in correlations of points (ΔD, ΔM): Pearson's r and Spearman's ρ (Pearson's r
of the ranks, ties given their average rank).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import ShapeMismatchError

ZERO_TOL = 1e-10  # singular values below ZERO_TOL x σ_1 are zero: their directions are not a subspace of the update


def as_matrix(x: torch.Tensor) -> torch.Tensor:
    """x detached, on the CPU, in float64, flattened to 2-D (a convolution's (d, k, *kernel) to d x k·kernel)."""
    return x.detach().to("cpu", torch.float64).flatten(1) if x.dim() > 1 else x.detach().to("cpu", torch.float64)


def singular_values(delta: torch.Tensor) -> torch.Tensor:
    """σ_1 >= σ_2 >= ... of a dense d x k matrix, float64 (min(d, k) values)."""
    return torch.linalg.svdvals(as_matrix(delta))


def eckart_young_bound(sv: torch.Tensor, r: int) -> float:
    """sqrt(Σ_{i>r} σ_i²): the Frobenius error of the best rank-r approximation (0 when r >= the rank)."""
    tail = torch.sort(sv.double(), descending=True).values[max(int(r), 0):]
    return float(torch.linalg.vector_norm(tail))


def top_energy(sv: torch.Tensor, r: int) -> float | None:
    """Σ_{i<=r} σ_i² / Σ_i σ_i²: the share of ||ΔW||_F² in the top r directions; None for a zero matrix."""
    energy = torch.sort(sv.double(), descending=True).values.square()
    total = float(energy.sum())
    return None if total <= 0.0 else float(energy[: max(int(r), 0)].sum()) / total


def lowrank_product(lora_B: torch.Tensor, lora_A: torch.Tensor, scale: float) -> torch.Tensor:
    """s B A as a dense d x k float64 matrix (B: (d, r[, 1...]), A: (r, k[, kernel...]) as stored).

    Raises:
        ShapeMismatchError: B's columns and A's rows differ.
    """
    b, a = as_matrix(lora_B), as_matrix(lora_A)
    if b.shape[1] != a.shape[0]:
        raise ShapeMismatchError(f"B is {tuple(lora_B.shape)} and A is {tuple(lora_A.shape)}: their ranks differ")
    return float(scale) * (b @ a)


def _check_same_shape(target: torch.Tensor, approx: torch.Tensor) -> None:
    if target.shape != approx.shape:
        raise ShapeMismatchError(f"the update is {tuple(target.shape)} and its approximation "
                                 f"{tuple(approx.shape)}: they must have the same shape")


def residual_norm(target: torch.Tensor, approx: torch.Tensor) -> float:
    """||target - approx||_F (both d x k).

    Raises:
        ShapeMismatchError: the shapes differ.
    """
    t, x = as_matrix(target), as_matrix(approx)
    _check_same_shape(t, x)
    return float(torch.linalg.matrix_norm(t - x))


def best_scalar_fit(target: torch.Tensor, approx: torch.Tensor) -> tuple[float, float]:
    """(c*, ||target - c* approx||_F) with c* = <target, approx>_F / ||approx||_F², the scalar that minimises the
    error. It separates a wrong length (c* != 1) from wrong directions: the rescaled error is still >= the
    Eckart-Young bound, as c* · approx has the same rank. (1.0, ||target||_F) for approx = 0.

    Raises:
        ShapeMismatchError: the shapes differ.
    """
    t, x = as_matrix(target), as_matrix(approx)
    _check_same_shape(t, x)
    xx = float((x * x).sum())
    if xx <= 0.0:
        return 1.0, float(torch.linalg.matrix_norm(t))
    c = float((t * x).sum()) / xx
    return c, float(torch.linalg.matrix_norm(t - c * x))


def cosine(target: torch.Tensor, approx: torch.Tensor) -> float | None:
    """<target, approx>_F / (||target||_F ||approx||_F); None when either is zero."""
    t, x = as_matrix(target), as_matrix(approx)
    _check_same_shape(t, x)
    denom = float(torch.linalg.matrix_norm(t)) * float(torch.linalg.matrix_norm(x))
    return None if denom <= 0.0 else float((t * x).sum()) / denom


def dense_subspaces(delta: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_m, V_m): orthonormal bases (d x m', k x m') of the top singular subspaces of a dense matrix, m' = m capped
    by the number of non-zero singular values (above ZERO_TOL σ_1)."""
    u, sv, vh = torch.linalg.svd(as_matrix(delta), full_matrices=False)
    keep = _nonzero(sv, m)
    return u[:, :keep], vh[:keep].t()


def lowrank_subspaces(lora_B: torch.Tensor, lora_A: torch.Tensor, scale: float,
                      m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same for s B A, from the factors: B = Q_B R_B, Aᵀ = Q_A R_A (thin QR), s R_B R_Aᵀ = U Σ Vᵀ, so
    s B A = (Q_B U) Σ (Q_A V)ᵀ and the bases are the first m' columns of Q_B U and Q_A V (no d x k matrix).

    Raises:
        ShapeMismatchError: B's columns and A's rows differ.
    """
    b, a = as_matrix(lora_B), as_matrix(lora_A)
    if b.shape[1] != a.shape[0]:
        raise ShapeMismatchError(f"B is {tuple(lora_B.shape)} and A is {tuple(lora_A.shape)}: their ranks differ")
    q_b, r_b = torch.linalg.qr(b, mode="reduced")  # (d, r'), (r', r)
    q_a, r_a = torch.linalg.qr(a.t(), mode="reduced")  # (k, r''), (r'', r)
    u, sv, vh = torch.linalg.svd(float(scale) * (r_b @ r_a.t()), full_matrices=False)
    keep = _nonzero(sv, m)
    return (q_b @ u)[:, :keep], (q_a @ vh.t())[:, :keep]


def _nonzero(sv: torch.Tensor, m: int) -> int:
    """How many of the first m singular values (descending) are above ZERO_TOL · σ_1 (0 for a zero matrix)."""
    if sv.numel() == 0 or float(sv[0]) <= 0.0:
        return 0
    return min(int(m), int((sv > ZERO_TOL * sv[0]).sum()))


def subspace_alignment(u: torch.Tensor, u_star: torch.Tensor) -> float | None:
    """||Uᵀ U*||_F² / m for orthonormal bases U (d x m1), U* (d x m2), m = min(m1, m2) (the first m columns of
    each: bases ordered by singular value); in [0, 1]. None when either is empty (a zero update has no subspace).

    Raises:
        ShapeMismatchError: the bases live in spaces of different dimension.
    """
    if u.shape[0] != u_star.shape[0]:
        raise ShapeMismatchError(f"subspaces of R^{u.shape[0]} and R^{u_star.shape[0]} cannot be compared")
    m = min(u.shape[1], u_star.shape[1])
    if m == 0:
        return None
    overlap = u[:, :m].double().t() @ u_star[:, :m].double()  # (m, m): cosines between the basis vectors
    return min(1.0, float(overlap.square().sum()) / m)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def compare_update(delta: torch.Tensor, lora_B: torch.Tensor, lora_A: torch.Tensor, scale: float, r: int,
                   top: int = 64, ranks: Sequence[int] = (1, 2, 4, 8, 16, 32, 64)) -> dict:
    """Full fine-tuning's update ΔW* of one module against LoRA's s B A (rank r), as JSON values:

    singular_values (the top `top` σ of ΔW*), fro_norm ||ΔW*||_F, energy_top_r (share of ||ΔW*||_F² in its top r
    directions), bound = sqrt(Σ_{i>r} σ_i²) and achieved = ||ΔW* - s B A||_F (achieved >= bound always), both also
    relative to ||ΔW*||_F, achieved / bound, lora_norm ||s B A||_F and its ratio to ||ΔW*||_F, the cosine
    <ΔW*, s B A>_F / (||ΔW*|| ||s B A||), the best scalar c* and the error ||ΔW* - c* s B A||_F (relative), and
    bound_curve {rank: bound / ||ΔW*||_F} at `ranks`.

    Raises:
        ShapeMismatchError: s B A and ΔW* have different shapes.
    """
    sv = singular_values(delta)
    norm = float(torch.linalg.vector_norm(sv))
    approx = lowrank_product(lora_B, lora_A, scale)
    bound = eckart_young_bound(sv, r)
    achieved = residual_norm(delta, approx)
    c, scaled = best_scalar_fit(delta, approx)
    lora_norm = float(torch.linalg.matrix_norm(approx))
    return {
        "d": int(approx.shape[0]), "k": int(approx.shape[1]), "r": int(r), "scale": float(scale),
        "singular_values": [float(s) for s in sv[:top]], "fro_norm": norm, "energy_top_r": top_energy(sv, r),
        "bound": bound, "bound_rel": _ratio(bound, norm), "achieved": achieved, "achieved_rel": _ratio(achieved, norm),
        "achieved_over_bound": _ratio(achieved, bound), "lora_norm": lora_norm, "lora_norm_rel": _ratio(lora_norm, norm),
        "cosine": cosine(delta, approx), "scalar": c, "scaled_error": scaled, "scaled_error_rel": _ratio(scaled, norm),
        "bound_curve": {str(k): _ratio(eckart_young_bound(sv, k), norm) for k in ranks},
    }


def update_alignment(target_bases: tuple[torch.Tensor, torch.Tensor], lora_B: torch.Tensor, lora_A: torch.Tensor,
                     scale: float, r: int) -> dict:
    """{"left": align(U_r(s B A), U*_r), "right": align(V_r(s B A), V*_r)} for the bases (U*_r, V*_r) of ΔW*'s top r
    singular subspaces (dense_subspaces(ΔW*, r)); None where s B A is zero (B = 0 at the start)."""
    u, v = lowrank_subspaces(lora_B, lora_A, scale, r)
    return {"left": subspace_alignment(u, target_bases[0]), "right": subspace_alignment(v, target_bases[1])}


# -- correlations ----------------------------------------------------------------------------------------
def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson's r = Σ (x - x̄)(y - ȳ) / sqrt(Σ (x - x̄)² Σ (y - ȳ)²), in [-1, 1]; None with fewer than 2 points or
    a constant x or y (r is undefined there).

    Raises:
        ShapeMismatchError: xs and ys differ in length.
    """
    if len(xs) != len(ys):
        raise ShapeMismatchError(f"{len(xs)} x values and {len(ys)} y values: a correlation needs pairs")
    if len(xs) < 2:
        return None
    x = torch.tensor(list(xs), dtype=torch.float64)
    y = torch.tensor(list(ys), dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    if denom <= 0.0 or not math.isfinite(denom):
        return None
    return max(-1.0, min(1.0, float((x * y).sum()) / denom))


def centred_within(values: Sequence[float], groups: Sequence[object]) -> list[float]:
    """values minus their group's mean (x_j - mean{x_l : g_l = g_j}): what a correlation sees once each group's
    (e.g. each checkpoint's) common level is taken out.

    Raises:
        ShapeMismatchError: values and groups differ in length.
    """
    if len(values) != len(groups):
        raise ShapeMismatchError(f"{len(values)} values and {len(groups)} group labels")
    sums: dict[object, list[float]] = {}
    for v, g in zip(values, groups):
        sums.setdefault(g, []).append(float(v))
    means = {g: sum(vs) / len(vs) for g, vs in sums.items()}
    return [float(v) - means[g] for v, g in zip(values, groups)]


def average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n of the values, tied values sharing the mean of their ranks ([10, 20, 20, 5] -> [2, 3.5, 3.5, 1])."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for j in range(start, end + 1):
            ranks[order[j]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's ρ: Pearson's r of the average ranks; None where Pearson's r is.

    Raises:
        ShapeMismatchError: xs and ys differ in length.
    """
    if len(xs) != len(ys):
        raise ShapeMismatchError(f"{len(xs)} x values and {len(ys)} y values: a correlation needs pairs")
    return pearson(average_ranks(xs), average_ranks(ys))


__all__ = ["ZERO_TOL", "as_matrix", "average_ranks", "best_scalar_fit", "centred_within", "compare_update", "cosine",
           "dense_subspaces", "eckart_young_bound", "lowrank_product", "lowrank_subspaces", "pearson", "residual_norm",
           "singular_values", "spearman", "subspace_alignment", "top_energy", "update_alignment"]
