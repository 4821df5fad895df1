"""Figure 1 of the paper: layer x layer phi heatmaps beside their random baseline, and per-layer line plots.

Pure and Axes-level (STYLE rule 6): arrays in, ``ax=None``, the Axes (or a Figure for composed panels) out.
Nothing here computes a statistic, saves a file or touches pyplot's global state: without ``ax`` a new
:class:`matplotlib.figure.Figure` is made directly, which needs no interactive backend. Saving and
report assembly live in :mod:`loralens.render.report`.

Layers are labelled 1..L as in the paper unless ``labels`` says otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, SupportsFloat, cast

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from loralens.errors import LoralensError, ShapeError
from loralens.render.style import thin_ticks

__all__ = [
    "CMAP",
    "COLORBLIND",
    "ANNOTATE_MAX_LAYERS",
    "FACTOR_LABELS",
    "factor_label",
    "similarity_heatmap",
    "similarity_figure",
    "offdiag_range",
    "per_layer_similarity",
]

#: Perceptually uniform and colour-blind safe.
CMAP = "viridis"
#: Cells carry their value when the matrix has at most this many layers.
ANNOTATE_MAX_LAYERS = 16
#: Largest side of one Figure-1 panel (inches): three panels and a colour bar stay under 15 inches (2,250 px at
#: 150 dpi), shown at half their size or more in a report.
FIGURE_PANEL_MAX = 4.5
#: A colour-blind-safe qualitative palette (seaborn's "colorblind") for line plots.
COLORBLIND = ("#0173b2", "#de8f05", "#029e73", "#d55e00", "#cc78bc", "#ca9161", "#fbafe4", "#949494", "#ece133")
#: Mathtext names of the conversion matrices (paper's Equations 3, 4) per factor.
FACTOR_LABELS = {
    "A": r"$W^{-1}A^\top$",
    "B": r"$W^{-1}B$",
    "BA": r"$W^{-1}BA$",
}
#: The same for a non-square W (the least-squares convention): the pseudo-inverse W^+, as no inverse exists.
LSTSQ_FACTOR_LABELS = {
    "A": r"$W^{+}A^\top$",
    "B": r"$W^{+}B$",
    "BA": r"$W^{+}BA$",
}
#: Plain-text names of the same matrices, for tables and captions.
FACTOR_TEXT = {"A": "W^-1 A^T", "B": "W^-1 B", "BA": "W^-1 B A"}
LSTSQ_FACTOR_TEXT = {"A": "W^+ A^T", "B": "W^+ B", "BA": "W^+ B A"}


def factor_label(factor: str, convention: str = "solve", *, text: bool = False) -> str:
    """The name of ``factor``'s conversion matrix (``"A"``, ``"B"``, ``"BA"``): with ``W^-1`` for a square W, with
    the pseudo-inverse ``W^+`` under the least-squares ``convention`` (``"lstsq"``, a non-square W), as no inverse
    exists there. Mathtext for figures, or plain ``text`` for tables and captions."""
    lstsq = convention == "lstsq"
    if text:
        return (LSTSQ_FACTOR_TEXT if lstsq else FACTOR_TEXT).get(factor, factor)
    return (LSTSQ_FACTOR_LABELS if lstsq else FACTOR_LABELS).get(factor, factor)


def similarity_heatmap(
    phi: Any,
    *,
    labels: Sequence[Any] | None = None,
    title: str | None = None,
    average: float | None = None,
    annotate: bool | None = None,
    colorbar: bool = True,
    cmap: str = CMAP,
    vmin: float = 0.0,
    vmax: float = 1.0,
    ax: Axes | None = None,
) -> Axes:
    """Draw an ``(L, L)`` phi matrix as a heatmap on the fixed colour scale 0..1 (or ``vmin .. vmax``).

    Parameters
    ----------
    phi : array-like
        ``(L, L)`` values in [0, 1] (NaN allowed: drawn blank); a NumPy array, a CPU tensor or nested lists.
    labels : sequence, optional
        ``L`` tick labels for rows and columns; default ``1..L``.
    title : str, optional
        First title line (e.g. module and factor).
    average : float, optional
        Shown as "average similarity" (the caller's mean off-diagonal value) on the title's last line.
    annotate : bool, optional
        Write each cell's value; default when ``L <= 16``.
    colorbar : bool
        Add a colour bar beside the Axes.
    cmap : str
        Matplotlib colour map; keep it perceptually uniform (viridis, cividis).
    vmin, vmax : float
        The colour scale; 0..1 unless a figure needs a scale fitted to small values (cells outside it are clipped).
    ax : Axes, optional
        Where to draw; a new Figure's Axes when None.

    Returns
    -------
    Axes
        Its first collection is the ``L * L`` QuadMesh; annotations are its texts.
    """
    values = _square(phi, "phi")
    L = values.shape[0]
    ticks = _labels(labels, L)
    annotate = L <= ANNOTATE_MAX_LAYERS if annotate is None else annotate
    if ax is None:
        side = max(4.0, 0.32 * L + 2.0)
        ax = Figure(figsize=(side + 1.0, side), layout="constrained").add_subplot()
    mesh = ax.pcolormesh(
        np.ma.masked_invalid(values),
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        edgecolors="white",
        linewidth=0.5 if L <= 32 else 0.0,
    )
    ax.set_xlim(0, L)
    ax.set_ylim(L, 0)  # row 1 at the top, as a matrix is written
    ax.set_aspect("equal")
    ax.tick_params(length=3)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if annotate:
        fontsize = max(5.0, min(10.0, 80.0 / L))
        shades = np.asarray(mesh.cmap(mesh.norm(values)))  # (L, L, 4) RGBA: a colour map maps an array to an array
        for (row, col), value in np.ndenumerate(values):
            if np.isfinite(value):
                dark = _luminance(shades[row, col]) > 0.408  # seaborn's rule: dark text on light cells
                ax.text(
                    col + 0.5,
                    row + 0.5,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=fontsize,
                    color="0.15" if dark else "white",
                )
    if colorbar:
        ax.figure.colorbar(mesh, ax=ax, label=_COLORBAR_LABEL)
    _layer_ticks(ax, ticks)
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(_title(title, average), fontsize=10)
    return ax


def similarity_figure(
    phi: Any,
    random_phi: Any,
    *,
    module: str,
    factor: str,
    average: float | None = None,
    random_average: float | None = None,
    random_expected: float | None = None,
    labels: Sequence[Any] | None = None,
    subtitle: str | None = None,
    w_null: Mapping[str, Any] | None = None,
    alpha: float = 0.05,
    convention: str = "solve",
) -> Figure:
    """The paper's Figure 1 panel pair: phi of the conversion matrices beside phi of random Gaussian matrices,
    and with ``w_null`` a third panel: the W-conditioned null's mean phi.

    The first row's panels share one 0..1 colour bar. A second row draws the same panels again on a colour scale
    fitted to the off-diagonal values of all of them together (:func:`offdiag_range`, so the panels stay comparable
    with each other), the diagonal (1 by definition) left blank: on 0..1 off-diagonal values of 0.01..0.1 all look
    alike. ``average`` / ``random_average`` are the mean off-diagonal
    values to print; ``random_expected`` is ``max(i, j) / d``; ``subtitle`` a line under the figure title
    (e.g. ``"i = j = 8, left singular vectors"``). ``w_null`` is the ``"w_null"`` object of
    ``SimilarityReport.to_dict()`` (``phi_mean`` and ``p`` ``(L, L)``, ``mean_offdiag``, ``mean_offdiag_std``,
    ``draws``): off-diagonal observed cells whose ``p > alpha`` (not above the W-null) get a small ring, explained
    in a legend line. ``convention`` is the conversion's (``settings["conventions"][module]``): ``"lstsq"`` (a
    non-square W) names the matrices with the pseudo-inverse ``W^+``, as no inverse exists there.

    Returns
    -------
    Figure
        With two (three with ``w_null``) heatmap Axes (conversion, random, W-null) on 0..1, the same number on the
        fitted off-diagonal scale, and a colour bar Axes for each row.
    """
    values, random_values = _square(phi, "phi"), _square(random_phi, "random_phi")
    if values.shape != random_values.shape:
        raise ShapeError(f"phi {values.shape} and random_phi {random_values.shape} must have the same shape")
    null_values = p_values = None
    if w_null is not None:
        null_values, p_values = _square(w_null["phi_mean"], "w_null phi_mean"), _square(w_null["p"], "w_null p")
        if null_values.shape != values.shape or p_values.shape != values.shape:
            raise ShapeError(
                f"w_null phi_mean {null_values.shape} and p {p_values.shape} must have phi's shape {values.shape}"
            )
    L = values.shape[0]
    side = min(FIGURE_PANEL_MAX, max(4.0, 0.32 * L + 2.0))
    panels = 2 if null_values is None else 3
    fig = Figure(figsize=(panels * side + 1.4, 2 * side + 2.4), layout="constrained")
    grid = fig.subplots(2, panels)
    axes, zoomed = list(grid[0]), list(grid[1])
    left, right = axes[0], axes[1]
    name = factor_label(factor, convention)
    similarity_heatmap(values, labels=labels, title=f"{module}, {name}", average=average, colorbar=False, ax=left)
    random_title = "random Gaussian, same shape"
    if random_expected is not None:
        random_title += f" (E = {random_expected:.3f})"
    similarity_heatmap(
        random_values, labels=labels, title=random_title, average=random_average, colorbar=False, ax=right
    )
    if w_null is not None and null_values is not None and p_values is not None:
        _w_null_panel(axes[2], left, null_values, p_values, w_null, labels, alpha, convention)
    fig.colorbar(left.collections[0], ax=axes, shrink=0.85, label=_COLORBAR_LABEL)
    shown = [values, random_values] + ([] if null_values is None else [null_values])
    low, high = offdiag_range(*shown)
    off = ~np.eye(L, dtype=bool)
    names = ["observed", "random Gaussian", "W-null"]
    for ax, matrix, what in zip(zoomed, shown, names, strict=False):
        similarity_heatmap(
            np.where(off, matrix, np.nan), labels=labels, title=f"{what}: off-diagonal scale", annotate=False,
            colorbar=False, vmin=low, vmax=high, ax=ax,
        )  # fmt: skip
    fig.colorbar(
        zoomed[0].collections[0], ax=zoomed, shrink=0.85,
        label=rf"$\varphi$, off-diagonal scale {low:.3g}..{high:.3g}",
    )  # fmt: skip
    heading = f"Layer x layer similarity of conversion matrices: {module}, factor {factor}"
    fig.suptitle(heading if subtitle is None else f"{heading}\n{subtitle}", fontsize=11)
    return fig


def offdiag_range(*matrices: Any) -> tuple[float, float]:
    """``(low, high)``: the smallest and largest finite off-diagonal value over all ``(L, L)`` ``matrices`` together,
    widened to at least 0.01 apart (``(0, 1)`` when none is finite): the fitted colour scale of Figure 1's second
    row."""
    values = []
    for m in matrices:
        array = np.asarray(m, dtype=np.float64)
        off = array[~np.eye(array.shape[0], dtype=bool)]
        values.append(off[np.isfinite(off)])
    finite = np.concatenate(values) if values else np.array([])
    if finite.size == 0:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    if high - low < 0.01:
        middle = (low + high) / 2
        low, high = max(0.0, middle - 0.005), min(1.0, max(middle + 0.005, 0.01))
    return low, high


def per_layer_similarity(
    values: Mapping[str, Sequence[float]],
    *,
    baseline: Mapping[str, float | Sequence[float]] | float | None = None,
    labels: Sequence[Any] | None = None,
    title: str | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Per-layer phi as lines (one per series, e.g. A, B, BA of Table 3), random baselines dashed.

    Parameters
    ----------
    values : mapping
        Series name -> ``L`` values in [0, 1].
    baseline : float, or mapping of series name -> float or ``L`` values, optional
        Random baseline(s), drawn dashed in the series' colour (a float: one grey line).
    labels : sequence, optional
        ``L`` x tick labels; default ``1..L``.
    """
    if not values:
        raise LoralensError("per_layer_similarity needs at least one series of values")
    series = {name: _vector(v, name) for name, v in values.items()}
    L = len(next(iter(series.values())))
    if any(len(v) != L for v in series.values()):
        raise ShapeError(f"all series need the same number of layers; got { ({k: len(v) for k, v in series.items()}) }")
    ticks = _labels(labels, L)
    if ax is None:
        ax = Figure(figsize=(max(5.0, 0.4 * L + 2.5), 3.6), layout="constrained").add_subplot()
    colours = [COLORBLIND[k % len(COLORBLIND)] for k in range(len(series))]
    x = np.arange(1, L + 1)
    for k, ((name, v), colour) in enumerate(zip(series.items(), colours, strict=True)):
        # later series drawn thinner on top, so equal values (phi_left(BA) = phi_left(B)) stay visible
        width = max(1.0, 2.8 - 0.7 * k)
        ax.plot(x, v, marker="osD^v<>p"[k % 8], color=colour, label=name, linewidth=width, markersize=2.5 * width + 2)
        ref = baseline.get(name) if isinstance(baseline, Mapping) else None
        if ref is not None:
            # np.isscalar narrows ref to a union float() is not typed for (complex, str, ...); here ref is a number
            ref_values = (
                np.full(L, float(cast(SupportsFloat, ref))) if np.isscalar(ref) else _vector(ref, f"baseline {name}")
            )
            if len(ref_values) != L:
                raise ShapeError(f"baseline {name!r} has {len(ref_values)} values for {L} layers")
            ax.plot(x, ref_values, linestyle="--", color=colour, alpha=0.8, label=f"{name}, random")
    if baseline is not None and not isinstance(baseline, Mapping):
        ax.axhline(float(baseline), linestyle="--", color="0.4", label="random")
    top = max(float(np.nanmax(v)) if np.isfinite(v).any() else 0.0 for v in series.values())
    ax.set_ylim(0.0, min(1.05, max(0.05, 1.25 * top)))
    keep = thin_ticks(L)
    ax.set_xticks(x[keep], [str(ticks[k]) for k in keep])
    ax.set_xlabel("layer")
    ax.set_ylabel(r"$\varphi$")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=2 if len(series) > 2 else 1)
    if title:
        ax.set_title(title, fontsize=10)
    return ax


