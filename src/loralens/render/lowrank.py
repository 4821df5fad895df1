"""Pictures of the LoRA paper's analyses (Hu et al. 2022, Sec. 7): overlap grids, projections, spectra.

Pure and Axes-level (STYLE rule 6): arrays in (NumPy, CPU tensors or nested lists, NaN drawn blank), ``ax=None``,
the Axes (or a :class:`matplotlib.figure.Figure` for composed panels) out. Nothing here computes a statistic,
saves a file or touches pyplot's global state. The numbers come from :mod:`loralens.analyses.lowrank`; layers are
labelled with the ``labels`` given (the model's layer numbers), else ``0..L-1``.

- :func:`overlap_heatmap`, :func:`overlap_figure`: phi(i, j) grids (the paper's Figures 3 and 4), one panel per
  module/factor (rows) and layer (columns), colour scale fixed to 0..1.
- :func:`projection_bars`, :func:`amplification_line`, :func:`amplification_figure`: Table 7 per layer.
- :func:`spectrum_lines`, :func:`angle_lines`, :func:`effective_rank_lines`, :func:`spectra_figure`: dW's singular
  values, its principal angles to W's top-r left singular subspace, effective ranks, one line per layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from loralens.errors import LoralensError, ShapeError
from loralens.render.style import LEGEND_MAX_LAYERS, layer_colorbar, layer_colours, layer_labels, palette, thin_ticks

__all__ = [
    "CMAP",
    "overlap_heatmap",
    "overlap_figure",
    "projection_bars",
    "amplification_line",
    "amplification_figure",
    "spectrum_lines",
    "angle_lines",
    "effective_rank_lines",
    "spectra_figure",
]

#: Perceptually uniform and colour-blind safe, as in :mod:`loralens.render.similarity`.
CMAP = "viridis"
PHI_LABEL = r"$\varphi(i, j)$"
#: Inches of panels per line of :func:`overlap_figure` (about 1,800 px at 150 dpi: shown at >= 60 % in a report).
OVERLAP_WIDTH = 12.0


# ------------------------------------------------------------------------------------------------ overlap


def overlap_heatmap(
    grid: Any,
    *,
    title: str | None = None,
    i_label: str = "i",
    j_label: str = "j",
    colorbar: bool = True,
    cmap: str = CMAP,
    ax: Axes | None = None,
) -> Axes:
    """Draw one ``(i_max, j_max)`` phi(i, j) grid on the fixed colour scale 0..1, ``i`` down, ``j`` across.

    Parameters
    ----------
    grid : array-like
        ``grid[i - 1, j - 1] = phi(i, j)``; NaN (past a layer's rank) is drawn blank.
    title : str, optional
    i_label, j_label : str
        Axis labels (e.g. ``"i (r = 4)"``).
    colorbar : bool
        Add a colour bar beside the Axes.
    cmap : str
    ax : Axes, optional
        Where to draw; a new Figure's Axes when None.

    Returns
    -------
    Axes
        Its first image is the grid (``ax.images[0]``), with extent ``0.5 .. j_max + 0.5`` across.
    """
    values = _matrix(grid, "grid")
    n_i, n_j = values.shape
    if ax is None:
        ax = Figure(figsize=(min(12.0, 1.5 + 0.3 * n_j), min(8.0, 1.2 + 0.3 * n_i)), layout="constrained").add_subplot()
    image = ax.imshow(
        np.ma.masked_invalid(values),
        vmin=0.0,
        vmax=1.0,
        cmap=cmap,
        aspect="auto",
        interpolation="nearest",
        extent=(0.5, n_j + 0.5, n_i + 0.5, 0.5),
    )
    ax.set_xticks(_ticks(n_j))
    ax.set_yticks(_ticks(n_i))
    ax.set_xlabel(j_label)
    ax.set_ylabel(i_label)
    if title:
        ax.set_title(title, fontsize=9)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label=PHI_LABEL)
    return ax


def overlap_figure(
    grids: Mapping[str, Any],
    *,
    labels: Sequence[Any] | None = None,
    i_label: str = "i",
    j_label: str = "j",
    title: str | None = None,
    cmap: str = CMAP,
    columns: int | None = None,
) -> Figure:
    """A panel grid of phi(i, j) heatmaps: for each entry of ``grids``, its layers in reading order, wrapped after
    ``columns`` panels (default: as many as fit about 12 inches) so that a figure stays readable at 30 layers; draw
    one figure per module to keep each small.

    Parameters
    ----------
    grids : mapping
        Row name (e.g. ``"value, A (right)"``) -> ``(L, i_max, j_max)`` grids; every row has the same ``L``.
    labels : sequence, optional
        ``L`` layer labels for the column titles; default ``0..L-1``.
    i_label, j_label : str
        Axis labels of the first adapter's and the second adapter's subspace dimension.
    title : str, optional
        Figure title.

    columns : int, optional
        Panels per line.

    Returns
    -------
    Figure
        ``len(grids) * L`` heatmap Axes (row-major, each entry's layers in order) and one shared colour bar; unused
        panels of an entry's last line are switched off.
    """
    if not grids:
        raise LoralensError("overlap_figure needs at least one row of grids")
    rows = {name: _stack(g, name, 3) for name, g in grids.items()}
    L = _same_length(rows)
    ticks = layer_labels(labels, L)
    n_i = max(v.shape[1] for v in rows.values())
    n_j = max(v.shape[2] for v in rows.values())
    cell_w, cell_h = min(3.2, 1.1 + 0.12 * n_j), min(3.2, 1.0 + 0.12 * n_i)
    if columns is None:
        columns = max(1, int(OVERLAP_WIDTH // cell_w))
    columns = max(1, min(L, columns))
    lines = -(-L // columns)  # of each entry
    fig = Figure(figsize=(cell_w * columns + 1.4, cell_h * lines * len(rows) + 0.9), layout="constrained")
    axes = fig.subplots(lines * len(rows), columns, squeeze=False)
    for n, (name, stack) in enumerate(rows.items()):
        for k, (grid, layer) in enumerate(zip(stack, ticks, strict=True)):
            line, col = n * lines + k // columns, k % columns
            overlap_heatmap(
                grid,
                title=f"{name}\nlayer {layer}" if k == 0 else f"layer {layer}",
                i_label=i_label if col == 0 else "",
                j_label=j_label if n == len(rows) - 1 and k + columns >= L else "",  # no panel below
                colorbar=False,
                cmap=cmap,
                ax=axes[line, col],
            )
        for k in range(L, lines * columns):
            axes[n * lines + k // columns, k % columns].set_axis_off()
    fig.colorbar(axes[0, 0].images[0], ax=axes.ravel().tolist(), shrink=0.9, label=PHI_LABEL)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


# ------------------------------------------------------------------------------------------ amplification


def projection_bars(
    values: Mapping[str, Any],
    *,
    labels: Sequence[Any] | None = None,
    logy: bool = True,
    title: str | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Grouped bars per layer: ``||U.T W V||_F`` for each series (e.g. dW's, W's top-r and random subspaces).

    Parameters
    ----------
    values : mapping
        Series name -> ``L`` values (positive when ``logy``).
    labels : sequence, optional
        ``L`` layer labels; default ``0..L-1``.
    logy : bool
        Logarithmic y axis (the series differ by orders of magnitude).

    Returns
    -------
    Axes
        One bar container per series (``ax.containers``), in the order given.
    """
    if not values:
        raise LoralensError("projection_bars needs at least one series")
    series = {name: _vector(v, name) for name, v in values.items()}
    L = _same_length(series)
    ticks = layer_labels(labels, L)
    if ax is None:
        ax = Figure(figsize=(max(5.0, 0.6 * L + 2.5), 3.6), layout="constrained").add_subplot()
    width = 0.8 / len(series)
    x = np.arange(L)
    colours = palette(len(series))
    for k, ((name, v), colour) in enumerate(zip(series.items(), colours, strict=True)):
        ax.bar(x + (k - (len(series) - 1) / 2) * width, v, width, label=name, color=colour)
    if logy:
        ax.set_yscale("log")
    _layer_xticks(ax, ticks)
    ax.set_xlabel("layer")
    ax.set_ylabel(r"$\|U^\top W V\|_F$")
    # the legend sits in one row in headroom above the tallest bar, never over a bar
    top = max((float(np.nanmax(v)) for v in series.values() if np.isfinite(v).any()), default=1.0)
    if logy and top > 0:
        ax.set_ylim(top=top * 12)
    elif not logy:
        ax.set_ylim(top=top * 1.35)
    ax.legend(fontsize=8, ncol=len(series), loc="upper center", frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def amplification_line(
    values: Any,
    *,
    labels: Sequence[Any] | None = None,
    title: str | None = None,
    ax: Axes | None = None,
) -> Axes:
    """The amplification factor ``||dW||_F / ||U.T W V||_F`` per layer as one line with markers."""
    v = _vector(values, "amplification")
    ticks = layer_labels(labels, len(v))
    if ax is None:
        ax = Figure(figsize=(max(5.0, 0.4 * len(v) + 2.5), 3.6), layout="constrained").add_subplot()
    x = np.arange(len(v))
    ax.plot(x, v, marker="o", color=palette(1)[0])
    _layer_xticks(ax, ticks)
    ax.set_xlabel("layer")
    ax.set_ylabel(r"$\|\Delta W\|_F \,/\, \|U^\top W V\|_F$")
    ax.set_ylim(bottom=0.0)
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def amplification_figure(
    projections: Mapping[str, Mapping[str, Any]],
    amplification: Mapping[str, Any],
    *,
    labels: Mapping[str, Sequence[Any]] | None = None,
    title: str | None = None,
) -> Figure:
    """One row per module: :func:`projection_bars` beside :func:`amplification_line`.

    Parameters
    ----------
    projections : mapping
        Module -> {series name -> ``L`` values} (e.g. ``{"dW": ..., "W top-r": ..., "random": ...}``).
    amplification : mapping
        Module -> ``L`` amplification factors; same modules as ``projections``.
    labels : mapping, optional
        Module -> ``L`` layer labels.
    """
    if not projections or set(projections) != set(amplification):
        raise LoralensError("amplification_figure needs the same, non-empty set of modules in both mappings")
    fig = Figure(figsize=(11.0, 3.3 * len(projections) + 0.6), layout="constrained")
    axes = fig.subplots(len(projections), 2, squeeze=False, width_ratios=[3, 2])
    for (left, right), (module, series) in zip(axes, projections.items(), strict=True):
        layer_labels = None if labels is None else labels.get(module)
        projection_bars(series, labels=layer_labels, title=f"{module}: W projected onto r-dim subspaces", ax=left)
        amplification_line(
            amplification[module], labels=layer_labels, title=f"{module}: amplification factor", ax=right
        )
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


# ------------------------------------------------------------------------------------------------ spectra


def spectrum_lines(
    singular_values: Any,
    *,
    labels: Sequence[Any] | None = None,
    logy: bool = True,
    title: str | None = None,
    ylabel: str = r"$\sigma_k(\Delta W)$",
    ax: Axes | None = None,
) -> Axes:
    """One line per layer: singular values ``sigma_1 >= sigma_2 >= ...`` against their index ``k = 1..r``.

    Parameters
    ----------
    singular_values : array-like
        ``(L, r)``; NaN past a layer's rank ends its line.
    labels : sequence, optional
        ``L`` layer labels for the legend; default ``0..L-1``.
    logy : bool
        Logarithmic y axis.

    Returns
    -------
    Axes
        ``L`` lines, coloured from early (dark) to late (light) layers; named in a legend up to
        :data:`~loralens.render.style.LEGEND_MAX_LAYERS` layers, else by a colour bar of layers.
    """
    values = _matrix(singular_values, "singular_values")
    return _layer_lines(values, labels, ax, title, ylabel, logy)


def angle_lines(
    angles_deg: Any,
    *,
    labels: Sequence[Any] | None = None,
    title: str | None = None,
    ax: Axes | None = None,
) -> Axes:
    """One line per layer: principal angles (degrees, ascending) against their index, on a 0..90 axis."""
    values = _matrix(angles_deg, "angles_deg")
    ax = _layer_lines(values, labels, ax, title, "principal angle (degrees)", False)
    ax.set_ylim(0.0, 90.0)
    ax.set_yticks([0, 15, 30, 45, 60, 75, 90])
    return ax


def effective_rank_lines(
    values: Mapping[str, Any],
    *,
    rank: Any = None,
    labels: Sequence[Any] | None = None,
    title: str | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Effective ranks per layer, one line per series (e.g. entropy, energy 90 %), the adapter's rank dashed; the
    series named in a legend beside the axes (right), never over the lines."""
    if not values:
        raise LoralensError("effective_rank_lines needs at least one series")
    series = {name: _vector(v, name) for name, v in values.items()}
    L = _same_length(series)
    ticks = layer_labels(labels, L)
    if ax is None:
        ax = Figure(figsize=(max(5.0, 0.4 * L + 2.5), 3.6), layout="constrained").add_subplot()
    x = np.arange(L)
    for (name, v), colour, marker in zip(series.items(), palette(len(series)), "osD^v", strict=False):
        ax.plot(x, v, marker=marker, color=colour, label=name)
    if rank is not None:
        r = _vector(np.broadcast_to(np.asarray(rank, dtype=float), (L,)), "rank")
        ax.plot(x, r, linestyle="--", color="0.4", label="rank r")
    _layer_xticks(ax, ticks)
    ax.set_xlabel("layer")
    ax.set_ylabel("effective rank")
    ax.set_ylim(bottom=0.0)
    # beside the axes, not over them: with many layers the lines span the whole width and any spot inside covers them
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def spectra_figure(
    singular_values: Mapping[str, Any],
    angles_deg: Mapping[str, Any],
    effective_ranks: Mapping[str, Mapping[str, Any]],
    *,
    ranks: Mapping[str, Any] | None = None,
    labels: Mapping[str, Sequence[Any]] | None = None,
    title: str | None = None,
) -> Figure:
    """One row per module: :func:`spectrum_lines`, :func:`angle_lines` and :func:`effective_rank_lines`.

    Parameters
    ----------
    singular_values, angles_deg : mapping
        Module -> ``(L, r)`` arrays.
    effective_ranks : mapping
        Module -> {series name -> ``L`` values}.
    ranks : mapping, optional
        Module -> rank (scalar or ``L`` values), drawn dashed beside the effective ranks.
    labels : mapping, optional
        Module -> ``L`` layer labels.
    """
    modules = list(singular_values)
    if not modules or set(angles_deg) != set(modules) or set(effective_ranks) != set(modules):
        raise LoralensError("spectra_figure needs the same, non-empty set of modules in every mapping")
    fig = Figure(figsize=(14.0, 3.4 * len(modules) + 0.6), layout="constrained")
    axes = fig.subplots(len(modules), 3, squeeze=False)
    for row, module in zip(axes, modules, strict=True):
        layer_labels = None if labels is None else labels.get(module)
        spectrum_lines(
            singular_values[module], labels=layer_labels, title=f"{module}: singular values of dW", ax=row[0]
        )
        angle_lines(
            angles_deg[module],
            labels=layer_labels,
            title=f"{module}: angles between col(dW) and W's top-r",
            ax=row[1],
        )
        effective_rank_lines(
            effective_ranks[module],
            rank=None if ranks is None else ranks.get(module),
            labels=layer_labels,
            title=f"{module}: effective rank of dW",
            ax=row[2],
        )
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


# ------------------------------------------------------------------------------------------------ helpers


def _layer_lines(
    values: np.ndarray, labels: Sequence[Any] | None, ax: Axes | None, title: str | None, ylabel: str, logy: bool
) -> Axes:
    L, r = values.shape
    ticks = layer_labels(labels, L)
    if ax is None:
        ax = Figure(figsize=(max(5.0, 0.3 * r + 3.0), 3.6), layout="constrained").add_subplot()
    k = np.arange(1, r + 1)
    for v, layer, colour in zip(values, ticks, layer_colours(L, CMAP), strict=True):
        ax.plot(k, v, marker="o", markersize=3, color=colour, label=f"layer {layer}")
    if logy:
        ax.set_yscale("log")
    ax.set_xticks(_ticks(r))
    ax.set_xlabel("k")
    ax.set_ylabel(ylabel)
    if L > LEGEND_MAX_LAYERS:  # a legend of L entries would cover the lines: a colour bar names the layers
        layer_colorbar(ax, ticks, CMAP)
    else:
        ax.legend(fontsize=7, ncols=2 if L > 6 else 1)
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def _as_array(values: Any, name: str) -> np.ndarray:
    try:
        return np.asarray(values, dtype=float)
    except (TypeError, ValueError) as e:
        raise ShapeError(f"{name}: expected numbers (an array, a CPU tensor or nested lists): {e}") from e


def _matrix(values: Any, name: str) -> np.ndarray:
    a = _as_array(values, name)
    if a.ndim != 2 or 0 in a.shape:
        raise ShapeError(f"{name}: expected a non-empty 2-D array, got shape {a.shape}")
    return a


def _stack(values: Any, name: str, ndim: int) -> np.ndarray:
    a = _as_array(values, name)
    if a.ndim != ndim or 0 in a.shape:
        raise ShapeError(f"{name}: expected a non-empty {ndim}-D array, got shape {a.shape}")
    return a


def _vector(values: Any, name: str) -> np.ndarray:
    a = _as_array(values, name)
    if a.ndim != 1 or a.size == 0:
        raise ShapeError(f"{name}: expected a non-empty 1-D array of per-layer values, got shape {a.shape}")
    return a


def _same_length(series: Mapping[str, np.ndarray]) -> int:
    lengths = {name: len(v) for name, v in series.items()}
    if len(set(lengths.values())) != 1:
        raise ShapeError(f"all series need the same number of layers; got {lengths}")
    return next(iter(lengths.values()))


def _layer_xticks(ax: Axes, ticks: Sequence[Any]) -> None:
    """x ticks at layers ``0..L-1`` labelled with ``ticks``, thinned (:func:`~loralens.render.style.thin_ticks`)."""
    keep = thin_ticks(len(ticks))
    ax.set_xticks(keep, [str(ticks[k]) for k in keep])


def _ticks(n: int) -> list[int]:
    """1-based tick positions, at most about 8 of them."""
    step = max(1, -(-n // 8))
    return list(range(1, n + 1, step))
