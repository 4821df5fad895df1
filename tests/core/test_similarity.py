"""Normalized subspace similarity phi against scipy.linalg.subspace_angles and numpy's SVD.

phi(X, Y, i, j) = sum(cos^2(principal angles between U_X[:, :i] and U_Y[:, :j])) / min(i, j).
Small seeded float64 Gaussian cases. Tolerances:

- ``TOL = 1e-10`` (absolute; phi is in [0, 1]) against the scipy reference: both sides are accurate to
  ~ eps / (singular-value gap), and seeded Gaussian spectra have relative gaps >= 1e-3.
- Projectors U U^T of the same subspace computed two ways agree to ``1e-8`` (same gap argument).
- Monte-Carlo means are within 5 standard errors (estimated from the sample of independent draws).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from loralens.core.conversion import conversion_matrices
from loralens.core.similarity import (
    basis_similarity,
    mean_offdiagonal,
    pairwise_basis_similarity,
    pairwise_subspace_similarity,
    product_singular_vectors,
    random_pairwise_similarity,
    random_similarity_expected,
    subspace_similarity,
    top_singular_vectors,
)
from loralens.errors import NonFiniteError, RankError, ShapeError

TOL = 1e-10  # absolute, on phi in [0, 1] (see module docstring)
PROJ_TOL = 1e-8  # max entry difference of two projectors onto the same subspace


# ---------------------------------------------------------------------------------------------- helpers


def T(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def numpy_basis(X: np.ndarray, k: int, side: str) -> np.ndarray:
    """Top-k left (or right) singular vectors of one matrix by numpy's thin SVD."""
    U, _, Vh = np.linalg.svd(X, full_matrices=False)
    return U[:, :k] if side == "left" else Vh[:k].T


def phi_ref(X: np.ndarray, Y: np.ndarray, i: int, j: int, side: str = "left") -> float:
    """Independent reference: sum of cos^2 of scipy's principal angles / min(i, j)."""
    angles = scipy.linalg.subspace_angles(numpy_basis(X, i, side), numpy_basis(Y, j, side))
    return float(np.sum(np.cos(angles) ** 2) / min(i, j))


def projector(U: torch.Tensor | np.ndarray) -> np.ndarray:
    U = U.numpy() if isinstance(U, torch.Tensor) else U
    return U @ np.swapaxes(U, -1, -2)


