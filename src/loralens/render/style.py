"""What every loralens figure shares: layer labels, thinned tick positions, the layer colour scale and the
colour-blind-safe palette."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colorbar import Colorbar
from matplotlib.colors import BoundaryNorm, ListedColormap

from loralens.errors import ShapeError

__all__ = ["LEGEND_MAX_LAYERS", "layer_labels", "thin_ticks", "layer_colours", "layer_colorbar", "palette"]

#: Line plots with one line per layer name each layer in a legend up to this many layers, else show a colour bar.
LEGEND_MAX_LAYERS = 8


def layer_labels(labels: Sequence[Any] | None, L: int) -> list[Any]:
    """The labels of ``L`` layers: ``labels`` (checked to have ``L`` entries), or ``0 .. L-1`` when None."""
    if labels is None:
        return list(range(L))
    if len(labels) != L:
        raise ShapeError(f"{len(labels)} layer labels for {L} layers")
    return list(labels)


def thin_ticks(n: int, most: int = 10) -> list[int]:
    """Indices ``0, step, 2 step, ...`` into ``n`` positions, at most ``most`` of them (all when ``n <= most``): the
    ticks of a layer axis whose labels must not overlap (``"1011121314"`` at 30 layers)."""
    step = max(1, math.ceil(n / max(1, most)))
    return list(range(0, n, step))


def layer_colours(L: int, cmap: str = "viridis") -> list[Any]:
    """``L`` colours from early (dark) to late (light) layers: ``cmap`` over 0 .. 0.9 (the light end left out)."""
    colours = colormaps[cmap]
    return [colours(0.9 * n / max(1, L - 1)) for n in range(L)]


def layer_colorbar(ax: Axes, labels: Sequence[Any], cmap: str = "viridis", most: int = 10) -> Colorbar:
    """A discrete colour bar beside ``ax`` naming the layer of each :func:`layer_colours` colour, instead of a
    legend of ``len(labels)`` entries; at most ``most`` labelled ticks."""
    L = len(labels)
    mappable = ScalarMappable(
        norm=BoundaryNorm([k - 0.5 for k in range(L + 1)], L), cmap=ListedColormap(layer_colours(L, cmap))
    )
    bar = ax.figure.colorbar(mappable, ax=ax, pad=0.02, fraction=0.06)
    ticks = thin_ticks(L, most)
    bar.set_ticks(ticks, labels=[str(labels[k]) for k in ticks])
    bar.set_label("layer")
    bar.ax.tick_params(labelsize=7, length=2)
    return bar


def palette(n: int) -> list[Any]:
    """``n`` colours of matplotlib's colour-blind-safe ``tableau-colorblind10`` style, cycled."""
    colours = ["#006BA4", "#FF800E", "#ABABAB", "#595959", "#5F9ED1", "#C85200", "#898989", "#A2C8EC", "#FFBC79"]
    return [colours[k % len(colours)] for k in range(n)]
