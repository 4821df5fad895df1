"""Figure-1 heatmaps and per-layer lines: cells, annotations, the fixed 0..1 colour scale, non-blank pictures."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import loralens.render
from loralens.errors import LoralensError, ShapeError
from loralens.render import per_layer_similarity, similarity_figure, similarity_heatmap
from loralens.render.similarity import FIGURE_PANEL_MAX, offdiag_range


def phi_matrix(L: int, seed: int = 0) -> np.ndarray:
    """A symmetric (L, L) matrix in [0, 1] with unit diagonal, like a phi matrix."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(0.0, 0.3, (L, L))
    X = (X + X.T) / 2
    np.fill_diagonal(X, 1.0)
    return X


def pixels(fig: Figure) -> np.ndarray:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].astype(float)


def test_heatmap_has_one_cell_and_one_annotation_per_pair() -> None:
    phi = phi_matrix(6)
    ax = similarity_heatmap(phi, title="value, B", average=0.123456)
    mesh = ax.collections[0]
    assert mesh.get_array().size == 36
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(6, 6), phi)
    assert mesh.get_clim() == (0.0, 1.0)
    assert mesh.cmap.name == "viridis"
    assert [t.get_text() for t in ax.texts] == [f"{v:.2f}" for v in phi.ravel()]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "3", "4", "5", "6"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "2", "3", "4", "5", "6"]
    assert ax.get_xlabel() == "layer" and ax.get_ylabel() == "layer"
    assert ax.get_title() == "value, B\naverage similarity 0.123"
    assert len(ax.figure.axes) == 2  # the heatmap and its colour bar


def test_heatmap_is_not_blank() -> None:
    ax = similarity_heatmap(phi_matrix(6), average=0.1)
    rgb = pixels(ax.figure)
    assert rgb.std() > 20  # a blank canvas has variance 0
    # viridis' ends are both drawn: the unit diagonal (yellow) and low values (dark purple)
    colours = {tuple(c) for c in rgb.reshape(-1, 3)[::7].astype(int)}
    assert any(r > 200 and g > 200 and b < 80 for r, g, b in colours)
    assert any(r < 90 and g < 40 and b > 60 for r, g, b in colours)


def test_annotations_only_up_to_16_layers() -> None:
    ax = similarity_heatmap(phi_matrix(20))
    assert ax.collections[0].get_array().size == 400
    assert len(ax.texts) == 0
    assert len(similarity_heatmap(phi_matrix(16)).texts) == 256
    assert len(similarity_heatmap(phi_matrix(4), annotate=False).texts) == 0


def test_many_layers_get_thinned_tick_labels() -> None:
    ax = similarity_heatmap(phi_matrix(30), colorbar=False)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[0] == "1" and len(labels) <= 15


def test_heatmap_draws_on_a_given_axes_and_takes_tensors_lists_and_labels() -> None:
    fig = Figure()
    ax = fig.add_subplot()
    phi = torch.tensor(phi_matrix(3))
    assert similarity_heatmap(phi, ax=ax, labels=[2, 4, 6], colorbar=False) is ax
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "4", "6"]
    assert len(fig.axes) == 1
    assert similarity_heatmap(phi.tolist()).collections[0].get_array().size == 9


def test_nan_cells_are_allowed_and_shown_as_na_average() -> None:
    phi = phi_matrix(3)
    phi[0, 1] = np.nan
    ax = similarity_heatmap(phi, average=float("nan"))
    assert ax.get_title() == "average similarity n/a"


def test_plots_leave_pyplot_alone() -> None:
    before = plt.get_fignums()
    similarity_heatmap(phi_matrix(3))
    similarity_figure(phi_matrix(3), phi_matrix(3, 1), module="value", factor="B")
    per_layer_similarity({"A": [0.1, 0.2]})
    assert plt.get_fignums() == before


