"""Pictures of DoRA's magnitude and direction (Liu et al. 2024): the paper's dM-against-dD scatter, and a table.

Pure and Axes-level: arrays in (nested lists, NumPy or CPU tensors), ``ax=None``, the Axes (or a
:class:`matplotlib.figure.Figure` for the composed panels) out. The numbers, the fitted lines included, come from
:mod:`loralens.analyses.dora` (``DoraReport.to_dict()`` or ``DoraSeriesReport.to_dict()``); nothing here computes
a statistic or saves a file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.collections import PathCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from loralens.errors import LoralensError
from loralens.render.tables import Cell, Table

__all__ = ["magnitude_direction_scatter", "dora_figure", "dora_table", "dora_runs"]

#: One marker per checkpoint (cycled).
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")

Fit = Mapping[str, Any]  # {"slope", "intercept", "r"}: numbers or None


def magnitude_direction_scatter(
    series: Mapping[str, Mapping[str, Sequence[Any]]],
    *,
    fits: Mapping[str, Fit] | None = None,
    title: str | None = None,
    ax: Axes | None = None,
) -> Axes:
    """dM (y) against dD (x), one point per layer coloured by its layer number, one marker per series.

    ``series``: label (a checkpoint) -> ``{"layers": [L], "dD": [L], "dM": [L]}`` (None/NaN: not drawn);
    ``fits``: label -> ``{"slope", "intercept", "r"}`` of a line ``dM = slope dD + intercept`` to draw, its slope
    and r in the legend (a line with a null slope is left out).
    """
    if not series:
        raise LoralensError("magnitude_direction_scatter needs at least one series of points")
    points = {}
    for label, s in series.items():
        layers, dD, dM = (np.asarray(s[key], dtype=float) for key in ("layers", "dD", "dM"))
        if not (layers.ndim == 1 and layers.shape == dD.shape == dM.shape):
            raise LoralensError(f"series {label!r}: layers, dD and dM must be equal-length lists")
        points[label] = (layers, dD, dM)
    if ax is None:
        ax = Figure(figsize=(5.8, 4.2), layout="constrained").add_subplot()
    every_layer = np.concatenate([p[0] for p in points.values()])
    norm = Normalize(vmin=float(every_layer.min()), vmax=float(max(every_layer.max(), every_layer.min() + 1)))
    cmap = colormaps["viridis"]
    for k, (label, (layers, dD, dM)) in enumerate(points.items()):
        ax.scatter(dD, dM, c=cmap(norm(layers)), marker=MARKERS[k % len(MARKERS)], s=36, edgecolors="0.2",
                   linewidths=0.5, label=label if len(points) > 1 else None, zorder=3)  # fmt: skip
    for k, (label, fit) in enumerate((fits or {}).items()):
        slope, intercept, r = fit.get("slope"), fit.get("intercept"), fit.get("r")
        if slope is None or intercept is None:
            continue
        # a series' own line spans its own points; any other (the pooled line) all points
        x = points[label][1] if label in points else np.concatenate([p[1] for p in points.values()])
        x = x[np.isfinite(x)]
        span = np.array([x.min(), x.max()]) if x.size else np.array([0.0, 1.0])
        r_text = "n/a" if r is None else f"{r:.2f}"
        ax.plot(span, slope * span + intercept, color="0.15" if k == 0 else "0.5", linestyle="-" if k == 0 else "--",
                linewidth=1.2, label=f"{label}: slope {slope:.3g}, r = {r_text}", zorder=2)  # fmt: skip
    ax.figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="layer")
    ax.set_xlabel("dD = mean(1 - cos(W'_n, W0_n))")
    ax.set_ylabel("dM = mean |m'_n - m0_n|")
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))
    ax.set_title(title or "Magnitude against direction change", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        legend = ax.legend(fontsize=7, frameon=False)
        for handle in legend.legend_handles:  # a marker stands for its checkpoint, whatever the layer's colour
            if isinstance(handle, PathCollection):
                handle.set_facecolor("0.6")
    ax.grid(alpha=0.3)
    return ax


def dora_runs(data: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """``(label, DoraReport.to_dict())`` per checkpoint of a ``to_dict()`` of either report: one unlabelled
    (``""``) for a single adapter, the adapters' folder names for a series."""
    if "runs" not in data:
        return [("", data)]
    names = [PurePath(a).name for a in data.get("adapters") or []]
    if len(set(names)) != len(names) or len(names) != len(data["runs"]):
        names = [f"checkpoint {k + 1}" for k in range(len(data["runs"]))]
    return list(zip(names, data["runs"], strict=True))


def dora_figure(data: Mapping[str, Any], *, title: str | None = None) -> Figure:
    """One scatter per module, side by side, from ``DoraReport.to_dict()`` or ``DoraSeriesReport.to_dict()``
    (then one marker per checkpoint, its own line dashed and the pooled line solid)."""
    runs = dora_runs(data)
    modules = list(dict.fromkeys(m for _, run in runs for m in run.get("modules") or {}))
    if not modules:
        raise LoralensError("dora_figure needs at least one module")
    fig = Figure(figsize=(5.4 * len(modules), 4.2), layout="constrained")
    axes = fig.subplots(1, len(modules), squeeze=False)[0]
    for ax, module in zip(axes, modules, strict=True):
        series = {label or module: run["modules"][module] for label, run in runs if module in run["modules"]}
        if "runs" in data:
            fits = {"pooled": data["pooled"][module]} | {
                label: run["modules"][module]["fit"] for label, run in runs if module in run["modules"]
            }
        else:
            fits = {"layers": data["modules"][module]["fit"]}
        kinds = {bool(s.get("dora")) for s in series.values()}
        kind = "DoRA and LoRA" if len(kinds) > 1 else "DoRA" if True in kinds else "LoRA"
        magnitude_direction_scatter(series, fits=fits, title=f"{module} ({kind})", ax=ax)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def dora_table(data: Mapping[str, Any]) -> Table:
    """One row per (checkpoint,) module and layer from either report's ``to_dict()``: dM, dD and where m' comes
    from; the fitted lines (slope, r) in the notes."""
    runs = dora_runs(data)
    several = len(runs) > 1 or "runs" in data
    rows: list[tuple[Cell, ...]] = []
    notes: list[str] = []
    for label, run in runs:
        for module, m in (run.get("modules") or {}).items():
            for n, layer in enumerate(m["layers"]):
                cells: tuple[Cell, ...] = (module, layer, m["dM"][n], m["dD"][n], "DoRA m" if m["dora"] else "||W'||")
                rows.append(((label,) + cells) if several else cells)
            notes.append(f"{(label + ' ') if several else ''}{module}: {_fit_text(m['fit'])}.")
    for module, fit in (data.get("pooled") or {}).items():
        notes.append(f"all checkpoints, {module}: {_fit_text(fit)}.")
    columns = ("module", "layer", "dM", "dD", "m'")
    return Table(
        (("checkpoint",) + columns) if several else columns,
        tuple(rows),
        "DoRA magnitude and direction per layer (means over output units n)",
        (*notes, "Fit: least squares dM = slope * dD + intercept over the layers, r = Pearson (Liu et al. 2024)."),
    )


def _fit_text(fit: Fit) -> str:
    slope, r = fit.get("slope"), fit.get("r")
    return f"slope {'n/a' if slope is None else f'{slope:.4g}'}, r = {'n/a' if r is None else f'{r:.3f}'}"