def gaussian(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


# --------------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(("i", "j"), [(3, 3), (2, 4), (4, 1), (5, 5)])
def test_subspace_similarity_matches_scipy(side: str, i: int, j: int) -> None:
    X, Y = gaussian(1, 9, 6), gaussian(2, 9, 5)
    if side == "right":
        X, Y = X.T, Y.T  # (6, 9) and (5, 9): right singular vectors live in R^9

    phi = subspace_similarity(T(X), T(Y), i, j, side=side)  # type: ignore[arg-type]

    assert phi.shape == () and phi.dtype == torch.float64
    ref = phi_ref(X, Y, i, j, side)
    assert 0.05 < ref < 0.95  # a non-trivial case
    assert abs(float(phi) - ref) < TOL


def test_subspace_similarity_broadcasts_batches() -> None:
    X, Y = gaussian(3, 4, 8, 5), gaussian(4, 8, 3)

    phi = subspace_similarity(T(X), T(Y), 3, 2)

    assert phi.shape == (4,)
    for l in range(4):
        assert abs(float(phi[l]) - phi_ref(X[l], Y, 3, 2)) < TOL


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(("i", "j"), [(3, None), (2, 4)])
def test_pairwise_equals_loop(side: str, i: int, j: int | None) -> None:
    X = gaussian(5, 4, 10, 6) if side == "left" else gaussian(5, 4, 6, 10)
    jj = i if j is None else j

    S = pairwise_subspace_similarity(T(X), i=i, j=j, side=side)  # type: ignore[arg-type]

    assert S.shape == (4, 4)
    for l in range(4):
        for k in range(4):
            assert abs(float(S[l, k]) - float(subspace_similarity(T(X[l]), T(X[k]), i, jj, side=side))) < TOL  # type: ignore[arg-type]
            assert abs(float(S[l, k]) - phi_ref(X[l], X[k], i, jj, side)) < TOL
    if j is None:
        assert torch.allclose(S.diagonal(), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
        assert torch.allclose(S, S.T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("side", ["left", "right"])
def test_pairwise_with_second_stack(side: str) -> None:
    if side == "left":
        X, Y = gaussian(6, 4, 10, 6), gaussian(7, 3, 10, 5)
    else:
        X, Y = gaussian(6, 4, 6, 10), gaussian(7, 3, 5, 10)

    S = pairwise_subspace_similarity(T(X), T(Y), i=3, j=2, side=side)  # type: ignore[arg-type]

    assert S.shape == (4, 3)
    for l in range(4):
        for k in range(3):
            assert abs(float(S[l, k]) - phi_ref(X[l], Y[k], 3, 2, side)) < TOL


def test_pairwise_basis_similarity_equals_loop() -> None:
    U = T(np.linalg.qr(gaussian(8, 5, 9, 3))[0])
    V = T(np.linalg.qr(gaussian(9, 2, 9, 4))[0])

    S = pairwise_basis_similarity(U, V)

    assert S.shape == (5, 2)
    for l in range(5):
        for k in range(2):
            assert abs(float(S[l, k]) - float(basis_similarity(U[l], V[k]))) < 1e-14
    assert torch.allclose(pairwise_basis_similarity(U), pairwise_basis_similarity(U, U), rtol=0, atol=0)


def test_basis_similarity_known_answer() -> None:
    e = torch.eye(4, dtype=torch.float64)
    U = e[:, :2]  # span(e1, e2)
    V = ((e[:, 0] + e[:, 2]) / np.sqrt(2)).unsqueeze(-1)  # 45 degrees out of span(e1, e2)

    assert abs(float(basis_similarity(U, V)) - 0.5) < 1e-15  # cos^2(45 deg) / min(2, 1)
    assert abs(float(basis_similarity(U, e[:, 2:])) - 0.0) < 1e-15
    assert abs(float(basis_similarity(U, e[:, [1, 0]])) - 1.0) < 1e-15


# ------------------------------------------------------------------------------------ singular vectors


@pytest.mark.parametrize("side", ["left", "right"])
def test_top_singular_vectors_span_numpy_svd(side: str) -> None:
    X = gaussian(10, 3, 8, 6)

    U = top_singular_vectors(T(X), 4, side=side)  # type: ignore[arg-type]

    d = 8 if side == "left" else 6
    assert U.shape == (3, d, 4) and U.dtype == torch.float64
    assert torch.allclose(U.mT @ U, torch.eye(4, dtype=torch.float64).expand(3, 4, 4), rtol=0, atol=1e-12)
    for l in range(3):
        assert np.abs(projector(U[l]) - projector(numpy_basis(X[l], 4, side))).max() < PROJ_TOL


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("shape", [(40, 5), (5, 40), (12, 6)], ids=["tall", "wide", "squarish"])
def test_top_singular_vectors_of_thin_matrices_go_through_qr(side: str, shape: tuple[int, int]) -> None:
    # Tall and wide matrices (conversion matrices are d x r) take the QR + small-SVD route; same subspaces.
    X = gaussian(12, 3, *shape) * np.logspace(0, -3, shape[1])  # distinct singular values
    U = top_singular_vectors(T(X), 4, side=side)  # type: ignore[arg-type]
    assert U.shape == (3, shape[0] if side == "left" else shape[1], 4)
    assert torch.allclose(U.mT @ U, torch.eye(4, dtype=torch.float64).expand(3, 4, 4), rtol=0, atol=1e-12)
    for l in range(3):
        assert np.abs(projector(U[l]) - projector(numpy_basis(X[l], 4, side))).max() < PROJ_TOL
    with pytest.raises(RankError, match="exceeds the rank"):
        top_singular_vectors(T(X[:, :, :3] if shape[1] == 40 else X[:, :3, :]), 4, side=side)  # type: ignore[arg-type]


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_top_singular_vectors_computes_half_in_float32(half: torch.dtype) -> None:
    X = T(gaussian(11, 8, 5)).to(half)

    U = top_singular_vectors(X, 2)

    assert U.dtype == torch.float32
    ref = numpy_basis(X.double().numpy(), 2, "left")  # the same (rounded) matrix in float64
    assert np.abs(projector(U.double()) - projector(ref)).max() < 1e-4  # float32 SVD: ~ eps32 / gap


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("k", [4, 2])
def test_product_singular_vectors_match_dense_svd(side: str, k: int) -> None:
    L, m, r, n = 2, 10, 4, 8
    B, A = gaussian(12, L, m, r), gaussian(13, L, r, n)

    U = product_singular_vectors(T(B), T(A), k, side=side)  # type: ignore[arg-type]

    assert U.shape == (L, m if side == "left" else n, k)
    assert torch.allclose(U.mT @ U, torch.eye(k, dtype=torch.float64).expand(L, k, k), rtol=0, atol=1e-12)
    for l in range(L):
        dense = numpy_basis(B[l] @ A[l], k, side)  # dense SVD of the (m, n) product, as the reference
        assert np.abs(projector(U[l]) - projector(dense)).max() < PROJ_TOL


def test_product_similarity_reduces_to_factor_similarity() -> None:
    # A1, A2 (r, n) of full row rank: col(B A) = col(B), so phi_left(B1 A1, B2 A2) = phi_left(B1, B2);
    # likewise row(B A) = row(A) for B of full column rank.
    m, r, n = 12, 3, 9
    B1, B2 = gaussian(14, m, r), gaussian(15, m, r)
    A1, A2 = gaussian(16, r, n), gaussian(17, r, n)

    left_factors = float(subspace_similarity(T(B1), T(B2), r, r))
    left_dense = float(subspace_similarity(T(B1 @ A1), T(B2 @ A2), r, r))
    left_product = float(
        basis_similarity(product_singular_vectors(T(B1), T(A1), r), product_singular_vectors(T(B2), T(A2), r))
    )
    assert 0.05 < left_factors < 0.95
    assert abs(left_dense - left_factors) < TOL
    assert abs(left_product - left_factors) < TOL
    assert abs(left_factors - phi_ref(B1, B2, r, r)) < TOL

    right_factors = float(subspace_similarity(T(A1), T(A2), r, r, side="right"))
    right_product = float(
        basis_similarity(
            product_singular_vectors(T(B1), T(A1), r, side="right"),
            product_singular_vectors(T(B2), T(A2), r, side="right"),
        )
    )
    assert abs(right_product - right_factors) < TOL


# ------------------------------------------------------------------------------------------ identities


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("i", [1, 3, 5])
def test_phi_of_a_matrix_with_itself_is_one(side: str, i: int) -> None:
    X = T(gaussian(20, 7, 5))
    assert abs(float(subspace_similarity(X, X, i, i, side=side)) - 1.0) < 1e-12  # type: ignore[arg-type]


def test_nested_subspaces_give_one() -> None:
    # span(U[:, :2]) is inside span(U[:, :4]): all min(i, j) = 2 principal angles are zero.
    X = T(gaussian(21, 9, 6))
    assert abs(float(subspace_similarity(X, X, 2, 4)) - 1.0) < 1e-12
    assert abs(float(subspace_similarity(X, X, 4, 2)) - 1.0) < 1e-12


def test_orthogonal_subspaces_give_zero() -> None:
    Q = np.linalg.qr(gaussian(22, 10, 10))[0]
    X = Q[:, :3] @ gaussian(23, 3, 3)  # column space span(q1..q3)
    Y = Q[:, 3:7] @ gaussian(24, 4, 5)  # column space span(q4..q7)

    assert abs(float(subspace_similarity(T(X), T(Y), 3, 4))) < 1e-14
    assert abs(float(subspace_similarity(T(X.T), T(Y.T), 3, 4, side="right"))) < 1e-14


@pytest.mark.parametrize("side", ["left", "right"])
def test_symmetry(side: str) -> None:
    X, Y = gaussian(25, 8, 6), gaussian(26, 8, 7)
    if side == "right":
        X, Y = X.T, Y.T
    for i, j in [(2, 5), (4, 4), (6, 1)]:
        a = float(subspace_similarity(T(X), T(Y), i, j, side=side))  # type: ignore[arg-type]
        b = float(subspace_similarity(T(Y), T(X), j, i, side=side))  # type: ignore[arg-type]
        assert abs(a - b) < 1e-14


def test_range_is_unit_interval() -> None:
    X = T(gaussian(27, 6, 7, 5))
    for i in range(1, 6):
        for j in range(1, 6):
            S = pairwise_subspace_similarity(X, i=i, j=j)
            assert (S >= -1e-12).all() and (S <= 1 + 1e-12).all()


@pytest.mark.parametrize("c", [-3.5, 1e-3, 1e4])
def test_invariant_to_scaling(c: float) -> None:
    X, Y = T(gaussian(28, 8, 6)), T(gaussian(29, 8, 5))
    for side in ("left", "right"):
        Yside = Y if side == "left" else T(gaussian(30, 4, 6))
        for i, j in [(2, 3), (4, 4)]:
            base = float(subspace_similarity(X, Yside, i, j, side=side))  # type: ignore[arg-type]
            scaled = float(subspace_similarity(c * X, Yside, i, j, side=side))  # type: ignore[arg-type]
            assert abs(base - scaled) < TOL


def test_left_invariant_to_right_multiplication() -> None:
    # X (d, n) of full column rank n: with i = n the left subspace is col(X) = col(X M) for invertible M.
    d, n = 9, 4
    X, Y = gaussian(31, d, n), gaussian(32, d, 3)
    M = gaussian(33, n, n) + n * np.eye(n)  # invertible (condition ~ 3)

    base = float(subspace_similarity(T(X), T(Y), n, 3))
    moved = float(subspace_similarity(T(X @ M), T(Y), n, 3))

    assert 0.05 < base < 0.95
    assert abs(base - moved) < TOL
    # The right subspace of X.T (its row space) is invariant to left-multiplication the same way.
    assert abs(float(subspace_similarity(T(M.T @ X.T), T(Y.T), n, 3, side="right")) - base) < TOL


def test_mean_offdiagonal() -> None:
    S = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], dtype=torch.float64)
    assert float(mean_offdiagonal(S)) == (2 + 3 + 4 + 6 + 7 + 8) / 6
    assert torch.isnan(mean_offdiagonal(torch.ones(1, 1)))
    with pytest.raises(ShapeError, match=r"square \(L, L\) matrix, got \(2, 3\)"):
        mean_offdiagonal(torch.ones(2, 3))


# ------------------------------------------------------------------------------------- random baseline


def test_random_similarity_expected() -> None:
    assert random_similarity_expected(8, 8, 768) == 8 / 768
    assert abs(random_similarity_expected(8, 8, 768) - 0.0104166666) < 1e-9  # the paper's "< 0.01"
    assert random_similarity_expected(2, 5, 20) == 0.25
    assert random_similarity_expected(5, 2, 20) == 0.25
    assert random_similarity_expected(4, 4, 4) == 1.0
    for i, j, d in [(0, 1, 5), (1, 0, 5), (6, 1, 5), (1, 6, 5)]:
        with pytest.raises(RankError, match=rf"i={i}, j={j} must lie in 1..d={d}"):
            random_similarity_expected(i, j, d)


@pytest.mark.parametrize(
    ("shape", "i", "j", "side", "rank"),
    [
        ((32, 20), 4, None, "left", None),  # d = 32
        ((20, 32), 2, 5, "right", None),  # d = 32, i != j
        ((24, 16), 3, None, "left", 6),  # low-rank products (conv_BA's baseline), d = 24
        ((16, 24), 5, 2, "right", 6),  # d = 24
    ],
    ids=["dense-left", "dense-right-i<j", "rank6-left", "rank6-right-i>j"],
)
def test_random_pairwise_monte_carlo_mean(
    shape: tuple[int, int], i: int, j: int | None, side: str, rank: int | None
) -> None:
    L, draws = 6, 40
    g = torch.Generator().manual_seed(1234)
    d = shape[0] if side == "left" else shape[1]
    jj = i if j is None else j
    means = []
    for _ in range(draws):
        S = random_pairwise_similarity(L, shape, i=i, j=j, side=side, rank=rank, generator=g)  # type: ignore[arg-type]
        assert S.shape == (L, L) and S.dtype == torch.float64
        assert torch.allclose(S.diagonal(), torch.ones(L, dtype=torch.float64), rtol=0, atol=1e-12)
        assert (S >= -1e-12).all() and (S <= 1 + 1e-12).all()
        means.append(float(mean_offdiagonal(S)))
    # Draws are independent, so the standard error of their mean comes from the sample itself. 5 SE is a loose,
    # distribution-free-enough bound (normal tail 6e-7); the seed makes the check deterministic anyway.
    expected = random_similarity_expected(i, jj, d)
    sample = np.asarray(means)
    se = sample.std(ddof=1) / np.sqrt(draws)
    assert 0 < se < 0.1 * expected  # the bound is informative
    assert abs(sample.mean() - expected) < 5 * se


@pytest.mark.parametrize("rank", [None, 5])
def test_random_pairwise_is_reproducible(rank: int | None) -> None:
    def draw(seed: int) -> torch.Tensor:
        return random_pairwise_similarity(4, (12, 10), i=3, rank=rank, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


def test_random_pairwise_dtype() -> None:
    g = torch.Generator().manual_seed(0)
    S = random_pairwise_similarity(3, (10, 8), i=2, dtype=torch.float32, generator=g)
    assert S.dtype == torch.float32 and S.shape == (3, 3)


# -------------------------------------------------------------------------------------------- errors


def test_k_above_numerical_rank() -> None:
    X = gaussian(40, 3, 7, 5)
    X[1] = gaussian(41, 7, 2) @ gaussian(42, 2, 5)  # rank 2 at batch position 1 only
    with pytest.raises(
        RankError, match=r"dimension 3 exceeds the rank at batch positions \[1\].*numerical rank is 2"
    ) as e:
        top_singular_vectors(T(X), 3)
    assert e.value.indices == (1,)
    assert top_singular_vectors(T(X), 2).shape == (3, 7, 2)  # k = 2 is fine for all


def test_k_above_smaller_dimension() -> None:
    with pytest.raises(RankError, match=r"exceeds the rank \(at most 4"):
        top_singular_vectors(T(gaussian(43, 7, 4)), 5)
    with pytest.raises(RankError, match="rank"):
        product_singular_vectors(T(gaussian(44, 7, 3)), T(gaussian(45, 3, 6)), 4)


def test_all_zero_matrix() -> None:
    X = np.stack([gaussian(46, 6, 4), np.zeros((6, 4))])
    with pytest.raises(RankError, match=r"batch positions \[1\] \(it is all zero\)") as e:
        top_singular_vectors(T(X), 1)
    assert e.value.indices == (1,)
    with pytest.raises(RankError, match="all zero"):  # PEFT's zero-initialised lora_B
        product_singular_vectors(torch.zeros(6, 2, dtype=torch.float64), T(gaussian(47, 2, 5)), 1)


def test_product_rank_below_factor_width() -> None:
    B = gaussian(48, 8, 1) @ gaussian(49, 1, 3)  # (8, 3) of rank 1
    with pytest.raises(RankError, match="numerical rank is 1"):
        product_singular_vectors(T(B), T(gaussian(50, 3, 6)), 2)


@pytest.mark.parametrize("k", [0, -1])
def test_k_must_be_positive(k: int) -> None:
    with pytest.raises(RankError, match="at least 1"):
        top_singular_vectors(T(gaussian(51, 5, 4)), k)
    with pytest.raises(RankError, match="at least 1"):
        subspace_similarity(T(gaussian(51, 5, 4)), T(gaussian(52, 5, 4)), k, 1)


def test_side_must_be_left_or_right() -> None:
    X = T(gaussian(53, 5, 4))
    for call in (
        lambda: top_singular_vectors(X, 1, side="up"),  # type: ignore[arg-type]
        lambda: product_singular_vectors(X, X.T, 1, side="columns"),  # type: ignore[arg-type]
        lambda: subspace_similarity(X, X, 1, 1, side="Left"),  # type: ignore[arg-type]
        lambda: pairwise_subspace_similarity(X.expand(2, 5, 4), i=1, side="row"),  # type: ignore[arg-type]
    ):
        with pytest.raises(ShapeError, match="side must be 'left' or 'right'"):
            call()


def test_mismatched_dimensions() -> None:
    with pytest.raises(ShapeError, match=r"different spaces: \(6, 2\) vs \(7, 2\)"):
        subspace_similarity(T(gaussian(54, 6, 4)), T(gaussian(55, 7, 4)), 2, 2)
    with pytest.raises(ShapeError, match="different spaces"):
        subspace_similarity(T(gaussian(54, 4, 6)), T(gaussian(55, 4, 7)), 2, 2, side="right")
    with pytest.raises(ShapeError, match=r"do not fit: \(6, 3\) and \(2, 5\)"):
        product_singular_vectors(T(gaussian(56, 6, 3)), T(gaussian(57, 2, 5)), 1)
    with pytest.raises(ShapeError, match=r"\(L, d, i\) and \(K, d, j\), got \(3, 8, 2\) and \(2, 9, 2\)"):
        pairwise_subspace_similarity(T(gaussian(58, 3, 8, 5)), T(gaussian(59, 2, 9, 5)), i=2)
    with pytest.raises(ShapeError, match=r"got \(8, 2\) and \(8, 2\)"):
        pairwise_subspace_similarity(T(gaussian(60, 8, 5)), i=2)  # a single matrix, not a stack
    with pytest.raises(ShapeError, match="matrices"):
        top_singular_vectors(torch.ones(5, dtype=torch.float64), 1)


def test_integer_input_is_rejected() -> None:
    with pytest.raises(ShapeError, match="floating-point tensor, got torch.int64"):
        top_singular_vectors(torch.ones(4, 3, dtype=torch.int64), 1)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_input(value: float) -> None:
    # NaN would make the SVD fail and Inf would make the rank tolerance inf ("it is all zero"): both are caught first.
    X = gaussian(61, 3, 6, 4)
    X[1, 0, 0] = value
    with pytest.raises(NonFiniteError, match=r"NaN or Inf .*batch positions \[1\]"):
        top_singular_vectors(T(X), 2)
    with pytest.raises(NonFiniteError, match=r"NaN or Inf"):
        subspace_similarity(T(gaussian(62, 6, 4)), T(X[1]), 2, 2)
    with pytest.raises(NonFiniteError, match=r"NaN or Inf .*batch positions \[1\]"):
        pairwise_subspace_similarity(T(X), i=2, side="right")
    with pytest.raises(NonFiniteError, match=r"NaN or Inf .*batch positions \[1\]"):
        product_singular_vectors(T(gaussian(63, 3, 5, 6)), T(X), 2)


# ----------------------------------------------------------------------------------------------- GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    ("dtype", "phi_tol", "conv_tol"),
    [(torch.float32, 1e-4, 1e-4), (torch.float64, 1e-10, 1e-10)],  # as asked: phi 1e-4 in float32, 1e-10 in float64
    ids=["float32", "float64"],
)
def test_cuda_matches_cpu(dtype: torch.dtype, phi_tol: float, conv_tol: float) -> None:
    rng = np.random.default_rng(70)
    L, d, r = 4, 32, 4
    W = T(rng.standard_normal((L, d, d)) + d * np.eye(d))  # condition ~ 3
    A, B = T(rng.standard_normal((L, r, d))), T(rng.standard_normal((L, d, r)))

    cpu = conversion_matrices(W, A, B, dtype=dtype)
    gpu = conversion_matrices(W.cuda(), A.cuda(), B.cuda(), dtype=dtype)

    assert gpu.A.is_cuda and gpu.A.dtype == dtype
    for c, g in ((cpu.A, gpu.A), (cpu.B, gpu.B), (cpu.BA, gpu.BA)):
        assert c is not None and g is not None
        err = torch.linalg.matrix_norm(g.cpu().double() - c.double()) / torch.linalg.matrix_norm(c.double())
        assert (err < conv_tol).all()
    for side in ("left", "right"):
        S_cpu = pairwise_subspace_similarity(cpu.A, i=r, side=side)  # type: ignore[arg-type]
        S_gpu = pairwise_subspace_similarity(gpu.A, i=r, side=side)  # type: ignore[arg-type]
        assert S_gpu.is_cuda
        assert (S_gpu.cpu() - S_cpu).abs().max() < phi_tol
        Sb_cpu = pairwise_subspace_similarity(cpu.B, i=2, j=3, side=side)  # type: ignore[arg-type]
        Sb_gpu = pairwise_subspace_similarity(gpu.B, i=2, j=3, side=side)  # type: ignore[arg-type]
        assert (Sb_gpu.cpu() - Sb_cpu).abs().max() < phi_tol
