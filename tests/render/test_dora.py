"""Pictures and the table of DoRA's magnitude and direction: the points drawn are the report's, one marker per
checkpoint, the fitted lines with their slope and r in the legend."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

from loralens.errors import LoralensError
from loralens.render.dora import dora_figure, dora_runs, dora_table, magnitude_direction_scatter


def _run(dM: list[float], dD: list[float | None], dora: bool, slope: float | None = 2.0) -> dict:
    fit = {"slope": slope, "intercept": 0.5, "r": None if slope is None else -0.75, "n": 3}
    return {
        "modules": {"query": {"layers": [0, 1, 2], "base_keys": ["a", "b", "c"], "dora": dora, "dM": dM, "dD": dD,
                              "fit": fit}},
        "definition": "d",
        "settings": {"device": "cpu", "dtype": "float64"},
    }  # fmt: skip


def test_one_adapter_draws_its_points_and_line() -> None:
    fig = dora_figure(_run([0.1, 0.2, 0.3], [0.01, 0.02, 0.03], True), title="t")
    ax = fig.axes[0]
    assert ax.get_title() == "query (DoRA)"
    (points,) = ax.collections
    np.testing.assert_allclose(points.get_offsets(), [[0.01, 0.1], [0.02, 0.2], [0.03, 0.3]])
    (line,) = ax.lines
    np.testing.assert_allclose(line.get_xdata(), [0.01, 0.03])
    np.testing.assert_allclose(line.get_ydata(), [2.0 * 0.01 + 0.5, 2.0 * 0.03 + 0.5])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["layers: slope 2, r = -0.75"]
    # each point coloured by its layer: three different colours
    assert len({tuple(c) for c in points.get_facecolors()}) == 3


def test_a_series_has_one_marker_per_checkpoint_and_a_pooled_line() -> None:
    data = {
        "adapters": ["/runs/step-100", "/runs/step-200"],
        "runs": [_run([0.1, 0.2, 0.3], [0.01, None, 0.03], False), _run([0.2, 0.3, 0.4], [0.02, 0.03, 0.04], False)],
        "pooled": {"query": {"slope": 1.0, "intercept": 0.0, "r": 0.9, "n": 5}},
        "definition": "d",
        "settings": {"device": "cpu", "dtype": "float64", "n_adapters": 2},
    }
    assert [label for label, _ in dora_runs(data)] == ["step-100", "step-200"]
    ax = dora_figure(data).axes[0]
    assert ax.get_title() == "query (LoRA)" and len(ax.collections) == 2
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["step-100", "step-200", "pooled: slope 1, r = 0.90", "step-100: slope 2, r = -0.75",
                      "step-200: slope 2, r = -0.75"]  # fmt: skip
    pooled = ax.lines[0]
    np.testing.assert_allclose(pooled.get_xdata(), [0.01, 0.04])  # over every defined point
    table = dora_table(data)
    assert table.columns == ("checkpoint", "module", "layer", "dM", "dD", "m'") and len(table.rows) == 6
    assert table.rows[1] == ("step-100", "query", 1, 0.2, None, "||W'||")
    assert any("all checkpoints, query: slope 1, r = 0.900" in n for n in table.notes)


def test_table_of_one_adapter() -> None:
    table = dora_table(_run([0.1, 0.2, 0.3], [0.01, 0.02, 0.03], True, slope=None))
    assert table.columns == ("module", "layer", "dM", "dD", "m'")
    assert table.rows[0] == ("query", 0, 0.1, 0.01, "DoRA m")
    assert table.notes[0] == "query: slope n/a, r = n/a."


def test_axes_level_function_draws_on_a_given_axes_and_refuses_bad_input() -> None:
    ax = Figure().add_subplot()
    series = {"a": {"layers": [0, 1], "dD": [0.1, 0.2], "dM": [1.0, 2.0]}}
    assert magnitude_direction_scatter(series, fits={"a": {"slope": None, "intercept": None, "r": None}}, ax=ax) is ax
    assert not ax.lines  # a null fit draws no line
    with pytest.raises(LoralensError, match="at least one series"):
        magnitude_direction_scatter({})
    with pytest.raises(LoralensError, match="equal-length"):
        magnitude_direction_scatter({"a": {"layers": [0, 1], "dD": [0.1], "dM": [1.0, 2.0]}})
    with pytest.raises(LoralensError, match="at least one module"):
        dora_figure({"modules": {}})
