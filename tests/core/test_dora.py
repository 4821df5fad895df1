"""DoRA's magnitude and direction (loralens.core.dora) against a dense float64 numpy reference, on seeded draws.

The reference forms ``W' = W0 + s B A`` (and DoRA's ``m V / ||V||_row``) and takes row norms and cosines of it; the
code under test gets them from the factors. Where the update is tiny, the reference's own ``1 - cos`` cancels, so
there the reference is the exact value in high precision (``fractions`` on the float64 inputs).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loralens.core.dora import (
    direction_change,
    linear_fit,
    magnitude_change,
    magnitude_direction_change,
    row_statistics,
)
from loralens.errors import ShapeError

TOL = 1e-12


def _draw(seed: int, L: int, d_out: int, d_in: int, r: int):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((L, d_out, d_in)),
        rng.standard_normal((L, d_out, r)),
        rng.standard_normal((L, r, d_in)),
    )


def _reference(W0: np.ndarray, B: np.ndarray, A: np.ndarray, s: np.ndarray, m: np.ndarray | None = None):
    """Dense float64 (dM (L,), dD (L,)): W' formed; DoRA's W' = m V / ||V||_row with V = W0 + s B A."""
    V = W0 + s[:, None, None] * (B @ A)
    n0, nv = np.linalg.norm(W0, axis=-1), np.linalg.norm(V, axis=-1)
    if m is None:
        Wp = V
    else:
        Wp = m[..., None] * V / nv[..., None]
    n1 = np.linalg.norm(Wp, axis=-1)
    cos = (Wp * W0).sum(-1) / (n1 * n0)
    return np.abs(n1 - n0).mean(-1), (1 - cos).mean(-1)


def _t(*xs: np.ndarray) -> list[torch.Tensor]:
    return [torch.from_numpy(x) for x in xs]


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    d_out=st.integers(1, 20),
    d_in=st.integers(1, 20),
    r=st.integers(1, 5),
    s=st.floats(0.05, 3.0),
    dora=st.booleans(),
)
def test_matches_the_dense_reference(seed: int, d_out: int, d_in: int, r: int, s: float, dora: bool) -> None:
    W0, B, A = _draw(seed, 2, d_out, d_in, r)
    scale = np.full(2, s)
    m = np.abs(np.random.default_rng(seed + 1).standard_normal((2, d_out))) + 0.1 if dora else None
    dM_ref, dD_ref = _reference(W0, B, A, scale, m)
    dM, dD = magnitude_direction_change(*_t(W0, B, A, scale), None if m is None else torch.from_numpy(m))
    np.testing.assert_allclose(dM.numpy(), dM_ref, rtol=1e-10, atol=TOL)
    np.testing.assert_allclose(dD.numpy(), dD_ref, rtol=1e-9, atol=TOL)


def _exact(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """``(1 - cos(a + b, a), | ||a + b|| - ||a|| |)`` of float64 vectors, exact in rationals up to the square roots."""
    fa = [Fraction(float(x)) for x in a]
    fc = [x + Fraction(float(y)) for x, y in zip(fa, b, strict=True)]
    aa, cc, ac = sum(x * x for x in fa), sum(x * x for x in fc), sum(x * y for x, y in zip(fa, fc, strict=True))
    root = Fraction(float(aa * cc) ** 0.5)  # sqrt(aa cc): the only rounding, relative 1e-16
    norms = Fraction(float(cc) ** 0.5) + Fraction(float(aa) ** 0.5)
    return float((aa * cc - ac * ac) / (root * (root + ac))), float(abs(cc - aa) / norms)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_a_tiny_update_keeps_its_relative_precision(dtype: torch.dtype, tol: float) -> None:
    """s = 1e-7: 1 - cos ~ 1e-14, below the rounding of cos in float32 (6e-8) and close to it in float64; the naive
    formula cancels (shown), the factored one keeps a small relative error, in float32 too (measured against the
    exact value for the float32-rounded inputs)."""
    W0, B, A = _draw(7, 1, 6, 9, 2)
    s = 1e-7
    Wp = W0[0] + s * B[0] @ A[0]
    naive = 1 - (Wp * W0[0]).sum(-1) / (np.linalg.norm(Wp, axis=-1) * np.linalg.norm(W0[0], axis=-1))
    exact = np.array([_exact(W0[0, n], s * (B[0] @ A[0])[n]) for n in range(6)])
    assert 1e-17 < exact[:, 0].min() and exact[:, 0].max() < 1e-12
    assert np.abs(naive - exact[:, 0]).max() / exact[:, 0].max() > 1e-3  # what the docstring warns about
    W0t, Bt, At = (torch.from_numpy(x).to(dtype) for x in (W0, B, A))
    stats = row_statistics(W0t, Bt, At, torch.tensor([s], dtype=dtype))
    Wd, Bd, Ad = (t[0].double().numpy() for t in (W0t, Bt, At))  # the inputs as the code saw them
    sd = float(torch.tensor(s, dtype=dtype))
    exact = np.array([_exact(Wd[n], sd * (Bd @ Ad)[n]) for n in range(6)])
    np.testing.assert_allclose(stats.one_minus_cos[0].double().numpy(), exact[:, 0], rtol=tol)
    # |m' - m0| of plain LoRA as (2 g + h) / (||W'|| + ||W0||), not as a difference of two close norms
    np.testing.assert_allclose(stats.norm_change[0].abs().double().numpy(), exact[:, 1], rtol=tol)


def test_known_answers() -> None:
    W0, B, A = _draw(3, 3, 5, 4, 2)
    W0t, Bt, At = _t(W0, B, A)
    zero = torch.zeros(3, dtype=torch.float64)
    dM, dD = magnitude_direction_change(W0t, Bt, At, zero)
    assert torch.equal(dM, torch.zeros(3, dtype=torch.float64)) and torch.equal(dD, torch.zeros(3, dtype=torch.float64))
    # DoRA with the base's own norms and no update: nothing moved
    dM, dD = magnitude_direction_change(W0t, Bt, At, zero, W0t.norm(dim=-1))
    assert dM.abs().max() < TOL and dD.abs().max() < TOL
    # an update along the row itself (B A = c W0 for rank >= d_in): direction unchanged, |m' - m0| = |c s| ||W0_n||
    U, S, Vh = torch.linalg.svd(W0t, full_matrices=False)
    B2, A2 = U * S[:, None, :], Vh  # B2 @ A2 = W0
    s = torch.full((3,), 0.25, dtype=torch.float64)
    dM, dD = magnitude_direction_change(W0t, B2, A2, s)
    torch.testing.assert_close(dM, 0.25 * W0t.norm(dim=-1).mean(-1), rtol=1e-12, atol=TOL)
    assert dD.abs().max() < 1e-14
    # the reverse (s = -2): every row flipped, cos = -1, 1 - cos = 2
    dM, dD = magnitude_direction_change(W0t, B2, A2, torch.full((3,), -2.0, dtype=torch.float64))
    torch.testing.assert_close(dD, torch.full((3,), 2.0, dtype=torch.float64), rtol=0, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), c=st.floats(1e-3, 1e3))
