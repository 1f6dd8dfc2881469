"""DoRA as pure functions (Liu et al. 2024, arXiv 2402.09353).

    W' = m ⊙ (W0 + s B A) / n,   n_i = ||W0_i + s (B A)_i||   (one norm per output row, as PEFT takes it)
    y  = c ⊙ (W0 x + s B A dropout(x)) + b,   c = m / n

n is treated as a constant in backward (the paper's section 4.3). It comes from low-rank pieces, so no
d × k matrix is built per step:

    n_i² = ||W0_i||² + 2 s B_i · (A W0ᵀ)_{:,i} + s² B_i (A Aᵀ) B_iᵀ

with ||W0_i||² frozen (computed once per base-weight version). Dropout acts on the adapter branch only
(as in torchtune); without dropout the output is PEFT's exactly.

`dora_linear` is the whole adapted Linear / GPT-2 Conv1D layer in one autograd op. Its backward keeps the
layer's output y (a reference: the model usually keeps it anyway) and recovers W0 x + s B A dropout(x) as
(y - b) / c for the magnitude's gradient, instead of keeping a second d-wide tensor per token.
"""

from __future__ import annotations

import torch

from .lora import draw_dropout_bits, keep_mask, lora_linear_inference

NORM_EPS = 1e-12  # n is clamped to this: a weight row of zeros gives c = m / eps (0 for m = 0), never NaN


