"""The LoRA update as pure functions (Hu et al. 2021, arXiv 2106.09685).

    x ──► W0 ──────────────────► (+) ──► h        h = W0 x + s · B A dropout(x)
     └──► dropout ─► A (r×k) ─► B (d×r) ─► ·s ┘  s = alpha / r  (rsLoRA: alpha / sqrt(r))

`lora_linear_add` adds the adapter branch into the base layer's output in place. Its backward keeps only
a reference to x (none when A is frozen, as in LoRA-FA), dropout's random draw (2 bytes per element on the CPU,
1 elsewhere) and h = A x (r values per token): never a copy of dropout(x). `lora_linear` does the same for a
whole frozen Linear layer; for fp32 on the CPU it stores no draw at all, only the 64-bit key from which backward
makes the mask again (`ops.native`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from . import native


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """s = alpha / r (LoRA, section 4.1), or alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023, arXiv 2312.03732)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def init_lora_A(weight: torch.Tensor, init: str, r: int, generator: torch.Generator | None = None) -> None:
    """Initialise A in place: Kaiming-uniform with a = sqrt(5) (PEFT's and nn.Linear's default), or N(0, 1/r).

    Raises:
        ValueError: an unknown `init`.
    """
    with torch.no_grad():
        if init == "gaussian":
            weight.normal_(0.0, 1.0 / r, generator=generator)
        elif init in ("kaiming", "random"):
            fan_in = weight[0].numel()  # A is (r, k, *kernel): fan-in per output row
            bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) reduces to U(-1/sqrt(k), 1/sqrt(k))
            weight.uniform_(-bound, bound, generator=generator)
        else:
            raise ValueError(f"unknown init {init!r}")


def lora_delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW = s · B A in fp32, shaped (d, k, *kernel): A (r, k, *kernel), B (d, r, 1...)."""
    a2 = lora_A.float().flatten(1)  # (r, k·kernel)
    b2 = lora_B.float().flatten(1)  # (d, r)
    return (b2 @ a2).mul_(scale).view(lora_B.shape[0], *lora_A.shape[1:])


def realised_drop_probability(p: float, device: torch.device | str = "cpu") -> float:
    """The drop probability dropout actually uses on `device`: p rounded to 1/65536 on the CPU, else p."""
    return round(p * 65536) / 65536 if torch.device(device).type == "cpu" else p


def cpu_keep_rule(p: float) -> tuple[float, int]:
    """CPU dropout's rule for drop probability p: (the exact keep probability, the int16 threshold). A uniform int16
    draw u keeps its element iff u >= threshold; threshold = level - 32768 with level = round(65536 p)."""
    level = round(p * 65536)
    return 1.0 - level / 65536, level - 32768


def draw_dropout_bits(x2: torch.Tensor, p: float) -> tuple[torch.Tensor | None, float]:
    """The random draw behind dropout's mask for x2, and the exact keep probability; (None, 1) for p = 0.

    The draw is what backward saves (2 bytes per element on the CPU, 1 elsewhere); `keep_mask` turns it into
    the 0/1 mask. On the CPU it is 16-bit uniforms carved out of uniform 64-bit words (four elements per word)
    from the compiled Philox4x32-10 generator (`ops.native`), or from PyTorch's generator without a C compiler
    (4x cheaper than bernoulli_ even so): p is realised exactly to 1/65536 and the returned keep probability is
    the realised one, so the 1/keep rescaling stays unbiased. Elsewhere it is a bool mask from bernoulli_.
    """
    if p <= 0.0:
        return None, 1.0
    if x2.device.type == "cpu":
        n = x2.numel()
        bits = native.random_words((n + 3) // 4)  # Philox4x32-10, compiled; None without a C compiler
        if bits is None:
            bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)  # full range: no modulo
        return bits.view(torch.int16)[:n].view(x2.shape), cpu_keep_rule(p)[0]
    return torch.empty(x2.shape, dtype=torch.bool, device=x2.device).bernoulli_(1.0 - p), 1.0 - p


def keep_mask(bits: torch.Tensor, keep_prob: float, dtype: torch.dtype) -> torch.Tensor:
    """Dropout's keep mask (1 = kept, 0 = dropped) in `dtype`, a new tensor, from `draw_dropout_bits`'s draw.

    CPU draws are uniform int16 values u; an element is kept iff u >= threshold (`cpu_keep_rule`).
    The test runs as arithmetic in fp32 (u + 1 - threshold, clamped to [0, 1], is exactly 0 or 1): converting
    int16 to float and clamping are vectorised, whereas comparisons into bool and bool-to-float casts are not.
    """
    if bits.dtype == torch.bool:
        return bits.to(dtype)
    threshold = cpu_keep_rule(1.0 - keep_prob)[1]
    mask = bits.to(torch.float32).add_(1 - threshold).clamp_(0.0, 1.0)
    return mask if dtype == torch.float32 else mask.to(dtype)


def draw_keep_mask(x2: torch.Tensor, p: float) -> tuple[torch.Tensor | None, float]:
    """Dropout's keep mask for x2 as bool (True = kept) and the exact keep probability; (None, 1) for p = 0."""
    bits, keep_prob = draw_dropout_bits(x2, p)
    return (None if bits is None else keep_mask(bits, keep_prob, torch.uint8).bool()), keep_prob


