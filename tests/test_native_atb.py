"""ops.native.at_b: the compiled a^T b behind the adapter's weight gradients (where it is the faster one), and
its fallback."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.ops import native

needs_native = pytest.mark.skipif(native.library() is None, reason="no C compiler: at_b falls back to matmul")


def _reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double().t() @ b.double()).float()


@needs_native
@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 600), r=st.integers(1, 21), k=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_at_b_equals_the_product_for_any_shape(n: int, r: int, k: int, seed: int) -> None:
    """Tails of every block (k not a multiple of 64, r not of 4, n not of 256) and n = 0 (a zero result)."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, r, generator=gen), torch.randn(n, k, generator=gen)
    out = native.atb_kernel(a, b)
    assert out.shape == (r, k) and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, _reference(a, b), rtol=1e-5, atol=1e-5 * max(n, 1) ** 0.5)


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_at_b_on_adapter_sized_operands_does_not_depend_on_threads(threads: int) -> None:
    a, b = torch.randn(1024, 16), torch.randn(1024, 1408)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = native.atb_kernel(a, b)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, _reference(a, b), rtol=1e-5, atol=1e-4)
    assert torch.equal(out, native.atb_kernel(a, b))  # each column block is summed by one thread, in one order


def test_at_b_falls_back_for_what_the_kernel_does_not_take() -> None:
    a, b = torch.randn(64, 4), torch.randn(64, 80)
    for a2, b2 in ((a, b.t().contiguous().t()), (a.double(), b.double()), (a.requires_grad_(), b)):
        out = native.at_b(a2, b2)
        torch.testing.assert_close(out, a2.t() @ b2)
    with pytest.raises(ValueError, match=r"at_b: a \(n, r\) and b \(n, k\)"):
        native.at_b(torch.randn(5, 2), torch.randn(6, 3))


def test_at_b_uses_the_faster_of_kernel_and_matmul(monkeypatch: pytest.MonkeyPatch) -> None:
    """The choice is measured once per process; LORAKIT_ATB fixes it; either way the product is a^T b."""
    a, b = torch.randn(300, 16), torch.randn(300, 200)
    monkeypatch.setattr(native, "_atb_pays", None)
    chosen = native.atb_kernel_pays()
    assert native._atb_pays is chosen and (native.library() is not None or not chosen)
    for forced in ("kernel", "blas"):
        monkeypatch.setenv("LORAKIT_ATB", forced)
        assert native.atb_kernel_pays() is (forced == "kernel" and native.library() is not None)
        torch.testing.assert_close(native.at_b(a, b), _reference(a, b), rtol=1e-5, atol=1e-4)
    calls = []
    monkeypatch.setenv("LORAKIT_ATB", "kernel")
    monkeypatch.setattr(native, "atb_kernel", lambda x, y: calls.append(1) or x.t() @ y)
    native.at_b(a, b)
    assert calls == ([1] if native.library() is not None else [])
    monkeypatch.setenv("LORAKIT_ATB", "blas")
    native.at_b(a, b)
    assert len(calls) <= 1
