"""Inits that take B, A out of the pre-trained weight W0 (d, k) and leave the residual in the base, as pure functions.

    PiSSA (Meng et al. 2024, arXiv 2404.02948):  W0 = U S Vᵀ,  B = U_r sqrt(S_r / s),  A = sqrt(S_r / s) V_rᵀ
        so s B A = U_r S_r V_rᵀ is the best rank-r part of W0 (Eckart-Young) and W_res = W0 - s B A.
    OLoRA (Büyükakyüz 2024, arXiv 2406.01775):  W0 = Q R,  B = Q[:, :r],  A = R[:r],  W_res = W0 - s B A.

Every function works in fp32 on the weight's device and takes W0 in the (d, k) layout (out, in).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

DEFAULT_OVERSAMPLE = 10  # extra sketch columns of the randomised SVD (Halko et al. 2011 suggest 5 to 10)


def _check_rank(weight: Tensor, r: int) -> None:
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight (d, k), got shape {tuple(weight.shape)}")
    if not 0 < r <= min(weight.shape):
        raise ValueError(f"rank r={r} must be in [1, min(d, k)] = [1, {min(weight.shape)}] for a {tuple(weight.shape)} weight")


def _orthonormal_basis(y: Tensor) -> Tensor:
    """An orthonormal basis of the columns of y (n, q): the Q of its reduced QR."""
    return torch.linalg.qr(y, mode="reduced").Q


def randomized_svd(
    weight: Tensor, r: int, niter: int, oversample: int = DEFAULT_OVERSAMPLE, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-r singular triplets (U_r (d, r), S_r (r,), Vh_r (r, k)) of `weight` by randomised subspace iteration.

    Halko, Martinsson & Tropp 2011 (arXiv 0909.4061), Algorithm 4.4: a Gaussian sketch Y = W Ω with
    q = r + oversample columns, `niter` power iterations Y <- W (Wᵀ Q) with a QR re-orthonormalisation after
    every product (without it the columns collapse onto the top singular vector in floating point), then the
    exact SVD of the small (q, k) matrix Qᵀ W. The error shrinks like (σ_{q+1} / σ_r)^(2 niter + 1).

    Raises:
        ValueError: r outside [1, min(d, k)] or niter < 0.
    """
    _check_rank(weight, r)
    if niter < 0:
        raise ValueError(f"niter must be >= 0, got {niter}")
    w = weight.float()
    d, k = w.shape
    q = min(r + oversample, d, k)
    omega = torch.randn(k, q, dtype=w.dtype, device="cpu", generator=generator).to(w.device)  # (k, q)
    basis = _orthonormal_basis(w @ omega)  # (d, q): approximates W's range
    for _ in range(niter):
        basis = _orthonormal_basis(w @ _orthonormal_basis(w.t() @ basis))  # (d, q)
    u_small, s, vh = torch.linalg.svd(basis.t() @ w, full_matrices=False)  # (q, q), (q,), (q, k)
    return (basis @ u_small[:, :r]), s[:r], vh[:r]


def exact_svd(weight: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-r singular triplets (U_r, S_r, Vh_r) of `weight` from the full SVD (torch.linalg.svd)."""
    _check_rank(weight, r)
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    return u[:, :r], s[:r], vh[:r]


def pissa_factors(
    weight: Tensor, r: int, scale: float, niter: int | None = None, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """PiSSA's (A (r, k), B (d, r)) in fp32: B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_rᵀ, so s B A = U_r S_r V_rᵀ.

    Args:
        weight: W0 (d, k), any float dtype.
        r: rank. scale: s (alpha / r, or alpha / sqrt(r)).
        niter: None for the exact SVD (PEFT's "pissa"); n >= 0 for the randomised SVD with n power
            iterations (PEFT's "pissa_niter_<n>").

    Raises:
        ValueError: r outside [1, min(d, k)], scale <= 0 or niter < 0.
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    u, s, vh = exact_svd(weight, r) if niter is None else randomized_svd(weight, r, niter, generator=generator)
    root = (s / scale).sqrt()  # (r,)
    return root[:, None] * vh, u * root[None, :]


def olora_factors(weight: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """OLoRA's (A (r, k), B (d, r)) in fp32: W0 = Q R (reduced QR), B = Q[:, :r] (orthonormal), A = R[:r].

    As in the paper and PEFT, the factors are not rescaled: the residual is W0 - s Q_r R_r.

    Raises:
        ValueError: r outside [1, min(d, k)].
    """
    _check_rank(weight, r)
    q, rr = torch.linalg.qr(weight.float(), mode="reduced")  # (d, m), (m, k), m = min(d, k)
    return rr[:r].contiguous(), q[:, :r].contiguous()


def residual_factors(
    weight: Tensor, r: int, scale: float, init: str, niter: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """(A, B) in fp32 for `init` "pissa" (exact, or randomised with `niter`) or "olora".

    Raises:
        ValueError: an unknown init, or a rank the weight cannot hold.
    """
    if init == "olora":
        return olora_factors(weight, r)
    if init == "pissa":
        return pissa_factors(weight, r, scale, niter, generator)
    raise ValueError(f"unknown residual init {init!r} (expected 'pissa' or 'olora')")


@torch.no_grad()
def subtract_low_rank_(weight: Tensor, left: Tensor, right: Tensor, scale: float) -> None:
    """weight -= s · left @ right in place, the sum in fp32 (one addmm_, no temporary, for an fp32 weight).

    W_res = W0 - s B A for a (d, k) weight is (left, right) = (B, A); for a weight stored (k, d), (Aᵀ, Bᵀ).
    """
    left, right = left.float(), right.float()
    if weight.dtype == torch.float32:
        weight.addmm_(left, right, alpha=-scale)
    else:
        weight.copy_(torch.addmm(weight.float(), left, right, alpha=-scale))


def weight_fingerprint(weight: Tensor, probes: int = 4, seed: int = 0) -> list[float]:
    """A few numbers that tell a residual base W_res = W0 - s B0 A0 from W0 (d, k): [||W||_F, u_1ᵀ W v_1, ...].

    u_i (d,), v_i (k,) are ±1 vectors from a fixed seed, so each probe has standard deviation ||W||_F over the
    draw of the signs, and W0 and W_res differ in it by about ||s B0 A0||_F. The norm alone is not enough:
    OLoRA with s = 2 makes W_res = (I - 2 Q_r Q_rᵀ) W0, a reflection of W0 with exactly its norm.
    """
    w = weight.float()
    d, k = w.shape
    gen = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 2, (probes, d), generator=gen).float().mul_(2).sub_(1).to(w.device)  # (p, d)
    v = torch.randint(0, 2, (probes, k), generator=gen).float().mul_(2).sub_(1).to(w.device)  # (p, k)
    values = ((u @ w) * v).sum(dim=1)  # (p,): u_i^T W v_i
    return [float(torch.linalg.vector_norm(w)), *values.tolist()]