def _masked(x2: torch.Tensor, bits: torch.Tensor | None, keep_prob: float, dtype: torch.dtype) -> torch.Tensor:
    """x ⊙ keep in `dtype` (a new tensor), or x itself cast to `dtype` (no copy if it has it) without dropout."""
    if bits is None:
        return x2.to(dtype)
    return keep_mask(bits, keep_prob, dtype).mul_(x2)


class _LoraLinearAdd(torch.autograd.Function):
    """out += c · (x ⊙ keep) Aᵀ Bᵀ in place, c = s / (1 - p); saves x (a reference), the dropout draw, h.

    With A frozen (LoRA-FA, Zhang et al. 2023, arXiv 2308.03303) ∇A is not needed, so x is not saved at all:
    ∇x needs only the draw, A and B, and ∇B needs h = A x (r values per token), so x can be freed after forward.
    """

    @staticmethod
    def forward(ctx, out, x, lora_A, lora_B, scale, dropout_p, compute_dtype):  # noqa: ANN001
        k, d = x.shape[-1], out.shape[-1]
        x2 = x.reshape(-1, k)  # (N, k), N = batch · tokens
        bits, keep_prob = draw_dropout_bits(x2, dropout_p)
        coeff = scale / keep_prob
        xin = _masked(x2, bits, keep_prob, compute_dtype)
        a = lora_A.to(compute_dtype)
        b = lora_B.to(compute_dtype)
        h = xin @ a.t()  # (N, r)
        del xin
        out2 = out.view(-1, d)  # (N, d), the base output's storage
        if out.dtype == compute_dtype:
            out2.addmm_(h, b.t(), alpha=coeff)
        else:
            out2.add_(h @ b.t(), alpha=coeff)
        ctx.mark_dirty(out)
        x_kept = x if ctx.needs_input_grad[2] else None  # only ∇A reads x (LoRA-FA: A frozen, x not kept)
        ctx.save_for_backward(x_kept, bits, h, lora_A, lora_B)
        ctx.coeff, ctx.keep_prob, ctx.x_shape, ctx.x_dtype = coeff, keep_prob, x.shape, x.dtype
        ctx.compute_dtype = compute_dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        x, bits, h, lora_A, lora_B = ctx.saved_tensors  # x is None when A is frozen
        cdt, coeff = ctx.compute_dtype, ctx.coeff
        k, d = ctx.x_shape[-1], grad_out.shape[-1]
        g = grad_out.reshape(-1, d).to(cdt)  # (N, d)
        b = lora_B.to(cdt)
        a = lora_A.to(cdt)
        grad_x = grad_A = grad_B = None
        gh = (g @ b).mul_(coeff)  # (N, r): gradient w.r.t. h
        mask = None if bits is None else keep_mask(bits, ctx.keep_prob, cdt)
        if ctx.needs_input_grad[3]:
            grad_B = (g.t() @ h).mul_(coeff).to(lora_B.dtype)  # (d, r)
        if ctx.needs_input_grad[1]:
            gx = gh @ a  # (N, k)
            if mask is not None:
                gx.mul_(mask)
            grad_x = gx.to(ctx.x_dtype).view(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            x2 = x.reshape(-1, k)
            xin = x2.to(cdt) if mask is None else mask.mul_(x2)  # the mask is not needed after this
            grad_A = (gh.t() @ xin).to(lora_A.dtype)  # (r, k)
        return grad_out, grad_x, grad_A, grad_B, None, None, None


def lora_linear_add(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Add s · B A dropout(x) to `out` (the base layer's output for x) in place and return it.

    Args:
        out: (..., d) output of the frozen base layer; overwritten.
        x: (..., k) the layer's input.
        lora_A: (r, k). lora_B: (d, r).
        scale: s. dropout_p: dropout on x in [0, 1); pass 0 outside training.

    The adapter math runs in the adapter's dtype (fp32 by default) or, under autocast, in the autocast
    dtype; the result is added in `out`'s dtype, so the output dtype is the input's.
    """
    if not out.is_contiguous():
        out = out.contiguous()
    compute_dtype = lora_A.dtype
    if torch.is_autocast_enabled(x.device.type):
        compute_dtype = torch.get_autocast_dtype(x.device.type)
    needs_grad = torch.is_grad_enabled() and (
        out.requires_grad or x.requires_grad or lora_A.requires_grad or lora_B.requires_grad
    )
    if needs_grad or dropout_p > 0.0:
        with torch.autocast(x.device.type, enabled=False):
            return _LoraLinearAdd.apply(out, x, lora_A, lora_B, scale, dropout_p, compute_dtype)
    # inference: one small matmul and one fused multiply-add into the base output
    k, d = x.shape[-1], out.shape[-1]
    h = x.reshape(-1, k).to(compute_dtype) @ lora_A.to(compute_dtype).t()  # (N, r)
    b = lora_B.to(compute_dtype)
    out2 = out.view(-1, d)
    if out.dtype == compute_dtype:
        out2.addmm_(h, b.t(), alpha=scale)
    else:
        out2.add_(h @ b.t(), alpha=scale)
    return out


class _LoraLinear(torch.autograd.Function):
    """out = x W0ᵀ + b + c · (x ⊙ keep) Aᵀ Bᵀ for a frozen W0 (Linear: W0 is (d, k); GPT-2 Conv1D: W0 is (k, d)).

    Owning the base GEMM lets backward accumulate the adapter's input gradient into g W0 in place
    (one buffer, no separate N x k tensor for autograd to add). x is saved only when ∇A or ∇W0 needs it:
    with A frozen (LoRA-FA) backward keeps h = A x, not x.

    `weight` may also be a function returning W0 (a quantised base, QLoRA): it is called in forward and again
    in backward, so no dense copy of W0 lives between them, and W0 gets no gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, dropout_p, transposed):  # noqa: ANN001
        k = x.shape[-1]
        x2 = x.reshape(-1, k)  # (N, k)
        lazy = callable(weight)
        w0 = weight() if lazy else weight
        w = w0 if transposed else w0.t()  # (k, d) view, no copy
        out = torch.addmm(bias, x2, w) if bias is not None else x2 @ w  # (N, d)
        del w, w0  # a dequantised W0 is freed here
        key = threshold = None
        if dropout_p > 0.0 and native.fused_dropout_applies(x2):  # mask drawn and applied in one pass, not stored
            key, bits = native.draw_key(), None
            keep_prob, threshold = cpu_keep_rule(dropout_p)
            xin = native.dropout_mul(x2, key, threshold)
        else:
            bits, keep_prob = draw_dropout_bits(x2, dropout_p)
            xin = _masked(x2, bits, keep_prob, x2.dtype)
        coeff = scale / keep_prob
        h = xin @ lora_A.t()  # (N, r)
        del xin
        out.addmm_(h, lora_B.t(), alpha=coeff)
        x_kept = x if ctx.needs_input_grad[1] or ctx.needs_input_grad[3] else None  # only ∇W0, ∇A read x
        ctx.save_for_backward(x_kept, None if lazy else weight, bits, h, lora_A, lora_B)
        ctx.weight_fn = weight if lazy else None
        ctx.key, ctx.threshold = key, threshold  # the fused dropout's mask is made again from its key
        ctx.coeff, ctx.keep_prob, ctx.transposed, ctx.has_bias = coeff, keep_prob, transposed, bias is not None
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        x, weight, bits, h, lora_A, lora_B = ctx.saved_tensors  # x is None when neither A nor W0 trains
        coeff = ctx.coeff
        k, d = ctx.x_shape[-1], grad_out.shape[-1]
        g = grad_out.reshape(-1, d)  # (N, d)
        gh = (g @ lora_B).mul_(coeff)  # (N, r)
        mask = None if bits is None else keep_mask(bits, ctx.keep_prob, ctx.x_dtype)
        key, threshold = ctx.key, ctx.threshold
        x2 = None if x is None else x.reshape(-1, k)
        x_dropped = None  # x ⊙ keep for ∇A, when the fused dropout's backward has made it
        grad_x = grad_w = grad_bias = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            w0 = ctx.weight_fn() if ctx.weight_fn is not None else weight
            gx = g @ (w0.t() if ctx.transposed else w0)  # (N, k): the base layer's input gradient
            del w0
            if key is not None:  # gx += (gh A) ⊙ keep and, in the same pass, gh A <- x ⊙ keep for ∇A
                x_dropped = gh @ lora_A
                native.dropout_backward(gx, x_dropped, x2 if ctx.needs_input_grad[3] else None, key, threshold)
            elif mask is None:
                gx.addmm_(gh, lora_A)  # + the adapter's, accumulated in place
            else:
                gx.addcmul_(gh @ lora_A, mask)
            grad_x = gx.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:  # a trainable base weight (not LoRA's case, but keep autograd's contract)
            gw = g.t() @ x2  # (d, k)
            grad_w = gw.t() if ctx.transposed else gw
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        if ctx.needs_input_grad[3]:
            if key is not None:
                xin = x_dropped if x_dropped is not None else native.dropout_mul(x2, key, threshold)
            else:
                xin = x2 if mask is None else mask.mul_(x2)  # the mask is not needed after this
            grad_A = native.at_b(gh, xin)  # (r, k) = ghᵀ xin
        if ctx.needs_input_grad[4]:
            grad_B = native.at_b(h, g).mul_(coeff).t()  # (d, r) = (hᵀ g)ᵀ
        return grad_x, grad_w, grad_bias, grad_A, grad_B, None, None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | Callable[[], torch.Tensor],
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    transposed: bool = False,
    weight_dtype: torch.dtype | None = None,
) -> torch.Tensor | None:
    """The whole adapted layer in one op: x W0ᵀ + b + s · B A dropout(x); `transposed` for (k, d) weights.

    `weight` is W0, or a function that returns it (a quantised base: called when needed, never kept, no
    gradient), then with `weight_dtype`, the dtype it returns. Returns None when the fused path does not apply
    (mixed dtypes, autocast, a small inference batch), and the caller then uses the base layer followed by
    `lora_linear_add`.
    """
    lazy = callable(weight)
    if lazy and weight_dtype is None:
        raise ValueError("lora_linear: a weight function needs weight_dtype")
    w_dtype = weight_dtype if lazy else weight.dtype
    dtypes = {x.dtype, w_dtype, lora_A.dtype, lora_B.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) != 1 or torch.is_autocast_enabled(x.device.type):
        return None
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, None if lazy else weight, bias, lora_A, lora_B)
    )
    if not needs_grad and dropout_p == 0.0:
        return lora_linear_inference(x, weight, bias, lora_A, lora_B, scale, transposed)
    return _LoraLinear.apply(x, weight, bias, lora_A, lora_B, scale, dropout_p, transposed)


