"""Tables as strings: Markdown, CSV, LaTeX (booktabs) and HTML from plain lists and dicts (no pandas).

A :class:`Table` is built from plain data by one of the builders (:func:`similarity_summary_table`,
:func:`phi_long_table`, :func:`table3`, :func:`table4`) and rendered by :func:`to_markdown`, :func:`to_csv`,
:func:`to_latex` or :func:`to_html`. CSV keeps every number exactly (``csv`` parses it back to the same
values); the other formats round to ``digits``.

Input shapes (all plain JSON-ready data):

- similarity: ``SimilarityReport.to_dict()``, i.e. ``{"modules": {m: {factor: {"phi": [[...]], "mean_offdiag",
  "random_phi", "random_mean_offdiag", "random_expected", "i", "j", ...}}}, "settings": {"layers": {m: [...]}}}``;
- Table 3 (LoRA vs CondLoRA per layer): ``{"modules": {m: {"A": [phi per layer], "B": [...], "BA": [...],
  "layers": [0, 1, ...] (optional), "random": {"A": x or [per layer], ..., "expected": x (optional)}}},
  "settings": {...}}``;
- Table 4 (parameters, speed): ``{"lora": N, "condlora": M, "ratio": x}``, where N and M may also be
  ``{"params": N, "speed": examples_per_s}``, or speeds given as ``"speed": {"lora": s, "condlora": s}``.

Layers are numbered from 1 as in the paper (checkpoint layer index + 1).
"""

from __future__ import annotations

import csv
import html
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loralens.errors import LoralensError

__all__ = [
    "Cell",
    "Table",
    "to_csv",
    "to_markdown",
    "to_latex",
    "to_html",
    "similarity_summary_table",
    "phi_long_table",
    "table3",
    "table4",
]

Cell = str | int | float | None

_FACTORS = ("A", "B", "BA")
_METHODS = {"lora": "LoRA", "condlora": "CondLoRA"}


@dataclass(frozen=True)
class Table:
    """Column names, rows of cells (str, int, float or None), a title and notes printed under the table."""

    columns: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    title: str = ""
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for k, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise LoralensError(
                    f"table {self.title!r}: row {k} has {len(row)} cells for {len(self.columns)} columns"
                )

    def records(self) -> list[dict[str, Cell]]:
        """Rows as dicts keyed by column name."""
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


# ---------------------------------------------------------------------------------------------- renderers


def to_csv(table: Table) -> str:
    """CSV with a header row; numbers written exactly (``repr``), None as an empty field."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(table.columns)
    writer.writerows([["" if c is None else c for c in row] for row in table.rows])
    return buf.getvalue()


def to_markdown(table: Table, digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table, numbers right-aligned, the title in bold above and notes below."""
    numeric = _numeric_columns(table)
    cells = [[_format(c, digits).replace("|", r"\|") for c in row] for row in table.rows]
    header = [c.replace("|", r"\|") for c in table.columns]
    lines = [f"**{table.title}**", ""] if table.title else []
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    for note in table.notes:  # one paragraph each
        lines += ["", f"_{note}_"]
    return "\n".join(lines) + "\n"


def to_latex(table: Table, digits: int = 3, *, label: str | None = None, float_env: bool = True) -> str:
    """A booktabs ``tabular`` (``\\usepackage{booktabs}``), in a ``table`` float with caption when ``float_env``."""
    numeric = _numeric_columns(table)
    spec = "".join("r" if n else "l" for n in numeric)
    body = [
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(_latex_escape(c) for c in table.columns) + r" \\",
        r"\midrule",
        *[" & ".join(_latex_escape(_format(c, digits)) for c in row) + r" \\" for row in table.rows],
        r"\bottomrule",
        r"\end{tabular}",
    ]
    if not float_env:
        return "\n".join(body) + "\n"
    caption = " ".join([table.title, *table.notes]).strip()
    head = [r"\begin{table}[t]", r"\centering"]
    if caption:
        head.append(rf"\caption{{{_latex_escape(caption)}}}")
    if label:
        head.append(rf"\label{{{label}}}")
    return "\n".join([*head, *body, r"\end{table}"]) + "\n"


