"""Pictures of the LoRA-paper analyses: what each Axes holds, fixed colour scales, NaN blanks, non-blank renders."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from loralens.errors import LoralensError, ShapeError
from loralens.render.lowrank import (
    OVERLAP_WIDTH,
    amplification_figure,
    amplification_line,
    angle_lines,
    effective_rank_lines,
    overlap_figure,
    overlap_heatmap,
    projection_bars,
    spectra_figure,
    spectrum_lines,
)


def pixels(fig: Figure) -> np.ndarray:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].astype(float)


def grid(i: int, j: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 1.0, (i, j))


def test_overlap_heatmap_holds_the_grid_on_a_fixed_scale() -> None:
    g = grid(4, 16)
    g[3, 10:] = np.nan  # past a rank: blank
    ax = overlap_heatmap(g, title="value, A", i_label="i (r=4)", j_label="j (r=16)")
    image = ax.images[0]
    data = image.get_array()
    assert data.shape == (4, 16) and bool(data.mask[3, 10:].all()) and not bool(data.mask[:3].any())
    np.testing.assert_allclose(data[:3].data, g[:3])
    assert image.get_clim() == (0.0, 1.0) and image.cmap.name == "viridis"
    assert image.get_extent() == [0.5, 16.5, 4.5, 0.5]  # i = 1 at the top, 1-based cells
    assert ax.get_xlabel() == "j (r=16)" and ax.get_ylabel() == "i (r=4)" and ax.get_title() == "value, A"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "2", "3", "4"]
    assert len(ax.figure.axes) == 2  # heatmap and colour bar
    assert pixels(ax.figure).std() > 20


def test_overlap_heatmap_takes_tensors_and_a_given_axes() -> None:
    ax = Figure().add_subplot()
    assert overlap_heatmap(torch.ones(3, 3, dtype=torch.float64), colorbar=False, ax=ax) is ax
    assert len(ax.figure.axes) == 1


def test_overlap_figure_has_one_panel_per_row_and_layer_and_one_colour_bar() -> None:
    rows = {
        "query, A (right)": np.stack([grid(4, 8, s) for s in range(3)]),
        "query, B (left)": grid(4, 8)[None] * np.ones((3, 1, 1)),
    }
    fig = overlap_figure(rows, labels=[0, 2, 5], title="overlap")
    heatmaps = [ax for ax in fig.axes if ax.images]
    assert len(heatmaps) == 6 and len(fig.axes) == 7
    assert heatmaps[0].get_title() == "query, A (right)\nlayer 0" and heatmaps[2].get_title() == "layer 5"
    np.testing.assert_allclose(heatmaps[1].images[0].get_array().data, rows["query, A (right)"][1])
    assert heatmaps[0].get_xlabel() == "" and heatmaps[3].get_xlabel() == "j"  # j label on the bottom row
    assert fig.get_suptitle() == "overlap"
    assert pixels(fig).std() > 20


def test_projection_bars_and_amplification_line() -> None:
    values = {"dW": [0.5, 0.3], "W top-r": [10.0, 9.0], "random": [0.3, 0.31]}
    ax = projection_bars(values, labels=[3, 4], title="value")
    assert len(ax.containers) == 3
    assert [b.get_height() for b in ax.containers[1]] == [10.0, 9.0]
    assert ax.get_yscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == ["3", "4"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(values)
    line = amplification_line(torch.tensor([2.0, 4.0]), labels=[3, 4]).lines[0]
    np.testing.assert_allclose(line.get_ydata(), [2.0, 4.0])
    fig = amplification_figure({"value": values}, {"value": [2.0, 4.0]}, labels={"value": [3, 4]}, title="T7")
    assert len(fig.axes) == 2 and pixels(fig).std() > 20


def test_spectrum_angle_and_effective_rank_lines() -> None:
    S = np.array([[3.0, 2.0, 1.0, np.nan], [4.0, 1.0, 0.5, 0.1]])
    ax = spectrum_lines(S, labels=[0, 1])
    assert len(ax.lines) == 2 and ax.get_yscale() == "log"
    np.testing.assert_allclose(ax.lines[1].get_ydata(), S[1])
    np.testing.assert_allclose(ax.lines[0].get_xdata(), [1, 2, 3, 4])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["layer 0", "layer 1"]
    angles = angle_lines(np.array([[10.0, 80.0], [20.0, 85.0]]))
    assert angles.get_ylim() == (0.0, 90.0) and len(angles.lines) == 2
    er = effective_rank_lines({"entropy": [3.5, 2.0], "energy 90%": [3, 1]}, rank=4)
    assert len(er.lines) == 3
    np.testing.assert_allclose(er.lines[2].get_ydata(), [4, 4])
    fig = spectra_figure(
        {"q": S, "v": S}, {"q": S * 10, "v": S * 10}, {"q": {"e": [1, 2]}, "v": {"e": [1, 2]}}, ranks={"q": 4, "v": 4}
    )
    assert len(fig.axes) == 6 and pixels(fig).std() > 20


def test_plots_leave_pyplot_alone() -> None:
    before = plt.get_fignums()
    overlap_figure({"a": np.ones((2, 3, 3))})
    spectrum_lines(np.ones((2, 3)))
    assert plt.get_fignums() == before


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: overlap_heatmap(np.ones(3)), ShapeError, "2-D"),
        (lambda: overlap_heatmap([["a"]]), ShapeError, "expected numbers"),
        (lambda: overlap_figure({}), LoralensError, "at least one"),
        (lambda: overlap_figure({"a": np.ones((2, 3, 3)), "b": np.ones((3, 3, 3))}), ShapeError, "same number"),
        (lambda: overlap_figure({"a": np.ones((2, 3, 3))}, labels=[1]), ShapeError, "1 layer labels for 2"),
        (lambda: projection_bars({"a": [1, 2], "b": [1]}), ShapeError, "same number"),
        (lambda: amplification_figure({"q": {"a": [1]}}, {"v": [1]}), LoralensError, "same, non-empty"),
        (lambda: spectra_figure({"q": np.ones((1, 2))}, {}, {}), LoralensError, "same, non-empty"),
    ],
)
def test_bad_input_is_refused(call, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_overlap_figure_wraps_thirty_layers_into_readable_lines() -> None:
    """30 layers: panels wrap after ``columns`` (about 12 inches of them), unused panels off, never 30 across."""
    stack = np.stack([grid(4, 4, s) for s in range(30)])
    fig = overlap_figure({"value, A (right)": stack, "value, B (left)": stack}, labels=list(range(1, 31)))
    heatmaps = [ax for ax in fig.axes if ax.images]
    assert len(heatmaps) == 60
    assert fig.get_figwidth() <= OVERLAP_WIDTH + 1.4
    columns = int(OVERLAP_WIDTH // (1.1 + 0.12 * 4))
    lines = -(-30 // columns)
    assert fig.get_figheight() == pytest.approx((1.0 + 0.12 * 4) * 2 * lines + 0.9)
    assert [ax.get_title() for ax in heatmaps[:2]] == ["value, A (right)\nlayer 1", "layer 2"]
    assert heatmaps[30].get_title() == "value, B (left)\nlayer 1"
    assert sum(not ax.axison for ax in fig.axes) == 2 * (lines * columns - 30)


def test_layer_lines_past_eight_layers_name_layers_in_a_colour_bar() -> None:
    values = np.linspace(1.0, 2.0, 30 * 4).reshape(30, 4)
    ax = spectrum_lines(values, labels=list(range(1, 31)))
    assert ax.get_legend() is None and len(ax.lines) == 30
    bar = ax.figure.axes[-1]
    assert bar is not ax and bar.get_ylabel() == "layer"
    assert len(bar.get_yticks()) <= 10
    small = spectrum_lines(values[:6], labels=list(range(1, 7)))
    assert len(small.get_legend().get_texts()) == 6 and len(small.figure.axes) == 1


def test_effective_rank_legend_stays_off_thirty_layers_of_lines() -> None:
    """The spectra figure's effective-rank panel at 30 layers: its legend (a few series, not layers) sits beside
    the axes, not over the lines, and inside the figure."""
    rng = np.random.default_rng(0)
    S = {"value": np.sort(rng.uniform(0.1, 2.0, (30, 8)), axis=1)[:, ::-1]}
    er = {"value": {"entropy": rng.uniform(6.0, 8.0, 30), "energy 90%": rng.integers(5, 8, 30).astype(float)}}
    fig = spectra_figure(S, {"value": S["value"] * 10}, er, ranks={"value": 8}, labels={"value": list(range(1, 31))})
    FigureCanvasAgg(fig).draw()
    ax = next(a for a in fig.axes if a.get_ylabel() == "effective rank")
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["entropy", "energy 90%", "rank r"]
    box, data = legend.get_window_extent(), ax.get_window_extent()
    assert not box.overlaps(data), (box, data)
    assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1)