def effective_weight_pays(n_tokens: int, k: int, d: int) -> bool:
    """Whether building W0 + s B A once beats adding the branch per token, for n_tokens rows through a d x k layer.

    Building it moves ~2·d·k values (read W0, write the sum) and costs 2·d·k·r FLOPs (r/n_tokens of the base
    GEMM's); the branch re-reads x (n·k values) and reads and writes the output (2·n·d) in skinny, memory-bound
    GEMMs. The sum is built when it moves fewer values.
    """
    return n_tokens * (k + 2 * d) > 2 * d * k


def lora_linear_inference(
    x: torch.Tensor,
    weight: torch.Tensor | Callable[[], torch.Tensor],
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    transposed: bool = False,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Inference through an unmerged adapter as one GEMM with a transient W0 + s B A (the model's weights are
    untouched); None when the batch is too small for that to pay (`effective_weight_pays`), for the add path.

    `row_scale` (d,), if given, multiplies each output row of the effective weight (DoRA's m / n). `weight` may be
    a function returning W0 (a quantised base): it is called only when the sum pays, and the sum is made in place.
    """
    k = x.shape[-1]
    d = lora_B.shape[0]
    if not effective_weight_pays(x.numel() // max(k, 1), k, d):
        return None
    if row_scale is not None:  # rs ⊙_row (W0 + s B A) = rs ⊙_row W0 + s (rs ⊙_row B) A: one pass over W0, like LoRA
        lora_B = lora_B * row_scale[:, None]
    pair = (lora_A.t(), lora_B.t()) if transposed else (lora_B, lora_A)  # s B A in W0's layout: pair[0] @ pair[1]
    if row_scale is not None:
        rs = row_scale if transposed else row_scale[:, None]
        w_eff = weight().mul_(rs) if callable(weight) else weight * rs
        w_eff.addmm_(*pair, alpha=scale)
    elif callable(weight):  # a fresh dequantised W0: add s B A into it in place
        w_eff = weight()
        w_eff.addmm_(*pair, alpha=scale)
    else:
        w_eff = torch.addmm(weight, *pair, alpha=scale)  # W0's layout: (d, k), or (k, d) for GPT-2 Conv1D
    if transposed:
        x2 = x.reshape(-1, k)
        out = torch.addmm(bias, x2, w_eff) if bias is not None else x2 @ w_eff
        return out.view(*x.shape[:-1], d)
    return torch.nn.functional.linear(x, w_eff, bias)