def test_figure_pairs_the_random_baseline_on_one_colour_scale() -> None:
    fig = similarity_figure(
        phi_matrix(6),
        phi_matrix(6, 1),
        module="value",
        factor="B",
        average=0.054,
        random_average=0.0204,
        random_expected=8 / 384,
        subtitle="i = j = 8",
    )
    assert isinstance(fig, Figure)
    # the first row on 0..1, the second row the same panels on the fitted off-diagonal scale (#20, a deliberate
    # change: the figure had only the first row)
    left, right, zoomed_left, zoomed_right, bar, zoomed_bar = fig.axes
    for ax in (left, right):
        assert ax.collections[0].get_array().size == 36
        assert ax.collections[0].get_clim() == (0.0, 1.0)
        assert len(ax.texts) == 36
    assert bar.get_ylim() == (0.0, 1.0)
    off = ~np.eye(6, dtype=bool)
    low, high = offdiag_range(phi_matrix(6), phi_matrix(6, 1))
    assert low == min(phi_matrix(6)[off].min(), phi_matrix(6, 1)[off].min()) and high < 1.0
    for ax, matrix in ((zoomed_left, phi_matrix(6)), (zoomed_right, phi_matrix(6, 1))):
        assert ax.collections[0].get_clim() == (low, high) and not ax.texts
        cells = ax.collections[0].get_array().reshape(6, 6)
        blank = np.ma.getmaskarray(cells)
        assert blank.diagonal().all() and not blank[off].any()  # the diagonal (1) blank, every other cell drawn
        np.testing.assert_allclose(cells[off], matrix[off])
    assert zoomed_bar.get_ylim() == (low, high) and "off-diagonal" in zoomed_bar.get_ylabel()
    assert "value" in left.get_title() and "average similarity 0.054" in left.get_title()
    assert "random" in right.get_title() and "average similarity 0.020" in right.get_title()
    assert "E = 0.021" in right.get_title()
    assert "factor B" in fig.get_suptitle() and "i = j = 8" in fig.get_suptitle()
    assert pixels(fig).std() > 20


def test_a_non_square_module_is_named_with_the_pseudo_inverse() -> None:
    phi = np.eye(3) * 0.5 + 0.5
    w_null = {"phi_mean": phi.tolist(), "p": np.full((3, 3), 0.5).tolist(), "draws": 4, "mean_offdiag": 0.5,
              "mean_offdiag_std": 0.01}  # fmt: skip
    titles = [
        ax.get_title()
        for ax in similarity_figure(phi, phi, module="down_proj", factor="A", w_null=w_null, convention="lstsq").axes
    ]
    assert any("W^{+}A^\\top" in t for t in titles) and any("W^{+}R" in t for t in titles)
    assert not any("W^{-1}" in t for t in titles)
    square = [ax.get_title() for ax in similarity_figure(phi, phi, module="query", factor="A").axes]
    assert any("W^{-1}A^\\top" in t for t in square)


def test_figure_needs_matching_shapes() -> None:
    with pytest.raises(ShapeError, match=r"phi \(3, 3\) and random_phi \(4, 4\)"):
        similarity_figure(phi_matrix(3), phi_matrix(4), module="m", factor="A")


@pytest.mark.parametrize(
    ("phi", "error", "match"),
    [
        (np.ones((2, 3)), ShapeError, r"square \(L, L\).*\(2, 3\)"),
        (np.ones(4), ShapeError, r"square"),
        (np.full((2, 2), 1.5), LoralensError, r"\[0, 1\].*1\.5"),
        (np.array([[1.0, np.inf], [0.0, 1.0]]), LoralensError, r"\[0, 1\]"),
        ([["a", "b"], ["c", "d"]], ShapeError, "numeric"),
    ],
)
def test_heatmap_rejects_bad_input(phi: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        similarity_heatmap(phi)


def test_heatmap_rejects_wrong_number_of_labels() -> None:
    with pytest.raises(ShapeError, match="2 labels for 3 layers"):
        similarity_heatmap(phi_matrix(3), labels=[1, 2])


def test_per_layer_lines_with_baselines() -> None:
    values = {"A": [0.05, 0.06, 0.04], "B": [0.04, 0.03, 0.05], "BA": [0.04, 0.03, 0.06]}
    ax = per_layer_similarity(values, baseline={"A": 0.02, "B": [0.01, 0.02, 0.03]}, labels=[1, 2, 3], title="value")
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["A", "A, random", "B", "B, random", "BA"]
    np.testing.assert_allclose(lines[0].get_ydata(), values["A"])
    np.testing.assert_allclose(lines[3].get_ydata(), [0.01, 0.02, 0.03])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "3"]
    assert ax.get_ylim()[0] == 0.0 and ax.get_title() == "value"
    assert pixels(ax.figure).std() > 10
    one = per_layer_similarity({"A": [0.1, 0.2]}, baseline=0.02)
    assert [line.get_label() for line in one.get_lines()] == ["A", "random"]