def to_html(table: Table, digits: int = 3, *, css_class: str = "numbers") -> str:
    """An HTML ``<table>`` with a caption (the title) and notes in a paragraph after it; all text escaped."""
    numeric = _numeric_columns(table)
    align = lambda n: ' class="num"' if n else ""  # noqa: E731
    parts = [f'<table class="{html.escape(css_class)}">']
    if table.title:
        parts.append(f"<caption>{html.escape(table.title)}</caption>")
    parts.append(
        "<thead><tr>"
        + "".join(f"<th{align(n)}>{html.escape(c)}</th>" for c, n in zip(table.columns, numeric, strict=True))
        + "</tr></thead>"
    )
    parts.append("<tbody>")
    for row in table.rows:
        parts.append(
            "<tr>"
            + "".join(
                f"<td{align(n)}>{html.escape(_format(c, digits))}</td>" for c, n in zip(row, numeric, strict=True)
            )
            + "</tr>"
        )
    parts.append("</tbody></table>")
    if table.notes:
        parts.append('<p class="notes">' + "<br>".join(html.escape(n) for n in table.notes) + "</p>")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------- builders


def similarity_summary_table(similarity: Mapping[str, Any]) -> Table:
    """One row per (module, factor): average similarity (mean off-diagonal phi) beside the random baselines."""
    modules = _mapping(similarity.get("modules"), "similarity['modules']")
    layers = similarity.get("settings", {}).get("layers", {})
    rows = []
    for module, factors in modules.items():
        for factor, s in _mapping(factors, f"similarity['modules'][{module!r}]").items():
            L = len(s["phi"])
            rows.append(
                (
                    module,
                    factor,
                    _layer_span(layers.get(module), L),
                    s.get("i"),
                    s.get("j"),
                    s.get("mean_offdiag"),
                    s.get("random_mean_offdiag"),
                    s.get("random_expected"),
                )
            )
    return Table(
        ("module", "factor", "layers", "i", "j", "average similarity", "random (one draw)", "random E = max(i,j)/d"),
        tuple(rows),
        "Layer x layer similarity of conversion matrices (mean off-diagonal phi)",
        ("Random: Gaussian matrices of the same shape; E = max(i, j) / d is the exact expectation.",),
    )


def phi_long_table(similarity: Mapping[str, Any]) -> Table:
    """Every entry of every phi matrix in long form: module, factor, matrix (conversion|random), row, col, phi."""
    modules = _mapping(similarity.get("modules"), "similarity['modules']")
    layers = similarity.get("settings", {}).get("layers", {})
    rows: list[tuple[Cell, ...]] = []
    for module, factors in modules.items():
        for factor, s in factors.items():
            for kind, key in (("conversion", "phi"), ("random", "random_phi")):
                matrix = s[key]
                labels = _layer_labels(layers.get(module), len(matrix))
                for a, row in zip(labels, matrix, strict=True):
                    rows.extend((module, factor, kind, a, b, v) for b, v in zip(labels, row, strict=True))
    return Table(
        ("module", "factor", "matrix", "row_layer", "col_layer", "phi"),
        tuple(rows),
        "phi matrices (layers numbered from 1)",
    )


def table3(data: Mapping[str, Any]) -> Table:
    """The paper's Table 3: per-layer phi between LoRA's and CondLoRA's A, B and BA, with the random baseline.

    One row per (module, factor), one column per layer. A per-layer random baseline (``random[f]`` a list, as
    ``loralens.compare`` gives it) becomes its own ``<factor> (random)`` row; a scalar one goes in a ``random``
    column. Per-factor means (``mean[f]``, ``random["mean"][f]``), when the data has them, fill a ``mean``
    column; ``random["expected"]`` (a number or one per factor) and ``settings`` i, j, seed go into the notes.
    """
    modules = _mapping(data.get("modules"), "table 3 data['modules']")
    if not modules:
        raise LoralensError("table 3 data has no modules")
    entries = []
    for module, d in modules.items():
        d = _mapping(d, f"table 3 data['modules'][{module!r}]")
        factors = [f for f in _FACTORS if f in d]
        if not factors:
            raise LoralensError(f"table 3 data for module {module!r} has none of A, B, BA")
        L = len(d[factors[0]])
        if any(len(d[f]) != L for f in factors):
            raise LoralensError(f"table 3 data for module {module!r}: factors have different numbers of layers")
        random = d.get("random")
        random = dict(random) if isinstance(random, Mapping) else {f: random for f in factors if random is not None}
        entries.append((module, d, factors, random, _layer_labels(d.get("layers"), L)))
    labels = entries[0][4]
    if any(e[4] != labels for e in entries):
        raise LoralensError("table 3: modules cover different layers; render one table per module")
    has_mean = any(isinstance(e[1].get("mean"), Mapping) for e in entries)
    has_scalar = any(isinstance(e[3].get(f), (int, float)) for e in entries for f in e[2])
    columns = ("module", "factor", *[str(k) for k in labels], *(("mean",) if has_mean else ()))
    columns += ("random",) if has_scalar else ()
    rows: list[tuple[Cell, ...]] = []
    notes = []
    for module, d, factors, random, _ in entries:
        means, random_means = _submapping(d, "mean"), _submapping(random, "mean")
        for f in factors:
            ref = random.get(f)
            per_layer = ref is not None and not isinstance(ref, (int, float))
            row: list[Cell] = [module, f, *[_number(v) for v in d[f]]]
            row += [_number(means.get(f))] if has_mean else []
            row += [None if per_layer or ref is None else float(ref)] if has_scalar else []
            rows.append(tuple(row))
            if per_layer:
                if len(ref) != len(labels):
                    raise LoralensError(f"table 3 data for module {module!r}: random {f!r} has {len(ref)} values")
                row = [module, f"{f} (random)", *[_number(v) for v in ref]]
                row += [_number(random_means.get(f))] if has_mean else []
                row += [None] if has_scalar else []
                rows.append(tuple(row))
        expected = random.get("expected")
        if isinstance(expected, Mapping):
            values = {f: float(v) for f, v in expected.items()}
            text = (
                f"{values[factors[0]]:.4f}"
                if len(set(values.values())) == 1
                else ", ".join(f"{f} {v:.4f}" for f, v in values.items())
            )
            notes.append(f"{module}: random expectation max(i, j) / d = {text}")
        elif expected is not None:
            notes.append(f"{module}: random expectation max(i, j) / d = {float(expected):.4f}")
    settings = data.get("settings") or {}
    detail = ", ".join(f"{k} = {settings[k]}" for k in ("i", "j", "seed") if settings.get(k) is not None)
    if detail:
        notes.append(f"Settings: {detail}.")
    return Table(columns, tuple(rows), "phi(LoRA, CondLoRA) per layer (Table 3)", tuple(notes))


