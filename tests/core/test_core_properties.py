"""Hypothesis property tests of the core: identities of phi and the defining equations of conversion matrices.

Shapes are drawn small (d in 2..12, r in 1..d, L in 1..4) and the matrices come from a drawn seed, so
every example is a fresh float64 Gaussian case. Tolerances:

- ``1e-12`` on phi's range, phi(X, X) = 1 and symmetry: exact identities up to a few roundings of O(1) sums.
- ``1e-9`` on invariances: the full column space of a d x r Gaussian is accurate to ~ cond(X) * eps.
- ``1e-10`` (norm-wise relative) on W @ conv = RHS for W = Q1 diag([1, 10]) Q2 (condition <= 10).
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loralens.core.conversion import conversion_matrices
from loralens.core.similarity import (
    basis_similarity,
    pairwise_subspace_similarity,
    product_singular_vectors,
    subspace_similarity,
)

EXAMPLES = 40


@st.composite
def stacks(draw: st.DrawFn) -> tuple[int, int, int, np.random.Generator]:
    """(L, d, r, rng): L in 1..4, d in 2..12, r in 1..d, and a generator from a drawn seed."""
    L = draw(st.integers(1, 4))
    d = draw(st.integers(2, 12))
    r = draw(st.integers(1, d))
    seed = draw(st.integers(0, 2**32 - 1))
    return L, d, r, np.random.default_rng(seed)


def _orthogonal(rng: np.random.Generator, L: int, d: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((L, d, d)))[0]


@settings(max_examples=EXAMPLES, deadline=None)
@given(case=stacks(), data=st.data())
def test_phi_range_diagonal_and_symmetry(case: tuple[int, int, int, np.random.Generator], data: st.DataObject) -> None:
    L, d, r, rng = case
    i = data.draw(st.integers(1, r), label="i")
    j = data.draw(st.integers(1, r), label="j")
    side = data.draw(st.sampled_from(["left", "right"]), label="side")
    X = torch.from_numpy(rng.standard_normal((L, d, r) if side == "left" else (L, r, d)))

    S_ij = pairwise_subspace_similarity(X, i=i, j=j, side=side)
    S_ji = pairwise_subspace_similarity(X, i=j, j=i, side=side)

    assert S_ij.shape == (L, L)
    assert (S_ij >= -1e-12).all() and (S_ij <= 1 + 1e-12).all()
    # phi(X_l, X_k, i, j) == phi(X_k, X_l, j, i)
    assert torch.allclose(S_ij, S_ji.T, rtol=0, atol=1e-12)
    # the top-min(i, j) subspace of a matrix lies inside its top-max(i, j) one: phi(X, X, i, j) = 1
    assert torch.allclose(S_ij.diagonal(), torch.ones(L, dtype=torch.float64), rtol=0, atol=1e-12)


@settings(max_examples=EXAMPLES, deadline=None)
@given(case=stacks(), data=st.data())
def test_phi_pair_symmetry_and_range(case: tuple[int, int, int, np.random.Generator], data: st.DataObject) -> None:
    L, d, r, rng = case
    r2 = data.draw(st.integers(1, d), label="r2")
    i = data.draw(st.integers(1, r), label="i")
    j = data.draw(st.integers(1, r2), label="j")
    X = torch.from_numpy(rng.standard_normal((L, d, r)))
    Y = torch.from_numpy(rng.standard_normal((L, d, r2)))

    xy = subspace_similarity(X, Y, i, j)
    yx = subspace_similarity(Y, X, j, i)

    assert xy.shape == (L,)
    assert (xy >= -1e-12).all() and (xy <= 1 + 1e-12).all()
    assert torch.allclose(xy, yx, rtol=0, atol=1e-12)
    assert torch.allclose(subspace_similarity(X, X, i, i), torch.ones(L, dtype=torch.float64), rtol=0, atol=1e-12)


@settings(max_examples=EXAMPLES, deadline=None)
@given(case=stacks(), data=st.data())
def test_phi_invariant_to_scale_and_basis_change(
    case: tuple[int, int, int, np.random.Generator], data: st.DataObject
) -> None:
    L, d, r, rng = case
    r2 = data.draw(st.integers(1, d), label="r2")
    j = data.draw(st.integers(1, r2), label="j")
    c = data.draw(st.sampled_from([-7.0, -1.0, 1e-3, 2.5, 1e5]), label="c")
    X = rng.standard_normal((L, d, r))
    Y = torch.from_numpy(rng.standard_normal((L, d, r2)))
    # invertible, condition <= 3: Q diag([1, 3])
    M = _orthogonal(rng, L, r) * rng.uniform(1.0, 3.0, size=(L, 1, r))

    base = subspace_similarity(torch.from_numpy(X), Y, r, j)  # i = r: the whole column space of X
    moved = subspace_similarity(torch.from_numpy(c * X @ M), Y, r, j)

    assert torch.allclose(base, moved, rtol=0, atol=1e-9)


@settings(max_examples=EXAMPLES, deadline=None)
@given(case=stacks(), data=st.data())
def test_product_path_equals_dense_path(case: tuple[int, int, int, np.random.Generator], data: st.DataObject) -> None:
    L, d, r, rng = case
    n = data.draw(st.integers(r, 12), label="n")  # A (r, n) of full row rank needs n >= r
    B1, B2 = (torch.from_numpy(rng.standard_normal((L, d, r))) for _ in range(2))
    A1, A2 = (torch.from_numpy(rng.standard_normal((L, r, n))) for _ in range(2))

    product = basis_similarity(product_singular_vectors(B1, A1, r), product_singular_vectors(B2, A2, r))
    factors = subspace_similarity(B1, B2, r, r)

    assert torch.allclose(product, factors, rtol=0, atol=1e-9)


@settings(max_examples=EXAMPLES, deadline=None)
@given(case=stacks())
def test_conversion_solves_its_equations(case: tuple[int, int, int, np.random.Generator]) -> None:
    L, d, r, rng = case
    W = (_orthogonal(rng, L, d) * rng.uniform(1.0, 10.0, size=(L, 1, d))) @ _orthogonal(rng, L, d)
    W, A, B = (torch.from_numpy(x) for x in (W, rng.standard_normal((L, r, d)), rng.standard_normal((L, d, r))))

    conv = conversion_matrices(W, A, B)

    def rel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.linalg.matrix_norm(x - y) / torch.linalg.matrix_norm(y)

    assert conv.convention == "solve"
    assert (rel(W @ conv.B, B) < 1e-10).all()
    assert (rel(W @ conv.A, A.mT) < 1e-10).all()
    assert conv.BA is not None and (rel(W @ conv.BA, B @ A) < 1e-10).all()
    assert (conv.residual_A < 1e-12).all() and (conv.residual_B < 1e-12).all()
    assert (conv.condition >= 1 - 1e-12).all() and (conv.condition <= 10 * d * (1 + 1e-8)).all()  # cond_1 <= d cond_2
