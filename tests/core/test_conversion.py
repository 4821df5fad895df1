"""conversion_matrices and condition_estimate against numpy.linalg: solve, lstsq, pinv, cond.

Every case is small, seeded and float64 unless the test is about another dtype. Tolerances:

- ``RTOL = 1e-10`` for float64 results on well-conditioned W (2-norm condition <= ~30): the forward error
  is about cond * d * eps ~ 1e-13, so 1e-10 leaves three orders of margin and still catches any wrong formula.
- Residuals of exact solves are rounding noise, so they are bounded (``< 1e-13``), not compared; residuals of
  over-determined least-squares solves are O(1) and compared to numpy's at ``RTOL``.
- Near-singular W (least-squares fallback) are built with a gap: singular values in [0.01, 1] plus one far below
  eps * d (1e-17 in float64, 1e-9 in float32), so the truncated pseudo-inverse is well defined and conditioned
  (~100); scipy's ``lstsq`` (gelsd, float64, same cutoff) is the reference, at ``RTOL`` in float64 and 1e-3 in
  float32 (~ 100 * d * eps32).
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from loralens.core.conversion import (
    Conversion,
    condition_estimate,
    conversion_matrices,
    factorize,
    solve_conversions,
)
from loralens.errors import DTypeError, NearSingularWarning, NonFiniteError, ShapeError, SingularMatrixError

RTOL = 1e-10  # float64 vs numpy on well-conditioned W (see module docstring)
EXACT_RESIDUAL = 1e-13  # ||W X - RHS|| / ||RHS|| of an exact solve: ~ d * eps * cond(W) ~ 1e-14 here


# ---------------------------------------------------------------------------------------------- helpers


def _orthogonal(rng: np.random.Generator, L: int, d: int) -> np.ndarray:
    """(L, d, d) random orthogonal matrices (QR of Gaussians)."""
    return np.linalg.qr(rng.standard_normal((L, d, d)))[0]


def orthogonal_diag(rng: np.random.Generator, L: int, d: int) -> np.ndarray:
    """(L, d, d) Q1 diag(s) Q2 with s in [1, 10]: 2-norm condition <= 10."""
    s = rng.uniform(1.0, 10.0, size=(L, d))
    return (_orthogonal(rng, L, d) * s[:, None, :]) @ _orthogonal(rng, L, d)


def shifted_gaussian(rng: np.random.Generator, L: int, d: int) -> np.ndarray:
    """(L, d, d) Gaussian + d I: diagonally dominant in expectation, condition ~ 3."""
    return rng.standard_normal((L, d, d)) + d * np.eye(d)


def lora_factors(rng: np.random.Generator, L: int, d_out: int, d_in: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    """A (L, r, d_in) and B (L, d_out, r), as PEFT stores lora_A.weight and lora_B.weight."""
    return rng.standard_normal((L, r, d_in)), rng.standard_normal((L, d_out, r))


def T(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def mT(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(x, -1, -2)


def assert_close(actual: torch.Tensor | np.ndarray, expected: np.ndarray, rtol: float = RTOL) -> None:
    """Elementwise rtol plus an absolute floor of rtol * max|expected| for entries near zero."""
    actual = actual.detach().cpu().numpy() if isinstance(actual, torch.Tensor) else actual
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * float(np.abs(expected).max()))


def rel_residual(M: np.ndarray, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """numpy's ||M X - Y||_F / ||Y||_F per batch entry."""
    return np.linalg.norm(M @ X - Y, axis=(-2, -1)) / np.linalg.norm(Y, axis=(-2, -1))


def near_singular(rng: np.random.Generator, d: int, smallest: float) -> np.ndarray:
    """(d, d) Q1 diag(s) Q2 with s in [0.01, 1] and one singular value ``smallest`` (far below eps * d)."""
    s = np.concatenate([np.logspace(0, -2, d - 1), [smallest]])
    return ((_orthogonal(rng, 1, d) * s) @ _orthogonal(rng, 1, d))[0]


