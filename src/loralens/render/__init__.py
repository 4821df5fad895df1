"""Pictures and tables of loralens results: pure, Axes-level functions and string renderers.

Plots take arrays (NumPy, CPU tensors or lists) and ``ax=None`` and return the Axes (or a Figure for composed
panels); they never save, show or compute. Tables are built from plain lists/dicts and rendered as Markdown,
CSV, LaTeX (booktabs) or HTML strings. Saving and the report live in :mod:`loralens.render.report`, and
:func:`loralens.render.build.build_report` runs every analysis of the report and renders it.

    >>> from loralens import render
    >>> ax = render.similarity_heatmap(report.modules["value"]["B"].phi, average=0.05, title="value, B")
    >>> print(render.to_markdown(render.table4({"lora": 294912, "condlora": 24576, "ratio": 1 / 12})))

Submodules: :mod:`~loralens.render.similarity` (Figure 1 heatmaps, per-layer lines), :mod:`~loralens.render.tables`.
Names are imported on first use, so ``loralens.render.tables`` loads without matplotlib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> submodule that defines it (add new plot modules here)
_EXPORTS = {
    "similarity_heatmap": "loralens.render.similarity",
    "similarity_figure": "loralens.render.similarity",
    "per_layer_similarity": "loralens.render.similarity",
    "Table": "loralens.render.tables",
    "to_csv": "loralens.render.tables",
    "to_markdown": "loralens.render.tables",
    "to_latex": "loralens.render.tables",
    "to_html": "loralens.render.tables",
    "similarity_summary_table": "loralens.render.tables",
    "phi_long_table": "loralens.render.tables",
    "table2": "loralens.render.tables",
    "table3": "loralens.render.tables",
    "table3_over_pairs": "loralens.render.tables",
    "table4": "loralens.render.tables",
    "overlap_table": "loralens.render.tables",
    "amplification_table": "loralens.render.tables",
    "spectra_table": "loralens.render.tables",
}

__all__ = [  # kept literal for linters; equal to sorted(_EXPORTS) (tests/render check it)
    "Table",
    "amplification_table",
    "overlap_table",
    "per_layer_similarity",
    "phi_long_table",
    "similarity_figure",
    "similarity_heatmap",
    "similarity_summary_table",
    "spectra_table",
    "table2",
    "table3",
    "table3_over_pairs",
    "table4",
    "to_csv",
    "to_html",
    "to_latex",
    "to_markdown",
]

if TYPE_CHECKING:
    from loralens.render.similarity import per_layer_similarity, similarity_figure, similarity_heatmap
    from loralens.render.tables import (
        Table,
        amplification_table,
        overlap_table,
        phi_long_table,
        similarity_summary_table,
        spectra_table,
        table2,
        table3,
        table3_over_pairs,
        table4,
        to_csv,
        to_html,
        to_latex,
        to_markdown,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'loralens.render' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
