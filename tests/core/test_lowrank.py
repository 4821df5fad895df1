"""The LoRA paper's analyses in the core (loralens.core.lowrank) against float64 dense references.

References are independent: numpy's dense SVD of the product ``dW = s B A`` (the computation the core avoids),
``scipy.linalg.subspace_angles`` for principal angles and phi, and closed forms. Every case is a fresh seeded
float64 Gaussian draw. Tolerances:

- ``REL = 1e-11`` relative on singular values, norms and amplification: both sides are backward stable, so they
  agree to a small multiple of ``eps * cond``; seeded Gaussian factors have condition numbers below ~1e3.
- ``TOL = 1e-10`` absolute on phi and on cos^2 (values in [0, 1]) and on projectors of the same subspace:
  accurate to ~ eps / (relative singular-value gap), and seeded Gaussian spectra have gaps >= 1e-3.
- ``ANGLE_TOL = 1e-9`` radians against scipy for general angles; ``1e-14`` absolute for angles of ~1e-9, which
  the sine branch keeps accurate (arccos alone would be off by ~1e-8).
- Monte-Carlo expectations: within 5 standard errors of the sample (a false failure rate below 1e-6).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loralens.core.lowrank import (
    effective_rank_energy,
    effective_rank_entropy,
    lowrank_svd,
    overlap_grid,
    principal_angles,
    projection_norm,
    random_overlap_expected,
    random_projection_expected,
    random_projection_norms,
    top_projection_norm,
    update_health,
    update_spectrum,
    weight_projection,
)
from loralens.core.similarity import basis_similarity, top_singular_vectors
from loralens.errors import LoralensError, NonFiniteError, RankError, ShapeError

REL = 1e-11
TOL = 1e-10
ANGLE_TOL = 1e-9
EXAMPLES = 40


def T(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def factors(rng: np.random.Generator, L: int, d_out: int, d_in: int, r: int) -> tuple[np.ndarray, ...]:
    """W (L, d_out, d_in), B (L, d_out, r), A (L, r, d_in), standard Gaussian."""
    return (
        rng.standard_normal((L, d_out, d_in)),
        rng.standard_normal((L, d_out, r)),
        rng.standard_normal((L, r, d_in)),
    )


def dense_svd(dW: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference: numpy's dense SVD of the formed product, top k."""
    U, S, Vh = np.linalg.svd(dW)
    return U[:, :k], S[:k], Vh[:k].T


def phi_ref(X: np.ndarray, Y: np.ndarray) -> float:
    """sum cos^2(principal angles) / min(i, j), from scipy."""
    angles = scipy.linalg.subspace_angles(X, Y)
    return float(np.sum(np.cos(angles) ** 2) / min(X.shape[1], Y.shape[1]))


def projector(U: np.ndarray) -> np.ndarray:
    return U @ U.T


# ------------------------------------------------------------------------------------------- factored SVD


@pytest.mark.parametrize(("d_out", "d_in", "r"), [(20, 15, 4), (12, 30, 6), (16, 16, 16)])
def test_lowrank_svd_matches_the_dense_svd_of_the_product(d_out: int, d_in: int, r: int) -> None:
    rng = np.random.default_rng(d_out * 100 + d_in + r)
    _, B, A = factors(rng, 3, d_out, d_in, r)
    scale = np.array([0.5, 2.0, -1.5])  # a negative scale flips U, not the singular values
    svd = lowrank_svd(T(B), T(A), T(scale))
    assert svd.U.shape == (3, d_out, r) and svd.S.shape == (3, r) and svd.V.shape == (3, d_in, r)
    for l in range(3):
        dW = scale[l] * B[l] @ A[l]
        U, S, V = dense_svd(dW, r)
        np.testing.assert_allclose(svd.S[l].numpy(), S, rtol=REL, atol=REL * S[0])
        np.testing.assert_allclose(projector(svd.U[l].numpy()), projector(U), atol=TOL)
        np.testing.assert_allclose(projector(svd.V[l].numpy()), projector(V), atol=TOL)
        rebuilt = (svd.U[l] * svd.S[l]) @ svd.V[l].mT
        np.testing.assert_allclose(rebuilt.numpy(), dW, atol=REL * np.abs(dW).max() * r)


