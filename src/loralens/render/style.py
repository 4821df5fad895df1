"""What every loralens figure shares: layer labels and the colour-blind-safe palette."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loralens.errors import ShapeError

__all__ = ["layer_labels", "palette"]


def layer_labels(labels: Sequence[Any] | None, L: int) -> list[Any]:
    """The labels of ``L`` layers: ``labels`` (checked to have ``L`` entries), or ``0 .. L-1`` when None."""
    if labels is None:
        return list(range(L))
    if len(labels) != L:
        raise ShapeError(f"{len(labels)} layer labels for {L} layers")
    return list(labels)


def palette(n: int) -> list[Any]:
    """``n`` colours of matplotlib's colour-blind-safe ``tableau-colorblind10`` style, cycled."""
    colours = ["#006BA4", "#FF800E", "#ABABAB", "#595959", "#5F9ED1", "#C85200", "#898989", "#A2C8EC", "#FFBC79"]
    return [colours[k % len(colours)] for k in range(n)]
