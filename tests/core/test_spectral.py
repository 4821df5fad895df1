"""The block Krylov spectral engine (loralens.core.spectral) against float64 dense SVDs.

References are independent of the Krylov path: a dense float64 SVD of the (merged) matrix (``torch.linalg.svd`` for
the larger matrices, ``numpy.linalg.svd`` in the property test) and ``scipy.linalg.subspace_angles``. (numpy's
multithreaded OpenBLAS runs 100x slower on the shared, loaded 2-core test machine, so the larger references use
torch with one thread.) Every case is a fresh seeded draw; most put known singular values under random orthogonal
singular vectors.
The Krylov path is forced with ``dense_cutover=0`` (these matrices are small enough for the dense path otherwise).
Tolerances:

- ``SIGMA_REL = 1e-6`` relative on singular values and ``ANGLE = 1e-6`` radians on principal angles, for spectra with
  relative gaps >= 1e-2 at the compared boundaries (the float64 default tol 1e-10 bounds both errors by about
  ``1e-10 / gap``; they come out near 1e-12).
- float32 (default tol 2e-5): ``SIGMA_REL32 = 1e-5`` relative, angles below ``ANGLE32 = 1e-3`` for the same gaps.
- The residual test itself, ``max(||W v - s u||, ||W^T u - s v||) <= tol * s_1``, recomputed here from the dense
  matrix (with a factor 10 of slack for the rounding of the recomputation).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loralens.core.spectral import (
    DEFAULT_TOL,
    SpectralConvergenceError,
    StackOperator,
    operator_from_closures,
    top_singular_triplets,
    weight_operator,
)
from loralens.errors import BatchError, DTypeError, LoralensError, ShapeError

SIGMA_REL = 1e-6
ANGLE = 1e-6
SIGMA_REL32 = 1e-5
ANGLE32 = 1e-3


# ---------------------------------------------------------------------------------------------- helpers


def stack_with_spectrum(batch: int, d_out: int, d_in: int, sigma: np.ndarray, seed: int) -> np.ndarray:
    """(batch, d_out, d_in) float64, each ``U diag(sigma) V^T`` with fresh random orthonormal U, V."""
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(batch, d_out, len(sigma), dtype=torch.float64, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(batch, d_in, len(sigma), dtype=torch.float64, generator=gen))
    return ((U * T(sigma)) @ V.mT).numpy()


def dense_svd(W: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float64 thin SVD of one matrix: U (d_out, n), S (n,), Vh (n, d_in)."""
    U, S, Vh = torch.linalg.svd(T(W), full_matrices=False)
    return U.numpy(), S.numpy(), Vh.numpy()


def power_spectrum(n: int, decay: float = 1.0) -> np.ndarray:
    return np.arange(1, n + 1, dtype=np.float64) ** -decay