def weight_rows(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """The base weight as a (d, k') view whose rows are the rows DoRA normalises (no copy).

    layout: "dk" (nn.Linear, nn.ConvNd: (d, k, *kernel)) or "kd" (GPT-2 Conv1D, nn.Embedding: (k, d)).
    """
    return weight.t() if layout == "kd" else weight.flatten(1)


@torch.no_grad()
def row_norms_sq(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """||W0_i||² per output row, in fp32 (or in the weight's dtype if wider)."""
    rows = weight_rows(weight, layout)
    dtype = torch.promote_types(rows.dtype, torch.float32)
    return torch.linalg.vector_norm(rows, dim=1, dtype=dtype).square_()


@torch.no_grad()
def dora_norm(
    w0_sq: torch.Tensor,
    weight: torch.Tensor,
    layout: str,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    eps: float = NORM_EPS,
) -> torch.Tensor:
    """n = ||W0 + s B A||_row in fp32 from low-rank pieces (never materialises W0 + s B A), clamped to >= eps.

    w0_sq: (d,) = ||W0_i||². lora_A: (r, k, *kernel). lora_B: (d, r, 1...).
    """
    acc = w0_sq.dtype  # fp32, or fp64 for a fp64 base
    a = lora_A.flatten(1)  # (r, k')
    b = lora_B.flatten(1).to(acc)  # (d, r)
    rows = weight_rows(weight, layout)  # (d, k')
    aw = (a.to(rows.dtype) @ rows.t()).to(acc)  # (r, d) = A W0ᵀ: accumulated in fp32 by the GEMM
    af = a.to(acc)
    gram = af @ af.t()  # (r, r) = A Aᵀ
    cross = (b * aw.t()).sum(1)  # B_i · (A W0ᵀ)_{:,i}
    quad = ((b @ gram) * b).sum(1)  # B_i A Aᵀ B_iᵀ
    n_sq = w0_sq + (2.0 * scale) * cross + (scale * scale) * quad
    return n_sq.clamp_min_(0.0).sqrt_().clamp_min_(eps)


def dora_merged_weight(
    weight: torch.Tensor, layout: str, delta: torch.Tensor, magnitude: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', c) in fp32 and the weight's layout: W' = c ⊙_row (W0 + ΔW), c = m / ||W0 + ΔW||_row.

    delta: s B A in the weight's layout (fp32). Used by merge, where a full matrix is built once anyway.
    """
    full = weight.float() + delta
    rows = weight_rows(full, layout)
    c = magnitude.float() / torch.linalg.vector_norm(rows, dim=1).clamp_min(NORM_EPS)
    merged_rows = rows * c[:, None]
    merged = merged_rows.t() if layout == "kd" else merged_rows.view(weight.shape)
    return merged, c


@torch.no_grad()
def row_magnitude_direction(w0: torch.Tensor, w1: torch.Tensor, layout: str = "dk") -> tuple[torch.Tensor, torch.Tensor]:
    """Per output row i of a weight moving from W0 to W1 (dense, e.g. full fine-tuning), the DoRA paper's
    magnitude and direction changes (Liu et al. 2024, section 2.2), per row as lorakit's and PEFT's DoRA normalise:

        ΔM_i = ||W1_i|| - ||W0_i||          (signed; the paper averages |ΔM_i|)
        ΔD_i = 1 - cos(W1_i, W0_i)          (0 for an unchanged direction; a zero row counts as cos = 1)

    Computed in fp32 (fp64 for a fp64 weight). Returns two (d,) tensors.

    Raises:
        ValueError: W0 and W1 of different shapes.
    """
    if w0.shape != w1.shape:
        raise ValueError(f"row_magnitude_direction: W0 has shape {tuple(w0.shape)}, W1 {tuple(w1.shape)}")
    acc = torch.promote_types(w0.dtype, torch.float32)
    r0, r1 = weight_rows(w0, layout).to(acc), weight_rows(w1, layout).to(acc)
    n0, n1 = torch.linalg.vector_norm(r0, dim=1), torch.linalg.vector_norm(r1, dim=1)
    return n1 - n0, _one_minus_cos((r0 * r1).sum(1), n0, n1)


def _one_minus_cos(dot: torch.Tensor, n0: torch.Tensor, n1: torch.Tensor) -> torch.Tensor:
    denom = n0 * n1
    cos = torch.where(denom > 0, dot / denom.clamp_min(torch.finfo(denom.dtype).tiny), torch.ones_like(dot))
    return (1.0 - cos.clamp(-1.0, 1.0)).clamp_min(0.0)


@torch.no_grad()
def lowrank_magnitude_direction(w0: torch.Tensor, layout: str, lora_A: torch.Tensor, lora_B: torch.Tensor,
                                scale: float, magnitude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """row_magnitude_direction for W1 = W0 + s B A (LoRA), or with `magnitude` m for DoRA, whose row i is
    W1_i = m_i V_i / ||V_i||, V = W0 + s B A (so ||W1_i|| = |m_i| and W1_i points along sign(m_i) V_i), without
    forming the d x k matrix:

        ||V_i||² = ||W0_i||² + 2 s B_i · (A W0ᵀ)_{:,i} + s² B_i A Aᵀ B_iᵀ       (dora_norm)
        W0_i · V_i = ||W0_i||² + s B_i · (A W0ᵀ)_{:,i}

    Returns (ΔM, ΔD), two (d,) tensors in fp32 (fp64 for a fp64 base).
    """
    w0_sq = row_norms_sq(w0, layout)
    acc = w0_sq.dtype
    n_v = dora_norm(w0_sq, w0, layout, lora_A, lora_B, scale, eps=0.0)
    rows = weight_rows(w0, layout)
    a = lora_A.flatten(1)
    b = lora_B.flatten(1).to(acc)
    cross = (b * (a.to(rows.dtype) @ rows.t()).to(acc).t()).sum(1)
    dot = w0_sq + scale * cross
    n0 = w0_sq.sqrt()
    if magnitude is None:
        return n_v - n0, _one_minus_cos(dot, n0, n_v)
    m = magnitude.reshape(-1).to(acc)  # a negative m_i flips the row: ||W1_i|| = |m_i|, W1_i along -V_i
    return m.abs() - n0, _one_minus_cos(torch.where(m < 0, -dot, dot), n0, n_v)


class _DoraLinear(torch.autograd.Function):
    """y = c ⊙ (x W0ᵀ + coeff · (x ⊙ keep) Aᵀ Bᵀ) + b, c = m / n, for a frozen W0; n is a constant."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, norm, scale, dropout_p, transposed):  # noqa: ANN001
        k = x.shape[-1]
        x2 = x.reshape(-1, k)  # (N, k)
        w = weight if transposed else weight.t()  # (k, d) view
        out = x2 @ w  # (N, d)
        bits, keep_prob = draw_dropout_bits(x2, dropout_p)
        coeff = scale / keep_prob
        xin = x2 if bits is None else keep_mask(bits, keep_prob, x2.dtype).mul_(x2)
        h = xin @ lora_A.t()  # (N, r)
        del xin
        out.addmm_(h, lora_B.t(), alpha=coeff)  # z = W0 x + s B A dropout(x)
        c = magnitude / norm  # (d,)
        out.mul_(c)
        if bias is not None:
            out.add_(bias)
        keep_x = lora_A.requires_grad or weight.requires_grad or bool((c == 0).any())
        ctx.save_for_backward(x if keep_x else None, weight, bias, bits, h, lora_A, lora_B, norm, c, out)
        ctx.coeff, ctx.keep_prob, ctx.transposed, ctx.x_shape = coeff, keep_prob, transposed, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        x, weight, bias, bits, h, lora_A, lora_B, norm, c, y = ctx.saved_tensors
        coeff = ctx.coeff
        d = grad_out.shape[-1]
        g = grad_out.reshape(-1, d)  # (N, d)
        grad_x = grad_w = grad_bias = grad_A = grad_B = grad_m = None
        needs = ctx.needs_input_grad
        if needs[5]:  # magnitude: dL/dm_i = sum_t g_ti z_ti / n_i, z = (y - b) / c
            gy = (g * y).sum(0)
            if bias is not None:
                gy.sub_(bias * g.sum(0))
            grad_m = gy / (c * norm)
            zero = (c == 0).nonzero().flatten()
            if zero.numel():  # rows with m = 0: z cannot be read off y; rebuild those columns from x
                x2 = x.reshape(-1, x.shape[-1])
                w_rows = weight[:, zero] if ctx.transposed else weight[zero].t()
                z = x2 @ w_rows + coeff * (h @ lora_B[zero].t())
                grad_m[zero] = (g[:, zero] * z).sum(0) / norm[zero]
        if needs[2] and bias is not None:
            grad_bias = g.sum(0)
        gz = g * c  # (N, d): gradient w.r.t. z
        gh = (gz @ lora_B).mul_(coeff)  # (N, r)
        mask = None if bits is None else keep_mask(bits, ctx.keep_prob, gz.dtype)
        if needs[0]:
            gx = gz @ (weight.t() if ctx.transposed else weight)  # (N, k)
            if mask is None:
                gx.addmm_(gh, lora_A)
            else:
                gx.addcmul_(gh @ lora_A, mask)
            grad_x = gx.view(ctx.x_shape)
        if needs[1]:
            gw = gz.t() @ x.reshape(-1, x.shape[-1])  # (d, k)
            grad_w = gw.t() if ctx.transposed else gw
        if needs[3]:
            x2 = x.reshape(-1, x.shape[-1])
            grad_A = gh.t() @ (x2 if mask is None else mask.mul_(x2))  # (r, k)
        if needs[4]:
            grad_B = (gz.t() @ h).mul_(coeff)  # (d, r)
        return grad_x, grad_w, grad_bias, grad_A, grad_B, grad_m, None, None, None, None


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    transposed: bool = False,
) -> torch.Tensor | None:
    """The whole DoRA layer in one op: m / n ⊙ (x W0ᵀ + s B A dropout(x)) + b; `transposed` for (k, d) weights.

    `norm` is n from `dora_norm` (a constant). Returns None when the op does not apply (mixed dtypes,
    autocast); the caller then uses `dora_add_to_output`.
    """
    tensors = [x, weight, lora_A, lora_B, magnitude] + ([bias] if bias is not None else [])
    if len({t.dtype for t in tensors}) != 1 or torch.is_autocast_enabled(x.device.type):
        return None
    norm = norm.to(x.dtype)
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
        if dropout_p > 0.0:
            return None
        with torch.no_grad():  # inference: no autograd bookkeeping, nothing saved
            out = lora_linear_inference(x, weight, bias, lora_A, lora_B, scale, transposed, magnitude / norm)
            if out is not None:  # one GEMM with the transient weight m / n ⊙_row (W0 + s B A)
                return out
            x2 = x.reshape(-1, x.shape[-1])
            out = x2 @ (weight if transposed else weight.t())
            out.addmm_(x2 @ lora_A.t(), lora_B.t(), alpha=scale)
            out.mul_(magnitude / norm)
            if bias is not None:
                out.add_(bias)
            return out.view(*x.shape[:-1], out.shape[-1])
    return _DoraLinear.apply(x, weight, bias, lora_A, lora_B, magnitude, norm, scale, dropout_p, transposed)
