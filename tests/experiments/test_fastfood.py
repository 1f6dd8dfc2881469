"""lorakit.ops.fastfood: the fast Walsh-Hadamard transform against the dense Hadamard matrix (and scipy's), and the
Fastfood projection against its own dense matrix built column by column."""

from __future__ import annotations

import pytest
import torch

from lorakit.ops.fastfood import (
    dense_projection,
    fastfood_apply,
    fastfood_draw,
    fastfood_transpose,
    fwht,
    hadamard_matrix,
    next_power_of_two,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dense_of(ff, dtype=torch.float64) -> torch.Tensor:
    """The D x d matrix of a Fastfood map, one column P e_j at a time."""
    eye = torch.eye(ff.d, dtype=dtype)
    return torch.stack([fastfood_apply(ff, eye[j]) for j in range(ff.d)], dim=1)


# -- Walsh-Hadamard --------------------------------------------------------------------------------------
def test_hadamard_matrix_is_orthogonal_up_to_n():
    for n in (1, 2, 8, 64):
        h = hadamard_matrix(n, dtype=torch.float64)
        assert set(h.unique().tolist()) <= {-1.0, 1.0}
        assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
        assert torch.equal(h, h.T)


@pytest.mark.parametrize("n", [1, 2, 4, 32, 64, 128, 2048])  # one and two GEMM stages
def test_fwht_matches_the_dense_hadamard_matrix(n):
    x = torch.randn(3, n, generator=_gen(n), dtype=torch.float64)
    expected = x @ hadamard_matrix(n, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), expected, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("n", [2**12, 2**13, 2**19])  # two, three and four GEMM stages
def test_fwht_follows_sylvesters_recursion(n):
    # H_2m [a; b] = [H_m a + H_m b; H_m a - H_m b], H_m from fwht at half the length (tested above, recursively)
    x = torch.randn(2, n, generator=_gen(n), dtype=torch.float64)
    a, b = fwht(x[:, : n // 2]), fwht(x[:, n // 2 :])
    torch.testing.assert_close(fwht(x), torch.cat((a + b, a - b), dim=1), rtol=1e-12, atol=1e-8)


def test_fwht_matches_scipy():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    for n in (16, 256, 1024):
        x = torch.randn(2, 5, n, generator=_gen(n), dtype=torch.float64)
        expected = x @ torch.from_numpy(scipy_linalg.hadamard(n)).to(torch.float64)
        torch.testing.assert_close(fwht(x), expected, rtol=1e-12, atol=1e-9)


def test_fwht_twice_is_n_times_the_identity():
    x = torch.randn(4, 512, generator=_gen(), dtype=torch.float64)
    torch.testing.assert_close(fwht(fwht(x)), 512 * x)


def test_fwht_is_differentiable_twice():
    x = torch.randn(1, 128, generator=_gen(), dtype=torch.float64, requires_grad=True)  # two stages
    assert torch.autograd.gradcheck(fwht, (x,))
    assert torch.autograd.gradgradcheck(fwht, (x[:, :16].detach().requires_grad_(),))


def test_fwht_refuses_a_length_that_is_not_a_power_of_two():
    with pytest.raises(ValueError, match="2\\^m, got 12"):
        fwht(torch.zeros(12))
    with pytest.raises(ValueError, match="n = 6"):
        hadamard_matrix(6)


def test_next_power_of_two():
    assert [next_power_of_two(n) for n in (1, 2, 3, 4, 5, 1000, 1024, 1025)] == [1, 2, 4, 4, 8, 1024, 1024, 2048]


# -- Fastfood --------------------------------------------------------------------------------------------
def test_fastfood_is_linear_and_matches_its_dense_matrix():
    ff = fastfood_draw(5, 37, _gen(), dtype=torch.float64)  # n = 8, five blocks, the last one cut at row 37
    assert (ff.n, ff.blocks) == (8, 5)
    P = dense_of(ff)
    assert P.shape == (37, 5)
    x, y = torch.randn(5, generator=_gen(1), dtype=torch.float64), torch.randn(5, generator=_gen(2), dtype=torch.float64)
    torch.testing.assert_close(fastfood_apply(ff, 2.5 * x - 0.5 * y), 2.5 * fastfood_apply(ff, x) - 0.5 * fastfood_apply(ff, y))
    torch.testing.assert_close(fastfood_apply(ff, x), P @ x)
    g = torch.randn(37, generator=_gen(3), dtype=torch.float64)
    torch.testing.assert_close(fastfood_transpose(ff, g), P.T @ g)


def test_fastfood_gradient_is_the_transpose():
    ff = fastfood_draw(6, 50, _gen(), dtype=torch.float64)
    z = torch.randn(6, generator=_gen(1), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: fastfood_apply(ff, v), (z,))


def test_fastfood_columns_have_unit_norm():
    # exactly 1 when the block size n divides D (each full block's columns are normalised exactly)
    for d, D in ((8, 64), (5, 40), (3, 4)):
        norms = dense_of(fastfood_draw(d, D, _gen(d), dtype=torch.float64)).norm(dim=0)
        torch.testing.assert_close(norms, torch.ones(d, dtype=torch.float64))
    # otherwise 1 in expectation: the squared norms over many draws average to ~1
    squares = torch.cat([dense_of(fastfood_draw(5, 37, _gen(s), dtype=torch.float64)).square().sum(0) for s in range(60)])
    assert abs(squares.mean().item() - 1.0) < 0.05


def test_fastfood_columns_are_nearly_orthogonal_when_d_is_much_smaller_than_D():
    P = dense_of(fastfood_draw(16, 2**14, _gen(), dtype=torch.float64))
    gram = P.T @ P
    off = gram - torch.diag(torch.diagonal(gram))
    assert off.abs().max() < 0.1  # ~ 1/sqrt(D / n) = 1/32 for random columns


def test_fastfood_draw_is_reproducible_from_the_generator():
    a, b, c = fastfood_draw(10, 100, _gen(7)), fastfood_draw(10, 100, _gen(7)), fastfood_draw(10, 100, _gen(8))
    z = torch.randn(10, generator=_gen())
    assert torch.equal(fastfood_apply(a, z), fastfood_apply(b, z))
    assert not torch.equal(fastfood_apply(a, z), fastfood_apply(c, z))
    assert torch.equal(a.perm.sort(dim=1).values, torch.arange(a.n).expand(a.blocks, a.n))  # permutations


def test_fastfood_refuses_bad_sizes():
    with pytest.raises(ValueError, match="d >= 1"):
        fastfood_draw(0, 10, _gen())
    ff = fastfood_draw(4, 10, _gen())
    with pytest.raises(ValueError, match="length d = 4"):
        fastfood_apply(ff, torch.zeros(5))
    with pytest.raises(ValueError, match="length D = 10"):
        fastfood_transpose(ff, torch.zeros(4))


# -- dense -----------------------------------------------------------------------------------------------
def test_dense_projection_has_unit_norm_columns_and_is_seeded():
    P = dense_projection(7, 300, _gen(), dtype=torch.float64)
    assert P.shape == (300, 7)
    torch.testing.assert_close(P.norm(dim=0), torch.ones(7, dtype=torch.float64))
    assert torch.equal(P, dense_projection(7, 300, _gen(), dtype=torch.float64))
    assert not torch.equal(P, dense_projection(7, 300, _gen(1), dtype=torch.float64))
    with pytest.raises(ValueError, match="D >= 1"):
        dense_projection(3, 0, _gen())