def table4(data: Mapping[str, Any]) -> Table:
    """The paper's Table 4: trainable parameters (and training speed when given) of LoRA and CondLoRA."""
    speeds = data.get("speed") if isinstance(data.get("speed"), Mapping) else {}
    rows = []
    for key, name in _METHODS.items():
        if key not in data:
            raise LoralensError(f"table 4 data needs {key!r} (trainable parameters); got keys {sorted(data)}")
        value = data[key]
        params = value.get("params", value.get("parameters")) if isinstance(value, Mapping) else value
        speed = value.get("speed") if isinstance(value, Mapping) else speeds.get(key)
        rows.append((name, None if params is None else int(params), None if speed is None else float(speed)))
    has_speed = any(r[2] is not None for r in rows)
    columns = ("method", "trainable parameters", *(("speed (examples/s)",) if has_speed else ()))
    notes = [str(data["speed_source"])] if has_speed and data.get("speed_source") else []
    if data.get("ratio") is not None:
        notes.append(f"CondLoRA / LoRA parameters = {float(data['ratio']):.4f}")
    return Table(
        columns, tuple(r if has_speed else r[:2] for r in rows), "Trainable parameters (Table 4)", tuple(notes)
    )


# ---------------------------------------------------------------------------------------------- helpers


def _mapping(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise LoralensError(f"{what} must be a mapping; got {type(value).__name__}")
    return value


def _submapping(d: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = d.get(key)
    return value if isinstance(value, Mapping) else {}


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def _layer_labels(layers: Sequence[int] | None, L: int) -> list[int]:
    """Checkpoint layer indices -> 1-based labels; ``1..L`` when unknown."""
    if layers is None:
        return list(range(1, L + 1))
    if len(layers) != L:
        raise LoralensError(f"{len(layers)} layer numbers for {L} values")
    return [int(k) + 1 for k in layers]


def _layer_span(layers: Sequence[int] | None, L: int) -> str:
    labels = _layer_labels(layers, L)
    contiguous = labels == list(range(labels[0], labels[0] + L))
    return f"{labels[0]}-{labels[-1]}" if contiguous and L > 1 else ",".join(map(str, labels))


def _numeric_columns(table: Table) -> list[bool]:
    """A column is numeric when every non-empty cell is an int or float."""
    return [
        all(isinstance(row[k], (int, float)) for row in table.rows if row[k] is not None)
        and any(row[k] is not None for row in table.rows)
        for k in range(len(table.columns))
    ]


def _format(cell: Cell, digits: int) -> str:
    if cell is None:
        return "n/a"
    if isinstance(cell, bool):
        return str(cell)
    if isinstance(cell, int):
        return f"{cell:,}"
    if isinstance(cell, float):
        return "n/a" if math.isnan(cell) else f"{cell:.{digits}f}"
    return str(cell)


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)
