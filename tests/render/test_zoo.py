"""Zoo pictures: the heatmap shows the matrix in dendrogram order, off-diagonal scale, thinned labels."""

from __future__ import annotations

import numpy as np
import pytest

from loralens.errors import LoralensError
from loralens.render.zoo import zoo_figure, zoo_heatmap, zoo_table


def test_heatmap_reorders_masks_the_diagonal_and_fits_the_scale() -> None:
    M = np.array([[1.0, 0.1, 0.3], [0.1, 1.0, 0.2], [0.3, 0.2, 1.0]])
    ax = zoo_heatmap(M, order=[2, 0, 1], labels=["a", "b", "c"], quantity="phi_B")
    shown = ax.images[0].get_array()
    assert shown.mask.diagonal().all()  # an adapter against itself is left out
    assert shown.data[0, 1] == M[2, 0] and shown.data[1, 2] == M[0, 1]  # row/column 0 is adapter 2, 1 is 0
    assert ax.images[0].get_clim() == (0.0, 0.3)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["c", "a", "b"]
    full = zoo_heatmap(M, quantity="cosine", fit_off_diagonal=False)
    assert full.images[0].get_clim() == (-1.0, 1.0)
    many = zoo_heatmap(np.eye(100), max_labels=10)
    assert len(many.get_xticklabels()) == 10


def test_figure_and_table_from_a_zoo_dict() -> None:
    m = {q: {"overall": [[1.0, 0.5], [0.5, 1.0]]} for q in ("cosine", "phi_B", "phi_A")}
    data = {"adapters": ["/x/one", "/y/two"], "modules": {"value": {**m, "order": [1, 0], "linkage": [[0, 1, 0.5, 2]]}}}
    fig = zoo_figure(data, "value")
    assert len(fig.axes) >= 4
    rows = zoo_table(data).rows
    assert [r[1] for r in rows] == ["two", "one"] and rows[0][2] == 0.5
    with pytest.raises(LoralensError, match="no module 'query'"):
        zoo_figure(data, "query")
    for bad in (np.zeros((2, 3)), np.zeros((0, 0))):
        with pytest.raises(LoralensError, match="square"):
            zoo_heatmap(bad)
    with pytest.raises(LoralensError, match="permutation"):
        zoo_heatmap(np.eye(2), order=[0, 0])