_COLORBAR_LABEL = r"$\varphi$ (normalized subspace similarity)"


def _w_null_panel(
    ax: Axes,
    observed: Axes,
    null_values: np.ndarray,
    p_values: np.ndarray,
    w_null: Mapping[str, Any],
    labels: Sequence[Any] | None,
    alpha: float,
    convention: str,
) -> None:
    """The W-null's mean phi on ``ax``; dots on the ``observed`` Axes where p > ``alpha`` off the diagonal."""
    draws = w_null.get("draws")
    mean, std = w_null.get("mean_offdiag"), w_null.get("mean_offdiag_std")
    inverse = r"W^{+}" if convention == "lstsq" else r"W^{-1}"
    title = rf"W-null ${inverse}R$, R Gaussian" + (f" ({draws} draws)" if draws else "")
    if isinstance(mean, (int, float)) and isinstance(std, (int, float)):
        title += f"\naverage similarity {mean:.3f} ± {std:.3f}"
    similarity_heatmap(null_values, labels=labels, title=title, colorbar=False, ax=ax)
    L = null_values.shape[0]
    rows, cols = np.nonzero((p_values > alpha) & ~np.eye(L, dtype=bool))
    marker = dict(marker="o", s=max(4.0, min(18.0, 200.0 / L)), facecolors="none", edgecolors="#d55e00")
    observed.scatter(cols + 0.82, rows + 0.18, linewidths=1.0, zorder=3, **marker)
    observed.scatter(
        [], [], linewidths=1.0, label=f"not above the W-null (p > {alpha:g})", **marker
    )  # the legend's entry, also when no cell is marked
    observed.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=8, frameon=False)


