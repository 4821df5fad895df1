"""Pictures of an adapter zoo: the N x N similarity heatmaps in dendrogram order, with the dendrogram.

Pure: data in (``ZooReport.to_dict()`` or arrays), a :class:`matplotlib.figure.Figure` or the Axes out; the
clustering itself comes from :mod:`loralens.analyses.zoo`. With many adapters the labels are thinned (at most
``max_labels`` shown).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from loralens.errors import LoralensError

__all__ = ["zoo_heatmap", "zoo_figure", "zoo_table"]

#: The quantities of a zoo, with their titles and colour ranges.
QUANTITIES = {
    "cosine": ("cosine of the updates dW", (-1.0, 1.0), "RdBu_r"),
    "phi_B": ("phi of B's column spaces", (0.0, 1.0), "viridis"),
    "phi_A": ("phi of A's row spaces", (0.0, 1.0), "viridis"),
}


def zoo_heatmap(
    matrix: Any,
    *,
    order: Sequence[int] | None = None,
    labels: Sequence[str] | None = None,
    quantity: str = "cosine",
    max_labels: int = 40,
    fit_off_diagonal: bool = True,
    title: str | None = None,
    ax: Axes | None = None,
) -> Axes:
    """One ``N x N`` matrix, rows and columns in ``order`` (default: as given), NaN blank.

    ``fit_off_diagonal``: leave out the diagonal (an adapter against itself: 1) and fit the colour scale to the
    off-diagonal values, which are often 0.01-0.2 and would vanish on the full range; else the full range.
    """
    M = np.asarray(matrix, dtype=float)
    if M.ndim != 2 or M.shape[0] != M.shape[1] or M.shape[0] == 0:
        raise LoralensError(f"zoo_heatmap needs a square, non-empty N x N matrix, got shape {M.shape}")
    if quantity not in QUANTITIES:
        raise LoralensError(f"quantity must be one of {', '.join(QUANTITIES)}, got {quantity!r}")
    n = M.shape[0]
    idx = list(range(n)) if order is None else [int(i) for i in order]
    if sorted(idx) != list(range(n)):
        raise LoralensError(f"order must be a permutation of 0..{n - 1}")
    names = [str(i) for i in range(n)] if labels is None else [str(x) for x in labels]
    if ax is None:
        side = min(12.0, max(4.0, 0.25 * n + 2.5))
        ax = Figure(figsize=(side + 1.2, side), layout="constrained").add_subplot()
    heading, (lo, hi), cmap = QUANTITIES[quantity]
    shown = M[np.ix_(idx, idx)].copy()
    if fit_off_diagonal and n > 1:
        np.fill_diagonal(shown, np.nan)
        off = shown[np.isfinite(shown)]
        if off.size:
            top = float(np.abs(off).max()) or 1.0
            lo, hi = (-top, top) if lo < 0 else (0.0, top)
            heading += " (diagonal left out)"
    image = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
    step = max(1, -(-n // max_labels))
    ticks = list(range(0, n, step))
    ax.set_xticks(ticks, [names[idx[t]] for t in ticks], rotation=90, fontsize=7)
    ax.set_yticks(ticks, [names[idx[t]] for t in ticks], fontsize=7)
    ax.figure.colorbar(image, ax=ax, shrink=0.8, label=quantity)
    ax.set_title(title or heading, fontsize=10)
    return ax


def zoo_figure(data: Mapping[str, Any], module: str, *, labels: Sequence[str] | None = None) -> Figure:
    """For one module: the dendrogram over the three heatmaps (overall cosine, phi_B, phi_A), in dendrogram order."""
    from scipy.cluster.hierarchy import dendrogram

    modules = data.get("modules") or {}
    if module not in modules:
        raise LoralensError(f"no module {module!r} in the zoo (it has {', '.join(modules) or 'none'})")
    m = modules[module]
    names = list(labels) if labels is not None else [_short(p) for p in data.get("adapters", [])]
    n = len(m["order"])
    fig = Figure(figsize=(16.0, 6.8), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=(1, 3))  # type: ignore[misc]
    axis = top.add_subplot()
    linkage = np.asarray(m["linkage"], dtype=float)
    if n >= 2 and linkage.size:
        dendrogram(
            linkage, ax=axis, labels=names or None, no_labels=n > 40, color_threshold=0, above_threshold_color="0.3"
        )
    axis.set_ylabel("1 - cosine")
    axis.set_title(f"{module}: average-linkage clustering on 1 - overall cosine", fontsize=10)
    axes = bottom.subplots(1, 3)
    for ax, quantity in zip(axes, QUANTITIES, strict=True):
        zoo_heatmap(m[quantity]["overall"], order=m["order"], labels=names or None, quantity=quantity, ax=ax)
    return fig


def zoo_table(data: Mapping[str, Any]) -> Any:
    """Per module: the adapters in dendrogram order with their mean cosine / phi to the others."""
    from loralens.render.tables import Table

    rows = []
    adapters = [_short(p) for p in data.get("adapters", [])]
    for module, m in (data.get("modules") or {}).items():
        for i in m["order"]:
            cells = []
            for quantity in QUANTITIES:
                row = [x for j, x in enumerate(m[quantity]["overall"][i]) if j != i and x is not None]
                cells.append(sum(row) / len(row) if row else None)
            rows.append((module, adapters[i] if i < len(adapters) else str(i), *cells))
    return Table(
        ("module", "adapter", "mean cosine", "mean phi_B", "mean phi_A"),
        tuple(rows),
        "Adapter zoo: each adapter's mean similarity to the others (dendrogram order)",
    )


def _short(path: str) -> str:
    """The last path component: adapters are told apart by their folder names."""
    return str(path).rstrip("/").rsplit("/", 1)[-1]