def test_lowrank_svd_rank_above_the_dimensions_gives_min_r_d() -> None:
    rng = np.random.default_rng(1)
    _, B, A = factors(rng, 2, 5, 7, 9)  # r = 9 > d_out = 5
    svd = lowrank_svd(T(B), T(A))
    assert svd.S.shape == (2, 5) and svd.U.shape == (2, 5, 5) and svd.V.shape == (2, 7, 5)
    np.testing.assert_allclose(svd.S[0].numpy(), np.linalg.svd(B[0] @ A[0], compute_uv=False)[:5], rtol=REL)


# ------------------------------------------------------------------------------------------------ overlap


@pytest.mark.parametrize("side", ["right", "left"])
def test_overlap_grid_matches_scipy_for_every_i_j(side: str) -> None:
    rng = np.random.default_rng(7)
    r1, r2, d = 4, 7, 30
    X1 = rng.standard_normal((2, r1, d) if side == "right" else (2, d, r1))
    X2 = rng.standard_normal((2, r2, d) if side == "right" else (2, d, r2))
    U1, U2 = top_singular_vectors(T(X1), r1, side), top_singular_vectors(T(X2), r2, side)
    grid = overlap_grid(U1, U2)
    assert grid.shape == (2, r1, r2)
    for l in range(2):
        B1, B2 = (
            (np.linalg.svd(X, full_matrices=False)[2].T if side == "right" else np.linalg.svd(X)[0])
            for X in (X1[l], X2[l])
        )
        for i in range(1, r1 + 1):
            for j in range(1, r2 + 1):
                expected = phi_ref(B1[:, :i], B2[:, :j])
                assert abs(float(grid[l, i - 1, j - 1]) - expected) < TOL, (l, i, j)
                assert abs(float(basis_similarity(U1[l, :, :i], U2[l, :, :j])) - expected) < TOL


def test_overlap_grid_of_a_basis_with_itself_is_one_everywhere() -> None:
    # phi(U[:, :i], U[:, :j]) = min(i, j) / min(i, j): the diagonal i = j (and every other cell) is 1
    U = torch.linalg.qr(torch.randn(3, 40, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))).Q
    grid = overlap_grid(U, U)
    torch.testing.assert_close(grid, torch.ones(3, 8, 8, dtype=torch.float64), atol=1e-12, rtol=0)


def test_overlap_grid_of_orthogonal_subspaces_is_zero() -> None:
    Q = torch.linalg.qr(torch.randn(20, 10, dtype=torch.float64)).Q
    assert float(overlap_grid(Q[:, :4], Q[:, 4:10]).abs().max()) < 1e-14


def test_random_overlap_expected_is_max_i_j_over_d_and_matches_monte_carlo() -> None:
    d, r1, r2, n = 24, 3, 5, 4000
    expected = random_overlap_expected(r1, r2, d)
    assert expected.dtype == torch.float64 and expected.shape == (r1, r2)
    assert float(expected[1, 3]) == pytest.approx(4 / 24) and float(expected[2, 0]) == pytest.approx(3 / 24)
    g = torch.Generator().manual_seed(3)
    U1 = torch.linalg.qr(torch.randn(n, d, r1, dtype=torch.float64, generator=g)).Q
    U2 = torch.linalg.qr(torch.randn(n, d, r2, dtype=torch.float64, generator=g)).Q
    grids = overlap_grid(U1, U2)
    se = grids.std(dim=0) / math.sqrt(n)
    assert bool(((grids.mean(dim=0) - expected).abs() < 5 * se).all())


# ------------------------------------------------------------------------------------------ dW against W