def test_per_layer_lines_reject_ragged_series() -> None:
    with pytest.raises(ShapeError, match="same number of layers"):
        per_layer_similarity({"A": [0.1, 0.2], "B": [0.1]})
    with pytest.raises(LoralensError, match="at least one series"):
        per_layer_similarity({})
    with pytest.raises(ShapeError, match="baseline 'A' has 3 values for 2 layers"):
        per_layer_similarity({"A": [0.1, 0.2]}, baseline={"A": [0.1, 0.1, 0.1]})


def test_public_names() -> None:
    assert sorted(loralens.render.__all__) == sorted(loralens.render._EXPORTS)
    for name in loralens.render.__all__:
        assert callable(getattr(loralens.render, name))
    with pytest.raises(AttributeError):
        loralens.render.no_such_plot  # noqa: B018


def test_figure_adds_the_w_null_panel_and_marks_cells_not_above_it() -> None:
    L = 5
    p = np.full((L, L), 0.01)
    p[0, 1] = p[3, 2] = 0.5  # two observed cells the W-null reaches (p > 0.05); the diagonal never counts
    np.fill_diagonal(p, 1.0)
    w_null = {"phi_mean": phi_matrix(L, 2), "p": p, "draws": 20, "mean_offdiag": 0.057, "mean_offdiag_std": 0.003}
    fig = similarity_figure(phi_matrix(L), phi_matrix(L, 1), module="value", factor="A", w_null=w_null)
    observed, random, null, *zoomed, bar, zoomed_bar = fig.axes
    assert len(zoomed) == 3 and {ax.collections[0].get_clim() for ax in zoomed} == {offdiag_range(
        phi_matrix(L), phi_matrix(L, 1), w_null["phi_mean"])}  # fmt: skip
    assert bar.get_ylabel().startswith(r"$\varphi$")
    meshes = [ax.collections[0] for ax in (observed, random, null)]
    assert {(m.norm.vmin, m.norm.vmax) for m in meshes} == {(0.0, 1.0)}  # one colour scale for the three panels
    np.testing.assert_allclose(np.asarray(null.collections[0].get_array()).reshape(L, L), w_null["phi_mean"])
    assert "W-null" in null.get_title() and "0.057 ± 0.003" in null.get_title()
    dots = observed.collections[1].get_offsets()
    assert sorted((int(y), int(x)) for x, y in dots) == [(0, 1), (3, 2)]
    assert [t.get_text() for t in observed.get_legend().get_texts()] == ["not above the W-null (p > 0.05)"]
    FigureCanvasAgg(fig).draw()  # renders without error
    two = similarity_figure(phi_matrix(L), phi_matrix(L, 1), module="value", factor="A")
    assert len(two.axes) == 6  # without a W-null: the paper's pair on both scales and their colour bars
    with pytest.raises(ShapeError, match="w_null phi_mean"):
        similarity_figure(phi_matrix(L), phi_matrix(L, 1), module="m", factor="A", w_null={**w_null, "p": p[:2, :2]})


def test_offdiag_range_spans_every_matrix_and_never_collapses() -> None:
    a, b = np.eye(3), np.full((3, 3), 0.2)
    a[0, 1], b[2, 0] = 0.05, 0.3
    assert offdiag_range(a, b) == (0.0, 0.3)
    assert offdiag_range(np.full((2, 2), 0.5)) == pytest.approx((0.495, 0.505))  # constant: widened to 0.01
    assert offdiag_range(np.full((2, 2), np.nan)) == (0.0, 1.0)


def test_thirty_layers_keep_figure1_small_and_its_tick_labels_apart() -> None:
    """At 30 layers the labels 1..30 must not run together ("1011121314") and the picture stays under 15 inches."""
    L = 30
    fig = similarity_figure(phi_matrix(L), phi_matrix(L, 1), module="value", factor="A")
    assert fig.get_figwidth() <= 3 * FIGURE_PANEL_MAX + 1.4
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    for ax in fig.axes[:4]:
        labels = [t for t in ax.get_xticklabels() if t.get_text()]
        assert 5 <= len(labels) <= 10
        boxes = [t.get_window_extent(renderer) for t in labels]
        assert all(left.x1 < right.x0 for left, right in zip(boxes, boxes[1:], strict=False))
    line = per_layer_similarity({"A": np.full(L, 0.1)})
    assert len(line.get_xticks()) <= 10
