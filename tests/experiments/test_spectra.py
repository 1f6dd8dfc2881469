"""experiments/spectra.py: spectra, the Eckart-Young bound, subspace alignment and correlations, on matrices built
with known singular values and subspaces."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.errors import ShapeMismatchError
from lorakit.experiments import spectra as S


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthonormal(n: int, m: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, m, dtype=torch.float64, generator=_gen(seed))).Q


def _with_spectrum(sv: list[float], d: int = 12, k: int = 9, seed: int = 0) -> torch.Tensor:
    """U diag(sv) Vᵀ with random orthonormal U (d x m), V (k x m)."""
    m = len(sv)
    return _orthonormal(d, m, seed) @ torch.diag(torch.tensor(sv, dtype=torch.float64)) @ _orthonormal(k, m, seed + 1).t()


def test_singular_values_are_the_constructed_ones():
    sv = [5.0, 3.0, 1.0, 0.5, 0.25]
    got = S.singular_values(_with_spectrum(sv))
    assert got.dtype == torch.float64 and got.shape == (9,)
    assert torch.allclose(got[:5], torch.tensor(sv, dtype=torch.float64), atol=1e-10)
    assert float(got[5:].abs().max()) < 1e-10


@pytest.mark.parametrize("r", [0, 1, 2, 3, 5, 7])
def test_bound_is_the_tail_norm_and_the_truncated_svd_reaches_it(r: int):
    sv = [5.0, 3.0, 1.0, 0.5, 0.25]
    delta = _with_spectrum(sv)
    bound = S.eckart_young_bound(S.singular_values(delta), r)
    assert bound == pytest.approx(math.sqrt(sum(s * s for s in sv[r:])), abs=1e-10)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    truncated = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
    assert S.residual_norm(delta, truncated) == pytest.approx(bound, abs=1e-10)


def test_exact_low_rank_has_zero_bound_and_lora_factors_reach_it():
    g = _gen(1)
    b, a = torch.randn(12, 3, dtype=torch.float64, generator=g), torch.randn(3, 9, dtype=torch.float64, generator=g)
    delta = 0.5 * b @ a
    sv = S.singular_values(delta)
    assert S.eckart_young_bound(sv, 3) < 1e-10 and S.eckart_young_bound(sv, 2) > 0.1
    assert S.residual_norm(delta, S.lowrank_product(b, a, 0.5)) < 1e-10
    assert S.top_energy(sv, 3) == pytest.approx(1.0)


def test_any_rank_r_approximation_is_no_better_than_the_bound():
    delta = torch.randn(12, 9, dtype=torch.float64, generator=_gen(2))
    bound = S.eckart_young_bound(S.singular_values(delta), 2)
    for seed in range(20):
        g = _gen(100 + seed)
        b, a = torch.randn(12, 2, dtype=torch.float64, generator=g), torch.randn(2, 9, dtype=torch.float64, generator=g)
        approx = S.lowrank_product(b, a, 0.3)
        assert S.residual_norm(delta, approx) >= bound
        c, rescaled = S.best_scalar_fit(delta, approx)
        assert bound <= rescaled <= S.residual_norm(delta, approx) + 1e-12
        assert rescaled == pytest.approx(float(torch.linalg.matrix_norm(delta - c * approx)))


def test_best_scalar_fit_recovers_the_scale_and_handles_zero():
    delta = _with_spectrum([2.0, 1.0])
    c, err = S.best_scalar_fit(delta, delta / 4)
    assert c == pytest.approx(4.0) and err < 1e-10
    c, err = S.best_scalar_fit(delta, torch.zeros_like(delta))
    assert c == 1.0 and err == pytest.approx(math.sqrt(5.0))
    assert S.cosine(delta, -3 * delta) == pytest.approx(-1.0) and S.cosine(delta, torch.zeros_like(delta)) is None


def test_top_energy():
    sv = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    assert S.top_energy(sv, 1) == pytest.approx(9 / 14) and S.top_energy(sv, 2) == pytest.approx(13 / 14)
    assert S.top_energy(torch.zeros(3), 1) is None


def test_lowrank_subspaces_match_the_dense_svd_and_ignore_the_scale():
    g = _gen(3)
    b, a = torch.randn(12, 4, dtype=torch.float64, generator=g), torch.randn(4, 9, dtype=torch.float64, generator=g)
    u_low, v_low = S.lowrank_subspaces(b, a, 0.25, 4)
    u_dense, v_dense = S.dense_subspaces(S.lowrank_product(b, a, 0.25), 4)
    assert u_low.shape == (12, 4) and v_low.shape == (9, 4)
    assert torch.allclose(u_low.t() @ u_low, torch.eye(4, dtype=torch.float64), atol=1e-10)
    for m in (1, 2, 4):  # the same top-m subspaces (singular values are distinct)
        assert S.subspace_alignment(u_low[:, :m], u_dense[:, :m]) == pytest.approx(1.0, abs=1e-9)
        assert S.subspace_alignment(v_low[:, :m], v_dense[:, :m]) == pytest.approx(1.0, abs=1e-9)
    u_big, v_big = S.lowrank_subspaces(b, a, 1e3, 4)  # invariance to the scale (and to its sign)
    u_neg, _ = S.lowrank_subspaces(b, a, -2.0, 4)
    assert S.subspace_alignment(u_low, u_big) == pytest.approx(1.0) and S.subspace_alignment(v_low, v_big) == pytest.approx(1.0)
    assert S.subspace_alignment(u_low, u_neg) == pytest.approx(1.0)


def test_zero_update_has_no_subspace():
    u, v = S.lowrank_subspaces(torch.zeros(12, 4), torch.randn(4, 9, generator=_gen(4)), 2.0, 4)
    assert u.shape == (12, 0) and v.shape == (9, 0)
    assert S.subspace_alignment(u, _orthonormal(12, 4, 5)) is None
    rank2 = _with_spectrum([1.0, 1.0])  # only 2 non-zero directions: m capped at 2
    assert S.dense_subspaces(rank2, 4)[0].shape == (12, 2)


def test_alignment_of_orthogonal_and_random_subspaces():
    q = _orthonormal(40, 8, 6)
    assert S.subspace_alignment(q[:, :4], q[:, 4:]) == pytest.approx(0.0, abs=1e-12)
    assert S.subspace_alignment(q[:, :4], q[:, :4] @ _orthonormal(4, 4, 7)) == pytest.approx(1.0)  # another basis
    d, m = 200, 4
    values = [S.subspace_alignment(_orthonormal(d, m, 10 + i), _orthonormal(d, m, 500 + i)) for i in range(50)]
    mean = sum(values) / len(values)  # E = m / d = 0.02
    assert 0.5 * m / d < mean < 1.5 * m / d
    assert all(0.0 <= v <= 1.0 for v in values)
    with pytest.raises(ShapeMismatchError, match="R\\^40 and R\\^200"):
        S.subspace_alignment(q, _orthonormal(200, 4, 8))


def test_shapes_are_checked():
    with pytest.raises(ShapeMismatchError, match="ranks differ"):
        S.lowrank_product(torch.zeros(5, 2), torch.zeros(3, 4), 1.0)
    with pytest.raises(ShapeMismatchError, match="same shape"):
        S.residual_norm(torch.zeros(5, 4), torch.zeros(4, 5))


def test_pearson_and_spearman():
    xs = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert S.pearson(xs, [2 * x + 1 for x in xs]) == pytest.approx(1.0)
    assert S.pearson(xs, [-x for x in xs]) == pytest.approx(-1.0)
    ys = [x ** 3 for x in xs]  # monotone, not linear: Spearman 1, Pearson below 1
    assert S.spearman(xs, ys) == pytest.approx(1.0) and S.pearson(xs, ys) < 0.99
    g = _gen(9)
    x, y = torch.randn(30, generator=g), torch.randn(30, generator=g)
    ref = float(torch.corrcoef(torch.stack([x, y]))[0, 1])
    assert S.pearson(x.tolist(), y.tolist()) == pytest.approx(ref, abs=1e-6)
    assert S.pearson([1.0], [2.0]) is None and S.pearson(xs, [3.0] * 5) is None
    with pytest.raises(ShapeMismatchError, match="pairs"):
        S.spearman(xs, xs[:2])


def test_average_ranks_share_ties():
    assert S.average_ranks([10.0, 20.0, 20.0, 5.0]) == [2.0, 3.5, 3.5, 1.0]
    assert S.spearman([1.0, 2.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]) == pytest.approx(
        S.pearson([1.0, 2.5, 2.5, 4.0], [1.0, 2.0, 3.0, 4.0]))


def test_compare_update_on_a_constructed_update():
    sv = [4.0, 2.0, 1.0, 0.5]
    delta = _with_spectrum(sv, d=12, k=9, seed=20)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    b, a = u[:, :2] * s[:2], vh[:2]  # the truncated SVD as factors B (d x 2), A (2 x 9), scale 0.5 -> half of it
    row = S.compare_update(delta, b, a, 0.5, r=2, top=3, ranks=(1, 2, 4))
    norm = math.sqrt(sum(x * x for x in sv))
    bound = math.sqrt(1.0 + 0.25)
    assert row["singular_values"] == pytest.approx(sv[:3]) and row["fro_norm"] == pytest.approx(norm)
    assert row["bound"] == pytest.approx(bound) and row["bound_rel"] == pytest.approx(bound / norm)
    assert row["energy_top_r"] == pytest.approx(20.0 / 21.25)
    assert row["achieved"] == pytest.approx(math.sqrt(2.0**2 + 1.0**2 + 1.25))  # half of each top direction missing
    assert row["scalar"] == pytest.approx(2.0) and row["scaled_error"] == pytest.approx(bound)  # c* = 2 repairs it
    assert row["cosine"] == pytest.approx(math.sqrt(20.0 / 21.25))
    assert row["bound_curve"] == {"1": pytest.approx(math.sqrt(5.25) / norm), "2": pytest.approx(bound / norm),
                                  "4": pytest.approx(0.0, abs=1e-9)}
    align = S.update_alignment(S.dense_subspaces(delta, 2), b, a, 0.5, 2)
    assert align["left"] == pytest.approx(1.0) and align["right"] == pytest.approx(1.0)
    other = S.update_alignment(S.dense_subspaces(delta, 2), u[:, 2:4], vh[2:4], 1.0, 2)  # the next two directions
    assert other["left"] == pytest.approx(0.0, abs=1e-10) and other["right"] == pytest.approx(0.0, abs=1e-10)
    zero = S.update_alignment(S.dense_subspaces(delta, 2), torch.zeros_like(b), a, 0.5, 2)
    assert zero == {"left": None, "right": None}  # B = 0 at the start: no subspace yet


def test_centred_within_groups():
    assert S.centred_within([1.0, 3.0, 10.0, 20.0], ["a", "a", "b", "b"]) == [-1.0, 1.0, -5.0, 5.0]
    with pytest.raises(ShapeMismatchError, match="group labels"):
        S.centred_within([1.0], ["a", "b"])
