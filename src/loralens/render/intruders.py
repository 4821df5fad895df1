"""Pictures of intruder dimensions (Shuttleworth et al. 2024): counts per layer and module, and the epsilon curve.

Pure and Axes-level: arrays in (NumPy, CPU tensors or nested lists), ``ax=None``, the Axes (or a
:class:`matplotlib.figure.Figure` for the composed panels) out. The numbers come from
:mod:`loralens.analyses.intruders`; nothing here computes a statistic or saves a file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from loralens.errors import LoralensError
from loralens.render.style import layer_labels, palette, thin_ticks
from loralens.render.tables import Cell, Table

__all__ = ["intruder_count_heatmap", "epsilon_curve", "intruders_figure", "intruders_table"]


def intruder_count_heatmap(
    counts: Mapping[str, Sequence[float]],
    *,
    labels: Sequence[Any] | None = None,
    k: int | None = None,
    title: str | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Intruders per layer (columns) and module (rows), the count written in each cell.

    ``counts``: module -> ``L`` counts over the same ``labels`` (NaN: the module has no adapter at that layer,
    drawn blank); ``k``: the number of directions examined, the top of the colour scale (default: the largest
    count, at least 1).
    """
    modules = list(counts)
    rows = [np.asarray(counts[m], dtype=float) for m in modules]
    if not rows or rows[0].size == 0 or any(r.shape != rows[0].shape or r.ndim != 1 for r in rows):
        raise LoralensError("intruder_count_heatmap needs a non-empty mapping of modules to equal-length counts")
    grid = np.array(rows)
    if ax is None:
        size = (max(4.5, 0.6 * grid.shape[1] + 2.5), 0.55 * len(modules) + 1.6)
        ax = Figure(figsize=size, layout="constrained").add_subplot()
    top = float(k) if k else max(1.0, float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0)
    image = ax.imshow(grid, cmap="Reds", vmin=0, vmax=top, aspect="auto")
    for (row, col), value in np.ndenumerate(grid):
        if value != value:  # NaN: no adapter there
            continue
        ax.text(col, row, f"{int(value)}", ha="center", va="center", fontsize=9 if grid.shape[1] <= 16 else 6,
                color="white" if value > 0.6 * top else "black")  # fmt: skip
    names = layer_labels(labels, grid.shape[1])
    keep = thin_ticks(len(names), 16)  # labels never overlap, also at 30 layers
    ax.set_xticks(keep, [str(names[k]) for k in keep])
    ax.set_yticks(range(len(modules)), modules)
    ax.set_xlabel("layer")
    ax.figure.colorbar(image, ax=ax, label="intruders" + (f" (of top {k})" if k else ""))
    ax.set_title(title or "Intruder dimensions per layer", fontsize=10)
    return ax


def epsilon_curve(
    epsilon: Sequence[float],
    counts: Mapping[str, Any],
    *,
    chosen: float | None = None,
    title: str | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Intruders summed over layers against the threshold epsilon, one line per module.

    ``counts``: module -> ``(E, L)`` counts (one row per epsilon); ``chosen``: the report's epsilon, marked.
    """
    eps = np.asarray(epsilon, dtype=float)
    if ax is None:
        ax = Figure(figsize=(5.5, 3.6), layout="constrained").add_subplot()
    for color, (module, grid) in zip(palette(len(counts)), counts.items(), strict=True):
        total = np.asarray(grid, dtype=float).reshape(len(eps), -1).sum(axis=1)
        ax.plot(eps, total, marker="o", markersize=3, color=color, label=module)
    if chosen is not None:
        ax.axvline(chosen, color="0.4", linestyle="--", linewidth=1, label=f"epsilon = {chosen:g}")
    ax.set_xlabel("epsilon (intruder: max |cos| with W0 < epsilon)")
    ax.set_ylabel("intruders, all layers")
    ax.set_title(title or "Intruders against the threshold", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    return ax


def intruders_figure(data: Mapping[str, Any], *, title: str | None = None) -> Figure:
    """The count heatmap and the epsilon curve side by side, from ``IntrudersReport.to_dict()``."""
    modules = data.get("modules") or {}
    if not modules:
        raise LoralensError("intruders_figure needs at least one module")
    settings = data.get("settings", {})
    first = next(iter(modules.values()))
    layers = sorted({layer for v in modules.values() for layer in v["layers"]})
    column = {layer: n for n, layer in enumerate(layers)}
    counts: dict[str, list[float]] = {}
    for m, v in modules.items():  # modules may cover different layers: NaN where one has none
        row = [float("nan")] * len(layers)
        for layer, count in zip(v["layers"], v["count"], strict=True):
            row[column[layer]] = count
        counts[m] = row
    fig = Figure(figsize=(12.0, max(3.8, 0.55 * len(modules) + 2.2)), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=(1.3, 1))
    intruder_count_heatmap(counts, labels=layers, k=settings.get("k"), ax=left)
    epsilon_curve(
        first["epsilon_sweep"]["epsilon"],
        {m: v["epsilon_sweep"]["count"] for m, v in modules.items()},
        chosen=settings.get("epsilon"),
        ax=right,
    )
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def intruders_table(data: Mapping[str, Any]) -> Table:
    """One row per module and layer from ``IntrudersReport.to_dict()``: the intruder count among the top k, the
    best base cosine of each intruder and its singular value, the smallest ``c_j`` of the layer and the update's
    share along the intruders."""
    settings = data.get("settings") or {}
    rows: list[tuple[Cell, ...]] = []
    for module, m in (data.get("modules") or {}).items():
        for n, layer in enumerate(m["layers"]):
            flags, cos, sigma = m["intruder"][n], m["max_cos"][n], m["sigma"][n]
            which = [j for j, flag in enumerate(flags) if flag]
            rows.append(
                (
                    module,
                    layer,
                    m["count"][n],
                    ", ".join(f"{cos[j]:.3f}" for j in which) or "-",
                    ", ".join(f"{sigma[j]:.3g}" for j in which) or "-",
                    min(c for c in cos if c is not None) if any(c is not None for c in cos) else None,
                    m["update_share"][n],
                )
            )
    k, epsilon = settings.get("k"), settings.get("epsilon")
    return Table(
        ("module", "layer", "intruders", "their max |cos|", "their sigma", "min max|cos|", "share of dW"),
        tuple(rows),
        f"Intruder dimensions: top-{k} directions of W0 + s B A with max |cos| to W0's singular vectors < {epsilon}",
        ("share of dW: ||P dW||_F / ||dW||_F, P the projector onto the intruders (Shuttleworth et al. 2024)",),
    )
