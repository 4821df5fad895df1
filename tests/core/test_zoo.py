"""Zoo math (loralens.core.zoo) against float64 numpy references on fresh seeded draws.

The references form each ``dW_i = B_i A_i`` densely and take ``np.sum(dW_i * dW_j)`` (the Frobenius inner
product) and, for phi, orthonormal bases from ``numpy.linalg.svd``. Tolerance 1e-10 relative to the scale of the
numbers (float64, a few GEMMs apart).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loralens.core.zoo import cosine_from_inner_products, segment_subspace_similarity, update_inner_products
from loralens.errors import ShapeError


def _segments(ranks: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((r,), i, dtype=torch.int64) for i, r in enumerate(ranks)])


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    ranks=st.lists(st.integers(1, 5), min_size=1, max_size=5),
    ranks2=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    d_out=st.integers(2, 12),
    d_in=st.integers(2, 12),
)
def test_inner_products_equal_the_dense_frobenius_products(
    seed: int, ranks: list[int], ranks2: list[int], d_out: int, d_in: int
) -> None:
    rng = np.random.default_rng(seed)
    L = 2
    B1, A1 = rng.standard_normal((L, d_out, sum(ranks))), rng.standard_normal((L, sum(ranks), d_in))
    B2, A2 = rng.standard_normal((L, d_out, sum(ranks2))), rng.standard_normal((L, sum(ranks2), d_in))
    got = update_inner_products(
        *(torch.from_numpy(x) for x in (B1, A1)), _segments(ranks), len(ranks),
        *(torch.from_numpy(x) for x in (B2, A2)), _segments(ranks2), len(ranks2),
    ).numpy()  # fmt: skip
    e1, e2 = np.cumsum([0, *ranks]), np.cumsum([0, *ranks2])
    for layer in range(L):
        for i in range(len(ranks)):
            dWi = B1[layer, :, e1[i] : e1[i + 1]] @ A1[layer, e1[i] : e1[i + 1]]
            for j in range(len(ranks2)):
                dWj = B2[layer, :, e2[j] : e2[j + 1]] @ A2[layer, e2[j] : e2[j + 1]]
                ref = np.sum(dWi * dWj)
                assert got[layer, i, j] == pytest.approx(ref, rel=1e-10, abs=1e-10 * np.abs(dWi).max() * d_in)


def test_uniform_and_general_segments_agree_and_self_cosine_is_one() -> None:
    """Equal ranks in order take the reshape path; the same columns with segments out of order take the indicator
    path: the two agree, and the cosines satisfy their identities."""
    rng = np.random.default_rng(0)
    B, A = torch.from_numpy(rng.standard_normal((1, 9, 12))), torch.from_numpy(rng.standard_normal((1, 12, 7)))
    uniform = _segments([4, 4, 4])
    inner = update_inner_products(B, A, uniform, 3, B, A, uniform, 3)
    shuffled = _segments([4, 4, 4])[torch.tensor([4, 5, 6, 7, 0, 1, 2, 3, 8, 9, 10, 11])]
    swapped = update_inner_products(B, A, shuffled, 3, B, A, uniform, 3)  # segment 0 and 1 swapped
    torch.testing.assert_close(swapped[0, 0], inner[0, 1], rtol=1e-12, atol=0)
    torch.testing.assert_close(swapped[0, 1], inner[0, 0], rtol=1e-12, atol=0)
    torch.testing.assert_close(swapped[0, 2], inner[0, 2], rtol=1e-12, atol=0)
    norms = inner.diagonal(dim1=-2, dim2=-1)
    cos = cosine_from_inner_products(inner, norms, norms)
    torch.testing.assert_close(cos.diagonal(dim1=-2, dim2=-1), torch.ones(1, 3, dtype=torch.float64))
    assert (cos.abs() <= 1).all() and torch.allclose(cos, cos.mT)
    zero = cosine_from_inner_products(torch.zeros(2, 2), torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0]))
    assert torch.isnan(zero[0]).all() and torch.isnan(zero[:, 0]).all() and zero[1, 1] == 0


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 4), n1=st.integers(1, 4), n2=st.integers(1, 4))
def test_segment_phi_equals_the_pairwise_definition(seed: int, k: int, n1: int, n2: int) -> None:
    rng = np.random.default_rng(seed)
    d = 10
    Q1 = [np.linalg.svd(rng.standard_normal((d, k)), full_matrices=False)[0] for _ in range(n1)]
    Q2 = [np.linalg.svd(rng.standard_normal((d, k)), full_matrices=False)[0] for _ in range(n2)]
    got = segment_subspace_similarity(
        torch.from_numpy(np.concatenate(Q1, axis=1))[None], torch.from_numpy(np.concatenate(Q2, axis=1))[None], k
    ).numpy()[0]
    ref = np.array([[np.linalg.norm(a.T @ b) ** 2 / k for b in Q2] for a in Q1])
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    assert ((got >= -1e-12) & (got <= 1 + 1e-12)).all()


def test_shapes_are_checked() -> None:
    B, A = torch.zeros(1, 4, 2), torch.zeros(1, 2, 3)
    seg = torch.tensor([0, 1])
    with pytest.raises(ShapeError, match="do not fit"):
        update_inner_products(B, torch.zeros(1, 3, 3), seg, 2, B, A, seg, 2)
    with pytest.raises(ShapeError, match="segment indices"):
        update_inner_products(B, A, torch.tensor([0, 5]), 2, B, A, seg, 2)
    with pytest.raises(ShapeError, match="multiples"):
        segment_subspace_similarity(torch.zeros(1, 4, 3), torch.zeros(1, 4, 4), 2)