def test_weight_projection_matches_dense_references() -> None:
    rng = np.random.default_rng(11)
    L, d_out, d_in, r = 3, 24, 18, 4
    W, B, A = factors(rng, L, d_out, d_in, r)
    scale = np.array([0.25, 1.0, 3.0])
    wp = weight_projection(T(W), T(B), T(A), T(scale), n_random=6, generator=torch.Generator().manual_seed(0))
    for l in range(L):
        dW = scale[l] * B[l] @ A[l]
        U, _, V = dense_svd(dW, r)
        S_W = np.linalg.svd(W[l], compute_uv=False)
        projection = np.linalg.norm(U.T @ W[l] @ V)
        assert float(wp.dW_projection[l]) == pytest.approx(projection, rel=REL)
        assert float(wp.W_top_projection[l]) == pytest.approx(np.sqrt(np.sum(S_W[:r] ** 2)), rel=REL)
        assert float(wp.W_norm[l]) == pytest.approx(np.linalg.norm(W[l]), rel=REL)
        assert float(wp.dW_norm[l]) == pytest.approx(np.linalg.norm(dW), rel=REL)
        assert float(wp.amplification[l]) == pytest.approx(np.linalg.norm(dW) / projection, rel=REL)
        assert float(wp.random_expected[l]) == pytest.approx(r * np.linalg.norm(W[l]) / np.sqrt(d_out * d_in), rel=REL)
    assert wp.random_projection.shape == (L, 6)


def test_dw_inside_ws_top_r_subspace_gives_the_largest_projection() -> None:
    rng = np.random.default_rng(5)
    L, d, r = 4, 30, 5
    W = rng.standard_normal((L, d, d))
    U_W, _, Vh_W = np.linalg.svd(W)
    C = rng.standard_normal((L, r, r))
    B = U_W[..., :r] @ C  # col(dW) = span(U_W[:, :r]), row(dW) = span(V_W[:, :r])
    A = Vh_W[:, :r, :]
    wp = weight_projection(T(W), T(B), T(A), n_random=0)
    torch.testing.assert_close(wp.dW_projection, wp.W_top_projection, rtol=REL, atol=0)
    sp = update_spectrum(T(W), T(B), T(A))
    assert float(sp.principal_angles.abs().max()) < 1e-7
    torch.testing.assert_close(sp.phi_W_top, torch.ones(L, dtype=torch.float64), atol=TOL, rtol=0)
    # and any other dW projects less of W (Ky Fan / interlacing)
    _, B2, A2 = factors(rng, L, d, d, r)
    other = weight_projection(T(W), T(B2), T(A2), n_random=0)
    assert bool((other.dW_projection < wp.W_top_projection).all())


def test_random_dw_gives_the_random_subspace_expectation() -> None:
    # Gaussian factors span uniformly random subspaces, so E ||U^T W V||_F^2 = r^2 ||W||_F^2 / (d_out d_in).
    rng = np.random.default_rng(21)
    L, d_out, d_in, r = 400, 30, 20, 3
    W0 = rng.standard_normal((d_out, d_in)) * np.linspace(0.1, 3.0, d_in)  # anisotropic: the identity is not trivial
    W = np.broadcast_to(W0, (L, d_out, d_in))
    _, B, A = factors(rng, L, d_out, d_in, r)
    wp = weight_projection(T(W), T(B), T(A), n_random=0)
    ratio = (wp.dW_projection / wp.random_expected).square()  # mean 1
    se = float(ratio.std()) / math.sqrt(L)
    assert abs(float(ratio.mean()) - 1.0) < 5 * se
    draws = random_projection_norms(T(W0), r, 400, generator=torch.Generator().manual_seed(1))
    ratio = (draws / random_projection_expected(float(np.linalg.norm(W0)), r, d_out, d_in)).square()
    assert abs(float(ratio.mean()) - 1.0) < 5 * float(ratio.std()) / math.sqrt(400)


