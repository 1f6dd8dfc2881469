"""The DoRA paper's magnitude / direction changes per output row (ops.dora.row_magnitude_direction and its low-rank
form lowrank_magnitude_direction): checked against the definitions on explicit matrices."""

from __future__ import annotations

import pytest
import torch

from lorakit.ops.dora import lowrank_magnitude_direction, row_magnitude_direction


def _factors(d: int = 7, k: int = 5, r: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return rand(d, k), rand(r, k), rand(d, r)


def test_dense_definition_row_by_row():
    w0, a, b = _factors()
    w1 = w0 + 0.3 * b @ a
    dm, dd = row_magnitude_direction(w0, w1)
    for i in range(w0.shape[0]):
        assert dm[i].item() == pytest.approx((w1[i].norm() - w0[i].norm()).item(), abs=1e-12)
        cos = torch.dot(w0[i], w1[i]) / (w0[i].norm() * w1[i].norm())
        assert dd[i].item() == pytest.approx(1 - cos.item(), abs=1e-12)


def test_pure_rescaling_changes_magnitude_only_and_rotation_direction_only():
    w0, _, _ = _factors()
    dm, dd = row_magnitude_direction(w0, 2.0 * w0)
    assert torch.allclose(dm, w0.norm(dim=1)) and torch.allclose(dd, torch.zeros_like(dd), atol=1e-12)
    rot = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))[0]
    dm, dd = row_magnitude_direction(w0, w0 @ rot)
    assert torch.allclose(dm, torch.zeros_like(dm), atol=1e-12) and bool((dd > 1e-6).all())


@pytest.mark.parametrize("with_magnitude", [False, True])
@pytest.mark.parametrize("layout", ["dk", "kd"])
def test_lowrank_equals_dense(layout: str, with_magnitude: bool):
    w0, a, b = _factors()
    scale = 0.7
    v = w0 + scale * b @ a
    m = torch.rand(7, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 0.5
    w1 = m[:, None] * v / v.norm(dim=1, keepdim=True) if with_magnitude else v
    dense = row_magnitude_direction(w0, w1)
    stored = w0.t().contiguous() if layout == "kd" else w0
    low = lowrank_magnitude_direction(stored, layout, a, b, scale, m if with_magnitude else None)
    for x, y in zip(dense, low):
        assert torch.allclose(x, y, atol=1e-12)


def test_zero_update_is_zero_and_shapes_are_checked():
    w0, a, b = _factors()
    dm, dd = lowrank_magnitude_direction(w0, "dk", a, torch.zeros_like(b), 1.0)
    assert float(dm.abs().max()) < 1e-12 and float(dd.abs().max()) < 1e-12
    with pytest.raises(ValueError, match="W0 has shape"):
        row_magnitude_direction(w0, w0[:3])


def test_a_negative_magnitude_flips_the_row():
    w0, a, b = _factors()
    v = w0 + 0.5 * b @ a
    m = torch.linspace(-1.0, 1.0, 7, dtype=torch.float64) + 0.05
    w1 = m[:, None] * v / v.norm(dim=1, keepdim=True)
    for x, y in zip(row_magnitude_direction(w0, w1), lowrank_magnitude_direction(w0, "dk", a, b, 0.5, m)):
        assert torch.allclose(x, y, atol=1e-12)