def test_scaling_everything_leaves_dD_alone_and_scales_dM(seed: int, c: float) -> None:
    """dD depends on directions only: W0, s B A -> c W0, c s B A (c > 0) keeps it; dM scales by c."""
    W0, B, A = _draw(seed, 2, 6, 5, 2)
    W0t, Bt, At = _t(W0, B, A)
    s = torch.full((2,), 0.5, dtype=torch.float64)
    dM, dD = magnitude_direction_change(W0t, Bt, At, s)
    dM_c, dD_c = magnitude_direction_change(c * W0t, Bt, At, c * s)
    torch.testing.assert_close(dD_c, dD, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(dM_c, c * dM, rtol=1e-9, atol=1e-14)


def test_zero_rows_are_left_out_of_dD() -> None:
    W0, B, A = _draw(5, 1, 4, 3, 2)
    W0[0, 1] = 0
    stats = row_statistics(*_t(W0, B, A), torch.tensor([1.0], dtype=torch.float64))
    assert torch.isnan(stats.one_minus_cos[0, 1]) and not torch.isnan(stats.one_minus_cos[0, [0, 2, 3]]).any()
    torch.testing.assert_close(direction_change(stats), stats.one_minus_cos[:, [0, 2, 3]].mean(-1))
    assert not torch.isnan(magnitude_change(stats)).any()


def test_linear_fit_against_numpy() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(12)
    y = 0.7 * x + 0.1 * rng.standard_normal(12) - 2
    slope, intercept, r = linear_fit(torch.from_numpy(x), torch.from_numpy(y))
    ref_slope, ref_intercept = np.polyfit(x, y, 1)
    assert slope == pytest.approx(ref_slope, rel=1e-12) and intercept == pytest.approx(ref_intercept, rel=1e-12)
    assert r == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-12)
    x[3] = np.nan  # left out
    assert linear_fit(torch.from_numpy(x), torch.from_numpy(y))[0] == pytest.approx(
        np.polyfit(np.delete(x, 3), np.delete(y, 3), 1)[0], rel=1e-12
    )
    nan = [v != v for v in linear_fit(torch.ones(4), torch.arange(4.0))]
    assert nan == [True, True, True]
    assert all(v != v for v in linear_fit(torch.ones(1), torch.ones(1)))
    slope, _, r = linear_fit(torch.arange(4.0), torch.ones(4))
    assert slope == 0 and r != r


def test_shapes_are_checked() -> None:
    W0, B, A = _t(*_draw(1, 2, 4, 3, 2))
    s = torch.ones(2, dtype=torch.float64)
    with pytest.raises(ShapeError, match="do not fit"):
        magnitude_direction_change(W0, B.mT, A, s)
    with pytest.raises(ShapeError, match="magnitude"):
        magnitude_direction_change(W0, B, A, s, torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(ShapeError, match="scale"):
        row_statistics(W0, B, A, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ShapeError, match="expected x"):
        linear_fit(torch.ones(3), torch.ones(4))
