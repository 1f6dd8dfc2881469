"""Property tests for the pure LoRA functions in lorakit.ops.lora."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.ops.lora import (
    init_lora_A,
    lora_delta_weight,
    lora_linear_add,
    lora_scaling,
    realised_drop_probability,
)

SETTINGS = settings(max_examples=30, deadline=None)

dims = st.integers(min_value=1, max_value=7)
ranks = st.integers(min_value=1, max_value=4)
seeds = st.integers(min_value=0, max_value=2**31 - 1)
scales = st.floats(min_value=0.05, max_value=8.0, allow_nan=False)
# leading dims of x: (N,) for 2-D inputs, (B, T) for 3-D inputs
leads = st.one_of(st.tuples(dims), st.tuples(dims, dims))


def _rand(shape, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=dtype)


def naive(base, x, a, b, s, mask=None, p=0.0):
    """base + s / (1 - p) * ((x * mask) A^T) B^T."""
    xin = x if mask is None else x * mask
    return base + (s / (1.0 - p)) * ((xin @ a.t()) @ b.t())


# ---------------------------------------------------------------------------------------------------------
# scaling and delta weight
# ---------------------------------------------------------------------------------------------------------
@SETTINGS
@given(alpha=st.floats(min_value=1e-3, max_value=1e4, allow_nan=False), r=st.integers(1, 4096))
def test_lora_scaling(alpha: float, r: int) -> None:
    assert lora_scaling(alpha, r) == pytest.approx(alpha / r, rel=1e-12)
    assert lora_scaling(alpha, r, use_rslora=False) == pytest.approx(alpha / r, rel=1e-12)
    assert lora_scaling(alpha, r, use_rslora=True) == pytest.approx(alpha / math.sqrt(r), rel=1e-12)


def test_lora_scaling_known_values() -> None:
    assert lora_scaling(16, 8) == 2.0
    assert lora_scaling(16, 4, use_rslora=True) == 8.0
    assert lora_scaling(8, 64, use_rslora=True) == 1.0


@SETTINGS
@given(r=ranks, k=dims, d=dims, s=scales, seed=seeds)
def test_delta_weight_is_scaled_b_at_a(r: int, k: int, d: int, s: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    a, b = _rand((r, k), gen, torch.float32), _rand((d, r), gen, torch.float32)
    delta = lora_delta_weight(a, b, s)
    assert delta.shape == (d, k)
    assert delta.dtype == torch.float32
    want = s * (b.double() @ a.double())
    torch.testing.assert_close(delta.double(), want, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(r=ranks, k=dims, d=dims, s=scales, seed=seeds, dtype=st.sampled_from([torch.float16, torch.bfloat16]))
def test_delta_weight_is_fp32_for_low_precision_adapters(r, k, d, s, seed, dtype) -> None:
    gen = torch.Generator().manual_seed(seed)
    a, b = _rand((r, k), gen).to(dtype), _rand((d, r), gen).to(dtype)
    delta = lora_delta_weight(a, b, s)
    assert delta.dtype == torch.float32
    torch.testing.assert_close(delta.double(), s * (b.double() @ a.double()), rtol=1e-5, atol=1e-5)


@SETTINGS
@given(
    r=ranks,
    k=dims,
    d=dims,
    kernel=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    s=scales,
    seed=seeds,
)
def test_delta_weight_conv_shapes(r: int, k: int, d: int, kernel: list[int], s: float, seed: int) -> None:
    """A (r, k, *kernel), B (d, r, 1, ...) -> ΔW[o, i, *kern] = s * sum_j B[o, j] A[j, i, *kern]."""
    gen = torch.Generator().manual_seed(seed)
    a = _rand((r, k, *kernel), gen, torch.float32)
    b = _rand((d, r, *([1] * len(kernel))), gen, torch.float32)
    delta = lora_delta_weight(a, b, s)
    assert delta.shape == (d, k, *kernel)
    want = s * torch.einsum("or,ri...->oi...", b.double().flatten(1), a.double())
    torch.testing.assert_close(delta.double(), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# lora_linear_add: forward and backward, dropout 0
# ---------------------------------------------------------------------------------------------------------
@SETTINGS
@given(lead=leads, r=ranks, k=dims, d=dims, s=scales, seed=seeds, grad=st.booleans())
def test_linear_add_forward_matches_naive(lead, r, k, d, s, seed, grad) -> None:
    gen = torch.Generator().manual_seed(seed)
    x, base = _rand((*lead, k), gen), _rand((*lead, d), gen)
    a, b = _rand((r, k), gen), _rand((d, r), gen)
    want = naive(base, x, a, b, s)
    a.requires_grad_(grad)  # grad=True takes the autograd.Function path, False the inference path
    with torch.set_grad_enabled(grad):
        got = lora_linear_add(base.clone(), x, a, b, s, 0.0)
    assert got.shape == (*lead, d)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-10)


@SETTINGS
@given(lead=leads, r=ranks, k=dims, d=dims, s=scales, seed=seeds)
def test_linear_add_non_contiguous_out(lead, r, k, d, s, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = _rand((*lead, k), gen)
    base = _rand((d, *lead), gen).movedim(0, -1)  # a non-contiguous view, as a transposing base layer gives
    a, b = _rand((r, k), gen), _rand((d, r), gen)
    want = naive(base, x, a, b, s)
    got = lora_linear_add(base.clone() if base.is_contiguous() else base, x, a, b, s, 0.0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@SETTINGS
@given(lead=leads, r=ranks, k=dims, d=dims, s=scales, seed=seeds)
def test_linear_add_gradients_match_autograd(lead, r, k, d, s, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    leaves = [_rand((*lead, k), gen), _rand((*lead, d), gen), _rand((r, k), gen), _rand((d, r), gen)]
    upstream = _rand((*lead, d), gen)

    def grads(fn):
        x, base, a, b = (t.clone().requires_grad_(True) for t in leaves)
        out = fn(base * 1.0, x, a, b)  # `base * 1.0`: a non-leaf, like a real layer's output
        (out * upstream).sum().backward()
        return out.detach(), [t.grad for t in (x, base, a, b)]

    out_got, got = grads(lambda base, x, a, b: lora_linear_add(base, x, a, b, s, 0.0))
    out_want, want = grads(lambda base, x, a, b: naive(base, x, a, b, s))
    torch.testing.assert_close(out_got, out_want, rtol=0, atol=1e-10)
    for name, g, w in zip(("x", "out", "A", "B"), got, want):
        assert g is not None, f"no gradient for {name}"
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10, msg=lambda m, n=name: f"grad {n}: {m}")


def test_linear_add_gradcheck() -> None:
    gen = torch.Generator().manual_seed(0)
    x, base, a, b = _rand((2, 3, 5), gen), _rand((2, 3, 4), gen), _rand((2, 5), gen), _rand((4, 2), gen)
    for t in (x, base, a, b):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, base, a, b: lora_linear_add(base.clone(), x, a, b, 1.5), (x, base, a, b))


def test_linear_add_float32_adapter_with_low_precision_output() -> None:
    """fp32 adapter on a bf16/fp16 base: the result keeps the base output's dtype."""
    gen = torch.Generator().manual_seed(0)
    a, b = _rand((2, 6), gen, torch.float32), _rand((5, 2), gen, torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        x, base = _rand((3, 6), gen).to(dtype), _rand((3, 5), gen).to(dtype)
        want = naive(base.double(), x.double(), a.double(), b.double(), 0.5)
        got = lora_linear_add(base.clone(), x, a, b, 0.5)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------------------------
# lora_linear_add with dropout
# ---------------------------------------------------------------------------------------------------------
def _mask_from_grad_x(grad_x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, coeff: float) -> torch.Tensor:
    """With an upstream gradient of ones, grad_x[n, j] = mask[n, j] * coeff * (1^T B A)[j]."""
    per_column = coeff * (b.sum(0) @ a)  # (k,)
    return grad_x / per_column


@SETTINGS
@given(
    lead=leads,
    r=ranks,
    k=dims,
    d=dims,
    s=scales,
    seed=seeds,
    p=st.sampled_from([0.1, 0.25, 0.5, 0.9]),
)
def test_linear_add_dropout_uses_one_binary_mask(lead, r, k, d, s, seed, p) -> None:
    """The output is base + s/(1-p) ((x*mask) A^T) B^T for some binary mask, and the gradients of x, A, B
    and out are those of that same formula with that same mask."""
    gen = torch.Generator().manual_seed(seed)
    x, base = _rand((*lead, k), gen), _rand((*lead, d), gen)
    a, b = _rand((r, k), gen), _rand((d, r), gen)
    p = realised_drop_probability(p)  # the CPU realises p to 1/65536 and rescales by exactly that
    coeff = s / (1.0 - p)
    # keep the mask identifiable from grad_x: every column of 1^T B A clearly non-zero
    per_column = b.sum(0) @ a
    if per_column.abs().min() < 1e-3:
        a[:, per_column.abs() < 1e-3] += 0.5
        per_column = b.sum(0) @ a
    if per_column.abs().min() < 1e-3:
        return

    xg, bg, ag, bbg = (t.clone().requires_grad_(True) for t in (x, base, a, b))
    torch.manual_seed(seed)
    out = lora_linear_add(bg * 1.0, xg, ag, bbg, s, p)
    out.sum().backward()

    mask = _mask_from_grad_x(xg.grad, a, b, coeff)
    binary = torch.where(mask > 0.5, 1.0, 0.0).to(torch.float64)
    torch.testing.assert_close(mask, binary, rtol=0, atol=1e-8, msg="grad_x is not (binary mask) * dense grad")

    # the output uses that same mask
    torch.testing.assert_close(out.detach(), naive(base, x, a, b, s, binary, p), rtol=0, atol=1e-10)
    # and so do the gradients of A, B and out (upstream gradient of ones)
    xr, br, ar, bbr = (t.clone().requires_grad_(True) for t in (x, base, a, b))
    naive(br, xr, ar, bbr, s, binary, p).sum().backward()
    for name, g, w in (("out", bg.grad, br.grad), ("A", ag.grad, ar.grad), ("B", bbg.grad, bbr.grad)):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10, msg=lambda m, n=name: f"grad {n}: {m}")


