"""Pictures of intruder dimensions: the numbers drawn are the report's, modules over different layers line up."""

from __future__ import annotations

import pytest
from matplotlib.figure import Figure

from loralens.errors import LoralensError
from loralens.render.intruders import epsilon_curve, intruder_count_heatmap, intruders_figure

EPS = [0.25, 0.5, 0.75]


def _data() -> dict:
    return {
        "modules": {
            "query": {"layers": [0, 1, 2], "count": [0, 2, 1], "epsilon_sweep": {"epsilon": EPS,
                      "count": [[0, 1, 0], [0, 2, 1], [1, 4, 3]]}},
            "value": {"layers": [1, 2], "count": [3, 0], "epsilon_sweep": {"epsilon": EPS,
                      "count": [[1, 0], [3, 0], [5, 2]]}},
        },
        "settings": {"k": 10, "epsilon": 0.5},
    }  # fmt: skip


def test_figure_draws_the_counts_of_each_layer_in_its_column() -> None:
    fig = intruders_figure(_data(), title="t")
    heat, curve = fig.axes[0], fig.axes[1]
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in heat.texts}
    # rows: query, value; columns: layers 0, 1, 2 (value has no layer 0: blank)
    assert cells == {(0, 0): "0", (0, 1): "2", (0, 2): "1", (1, 1): "3", (1, 2): "0"}
    assert [t.get_text() for t in heat.get_xticklabels()] == ["0", "1", "2"]
    totals = {
        line.get_label(): list(line.get_ydata()) for line in curve.lines if line.get_label() in ("query", "value")
    }
    assert totals == {"query": [1, 3, 8], "value": [1, 3, 7]}


def test_axes_level_functions_draw_on_a_given_axes_and_refuse_bad_input() -> None:
    ax = Figure().add_subplot()
    assert intruder_count_heatmap({"q": [1, 0]}, ax=ax) is ax
    assert epsilon_curve(EPS, {"q": [[0], [1], [2]]}, chosen=0.5, ax=ax) is ax
    for bad in ({}, {"q": [1, 2], "v": [1]}):
        with pytest.raises(LoralensError, match="equal-length"):
            intruder_count_heatmap(bad)
    with pytest.raises(LoralensError, match="at least one module"):
        intruders_figure({"modules": {}})


def test_thirty_layers_thin_the_layer_ticks_and_keep_every_count() -> None:
    """At 30 layers every cell still carries its count, but at most 16 layer labels, so they never run together."""
    counts = [k % 3 for k in range(30)]
    ax = intruder_count_heatmap({"query": counts, "value": counts[::-1]}, labels=list(range(1, 31)), k=10)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert len(labels) <= 16 and labels[:2] == ["1", "3"]
    assert len(ax.texts) == 60 and {t.get_fontsize() for t in ax.texts} == {6}