def test_random_projection_expected_reproduces_table_7_random_row() -> None:
    # GPT-3 W_q: d = 12288, ||W_q||_F = 61.95; the paper reports 0.02 (r = 4) and 0.33 (r = 64)
    assert float(random_projection_expected(61.95, 4, 12288, 12288)) == pytest.approx(0.0202, abs=5e-4)
    assert float(random_projection_expected(61.95, 64, 12288, 12288)) == pytest.approx(0.323, abs=5e-3)


def test_random_projection_draws_do_not_depend_on_batch_split() -> None:
    W = torch.randn(4, 10, 8, dtype=torch.float64)
    whole = random_projection_norms(W, 2, 3, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    parts = torch.cat(
        [random_projection_norms(W[:1], 2, 3, generator=g), random_projection_norms(W[1:], 2, 3, generator=g)]
    )
    torch.testing.assert_close(whole, parts, rtol=0, atol=0)


def test_projection_norm_and_top_projection_norm_against_numpy() -> None:
    rng = np.random.default_rng(2)
    W = rng.standard_normal((12, 9))
    U = np.linalg.qr(rng.standard_normal((12, 3)))[0]
    V = np.linalg.qr(rng.standard_normal((9, 4)))[0]
    assert float(projection_norm(T(W), T(U), T(V))) == pytest.approx(np.linalg.norm(U.T @ W @ V), rel=REL)
    # the norm depends on the subspaces only: rotate the bases
    Q = np.linalg.qr(rng.standard_normal((3, 3)))[0]
    assert float(projection_norm(T(W), T(U @ Q), T(V))) == pytest.approx(np.linalg.norm(U.T @ W @ V), rel=REL)
    S = np.linalg.svd(W, compute_uv=False)
    assert float(top_projection_norm(T(S), 3)) == pytest.approx(np.linalg.norm(np.diag(S[:3])), rel=REL)


# -------------------------------------------------------------------------------------------------- spectra


@pytest.mark.parametrize("k", [1, 2, 5, 9])
def test_effective_ranks_of_a_rank_k_construction(k: int) -> None:
    rng = np.random.default_rng(k)
    d, r = 40, 12
    Q_out = np.linalg.qr(rng.standard_normal((d, k)))[0]
    Q_in = np.linalg.qr(rng.standard_normal((d, k)))[0]
    decaying = np.linspace(3.0, 1.0, k)
    # rank-k dW from rank-r factors: B = Q_out diag(sigma) G, A = pinv(G) Q_in^T with G (k, r) of full row rank
    G = rng.standard_normal((k, r))
    B = (Q_out * decaying) @ G
    A = np.linalg.pinv(G) @ Q_in.T
    S = lowrank_svd(T(B), T(A)).S  # r values, r - k of them zero up to rounding
    np.testing.assert_allclose(S[:k].numpy(), decaying, rtol=1e-10)
    assert int(effective_rank_energy(S, threshold=1.0)) == k
    # equal singular values: entropy rank is exactly k, energy rank at threshold t is ceil(t k)
    B_eq = Q_out @ G
    S_eq = lowrank_svd(T(B_eq), T(A)).S
    assert float(effective_rank_entropy(S_eq)) == pytest.approx(k, rel=1e-10)
    for t in (0.5, 0.9, 1.0):
        assert int(effective_rank_energy(S_eq, threshold=t)) == math.ceil(round(t * k, 9))


def test_effective_rank_entropy_closed_form() -> None:
    S = torch.tensor([[4.0, 2.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    p = np.array([4, 2, 1, 1]) / 8
    expected = np.exp(-np.sum(p * np.log(p)))
    torch.testing.assert_close(effective_rank_entropy(S), torch.tensor([expected, 1.0], dtype=torch.float64))
    assert torch.isnan(effective_rank_entropy(torch.zeros(3, dtype=torch.float64)))
    assert int(effective_rank_energy(torch.zeros(3, dtype=torch.float64))) == 0


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 30),
    top=st.integers(1, 30),
    tau=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_energy_rank_from_the_top_values_and_the_total(n: int, top: int, tau: float, seed: int) -> None:
    # k_tau from a top-k SVD (``total`` = ||M||_F^2): the full-spectrum k_tau where the top values reach tau,
    # else -1; the reference is numpy's cumulative energy of the whole spectrum (float64).
    rng = np.random.default_rng(seed)
    S = np.sort(rng.gamma(0.5, size=n))[::-1].copy()
    top = min(top, n)
    energy = np.cumsum(S**2)
    k_full = int(np.argmax(energy >= tau * energy[-1] * (1 - 1e-12))) + 1
    got = int(effective_rank_energy(T(S[:top]), tau, total=torch.tensor(energy[-1], dtype=torch.float64)))
    assert got == (k_full if k_full <= top else -1), (got, k_full, top)
    # the whole spectrum with its own total is the plain energy rank
    assert int(effective_rank_energy(T(S), tau, total=torch.tensor(energy[-1], dtype=torch.float64))) == int(
        effective_rank_energy(T(S), tau)
    )


def test_energy_rank_total_is_checked() -> None:
    S = T(np.array([3.0, 1.0]))
    with pytest.raises(LoralensError, match="total energy"):
        effective_rank_energy(S, 0.9, total=torch.tensor(-1.0, dtype=torch.float64))
    with pytest.raises(LoralensError, match="total energy"):
        effective_rank_energy(S, 0.9, total=torch.ones(2, dtype=torch.float64))


def test_principal_angles_match_scipy() -> None:
    rng = np.random.default_rng(8)
    for k1, k2 in ((3, 3), (5, 2), (2, 6)):
        X, Y = rng.standard_normal((25, k1)), rng.standard_normal((25, k2))
        Q1, Q2 = np.linalg.qr(X)[0], np.linalg.qr(Y)[0]
        ours = principal_angles(T(Q1), T(Q2)).numpy()
        np.testing.assert_allclose(ours, np.sort(scipy.linalg.subspace_angles(X, Y)), atol=ANGLE_TOL)
        assert np.all(np.diff(ours) >= 0)


def test_small_principal_angles_stay_accurate() -> None:
    rng = np.random.default_rng(9)
    Q = np.linalg.qr(rng.standard_normal((30, 6)))[0]
    theta = np.array([1e-9, 2e-9, 3e-9])
    # Q2[:, t] = cos(theta_t) Q[:, t] + sin(theta_t) Q[:, 3 + t]: principal angles exactly theta
    Q2 = Q[:, :3] * np.cos(theta) + Q[:, 3:] * np.sin(theta)
    ours = principal_angles(T(Q[:, :3]), T(Q2)).numpy()
    np.testing.assert_allclose(ours, theta, atol=1e-14, rtol=0)


def test_update_spectrum_matches_dense_references() -> None:
    rng = np.random.default_rng(13)
    L, d_out, d_in, r = 3, 22, 16, 5
    W, B, A = factors(rng, L, d_out, d_in, r)
    sp = update_spectrum(T(W), T(B), T(A), 0.5, energy_threshold=0.8)
    for l in range(L):
        dW = 0.5 * B[l] @ A[l]
        S = np.linalg.svd(dW, compute_uv=False)[:r]
        U_W, S_W, _ = np.linalg.svd(W[l])
        np.testing.assert_allclose(sp.singular_values[l].numpy(), S, rtol=REL)
        np.testing.assert_allclose(sp.W_singular_values[l].numpy(), S_W[:r], rtol=REL)
        angles = np.sort(scipy.linalg.subspace_angles(dW, U_W[:, :r]))  # scipy orthonormalises dW itself
        np.testing.assert_allclose(sp.principal_angles[l].numpy(), angles, atol=ANGLE_TOL)
        assert float(sp.phi_W_top[l]) == pytest.approx(phi_ref(dW, U_W[:, :r]), abs=TOL)
        p = S / S.sum()
        assert float(sp.effective_rank_entropy[l]) == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=REL)
        energy = np.cumsum(S**2) / np.sum(S**2)
        assert int(sp.effective_rank_energy[l]) == int(np.argmax(energy >= 0.8)) + 1


# ------------------------------------------------------------------------------------------- properties


@st.composite
def cases(draw: st.DrawFn) -> tuple[int, int, int, int, np.random.Generator]:
    """(L, d_out, d_in, r, rng): L in 1..3, d in 2..12, r in 1..min(d_out, d_in), a generator from a drawn seed."""
    L = draw(st.integers(1, 3))
    d_out, d_in = draw(st.integers(2, 12)), draw(st.integers(2, 12))
    r = draw(st.integers(1, min(d_out, d_in)))
    return L, d_out, d_in, r, np.random.default_rng(draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=EXAMPLES, deadline=None)
@given(case=cases(), c=st.floats(0.1, 10.0), negative=st.booleans())
def test_projection_bounds_and_invariances(
    case: tuple[int, int, int, int, np.random.Generator], c: float, negative: bool
) -> None:
    L, d_out, d_in, r, rng = case
    W, B, A = (T(x) for x in factors(rng, L, d_out, d_in, r))
    wp = weight_projection(W, B, A, n_random=2, generator=torch.Generator().manual_seed(0))
    slack = 1e-10 * wp.W_norm
    # interlacing: no r-dim pair projects more than W's top r, which is at most all of W
    assert bool((wp.dW_projection <= wp.W_top_projection + slack).all())
    assert bool((wp.random_projection <= wp.W_top_projection[..., None] + slack[..., None]).all())
    assert bool((wp.W_top_projection <= wp.W_norm + slack).all())
    # same dW from other factors (B G, G^-1 A) and a rescaled dW: the subspaces, hence the projection, do not move
    G = T(rng.standard_normal((L, r, r)) + 3 * np.eye(r))
    scale = -c if negative else c
    other = weight_projection(W, B @ G, torch.linalg.solve(G, A), scale, n_random=0)
    torch.testing.assert_close(other.dW_projection, wp.dW_projection, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(other.amplification, abs(scale) * wp.amplification, rtol=1e-8, atol=0)


@settings(max_examples=EXAMPLES, deadline=None)
@given(case=cases(), data=st.data())
def test_overlap_grid_range_symmetry_and_spectrum_ranges(
    case: tuple[int, int, int, int, np.random.Generator], data: st.DataObject
) -> None:
    L, d_out, d_in, r, rng = case
    r2 = data.draw(st.integers(1, d_in), label="r2")
    U1 = top_singular_vectors(T(rng.standard_normal((L, r, d_in))), r, "right")
    U2 = top_singular_vectors(T(rng.standard_normal((L, r2, d_in))), r2, "right")
    grid = overlap_grid(U1, U2)
    assert bool(((grid >= -1e-12) & (grid <= 1 + 1e-12)).all())
    torch.testing.assert_close(overlap_grid(U2, U1), grid.mT, rtol=0, atol=1e-12)
    # spectra: 1 <= entropy rank <= r, energy rank in 1..r and monotone in the threshold, mean cos^2 = phi
    W, B, A = (T(x) for x in factors(rng, L, d_out, d_in, r))
    sp = update_spectrum(W, B, A)
    assert bool(((sp.effective_rank_entropy >= 1 - 1e-12) & (sp.effective_rank_entropy <= r + 1e-9)).all())
    low, high = effective_rank_energy(sp.singular_values, 0.5), effective_rank_energy(sp.singular_values, 0.99)
    assert bool(((1 <= low) & (low <= high) & (high <= r)).all())
    torch.testing.assert_close(sp.principal_angles.cos().square().mean(dim=-1), sp.phi_W_top, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------ health numbers


@pytest.mark.parametrize(("d_out", "d_in", "r"), [(20, 15, 4), (12, 30, 6), (16, 16, 1)])
def test_health_numbers_match_dense_svds_of_the_formed_update_and_of_W(d_out: int, d_in: int, r: int) -> None:
    """dominance, spike ratio and stable rank from update_spectrum's singular values (factored) equal those of
    numpy's dense SVDs of the formed s B A and of W0."""
    rng = np.random.default_rng(d_out * 1000 + d_in * 10 + r)
    W, B, A = factors(rng, 3, d_out, d_in, r)
    scale = np.array([0.25, 2.0, 1.5])
    sp = update_spectrum(T(W), T(B), T(A), T(scale))
    health = update_health(sp.singular_values, sp.W_singular_values)
    assert all(t.shape == (3,) and t.dtype == torch.float64 for t in health)
    for l in range(3):
        S = np.linalg.svd(scale[l] * B[l] @ A[l], compute_uv=False)
        S_W = np.linalg.svd(W[l], compute_uv=False)
        assert float(health.dominance[l]) == pytest.approx(S[0] / S_W[0], rel=REL)
        assert float(health.stable_rank[l]) == pytest.approx(np.sum(S[:r] ** 2) / S[0] ** 2, rel=REL)
        if r == 1:  # no second direction: undefined
            assert math.isnan(float(health.spike_ratio[l]))
        else:
            assert float(health.spike_ratio[l]) == pytest.approx(S[0] / S[1], rel=1e-9)


def test_health_numbers_known_answers_and_undefined_cases() -> None:
    S = torch.tensor([[3.0, 3.0, 3.0], [4.0, 2.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    S_W = torch.tensor([[6.0, 1.0], [8.0, 1.0], [5.0, 5.0], [0.0, 0.0]], dtype=torch.float64)
    h = update_health(S, S_W)
    torch.testing.assert_close(h.dominance[:3], torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64))
    assert math.isnan(float(h.dominance[3]))  # sigma_1(W) = 0
    torch.testing.assert_close(h.spike_ratio[:2], torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert math.isnan(float(h.spike_ratio[2])) and math.isnan(float(h.spike_ratio[3]))  # sigma_2 = 0
    torch.testing.assert_close(h.stable_rank[:3], torch.tensor([3.0, 1.25, 1.0], dtype=torch.float64))
    assert math.isnan(float(h.stable_rank[3]))  # dW = 0
    one = update_health(torch.tensor([[2.0]]), torch.tensor([[4.0]]))  # r = 1
    assert math.isnan(float(one.spike_ratio[0])) and float(one.stable_rank[0]) == 1.0
    with pytest.raises(ShapeError, match="one batch shape"):
        update_health(torch.ones(2, 3), torch.ones(3, 3))
    with pytest.raises(LoralensError, match="non-negative"):
        update_health(torch.tensor([1.0, -1.0]), torch.tensor([1.0]))
    with pytest.raises(NonFiniteError):
        update_health(torch.tensor([float("nan")]), torch.tensor([1.0]))


@settings(max_examples=EXAMPLES, deadline=None)
@given(case=cases(), c=st.floats(0.1, 10.0))
def test_health_ranges_and_scaling(case: tuple[int, int, int, int, np.random.Generator], c: float) -> None:
    """Stable rank in [1, r] and spike ratio >= 1 whatever the factors; rescaling dW by c rescales the dominance
    by c and leaves spike ratio and stable rank alone."""
    L, d_out, d_in, r, rng = case
    W, B, A = (T(x) for x in factors(rng, L, d_out, d_in, r))
    sp = update_spectrum(W, B, A)
    h = update_health(sp.singular_values, sp.W_singular_values)
    k = sp.singular_values.shape[-1]
    assert bool(((h.stable_rank >= 1 - 1e-12) & (h.stable_rank <= k + 1e-9)).all())
    assert bool((h.dominance > 0).all())
    if k == 1:
        assert bool(h.spike_ratio.isnan().all())
    else:
        assert bool((h.spike_ratio >= 1 - 1e-12).all())
    scaled = update_health(update_spectrum(W, B, A, c).singular_values, sp.W_singular_values)
    torch.testing.assert_close(scaled.dominance, c * h.dominance, rtol=1e-9, atol=0)
    torch.testing.assert_close(scaled.spike_ratio, h.spike_ratio, rtol=1e-8, atol=0, equal_nan=True)
    torch.testing.assert_close(scaled.stable_rank, h.stable_rank, rtol=1e-8, atol=0)


# ------------------------------------------------------------------------------------------------ errors


def test_errors_name_the_problem() -> None:
    W, B, A = torch.randn(2, 6, 5), torch.randn(2, 6, 2), torch.randn(2, 2, 5)
    with pytest.raises(ShapeError, match=r"B \(\.\.\., d_out, r\) and A"):
        lowrank_svd(B, torch.randn(2, 3, 5))
    with pytest.raises(ShapeError, match="does not fit B"):
        weight_projection(torch.randn(2, 5, 6), B, A)
    with pytest.raises(ShapeError, match="does not broadcast"):
        weight_projection(W, B, A, torch.ones(3))
    with pytest.raises(RankError, match="all zero") as info:
        weight_projection(W, torch.zeros_like(B), A)
    assert info.value.indices == (0, 1)
    with pytest.raises(RankError, match="numerical rank is 1"):
        update_spectrum(W, B[..., :1].repeat(1, 1, 2), A)
    bad = B.clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="batch positions \\[1\\]"):
        update_spectrum(W, bad, A)
    with pytest.raises(LoralensError, match="threshold"):
        update_spectrum(W, B, A, energy_threshold=0.0)
    with pytest.raises(LoralensError, match="non-negative"):
        effective_rank_entropy(torch.tensor([1.0, -0.5]))
    with pytest.raises(ShapeError, match="k=7"):
        random_projection_norms(W, 7)
    with pytest.raises(LoralensError, match="n_random"):
        weight_projection(W, B, A, n_random=-1)
    with pytest.raises(ShapeError, match="different spaces"):
        overlap_grid(torch.randn(5, 2), torch.randn(6, 2))
    with pytest.raises(ShapeError, match="do not fit"):
        principal_angles(torch.randn(5, 2), torch.randn(6, 2))
    with pytest.raises(ShapeError, match="k=4"):
        top_projection_norm(torch.ones(3), 4)


def test_half_precision_is_computed_in_float32() -> None:
    W, B, A = torch.randn(6, 5).half(), torch.randn(6, 2).half(), torch.randn(2, 5).bfloat16()
    wp = weight_projection(W, B, A, n_random=1)
    assert wp.dW_projection.dtype == torch.float32
    assert update_spectrum(W, B, A).singular_values.dtype == torch.float32


def test_core_lowrank_imports_no_io_plotting_or_scipy(tmp_path) -> None:
    from test_import_isolation import FORBIDDEN, imported_forbidden

    assert imported_forbidden(["loralens.core.lowrank"], FORBIDDEN, tmp_path) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    rng = np.random.default_rng(4)
    W, B, A = (T(x) for x in factors(rng, 3, 64, 48, 8))
    cpu = weight_projection(W, B, A, n_random=0)
    gpu = weight_projection(W.cuda(), B.cuda(), A.cuda(), n_random=2, generator=torch.Generator("cuda").manual_seed(0))
    torch.testing.assert_close(gpu.dW_projection.cpu(), cpu.dW_projection, rtol=1e-10, atol=0)
    sp_cpu, sp_gpu = update_spectrum(W, B, A), update_spectrum(W.cuda(), B.cuda(), A.cuda())
    torch.testing.assert_close(sp_gpu.principal_angles.cpu(), sp_cpu.principal_angles, rtol=0, atol=1e-9)