def test_linear_add_dropout_drops_about_p_of_the_inputs() -> None:
    """p = 0.5 on 512 inputs: roughly half are dropped (a mask that drops nothing, or everything, fails)."""
    gen = torch.Generator().manual_seed(0)
    n, k, d, r, p, s = 64, 8, 3, 2, 0.5, 1.0
    x, a, b = _rand((n, k), gen), _rand((r, k), gen), _rand((d, r), gen)
    x.requires_grad_(True)
    torch.manual_seed(0)
    out = lora_linear_add(torch.zeros(n, d, dtype=torch.float64), x, a, b, s, p)
    (grad_x,) = torch.autograd.grad(out.sum(), x)
    mask = _mask_from_grad_x(grad_x, a, b, s / (1 - p))
    torch.testing.assert_close(mask, mask.round().clamp(0, 1), rtol=0, atol=1e-8)
    assert 0.35 < mask.mean().item() < 0.65, mask.mean()


@pytest.mark.parametrize("p", [0.2, 0.6])
def test_linear_add_dropout_gradcheck_with_reseeding(p: float) -> None:
    """Re-seeding before each call draws the same mask, so the function is deterministic and its analytic
    gradients must match finite differences (float64)."""
    gen = torch.Generator().manual_seed(3)
    x, base, a, b = _rand((2, 3, 5), gen), _rand((2, 3, 4), gen), _rand((3, 5), gen), _rand((4, 3), gen)
    for t in (x, base, a, b):
        t.requires_grad_(True)

    def fn(x, base, a, b):
        torch.manual_seed(1234)
        return lora_linear_add(base.clone(), x, a, b, 0.7, p)

    torch.testing.assert_close(fn(x, base, a, b), fn(x, base, a, b), rtol=0, atol=0)
    assert torch.autograd.gradcheck(fn, (x, base, a, b))