def _luminance(rgba: np.ndarray) -> float:
    """WCAG relative luminance of an RGBA colour in [0, 1]."""
    rgb = np.asarray(rgba[:3], dtype=np.float64)
    rgb = np.where(rgb <= 0.03928, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    return float(rgb @ np.array([0.2126, 0.7152, 0.0722]))


def _square(values: Any, name: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ShapeError(f"{name} must be a numeric (L, L) array; got {type(values).__name__}") from e
    if array.ndim != 2 or array.shape[0] != array.shape[1] or array.shape[0] == 0:
        raise ShapeError(f"{name} must be a square (L, L) matrix with L >= 1; got shape {array.shape}")
    _in_unit_interval(array, name)
    return array


def _vector(values: Any, name: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ShapeError(f"series {name!r} must be numeric; got {type(values).__name__}") from e
    if array.ndim != 1 or len(array) == 0:
        raise ShapeError(f"series {name!r} must be one value per layer; got shape {array.shape}")
    _in_unit_interval(array, f"series {name!r}")
    return array


# phi computed in float32 lands up to a few eps32 (1.2e-7) outside [0, 1] (e.g. 1 + 1e-7 on the diagonal)
_PHI_ROUNDING = 1e-5


def _in_unit_interval(array: np.ndarray, name: str) -> None:
    finite = array[np.isfinite(array)]
    if np.isinf(array).any() or (finite.size and (finite.min() < -_PHI_ROUNDING or finite.max() > 1 + _PHI_ROUNDING)):
        raise LoralensError(
            f"{name} must hold phi values in [0, 1] (NaN allowed); got values from {np.nanmin(array):.4g} "
            f"to {np.nanmax(array):.4g}"
        )


def _labels(labels: Sequence[Any] | None, L: int) -> list[Any]:
    if labels is None:
        return list(range(1, L + 1))
    labels = list(labels)
    if len(labels) != L:
        raise ShapeError(f"{len(labels)} labels for {L} layers")
    return labels


def _layer_ticks(ax: Axes, labels: list[Any]) -> None:
    """Every label up to 16 layers, else at most 10 of them, so they never overlap (cells are centred at k + 0.5)."""
    positions = np.array(thin_ticks(len(labels), ANNOTATE_MAX_LAYERS if len(labels) <= ANNOTATE_MAX_LAYERS else 10))
    texts = [str(labels[k]) for k in positions]
    ax.set_xticks(positions + 0.5, texts, rotation=0)
    ax.set_yticks(positions + 0.5, texts, rotation=0)


def _title(title: str | None, average: float | None) -> str:
    lines = [title] if title else []
    if average is not None:
        lines.append("average similarity " + ("n/a" if average != average else f"{average:.3f}"))
    return "\n".join(lines)
