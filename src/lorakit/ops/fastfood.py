"""Random projections z (d) -> P z (D) for subspace training, as pure functions: the fast Walsh-Hadamard transform,
the Fastfood transform (Le, Sarlós & Smola 2013, "Fastfood: approximating kernel expansions in loglinear time")
used as Li et al. 2018 ("Measuring the intrinsic dimension of objective landscapes", arXiv 1804.08838) and
Aghajanyan et al. 2020 (arXiv 2012.13255) use it, and a dense Gaussian projection for small D x d.

    Walsh-Hadamard:  H_1 = [1],  H_2n = [[H_n, H_n], [H_n, -H_n]]   (Sylvester's order, scipy.linalg.hadamard's)
                     H_n is symmetric, H_n H_n = n I, and H_n = H_a ⊗ H_b (n = a b): y = H_n x in O(n log n)

    Fastfood, one block of size n = 2^ceil(log2 d) (z zero-padded to n):
                     V_b = H G_b Π_b H B_b            B_b: diagonal ±1, Π_b: a permutation, G_b: diagonal N(0, 1)
                     every column of V_b has squared norm exactly n ||g_b||²: divide by sqrt(n ||g_b||²)
    P (D x d):       ceil(D / n) independent blocks stacked, the rows cut at D, the columns of z's padding dropped,
                     and everything divided by sqrt(D / n): each column of P has unit norm in expectation
                     (exactly 1 when n divides D)

P z costs O(D log n) time and O(D) memory; P itself (D x d) is never formed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


# -- Walsh-Hadamard --------------------------------------------------------------------------------------
def is_power_of_two(n: int) -> bool:
    """n = 2^m for some m >= 0."""
    return n >= 1 and n & (n - 1) == 0


def next_power_of_two(n: int) -> int:
    """The smallest 2^m >= n (n >= 1)."""
    return 1 << max(0, (n - 1).bit_length())


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The dense n x n Hadamard matrix of Sylvester's construction (entries ±1), for tests and small n.

    Raises:
        ValueError: n is not a power of two.
    """
    if not is_power_of_two(n):
        raise ValueError(f"a Sylvester Hadamard matrix needs n = 2^m, got n = {n}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


RADIX_BITS = 6  # each stage of the transform is one GEMM with H_s, s <= 2^6 (see _stages)


def _stages(m: int, max_bits: int = RADIX_BITS) -> list[int]:
    """Split n = 2^m into stage sizes s_1 ... s_k (powers of two, s_i <= 2^max_bits, as equal as possible)."""
    k = max(1, math.ceil(m / max_bits))
    return [1 << (m // k + (1 if i < m % k else 0)) for i in range(k)]


def _radix_transform(x: Tensor) -> Tensor:
    """H_n x along the last axis, as a radix-s FWHT: H_n = H_s1 ⊗ ... ⊗ H_sk (Sylvester's order is the Kronecker
    order), so x viewed as (rows, s_1, ..., s_k) gets H_si along axis i, one GEMM per axis. Each stage costs
    n s_i multiply-adds: O(n log n) with a constant of at most 2^RADIX_BITS / RADIX_BITS (the radix-2 butterflies
    of the textbook are the case s = 2; a GEMM with H_64 runs several times faster than six of them on a CPU)."""
    n = x.shape[-1]
    if n == 1:
        return x.clone()
    y = x.reshape(-1, n)
    right = n
    for s in _stages(n.bit_length() - 1):
        right //= s
        h = hadamard_matrix(s, dtype=x.dtype).to(x.device)
        if right == 1:
            y = y.reshape(-1, s) @ h  # the last axis (H is symmetric)
        else:
            y = torch.matmul(h, y.reshape(-1, s, right))  # (rows·left, s, right): H_s along the middle axis
    return y.reshape(x.shape)


class _WalshHadamard(torch.autograd.Function):
    """y = H x; since H is symmetric, the gradient is H g (nothing is saved for backward)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return _radix_transform(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return _WalshHadamard.apply(grad)


def fwht(x: Tensor) -> Tensor:
    """The fast Walsh-Hadamard transform y = H_n x along the last axis (unnormalised; Sylvester's order, so
    fwht(x) == x @ hadamard_matrix(n)); O(n log n), differentiable (also twice: the backward is fwht itself).

    Raises:
        ValueError: the last axis' length is not a power of two.
    """
    n = x.shape[-1]
    if not is_power_of_two(n):
        raise ValueError(f"fwht needs a last axis of length 2^m, got {n} (pad it with zeros to a power of two)")
    return _WalshHadamard.apply(x.contiguous())


# -- Fastfood --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fastfood:
    """The random draws of one Fastfood projection P (D x d): `blocks` blocks of size n."""

    d: int  # dimension of z (the columns of P)
    D: int  # dimension of the output (the rows of P)
    signs: Tensor  # (blocks, n): B, ±1
    perm: Tensor  # (blocks, n) int64: Π, (Π x)_i = x_perm[i], a permutation of 0..n-1 per block
    gain: Tensor  # (blocks, n): G_b / divisor_b (fastfood_block_norm), the normalisation folded into G

    @property
    def n(self) -> int:
        return self.signs.shape[1]

    @property
    def blocks(self) -> int:
        return self.signs.shape[0]


def fastfood_draw(d: int, D: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> Fastfood:
    """Draw a Fastfood projection from R^d to R^D (blocks of n = 2^ceil(log2 d), ceil(D / n) of them), all from
    `generator` (the same generator state gives the same P).

    Raises:
        ValueError: d < 1 or D < 1.
    """
    if d < 1 or D < 1:
        raise ValueError(f"a projection from R^d to R^D needs d >= 1 and D >= 1, got d = {d}, D = {D}")
    n = next_power_of_two(d)
    blocks = math.ceil(D / n)
    signs = torch.randint(0, 2, (blocks, n), generator=generator).to(dtype).mul_(2).sub_(1)
    perm = torch.argsort(torch.rand(blocks, n, generator=generator), dim=1)
    gauss = torch.randn(blocks, n, generator=generator, dtype=torch.float64)
    gain = (gauss / fastfood_block_norm(gauss, D)).to(dtype)
    return Fastfood(d=d, D=D, signs=signs, perm=perm, gain=gain)


def fastfood_block_norm(gauss: Tensor, D: int) -> Tensor:
    """The divisor of each block, (blocks, 1): sqrt(n ||g_b||²) · sqrt(D / n). A column of H G_b Π_b H B_b has
    squared norm exactly n ||g_b||² (H is sqrt(n) times an orthogonal matrix; B, Π keep norms; every entry of a
    column of H Bᵦ is ±1), and the stacked blocks hold D / n of them."""
    n = gauss.shape[1]
    return (n * gauss.double().square().sum(1, keepdim=True) * (D / n)).sqrt().to(gauss.dtype)


def _project(z: Tensor, ff: Fastfood) -> Tensor:
    """P z: per block (H G Π H B [z; 0]) · gain, the blocks concatenated and cut at D."""
    y = _radix_transform(ff.signs * torch.nn.functional.pad(z, (0, ff.n - ff.d)))  # (blocks, n): H B z
    y = torch.gather(y, 1, ff.perm).mul_(ff.gain)  # G Π H B z (G already divided by the block's divisor)
    return _radix_transform(y).view(-1)[: ff.D]  # (D,)


def _project_transpose(g: Tensor, ff: Fastfood) -> Tensor:
    """Pᵀ g: per block B H Πᵀ G H [g_b] (H, G, B symmetric), summed over the blocks, cut at d."""
    u = torch.nn.functional.pad(g, (0, ff.blocks * ff.n - ff.D)).view(ff.blocks, ff.n)
    u = _radix_transform(u).mul_(ff.gain)  # G H g
    u = torch.empty_like(u).scatter_(1, ff.perm, u)  # Πᵀ: (Πᵀ u)_perm[i] = u_i
    u = _radix_transform(u).mul_(ff.signs)  # B H Πᵀ G H g
    return u.sum(0)[: ff.d]  # (d,)


class _FastfoodMap(torch.autograd.Function):
    """z -> P z; the gradient is Pᵀ g (no activations saved: P's draws are kept by the caller anyway)."""

    @staticmethod
    def forward(ctx, z: Tensor, ff: Fastfood) -> Tensor:  # type: ignore[override]
        ctx.ff = ff
        return _project(z, ff)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return _project_transpose(grad.contiguous(), ctx.ff), None


def fastfood_apply(ff: Fastfood, z: Tensor) -> Tensor:
    """P z (D,) for z (d,). Linear in z and differentiable (the gradient is fastfood_transpose); O(D log n) time,
    a few D-vectors of memory.

    Raises:
        ValueError: z is not a vector of length d.
    """
    if z.dim() != 1 or z.shape[0] != ff.d:
        raise ValueError(f"z must be a vector of length d = {ff.d}, got shape {tuple(z.shape)}")
    return _FastfoodMap.apply(z, ff)


def fastfood_transpose(ff: Fastfood, g: Tensor) -> Tensor:
    """Pᵀ g (d,) for g (D,).

    Raises:
        ValueError: g is not a vector of length D.
    """
    if g.dim() != 1 or g.shape[0] != ff.D:
        raise ValueError(f"g must be a vector of length D = {ff.D}, got shape {tuple(g.shape)}")
    return _project_transpose(g.contiguous(), ff)


# -- dense -----------------------------------------------------------------------------------------------
def dense_projection(d: int, D: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
    """A dense random P (D x d): entries N(0, 1), each column then divided by its norm (unit-norm columns).

    Raises:
        ValueError: d < 1 or D < 1.
    """
    if d < 1 or D < 1:
        raise ValueError(f"a projection from R^d to R^D needs d >= 1 and D >= 1, got d = {d}, D = {D}")
    p = torch.randn(D, d, generator=generator, dtype=torch.float64)
    return (p / p.norm(dim=0, keepdim=True)).to(dtype)


__all__ = ["Fastfood", "dense_projection", "fastfood_apply", "fastfood_block_norm", "fastfood_draw", "fastfood_transpose", "fwht",
           "hadamard_matrix", "is_power_of_two", "next_power_of_two"]