def test_linear_add_no_dropout_outside_training_is_deterministic() -> None:
    gen = torch.Generator().manual_seed(0)
    x, a, b = _rand((5, 4), gen), _rand((2, 4), gen), _rand((3, 2), gen)
    base = _rand((5, 3), gen)
    first = lora_linear_add(base.clone(), x, a, b, 2.0, 0.0)
    second = lora_linear_add(base.clone(), x, a, b, 2.0, 0.0)
    assert torch.equal(first, second)


# ---------------------------------------------------------------------------------------------------------
# init_lora_A
# ---------------------------------------------------------------------------------------------------------
@SETTINGS
@given(r=ranks, k=st.integers(1, 64), kernel=st.lists(st.integers(1, 3), max_size=2), seed=seeds)
def test_kaiming_init_bounds(r: int, k: int, kernel: list[int], seed: int) -> None:
    weight = torch.full((r, k, *kernel), 1e6)
    init_lora_A(weight, "kaiming", r, generator=torch.Generator().manual_seed(seed))
    fan_in = k * math.prod(kernel)
    bound = 1.0 / math.sqrt(fan_in)
    assert weight.abs().max().item() <= bound + 1e-7
    assert weight.abs().max().item() > 0  # was overwritten


def test_kaiming_init_fills_the_range() -> None:
    weight = torch.empty(8, 256)
    init_lora_A(weight, "kaiming", 8, generator=torch.Generator().manual_seed(0))
    bound = 1.0 / 16.0
    assert weight.max().item() > 0.95 * bound and weight.min().item() < -0.95 * bound
    assert abs(weight.mean().item()) < 0.05 * bound
    # uniform on [-b, b] has std b / sqrt(3)
    assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


@pytest.mark.parametrize("r", [1, 4, 16])
def test_gaussian_init_std_is_one_over_r(r: int) -> None:
    weight = torch.empty(r, 4096 // r)
    init_lora_A(weight, "gaussian", r, generator=torch.Generator().manual_seed(0))
    assert weight.std().item() == pytest.approx(1.0 / r, rel=0.05)
    assert abs(weight.mean().item()) < 0.1 / r


def test_init_is_reproducible_with_a_generator() -> None:
    first, second = torch.empty(4, 10), torch.empty(4, 10)
    init_lora_A(first, "kaiming", 4, generator=torch.Generator().manual_seed(5))
    init_lora_A(second, "kaiming", 4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, second)


def test_unknown_init_raises() -> None:
    with pytest.raises(ValueError, match="orthogonal"):
        init_lora_A(torch.empty(2, 3), "orthogonal", 2)