def lstsq_reference(M: np.ndarray, Y: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """scipy's minimum-norm least-squares solution of ``M X = Y`` in float64 (gelsd: SVD-based), singular values
    below ``eps(dtype) * max(M.shape) * sigma_max`` dropped, the cutoff of loralens's fallback."""
    cond = torch.finfo(dtype).eps * max(M.shape)
    return scipy.linalg.lstsq(M.astype(np.float64), Y.astype(np.float64), cond=cond, lapack_driver="gelsd")[0]


def run(W: np.ndarray, A: np.ndarray, B: np.ndarray, **kwargs: object) -> Conversion:
    return conversion_matrices(T(W), T(A), T(B), **kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------- square W


@pytest.mark.parametrize("make_W", [shifted_gaussian, orthogonal_diag])
def test_square_matches_numpy_solve(make_W) -> None:
    rng = np.random.default_rng(11)
    L, d, r = 3, 7, 3
    W = make_W(rng, L, d)
    A, B = lora_factors(rng, L, d, d, r)

    conv = run(W, A, B)

    assert conv.convention == "solve"
    assert conv.A.shape == (L, d, r)  # (L, d_in, r)
    assert conv.B.shape == (L, d, r)  # (L, d_out, r)
    assert conv.BA is not None and conv.BA.shape == (L, d, d)
    assert conv.residual_A.shape == conv.residual_B.shape == conv.condition.shape == (L,)
    for t in (conv.A, conv.B, conv.BA, conv.residual_A, conv.residual_B, conv.condition):
        assert t.dtype == torch.float64
    assert_close(conv.A, np.linalg.solve(W, mT(A)))
    assert_close(conv.B, np.linalg.solve(W, B))
    for l in range(L):  # conv_BA per layer, from the dense product (not from conv_B @ A)
        assert_close(conv.BA[l], np.linalg.solve(W[l], B[l] @ A[l]))


def test_square_residuals_and_condition() -> None:
    rng = np.random.default_rng(12)
    L, d, r = 4, 9, 2
    W = shifted_gaussian(rng, L, d)
    A, B = lora_factors(rng, L, d, d, r)

    conv = run(W, A, B)

    # Exact solves: both ours (recomputed by numpy) and numpy's own are at rounding level.
    assert (conv.residual_A < EXACT_RESIDUAL).all()
    assert (conv.residual_B < EXACT_RESIDUAL).all()
    assert (rel_residual(W, conv.A.numpy(), mT(A)) < EXACT_RESIDUAL).all()
    assert (rel_residual(W, conv.B.numpy(), B) < EXACT_RESIDUAL).all()
    # Condition: Hager's estimate is a lower bound on the exact 1-norm condition number.
    cond = np.linalg.cond(W, 1)
    est = conv.condition.numpy()
    assert (est <= cond * (1 + 1e-8)).all()
    assert (est >= cond / 3).all()
    assert_close(conv.condition, condition_estimate(T(W)).numpy(), rtol=1e-12)


def test_condition_estimate_bounds_on_random_gaussians() -> None:
    # Plain Gaussians (condition 10..1e3). Hager's estimate is a lower bound and is usually exact; like LAPACK's
    # dgecon it falls below cond / 3 on ~0.1% of random matrices, so the batch is seeded.
    rng = np.random.default_rng(13)
    W = rng.standard_normal((16, 10, 10))

    est = condition_estimate(T(W)).numpy()
    cond = np.linalg.cond(W, 1)

    assert est.shape == (16,)
    assert (est <= cond * (1 + 1e-8)).all()
    assert (est >= cond / 3).all()
    assert np.median(est / cond) > 0.999  # exact on most matrices


def test_condition_estimate_is_inf_for_exactly_singular() -> None:
    rng = np.random.default_rng(14)
    W = shifted_gaussian(rng, 3, 6)
    W[1, 4, :] = 0.0  # a zero row: exactly singular

    est = condition_estimate(T(W)).numpy()

    assert np.isinf(est[1])
    assert np.isfinite(est[[0, 2]]).all()
    cond = np.linalg.cond(W[[0, 2]], 1)
    assert (est[[0, 2]] <= cond * (1 + 1e-8)).all() and (est[[0, 2]] >= cond / 3).all()


def test_zero_B_gives_zero_conversion() -> None:
    # PEFT initialises lora_B to zero: conv_B and conv_BA must be exactly zero with a zero (not NaN) residual.
    rng = np.random.default_rng(15)
    W = shifted_gaussian(rng, 2, 5)
    A, _ = lora_factors(rng, 2, 5, 5, 2)

    conv = run(W, A, np.zeros((2, 5, 2)))

    assert torch.equal(conv.B, torch.zeros(2, 5, 2, dtype=torch.float64))
    assert conv.BA is not None and torch.equal(conv.BA, torch.zeros(2, 5, 5, dtype=torch.float64))
    assert torch.equal(conv.residual_B, torch.zeros(2, dtype=torch.float64))


def test_without_product() -> None:
    rng = np.random.default_rng(16)
    W = shifted_gaussian(rng, 2, 6)
    A, B = lora_factors(rng, 2, 6, 6, 3)

    full = run(W, A, B)
    lean = run(W, A, B, with_product=False)

    assert lean.BA is None
    assert torch.equal(lean.A, full.A) and torch.equal(lean.B, full.B)


# ------------------------------------------------------------------------------------- non-square W


@pytest.mark.parametrize(
    ("d_out", "d_in"),
    [
        (12, 36),  # d_out < d_in: Llama's grouped-query v_proj (192 x 576) scaled down by 16
        (36, 12),  # d_out > d_in
    ],
)
def test_non_square_matches_lstsq_and_pinv(d_out: int, d_in: int) -> None:
    rng = np.random.default_rng(21)
    L, r = 3, 4
    W = rng.standard_normal((L, d_out, d_in))  # 12 x 36 Gaussian: 2-norm condition ~ 4
    A, B = lora_factors(rng, L, d_out, d_in, r)

    conv = run(W, A, B)

    assert conv.convention == "lstsq"
    assert conv.A.shape == (L, d_out, r)  # solves W.T X = A.T
    assert conv.B.shape == (L, d_in, r)  # solves W X = B
    assert conv.BA is not None and conv.BA.shape == (L, d_in, d_in)
    for l in range(L):
        X_A = np.linalg.lstsq(W[l].T, A[l].T, rcond=None)[0]  # minimum-norm least-squares solution
        X_B = np.linalg.lstsq(W[l], B[l], rcond=None)[0]
        assert_close(conv.A[l], X_A)
        assert_close(conv.B[l], X_B)
    assert_close(conv.A, np.linalg.pinv(mT(W)) @ mT(A))
    assert_close(conv.B, np.linalg.pinv(W) @ B)
    assert_close(conv.BA, np.linalg.pinv(W) @ B @ A)


@pytest.mark.parametrize(("d_out", "d_in"), [(12, 36), (36, 12)])
def test_non_square_residuals(d_out: int, d_in: int) -> None:
    rng = np.random.default_rng(22)
    L, r = 3, 4
    W = rng.standard_normal((L, d_out, d_in))
    A, B = lora_factors(rng, L, d_out, d_in, r)

    conv = run(W, A, B)

    X_A = np.linalg.pinv(mT(W)) @ mT(A)
    X_B = np.linalg.pinv(W) @ B
    ref_A = rel_residual(mT(W), X_A, mT(A))
    ref_B = rel_residual(W, X_B, B)
    if d_out < d_in:  # W X = B under-determined (exact); W.T X = A.T over-determined
        exact, exact_ref, over, over_ref = conv.residual_B, ref_B, conv.residual_A, ref_A
    else:  # W X = B over-determined; W.T X = A.T under-determined (exact)
        exact, exact_ref, over, over_ref = conv.residual_A, ref_A, conv.residual_B, ref_B
    assert (exact < EXACT_RESIDUAL).all() and (exact_ref < EXACT_RESIDUAL).all()
    # Random RHS in R^36 has most of its mass outside W's 12-dimensional range: residual ~ sqrt(24 / 36).
    assert (over_ref > 0.5).all()
    assert_close(over, over_ref)
    # Our own residual recomputed by numpy from our solution agrees too.
    ours = rel_residual(mT(W), conv.A.numpy(), mT(A)) if d_out < d_in else rel_residual(W, conv.B.numpy(), B)
    assert_close(over, ours)


@pytest.mark.parametrize(("d_out", "d_in"), [(12, 36), (36, 12)])
def test_non_square_condition_is_that_of_R(d_out: int, d_in: int) -> None:
    rng = np.random.default_rng(23)
    W = rng.standard_normal((4, d_out, d_in))
    A, B = lora_factors(rng, 4, d_out, d_in, 2)

    conv = run(W, A, B)

    tall = W if d_out > d_in else mT(W)
    R = np.linalg.qr(tall)[1]  # (L, 12, 12); 1-norm condition is invariant to QR's sign choice
    cond = np.linalg.cond(R, 1)
    est = conv.condition.numpy()
    assert (est <= cond * (1 + 1e-8)).all() and (est >= cond / 3).all()
    # R has W's singular values: cond_1(R) lies within a factor k = 12 of W's 2-norm condition.
    cond2 = np.linalg.cond(W)
    assert (est <= 12 * cond2).all() and (est >= cond2 / 12).all()


# -------------------------------------------------------------------------------------------- dtypes


def test_float32_agrees_with_float64() -> None:
    rng = np.random.default_rng(31)
    L, d, r = 3, 16, 4
    W = orthogonal_diag(rng, L, d)
    A, B = lora_factors(rng, L, d, d, r)

    c64 = run(W, A, B)
    c32 = conversion_matrices(T(W).float(), T(A).float(), T(B).float(), dtype=torch.float32)

    for t in (c32.A, c32.B, c32.BA, c32.residual_A, c32.residual_B, c32.condition):
        assert t is not None and t.dtype == torch.float32
    for x32, x64 in ((c32.A, c64.A), (c32.B, c64.B), (c32.BA, c64.BA)):
        assert x32 is not None and x64 is not None
        # norm-wise relative error ~ cond * eps32 ~ 1e-6 for cond <= 10; 1e-4 as asked
        err = torch.linalg.matrix_norm(x32.double() - x64) / torch.linalg.matrix_norm(x64)
        assert (err < 1e-4).all()
    assert (c32.residual_A < 1e-5).all() and (c32.residual_B < 1e-5).all()  # ~ d * eps32
    assert torch.allclose(c32.condition.double(), c64.condition, rtol=1e-3)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_half_precision_inputs_are_upcast(half: torch.dtype, dtype: torch.dtype) -> None:
    rng = np.random.default_rng(32)
    W = T(shifted_gaussian(rng, 2, 8)).to(half)
    A, B = (T(x) for x in lora_factors(rng, 2, 8, 8, 2))

    conv = conversion_matrices(W, A.to(half), B.float(), dtype=dtype)
    ref = conversion_matrices(W.to(dtype), A.to(half).to(dtype), B.float().to(dtype), dtype=dtype)

    for t in (conv.A, conv.B, conv.BA, conv.condition):
        assert t is not None and t.dtype == dtype
    # the upcast of half values is exact, so the results are those of the upcast inputs (same ops, same data)
    torch.testing.assert_close(conv.A, ref.A, rtol=0, atol=0)
    torch.testing.assert_close(conv.B, ref.B, rtol=0, atol=0)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_compute_dtype_is_rejected(half: torch.dtype) -> None:
    # LU/QR have no half-precision kernels on CPU: the compute dtype must be float32 or float64 (inputs may be half).
    rng = np.random.default_rng(33)
    W = shifted_gaussian(rng, 2, 6)
    A, B = lora_factors(rng, 2, 6, 6, 2)
    with pytest.raises(DTypeError, match=rf"float32 or float64, got {re.escape(str(half))}"):
        run(W, A, B, dtype=half)


# -------------------------------------------------------------------------------------------- errors


def _good(L: int = 2, d_out: int = 5, d_in: int = 5, r: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(41)
    W = rng.standard_normal((L, d_out, d_in)) + (5 * np.eye(d_out, d_in) if d_out == d_in else 0)
    A, B = lora_factors(rng, L, d_out, d_in, r)
    return T(W), T(A), T(B)


@pytest.mark.parametrize(
    ("which", "shape"),
    [("W", (5, 5)), ("A", (3, 5)), ("B", (1, 2, 5, 3))],
)
def test_wrong_ndim(which: str, shape: tuple[int, ...]) -> None:
    W, A, B = _good()
    args = {"W": W, "A": A, "B": B}
    args[which] = torch.zeros(shape, dtype=torch.float64)
    with pytest.raises(ShapeError, match=rf"{which} must be a stack of matrices .*{re.escape(str(shape))}"):
        conversion_matrices(**args)


@pytest.mark.parametrize(
    ("A_shape", "B_shape"),
    [
        ((2, 3, 6), (2, 5, 3)),  # A has the wrong d_in
        ((2, 3, 5), (2, 4, 3)),  # B has the wrong d_out
        ((2, 3, 5), (2, 5, 2)),  # ranks of A and B differ
        ((3, 3, 5), (2, 5, 3)),  # A has another L
    ],
)
def test_mismatched_shapes_name_the_shapes(A_shape: tuple[int, ...], B_shape: tuple[int, ...]) -> None:
    W, _, _ = _good()
    A, B = torch.zeros(A_shape, dtype=torch.float64), torch.zeros(B_shape, dtype=torch.float64)
    pattern = rf"W \(2, 5, 5\).*A {re.escape(str(A_shape))} and B {re.escape(str(B_shape))}"
    with pytest.raises(ShapeError, match=pattern):
        conversion_matrices(W, A, B)


@pytest.mark.parametrize("which", ["W", "A", "B"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs(which: str, value: float) -> None:
    W, A, B = _good(L=3)
    args = {"W": W, "A": A, "B": B}
    args[which] = args[which].clone()
    args[which][1, 0, 1] = value
    with pytest.raises(NonFiniteError, match=rf"{which} holds NaN or Inf at batch positions \[1\]"):
        conversion_matrices(**args)


@pytest.mark.parametrize("which", ["W", "A", "B"])
@pytest.mark.parametrize("int_dtype", [torch.int8, torch.int32])
def test_integer_inputs_must_be_dequantized(which: str, int_dtype: torch.dtype) -> None:
    W, A, B = _good()
    args = {"W": W, "A": A, "B": B}
    args[which] = args[which].round().to(int_dtype)
    # ShapeError today; DTypeError ("integer or quantized weights") would be as good: both are LoralensErrors.
    with pytest.raises((ShapeError, DTypeError), match=rf"{which} has dtype torch\.{str(int_dtype)[6:]}.*dequantized"):
        conversion_matrices(**args)


def test_integer_compute_dtype_is_rejected() -> None:
    with pytest.raises(DTypeError, match="float32 or float64, got torch.int64"):
        conversion_matrices(*_good(), dtype=torch.int64)


def test_exactly_singular_W_names_its_position() -> None:
    W, A, B = _good(L=3)
    W[1, 2, :] = 0.0  # a zero row
    with pytest.raises(SingularMatrixError, match=r"batch positions \[1\]") as info:
        conversion_matrices(W, A, B)
    assert info.value.indices == (1,)


def test_equal_rows_are_exactly_singular_and_named() -> None:
    W, A, B = _good(L=4)
    W[0, 3, :] = W[0, 1, :]  # two equal rows: LAPACK's elimination makes the last pivot exactly zero
    W[2, 4, :] = W[2, 0, :]
    with pytest.raises(SingularMatrixError, match=r"exactly singular .*batch positions \[0, 2\]") as info:
        conversion_matrices(W, A, B)
    assert info.value.indices == (0, 2)


def test_singular_to_float32_but_not_float64() -> None:
    # condition 1e9: 1e9 * eps64 << 1 but 1e9 * eps32 ~ 120 >= 1: float32 falls back, float64 solves exactly
    rng = np.random.default_rng(42)
    Q = _orthogonal(rng, 2, 6)
    W = (Q * np.logspace(0, 9, 6)[None, None, :]) @ mT(Q)
    A, B = lora_factors(rng, 2, 6, 6, 2)

    with warnings.catch_warnings():
        warnings.simplefilter("error", NearSingularWarning)
        conv = run(W, A, B)
    assert (conv.condition > 1e8).all() and (conv.condition < 1e11).all() and not conv.fallback.any()
    with pytest.warns(NearSingularWarning, match=r"float32 precision at batch positions \[0, 1\].*in float64") as info:
        c32 = run(W, A, B, dtype=torch.float32)
    assert len(info) == 1 and c32.fallback.all()  # the numbers: test_near_singular_in_float32_says_to_use_float64


@pytest.mark.parametrize(("d_out", "d_in"), [(4, 8), (8, 4)])
def test_rank_deficient_non_square_W(d_out: int, d_in: int) -> None:
    W, A, B = _good(L=3, d_out=d_out, d_in=d_in, r=2)
    zero = W.clone()
    if d_out < d_in:
        zero[2, 1, :] = 0.0  # wide W with a zero row: rank 3 < 4, R has an exactly zero diagonal entry
    else:
        zero[2, :, 1] = 0.0  # tall W with a zero column: the same
    with pytest.raises(SingularMatrixError, match=r"exactly singular .*batch positions \[2\]") as info:
        conversion_matrices(zero, A, B)
    assert info.value.indices == (2,)
    # Two equal rows (columns): R's last diagonal entry is rounding noise: near-singular, least squares.
    equal = W.clone()
    if d_out < d_in:
        equal[2, 3, :] = equal[2, 0, :]
    else:
        equal[2, :, 3] = equal[2, :, 0]
    with pytest.warns(NearSingularWarning, match=r"batch positions \[2\]"):
        conv = conversion_matrices(equal, A, B)
    assert conv.convention == "lstsq" and conv.fallback.tolist() == [False, False, True]
    M = equal[2].numpy()
    assert_close(conv.A[2], lstsq_reference(M.T, A[2].T.numpy(), torch.float64))
    assert_close(conv.B[2], lstsq_reference(M, B[2].numpy(), torch.float64))
    assert_close(conv.residual_B[2:], rel_residual(M, conv.B[2].numpy(), B[2].numpy())[None])


# ------------------------------------------------------------------ near-singular W: least-squares fallback


def test_near_singular_square_W_is_solved_by_least_squares() -> None:
    rng = np.random.default_rng(61)
    L, d, r = 4, 8, 3
    W = orthogonal_diag(rng, L, d)
    W[2] = near_singular(rng, d, 1e-17)
    A, B = lora_factors(rng, L, d, d, r)

    with pytest.warns(NearSingularWarning) as info:
        conv = run(W, A, B)

    assert len(info) == 1
    message = str(info[0].message)
    assert conv.fallback.dtype == torch.bool and conv.fallback.tolist() == [False, False, True, False]
    assert torch.isfinite(conv.condition[2]) and float(conv.condition[2]) * torch.finfo(torch.float64).eps >= 1
    assert "near-singular to float64 precision at batch positions [2]" in message
    for value in (conv.condition[2], conv.residual_A[2], conv.residual_B[2]):
        assert f"{float(value):.2g}" in message  # the condition estimate and both residuals
    assert "compute in float64" not in message and info[0].message.option is None  # the float32 advice only in float32
    ref_A, ref_B = lstsq_reference(W[2], mT(A)[2], torch.float64), lstsq_reference(W[2], B[2], torch.float64)
    assert_close(conv.A[2], ref_A)
    assert_close(conv.B[2], ref_B)
    assert conv.BA is not None
    assert_close(conv.BA[2], ref_B @ A[2])
    # The residual is the RHS's part along the dropped direction: O(0.1), as numpy finds for the reference.
    assert_close(conv.residual_A[2:3], rel_residual(W[2], ref_A, mT(A)[2])[None], rtol=1e-8)
    assert_close(conv.residual_B[2:3], rel_residual(W[2], ref_B, B[2])[None], rtol=1e-8)
    assert float(conv.residual_A[2]) > 1e-3 and float(conv.residual_B[2]) > 1e-3
    # Well-conditioned layers keep the LU solution, bit for bit what they are without the bad layer.
    good = [0, 1, 3]
    alone = run(W[good], A[good], B[good])
    assert not alone.fallback.any()
    for x, y in (
        (conv.A, alone.A),
        (conv.B, alone.B),
        (conv.BA, alone.BA),
        (conv.residual_A, alone.residual_A),
        (conv.residual_B, alone.residual_B),
    ):
        assert x is not None and y is not None and torch.equal(x[good], y)
    assert_close(conv.A[good], np.linalg.solve(W[good], mT(A)[good]))


def test_near_singular_in_float32_says_to_use_float64() -> None:
    rng = np.random.default_rng(62)
    L, d, r = 3, 12, 2
    W = orthogonal_diag(rng, L, d)
    W[1] = near_singular(rng, d, 1e-9)  # condition ~1e9 (more once rounded to float32): past 1 / eps32 only
    W32 = W.astype(np.float32)
    A, B = lora_factors(rng, L, d, d, r)

    with pytest.warns(
        NearSingularWarning, match=r"float32 precision at batch positions \[1\] .*compute in float64"
    ) as w:
        c32 = conversion_matrices(T(W32), T(A).float(), T(B).float(), dtype=torch.float32)
    assert [x.message.option for x in w] == ["dtype"]  # the CLI names its --dtype flag
    with warnings.catch_warnings():
        warnings.simplefilter("error", NearSingularWarning)
        c64 = run(W, A, B)  # in float64 the same W is merely ill-conditioned: solved exactly

    assert c32.fallback.tolist() == [False, True, False] and not c64.fallback.any()
    A32, B32 = A.astype(np.float32), B.astype(np.float32)
    # float32 SVD on the kept singular values (condition 100): ~ 100 * d * eps32 ~ 1e-4 relative
    assert_close(c32.A[1], lstsq_reference(W32[1], mT(A32)[1], torch.float32), rtol=1e-3)
    assert_close(c32.B[1], lstsq_reference(W32[1], B32[1], torch.float32), rtol=1e-3)
    assert_close(c64.B[1], np.linalg.solve(W[1], B[1]), rtol=1e-5)  # cond 1e9 * eps64: 1e-7 forward error


def test_fallback_layers_keep_their_residuals_and_survive_select() -> None:
    rng = np.random.default_rng(63)
    L, d = 3, 6
    W = orthogonal_diag(rng, L, d)
    W[0] = near_singular(rng, d, 1e-17)
    A, B = lora_factors(rng, L, d, d, 2)
    f = factorize(T(W))
    assert f.fallback.tolist() == [True, False, False]

    with pytest.warns(NearSingularWarning, match=r"batch positions \[0\]"):
        lean = solve_conversions(f, [T(A)], [T(B)], with_residuals=False)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", NearSingularWarning)
        full = solve_conversions(f, [T(A)], [T(B)], warn=False)[0]
        sub = f.select([2, 0])
        picked = solve_conversions(sub, [T(A[[2, 0]])], [T(B[[2, 0]])], warn=False)[0]
        clean = f.select([1, 2])

    # Skipped residuals stay NaN, except in the fallback layer, whose residual the warning reports.
    assert torch.isnan(lean.residual_A[1:]).all() and torch.isnan(lean.residual_B[1:]).all()
    assert_close(lean.residual_A[:1], full.residual_A[:1].numpy(), rtol=1e-12)
    assert_close(lean.residual_B[:1], full.residual_B[:1].numpy(), rtol=1e-12)
    assert_close(lean.B, full.B.numpy(), rtol=1e-12)
    # select() carries the pseudo-inverse of the layers it keeps, and only theirs.
    assert sub.fallback.tolist() == [False, True] and clean.fallback.tolist() == [False, False]
    assert_close(picked.B, full.B[[2, 0]].numpy(), rtol=1e-12)
    assert_close(picked.B[1], lstsq_reference(W[0], B[0], torch.float64))


@pytest.mark.parametrize(
    "W",
    [
        torch.eye(4, dtype=torch.float64) * 2,  # (d, d), not (L, d, d)
        torch.ones(2, 3, 4, dtype=torch.float64),  # non-square
        torch.ones(3, dtype=torch.float64),  # a vector
    ],
    ids=["2d", "non-square", "1d"],
)
def test_condition_estimate_rejects_non_stacks(W: torch.Tensor) -> None:
    with pytest.raises(
        ShapeError, match=rf"stack of square matrices \(L, d, d\), got shape {re.escape(str(tuple(W.shape)))}"
    ):
        condition_estimate(W)


@pytest.mark.parametrize("dtype", [torch.int64, torch.float16, torch.bfloat16], ids=["int64", "float16", "bfloat16"])
def test_condition_estimate_rejects_dtypes_without_lu(dtype: torch.dtype) -> None:
    W = (3 * torch.eye(3, dtype=torch.float64)).expand(2, 3, 3).to(dtype)
    with pytest.raises(DTypeError, match=rf"float32 or float64 matrices, got {re.escape(str(dtype))}"):
        condition_estimate(W)


# ------------------------------------------------------------------ one factorisation, many right-hand sides


@pytest.mark.parametrize(("d_out", "d_in"), [(9, 9), (12, 36), (36, 12)], ids=["square", "wide", "tall"])
def test_many_adapters_equal_one_at_a_time(d_out: int, d_in: int) -> None:
    rng = np.random.default_rng(51)
    L = 3
    W = shifted_gaussian(rng, L, d_out) if d_out == d_in else rng.standard_normal((L, d_out, d_in))
    factors = [lora_factors(rng, L, d_out, d_in, r) for r in (2, 3, 5)]  # ranks may differ

    joint = solve_conversions(factorize(T(W)), [T(A) for A, _ in factors], [T(B) for _, B in factors])

    assert len(joint) == 3
    for (A, B), c in zip(factors, joint, strict=True):
        alone = run(W, A, B)
        assert c.convention == alone.convention
        for x, y in ((c.A, alone.A), (c.B, alone.B), (c.BA, alone.BA)):
            assert x is not None and y is not None
            assert_close(x, y.numpy(), rtol=1e-12)  # the same factorisation, one block solve: rounding only
        if d_out == d_in:
            assert (c.residual_A < EXACT_RESIDUAL).all() and (c.residual_B < EXACT_RESIDUAL).all()
            assert_close(c.A, np.linalg.solve(W, mT(A)))
            assert_close(c.B, np.linalg.solve(W, B))
        else:
            over = c.residual_A if d_out < d_in else c.residual_B  # O(1): compared, not bounded
            assert_close(over, (alone.residual_A if d_out < d_in else alone.residual_B).numpy())
            assert_close(c.A, np.linalg.pinv(mT(W)) @ mT(A))
            assert_close(c.B, np.linalg.pinv(W) @ B)
        assert torch.equal(c.condition, joint[0].condition)


def test_factorize_reads_a_sequence_into_a_reused_buffer_and_leaves_W_alone() -> None:
    rng = np.random.default_rng(52)
    W = T(shifted_gaussian(rng, 3, 8))
    A, B = (T(x) for x in lora_factors(rng, 3, 8, 8, 2))
    halves = [w.to(torch.float16) for w in W]  # e.g. memory-mapped fp16 tensors of a checkpoint
    kept = [h.clone() for h in halves]
    out = torch.empty(3, 8, 8, dtype=torch.float64)

    f = factorize(halves, dtype=torch.float64, out=out)
    c = solve_conversions(f, [A], [B])[0]

    assert f._factors[0].data_ptr() == out.data_ptr()  # the LU is computed in the caller's buffer
    assert all(torch.equal(h, k) for h, k in zip(halves, kept, strict=True))  # the inputs are untouched
    ref = conversion_matrices(torch.stack(halves), A, B)
    torch.testing.assert_close(c.A, ref.A, rtol=0, atol=0)
    torch.testing.assert_close(c.residual_B, ref.residual_B, rtol=0, atol=0)  # residuals against the fp16 values
    W64 = W.clone()
    conversion_matrices(W64, A, B)
    assert torch.equal(W64, W)  # float64 input of the compute dtype is copied, never factored in place
    with pytest.raises(ShapeError, match=r"out must be a contiguous \(3, 8, 8\) torch.float64"):
        factorize(halves, out=torch.empty(2, 8, 8, dtype=torch.float64))
    with pytest.raises(ShapeError, match=r"W\[1\] is \(8, 7\)"):
        factorize([W[0], W[1, :, :7]])
    with pytest.raises(DTypeError, match=r"W\[0\] has dtype torch.int8.*dequantized first"):
        factorize([W[0].to(torch.int8)])


def test_select_reuses_the_factors_of_a_subset_of_layers() -> None:
    rng = np.random.default_rng(53)
    W = shifted_gaussian(rng, 4, 6)
    A, B = lora_factors(rng, 4, 6, 6, 2)
    f = factorize(T(W))

    sub = f.select([1, 3])
    c = solve_conversions(sub, [T(A[[1, 3]])], [T(B[[1, 3]])])[0]

    assert sub.shape == (2, 6, 6) and torch.equal(sub.condition, f.condition[[1, 3]])
    assert_close(c.B, np.linalg.solve(W[[1, 3]], B[[1, 3]]))
    assert_close(sub.solve_transposed(T(B[[1, 3]])), np.linalg.solve(mT(W[[1, 3]]), B[[1, 3]]))


def test_residuals_can_be_skipped() -> None:
    rng = np.random.default_rng(54)
    W = shifted_gaussian(rng, 2, 5)
    A, B = lora_factors(rng, 2, 5, 5, 2)
    c = solve_conversions(factorize(T(W)), [T(A)], [T(B)], with_residuals=False, with_product=False)[0]
    assert torch.isnan(c.residual_A).all() and torch.isnan(c.residual_B).all() and c.BA is None
    assert_close(c.A, np.linalg.solve(W, mT(A)))


def test_float32_overflow_is_not_reported_as_nan() -> None:
    W = torch.eye(3, dtype=torch.float64).expand(2, 3, 3).clone() * 1e39  # finite in float64, inf in float32
    A, B = torch.ones(2, 1, 3, dtype=torch.float64), torch.ones(2, 3, 1, dtype=torch.float64)
    with pytest.raises(DTypeError, match=r"beyond the range of torch.float32; use float64"):
        conversion_matrices(W, A, B, dtype=torch.float32)
    assert torch.allclose(conversion_matrices(W, A, B).A, A.mT / 1e39)


def test_solve_conversions_checks_every_adapter() -> None:
    rng = np.random.default_rng(55)
    W = shifted_gaussian(rng, 2, 5)
    A, B = (T(x) for x in lora_factors(rng, 2, 5, 5, 2))
    f = factorize(T(W))
    with pytest.raises(ShapeError, match=r"need one B per A"):
        solve_conversions(f, [A, A], [B])
    with pytest.raises(ShapeError, match=r"A\[1\] \(L, r, d_in\)"):
        solve_conversions(f, [A, A[:, :, :4]], [B, B])
    bad = B.clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"B\[1\] holds NaN or Inf at batch positions \[1\]"):
        solve_conversions(f, [A, A], [B, bad])