def T(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def max_angle(A: np.ndarray, B: np.ndarray) -> float:
    return float(np.max(scipy.linalg.subspace_angles(A, B)))


def check_against_dense(W: np.ndarray, res, k: int, sigma_rel: float, angle: float) -> None:
    """S, U, V of ``res`` against numpy's float64 SVD of every matrix of ``W`` (batch, d_out, d_in)."""
    assert res.U.shape == (W.shape[0], W.shape[1], k)
    assert res.V.shape == (W.shape[0], W.shape[2], k)
    assert res.S.shape == (W.shape[0], k)
    for b in range(W.shape[0]):
        U, S, Vh = dense_svd(W[b])
        got_S = res.S[b].double().numpy()
        np.testing.assert_allclose(got_S, S[:k], rtol=sigma_rel, atol=0)
        assert max_angle(res.U[b].double().numpy(), U[:, :k]) < angle
        assert max_angle(res.V[b].double().numpy(), Vh[:k].T) < angle


def check_residual(W: np.ndarray, res, tol: float) -> None:
    """The residual test recomputed from the dense matrices, and orthonormal bases."""
    U, S, V = res.U.double().numpy(), res.S.double().numpy(), res.V.double().numpy()
    for b in range(W.shape[0]):
        r1 = np.linalg.norm(W[b] @ V[b] - U[b] * S[b], axis=0)
        r2 = np.linalg.norm(W[b].T @ U[b] - V[b] * S[b], axis=0)
        assert np.max(np.maximum(r1, r2)) <= 10 * tol * S[b, 0] + 1e-300
        k = S.shape[1]
        np.testing.assert_allclose(U[b].T @ U[b], np.eye(k), atol=100 * tol)
        np.testing.assert_allclose(V[b].T @ V[b], np.eye(k), atol=100 * tol)
        assert np.all(np.diff(S[b]) <= 0)


# ------------------------------------------------------------------------------------- accuracy, float64


@pytest.mark.parametrize(
    ("batch", "d_out", "d_in"),
    [(1, 160, 160), (4, 160, 160), (2, 192, 576), (2, 576, 192)],
    ids=["batch1", "batch4", "wide-192x576", "tall-576x192"],
)
def test_well_separated_matches_dense_svd(batch: int, d_out: int, d_in: int) -> None:
    n = min(d_out, d_in)
    W = stack_with_spectrum(batch, d_out, d_in, power_spectrum(n), seed=batch * 1000 + d_out)
    k = 8
    res = top_singular_triplets(weight_operator(T(W)), k, dense_cutover=0)
    assert res.method == "krylov"
    assert res.products < n  # converged before the basis filled R^n (not an exact-by-exhaustion answer)
    check_against_dense(W, res, k, SIGMA_REL, ANGLE)
    check_residual(W, res, DEFAULT_TOL[torch.float64])
    assert float(res.residual.max()) <= DEFAULT_TOL[torch.float64]


def test_gaussian_matrix_matches_dense_svd() -> None:
    """A plain Gaussian matrix (Marchenko-Pastur spectrum, small relative gaps at the top)."""
    rng = np.random.default_rng(7)
    W = rng.standard_normal((2, 120, 90))
    k = 5
    res = top_singular_triplets(weight_operator(T(W)), k, dense_cutover=0)
    check_residual(W, res, DEFAULT_TOL[torch.float64])
    for b in range(2):
        S = dense_svd(W[b])[1]
        np.testing.assert_allclose(res.S[b].numpy(), S[:k], rtol=SIGMA_REL)


def test_dense_and_krylov_paths_agree_with_signs() -> None:
    W = stack_with_spectrum(2, 150, 130, power_spectrum(130, 0.8), seed=11)
    op = weight_operator(T(W))
    kry = top_singular_triplets(op, 6, dense_cutover=0)
    den = top_singular_triplets(op, 6, exact=True)
    assert kry.method == "krylov" and den.method == "dense" and den.iterations == 0
    # the same sign convention on both paths: the vectors themselves agree, not only the subspaces
    np.testing.assert_allclose(kry.U.numpy(), den.U.numpy(), atol=1e-8)
    np.testing.assert_allclose(kry.V.numpy(), den.V.numpy(), atol=1e-8)
    np.testing.assert_allclose(kry.S.numpy(), den.S.numpy(), rtol=1e-12)


def test_default_path_is_dense_for_small_matrices() -> None:
    W = stack_with_spectrum(1, 64, 64, power_spectrum(64), seed=3)
    res = top_singular_triplets(weight_operator(T(W)), 4)
    assert res.method == "dense"
    check_against_dense(W, res, 4, 1e-12, 1e-10)
    # above DENSE_CUTOVER (384 in float64) and 12 k: Krylov by default
    W = stack_with_spectrum(1, 400, 400, power_spectrum(400), seed=4)
    res = top_singular_triplets(weight_operator(T(W)), 2)
    assert res.method == "krylov"
    check_against_dense(W, res, 2, SIGMA_REL, ANGLE)
    # k = 64 at n = 400 <= 12 k: the basis would need most of R^n, so dense
    assert top_singular_triplets(weight_operator(T(W)), 64).method == "dense"


@pytest.mark.parametrize(("d_out", "d_in"), [(40, 30), (30, 40), (25, 25)])
def test_k_equal_to_min_dimension(d_out: int, d_in: int) -> None:
    """k = min(d): the basis fills R^n, where Rayleigh-Ritz is exact."""
    n = min(d_out, d_in)
    W = stack_with_spectrum(2, d_out, d_in, power_spectrum(n, 0.5), seed=n)
    res = top_singular_triplets(weight_operator(T(W)), n, dense_cutover=0)
    assert res.method == "krylov"
    check_against_dense(W, res, n, SIGMA_REL, ANGLE)


# ---------------------------------------------------------------------------------------------- clusters


@pytest.mark.parametrize("spread", [0.0, 1e-10], ids=["equal", "near-equal"])
def test_clustered_spectrum(spread: float) -> None:
    """Clusters inside the top k (ranks 3-6) and across the k boundary (ranks 9-12, k = 10).

    Inside: the cluster's subspace is unique and must match. Across the boundary: the top-8 subspace (above the
    cluster) must match, every sigma must be right, and the computed top-10 must lie inside the true top-12.
    """
    n, k = 120, 10
    sigma = power_spectrum(n)
    sigma[2:6] = sigma[2] * (1 - spread * np.arange(4))
    sigma[8:12] = sigma[8] * (1 - spread * np.arange(4))
    W = stack_with_spectrum(3, n, n, sigma, seed=int(spread == 0))
    res = top_singular_triplets(weight_operator(T(W)), k, dense_cutover=0)
    check_residual(W, res, DEFAULT_TOL[torch.float64])
    for b in range(3):
        U, S, _ = dense_svd(W[b])
        got = res.U[b].numpy()
        np.testing.assert_allclose(res.S[b].numpy(), S[:k], rtol=SIGMA_REL)
        assert max_angle(got[:, 2:6], U[:, 2:6]) < ANGLE  # the cluster inside
        assert max_angle(got[:, :8], U[:, :8]) < ANGLE  # everything above the boundary cluster
        assert max_angle(got, U[:, :12]) < ANGLE  # top-10 inside the true top-12 (angles: min(10, 12) of them)


# ------------------------------------------------------------------------------------ W + s B A, closures


def test_implicit_lowrank_update_equals_dense_form() -> None:
    rng = np.random.default_rng(5)
    batch, d_out, d_in, r = 3, 140, 100, 4
    W = stack_with_spectrum(batch, d_out, d_in, power_spectrum(d_in), seed=5)
    B = rng.standard_normal((batch, d_out, r))
    A = rng.standard_normal((batch, r, d_in)) * 0.1
    s = np.array([0.5, 2.0, 1.0])
    merged = W + s[:, None, None] * (B @ A)
    implicit = weight_operator(T(W), T(B), T(A), T(s))
    X = T(rng.standard_normal((batch, d_in, 3)))
    Y = T(rng.standard_normal((batch, d_out, 3)))
    np.testing.assert_allclose(implicit.matvec(X).numpy(), merged @ X.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(implicit.rmatvec(Y).numpy(), merged.transpose(0, 2, 1) @ Y.numpy(), atol=1e-12)
    np.testing.assert_allclose(implicit.dense().numpy(), merged, atol=1e-12)
    res = top_singular_triplets(implicit, 6, dense_cutover=0)
    check_against_dense(merged, res, 6, SIGMA_REL, ANGLE)
    ref = top_singular_triplets(weight_operator(T(merged)), 6, dense_cutover=0)
    np.testing.assert_allclose(res.S.numpy(), ref.S.numpy(), rtol=1e-10)
    # a scalar scale is the same as a constant (batch,) one
    one = top_singular_triplets(weight_operator(T(W), T(B), T(A), 2.0), 6, dense_cutover=0)
    two = top_singular_triplets(weight_operator(T(W), T(B), T(A), torch.full((batch,), 2.0)), 6, dense_cutover=0)
    np.testing.assert_allclose(one.S.numpy(), two.S.numpy(), rtol=1e-12)


def test_closures_without_dense_form() -> None:
    """User closures: the Krylov path, and the dense path forming W from products on the smaller side."""
    for d_out, d_in in ((90, 60), (60, 90)):
        W = stack_with_spectrum(2, d_out, d_in, power_spectrum(min(d_out, d_in)), seed=d_out)
        Wt = T(W)
        op = operator_from_closures(lambda X, Wt=Wt: Wt @ X, lambda Y, Wt=Wt: Wt.mT @ Y, (2, d_out, d_in))
        assert op.dense is None
        check_against_dense(W, top_singular_triplets(op, 5, dense_cutover=0), 5, SIGMA_REL, ANGLE)
        dense = top_singular_triplets(op, 5, exact=True)
        assert dense.method == "dense" and dense.products == min(d_out, d_in)
        check_against_dense(W, dense, 5, 1e-12, 1e-10)


def test_zero_matrix_is_exact() -> None:
    res = top_singular_triplets(weight_operator(torch.zeros(2, 80, 70, dtype=torch.float64)), 3, dense_cutover=0)
    assert torch.equal(res.S, torch.zeros(2, 3, dtype=torch.float64))
    assert torch.equal(res.residual, torch.zeros(2, dtype=torch.float64))


# ------------------------------------------------------------------------------------------- real weights


def test_real_minilm_query_weights(minilm_path) -> None:
    from safetensors import safe_open

    keys = [f"encoder.layer.{n}.attention.self.query.weight" for n in range(6)]
    with safe_open(str(minilm_path / "model.safetensors"), framework="pt") as f:
        W32 = torch.stack([f.get_tensor(key) for key in keys])  # (6, 384, 384) float32
    W = W32.double().numpy()
    k = 16
    res = top_singular_triplets(weight_operator(W32.double()), k, dense_cutover=0)
    check_against_dense(W, res, k, SIGMA_REL, ANGLE)
    res32 = top_singular_triplets(weight_operator(W32), k, dense_cutover=0)
    assert res32.S.dtype == torch.float32
    check_against_dense(W, res32, k, SIGMA_REL32, ANGLE32)


# ------------------------------------------------------------------------------------------------ float32


def test_float32_path() -> None:
    W = stack_with_spectrum(3, 200, 160, power_spectrum(160), seed=32)
    W32 = T(W).float()
    res = top_singular_triplets(weight_operator(W32), 8, dense_cutover=0)
    assert res.U.dtype == res.S.dtype == res.V.dtype == torch.float32
    assert float(res.residual.max()) <= DEFAULT_TOL[torch.float32]
    check_against_dense(W32.double().numpy(), res, 8, SIGMA_REL32, ANGLE32)


def test_half_precision_is_upcast() -> None:
    W = T(stack_with_spectrum(1, 64, 64, power_spectrum(64), seed=16)).half()
    op = weight_operator(W)
    assert op.dtype == torch.float32
    res = top_singular_triplets(op, 4, dense_cutover=0)
    check_against_dense(W.double().numpy(), res, 4, SIGMA_REL32, ANGLE32)


# ------------------------------------------------------------------------------------------ reproducibility


def test_seeded_runs_are_byte_identical() -> None:
    W = T(stack_with_spectrum(3, 150, 150, power_spectrum(150, 0.7), seed=1))
    one = top_singular_triplets(weight_operator(W), 7, dense_cutover=0, seed=123)
    two = top_singular_triplets(weight_operator(W), 7, dense_cutover=0, seed=123)
    for a, b in zip(one[:4], two[:4], strict=True):
        assert torch.equal(a, b)
    other = top_singular_triplets(weight_operator(W), 7, dense_cutover=0, seed=124)
    assert not torch.equal(one.U, other.U)  # the seed is used (the answer is the same to tolerance)
    np.testing.assert_allclose(one.S.numpy(), other.S.numpy(), rtol=SIGMA_REL)


# --------------------------------------------------------------------------------------------- bad input


def test_bad_k_and_parameters_raise() -> None:
    op = weight_operator(torch.randn(2, 30, 20, dtype=torch.float64))
    with pytest.raises(ShapeError, match=r"k = 0 must be an integer in 1..min\(d_out, d_in\) = 20"):
        top_singular_triplets(op, 0)
    with pytest.raises(ShapeError, match=r"k = 21 .* = 20 for the stack shape \(2, 30, 20\)"):
        top_singular_triplets(op, 21)
    with pytest.raises(ShapeError, match="k = 2.5"):
        top_singular_triplets(op, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ShapeError, match="block_size = 0 must be a positive integer"):
        top_singular_triplets(op, 3, block_size=0)
    with pytest.raises(ShapeError, match="tol = 1e-20 must be a finite number above"):
        top_singular_triplets(op, 3, tol=1e-20)
    with pytest.raises(ShapeError, match="max_iter = 0"):
        top_singular_triplets(op, 3, max_iter=0)
    with pytest.raises(ShapeError, match="expected a StackOperator"):
        top_singular_triplets(torch.randn(2, 3, 3), 1)  # type: ignore[arg-type]


def test_mismatched_shapes_raise() -> None:
    W = torch.randn(2, 30, 20, dtype=torch.float64)
    with pytest.raises(ShapeError, match=r"W \(2, 30, 20\) does not fit B \(2, 30, 4\) and A \(2, 4, 21\)"):
        weight_operator(W, torch.randn(2, 30, 4), torch.randn(2, 4, 21))
    with pytest.raises(ShapeError, match=r"B \(batch, d_out, r\) and A \(batch, r, d_in\) do not fit"):
        weight_operator(W, torch.randn(2, 30, 4), torch.randn(2, 5, 20))
    with pytest.raises(ShapeError, match="give both factors"):
        weight_operator(W, torch.randn(2, 30, 4))
    with pytest.raises(ShapeError, match=r"scale must be a scalar or \(batch,\) = \(2,\)"):
        weight_operator(W, torch.randn(2, 30, 4), torch.randn(2, 4, 20), torch.ones(3))
    with pytest.raises(ShapeError, match="expected a stack W"):
        weight_operator(torch.randn(30))
    with pytest.raises(LoralensError, match="W: NaN or Inf"):
        weight_operator(torch.full((1, 3, 3), float("nan")))
    with pytest.raises(ShapeError, match=r"matvec maps \(batch, 20, p\) = \(2, 20, 1\) to \(2, 20, 1\)"):
        operator_from_closures(lambda X: X, lambda Y: Y, (2, 30, 20))
    with pytest.raises(DTypeError, match="float32 or float64"):
        operator_from_closures(lambda X: X, lambda Y: Y, (2, 20, 20), dtype=torch.float16)
    op = StackOperator(lambda X: X, lambda Y: Y, 1, 4, 4, torch.int64, torch.device("cpu"))
    with pytest.raises(DTypeError, match="float32 or float64, got torch.int64"):
        top_singular_triplets(op, 1)


def test_non_convergence_names_the_batch_positions() -> None:
    """Batch 0: fast decay (converges at once); batch 1: a flat Gaussian spectrum (cannot in one block)."""
    rng = np.random.default_rng(9)
    easy = stack_with_spectrum(1, 100, 100, 10.0 ** -np.arange(100.0), seed=9)[0]
    hard = rng.standard_normal((100, 100))
    W = T(np.stack([easy, hard]))
    with pytest.raises(SpectralConvergenceError, match=r"did not converge at batch positions \[1\]") as info:
        top_singular_triplets(weight_operator(W), 4, dense_cutover=0, max_iter=2)
    err = info.value
    assert isinstance(err, BatchError) and err.indices == (1,)
    assert err.result is not None and float(err.result.residual[0]) <= DEFAULT_TOL[torch.float64]
    assert "raise max_iter, loosen tol" in str(err)


# -------------------------------------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    d_out=st.integers(2, 24),
    d_in=st.integers(2, 24),
    k_frac=st.floats(0.0, 1.0),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_triplets_satisfy_the_residual_test(d_out: int, d_in: int, k_frac: float, batch: int, seed: int):
    """Random Gaussian matrices: W v = s u and W^T u = s v within tol * s_1, orthonormal, sigma as numpy's."""
    n = min(d_out, d_in)
    k = max(1, round(k_frac * n))
    W = np.random.default_rng(seed).standard_normal((batch, d_out, d_in))
    res = top_singular_triplets(weight_operator(T(W)), k, dense_cutover=0, seed=seed % 1000)
    check_residual(W, res, DEFAULT_TOL[torch.float64])
    for b in range(batch):
        S = np.linalg.svd(W[b], compute_uv=False)
        np.testing.assert_allclose(res.S[b].numpy(), S[:k], rtol=0, atol=1e-9 * S[0])


# ---------------------------------------------------------------------------------------------------- GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_cpu(dtype: torch.dtype) -> None:
    W = T(stack_with_spectrum(3, 300, 200, power_spectrum(200), seed=77)).to(dtype)
    rng = np.random.default_rng(77)
    B, A = T(rng.standard_normal((3, 300, 4))).to(dtype), T(rng.standard_normal((3, 4, 200))).to(dtype) * 0.1
    cpu = top_singular_triplets(weight_operator(W, B, A, 0.5), 8, dense_cutover=0)
    gpu = top_singular_triplets(weight_operator(W.cuda(), B.cuda(), A.cuda(), 0.5), 8, dense_cutover=0)
    assert gpu.U.device.type == "cuda" and gpu.S.dtype == dtype
    rel, angle = (SIGMA_REL, ANGLE) if dtype == torch.float64 else (SIGMA_REL32, ANGLE32)
    np.testing.assert_allclose(gpu.S.cpu().numpy(), cpu.S.numpy(), rtol=rel)
    for b in range(3):
        assert max_angle(gpu.U[b].cpu().double().numpy(), cpu.U[b].double().numpy()) < angle
        assert max_angle(gpu.V[b].cpu().double().numpy(), cpu.V[b].double().numpy()) < angle
    dense = top_singular_triplets(weight_operator(W.cuda()), 8, exact=True)
    assert dense.method == "dense" and dense.S.device.type == "cuda"


# ------------------------------------------------------- known top-r spectra in core.lowrank (#15 item 3)


@pytest.mark.parametrize("clustered", [False, True])
def test_engine_top_r_gives_the_dense_amplification_and_spectra(clustered: bool) -> None:
    """weight_projection / update_spectrum fed W's top-r triplets from the Krylov engine equal their dense path
    (svdvals / svd of W) to 1e-6 relative on sigma and norms and 1e-6 rad on principal angles."""
    from loralens.core.lowrank import update_spectrum, weight_projection

    d, r = 300, 8
    rng = np.random.default_rng(3)
    if clustered:  # four equal values on top, a 5 % gap after the r-th
        sigma = np.concatenate([[5.0] * 4, [4.0, 3.9, 3.8, 3.7], np.sort(rng.uniform(0.1, 3.5, d - 8))[::-1]])
    else:
        sigma = np.sort(rng.uniform(0.1, 4.0, d))[::-1]
    W = T(stack_with_spectrum(2, d, d, sigma, seed=5))
    gen = torch.Generator().manual_seed(1)
    B = torch.randn(2, d, r, dtype=torch.float64, generator=gen)
    A = torch.randn(2, r, d, dtype=torch.float64, generator=gen)
    top = top_singular_triplets(weight_operator(W), r, dense_cutover=0)
    assert top.method == "krylov"
    dense_wp = weight_projection(W, B, A, 0.5, n_random=0)
    engine_wp = weight_projection(W, B, A, 0.5, n_random=0, W_singular_values=top.S)
    torch.testing.assert_close(engine_wp.W_top_projection, dense_wp.W_top_projection, rtol=1e-6, atol=0)
    dense_sp = update_spectrum(W, B, A, 0.5)
    engine_sp = update_spectrum(W, B, A, 0.5, W_singular_values=top.S, W_left_vectors=top.U)
    torch.testing.assert_close(engine_sp.W_singular_values, dense_sp.W_singular_values, rtol=1e-6, atol=0)
    torch.testing.assert_close(engine_sp.principal_angles, dense_sp.principal_angles, rtol=1e-6, atol=ANGLE)
    torch.testing.assert_close(engine_sp.phi_W_top, dense_sp.phi_W_top, rtol=1e-6, atol=0)
    with pytest.raises(ShapeError, match="both"):
        update_spectrum(W, B, A, W_singular_values=top.S)
    with pytest.raises(ShapeError, match="does not fit"):
        weight_projection(W, B, A, W_singular_values=top.S[:, :4])
