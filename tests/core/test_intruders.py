"""Intruder dimensions (loralens.core.intruders) against a float64 numpy reference, on fresh seeded draws.

The reference forms ``W = W0 + s B A`` densely and takes ``numpy.linalg.svd`` of both; the code under test gets
the same numbers from the factors (and, in the planted cases, the top-k vectors from the Krylov engine on the
implicit sum, as the analysis does). Tolerances: ``c_j`` to 1e-10 in float64 (one GEMM apart), ``update_share``
to 1e-10; planted cases compare counts exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loralens.core.intruders import intruder_counts, max_cosine, projected_update_share
from loralens.core.spectral import top_singular_triplets, weight_operator
from loralens.errors import ShapeError

TOL = 1e-10


def _reference(W0: np.ndarray, B: np.ndarray, A: np.ndarray, s: float, k: int, epsilon: float):
    """Dense float64: (c (k,), intruder share of ||dW||_F) for one layer."""
    dW = s * B @ A
    U = np.linalg.svd(W0 + dW)[0][:, :k]
    U0 = np.linalg.svd(W0, full_matrices=False)[0]
    c = np.abs(U.T @ U0).max(axis=1)
    Ui = U[:, c < epsilon]
    share = np.linalg.norm(Ui.T @ dW) / np.linalg.norm(dW)
    return c, share


def _stack(rng: np.random.Generator, L: int, d_out: int, d_in: int, r: int):
    W0 = rng.standard_normal((L, d_out, d_in))
    B = rng.standard_normal((L, d_out, r)) * 0.5
    A = rng.standard_normal((L, r, d_in)) * 0.5
    return W0, B, A


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    d_out=st.integers(4, 24),
    d_in=st.integers(4, 24),
    r=st.integers(1, 4),
    k=st.integers(1, 4),
    epsilon=st.floats(0.05, 1.0),
)
def test_matches_the_dense_reference(seed: int, d_out: int, d_in: int, r: int, k: int, epsilon: float) -> None:
    rng = np.random.default_rng(seed)
    L, s = 2, 0.75
    W0, B, A = _stack(rng, L, d_out, d_in, r)
    k = min(k, d_out, d_in)
    Wt = torch.from_numpy(W0 + s * B @ A)
    U = torch.linalg.svd(Wt).U[..., :k]
    U0 = torch.linalg.svd(torch.from_numpy(W0), full_matrices=False).U
    c = max_cosine(U, U0)
    share = projected_update_share(U, c < epsilon, torch.from_numpy(B), torch.from_numpy(A), torch.full((L,), s))
    for layer in range(L):
        c_ref, share_ref = _reference(W0[layer], B[layer], A[layer], s, k, epsilon)
        np.testing.assert_allclose(c[layer].numpy(), c_ref, rtol=0, atol=TOL)
        np.testing.assert_allclose(float(share[layer]), share_ref, rtol=0, atol=TOL)
    # identities: cosines of unit vectors are in [0, 1]; the share is a fraction; counts grow with epsilon
    assert (c >= 0).all() and (c <= 1 + 1e-12).all()
    assert ((share >= 0) & (share <= 1)).all()
    counts = intruder_counts(c, torch.tensor([0.1, 0.5, 0.9, 1.01]))
    assert (counts.diff(dim=0) >= 0).all() and (counts[-1] == k).all()


def test_planted_intruder_and_planted_non_intruder() -> None:
    """A large rank-1 update orthogonal to W0's top directions is one intruder; a small update inside W0's top
    subspace is none. The top-k come from the Krylov engine on the implicit W0 + s B A (as in the analysis)."""
    rng = np.random.default_rng(7)
    d, k = 96, 10
    Q1, _ = np.linalg.qr(rng.standard_normal((d, d)))
    Q2, _ = np.linalg.qr(rng.standard_normal((d, d)))
    sigma = np.linspace(10, 1, d)
    W0 = Q1 @ np.diag(sigma) @ Q2.T
    # outside: u = a mix of W0's directions 40..95 (|cos| with each below 0.5), sigma 30 > sigma_1
    mix = rng.standard_normal(d - 40)
    u_out = Q1[:, 40:] @ (mix / np.linalg.norm(mix))
    v_out = Q2[:, 0]
    # inside: a small update along W0's second direction
    u_in, v_in = Q1[:, 1], Q2[:, 1]
    B = np.stack([u_out[:, None] * 30.0, u_in[:, None] * 0.5])
    A = np.stack([v_out[None, :], v_in[None, :]])
    W = torch.from_numpy(np.stack([W0, W0]))
    top = top_singular_triplets(weight_operator(W, torch.from_numpy(B), torch.from_numpy(A), 1.0), k, dense_cutover=0)
    assert top.method == "krylov"
    U0 = torch.linalg.svd(W, full_matrices=False).U
    c = max_cosine(top.U, U0)
    counts = (c < 0.5).sum(dim=-1).tolist()
    assert counts == [1, 0]
    assert float(c[0, 0]) < 0.5  # the intruder is the top direction (sigma ~ 30)
    share = projected_update_share(top.U, c < 0.5, torch.from_numpy(B), torch.from_numpy(A), torch.ones(2))
    assert float(share[0]) > 0.9 and float(share[1]) == 0.0
    for layer in range(2):
        c_ref, _ = _reference(W0, B[layer], A[layer], 1.0, k, 0.5)
        np.testing.assert_allclose(c[layer].numpy(), c_ref, rtol=0, atol=1e-6)


def test_an_untrained_update_has_no_share_and_no_intruder() -> None:
    rng = np.random.default_rng(3)
    W0 = torch.from_numpy(rng.standard_normal((1, 12, 12)))
    B, A = torch.zeros(1, 12, 2, dtype=torch.float64), torch.from_numpy(rng.standard_normal((1, 2, 12)))
    U = torch.linalg.svd(W0).U[..., :4]
    c = max_cosine(U, torch.linalg.svd(W0).U)
    np.testing.assert_allclose(c.numpy(), 1.0, atol=1e-12)
    assert torch.isnan(projected_update_share(U, c < 0.5, B, A, torch.ones(1))).all()


def test_shapes_are_checked() -> None:
    with pytest.raises(ShapeError, match="do not fit"):
        max_cosine(torch.zeros(1, 4, 2), torch.zeros(1, 5, 4))
    with pytest.raises(ShapeError, match="expected"):
        projected_update_share(
            torch.zeros(1, 4, 2), torch.zeros(1, 3, dtype=torch.bool), *(torch.zeros(1, 4, 1),) * 2, torch.ones(1)
        )
    with pytest.raises(ShapeError, match="expected c"):
        intruder_counts(torch.zeros(3), torch.zeros(2))
