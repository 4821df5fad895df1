"""Tables as strings: Markdown, CSV, LaTeX (booktabs) and HTML from plain lists and dicts (no pandas).

A :class:`Table` is built from plain data by one of the builders (:func:`similarity_summary_table`,
:func:`phi_long_table`, :func:`table3`, :func:`table4`, and for the LoRA paper's analyses :func:`overlap_table`,
:func:`amplification_table`, :func:`spectra_table`) and rendered by :func:`to_markdown`, :func:`to_csv`,
:func:`to_latex` or :func:`to_html`. CSV keeps every number exactly (``csv`` parses it back to the same
values); the other formats round to ``digits``.

Input shapes (all plain JSON-ready data):

- similarity: ``SimilarityReport.to_dict()``, i.e. ``{"modules": {m: {factor: {"phi": [[...]], "mean_offdiag",
  "random_phi", "random_mean_offdiag", "random_expected", "i", "j", ...}}}, "settings": {"layers": {m: [...]}}}``;
- Table 3 (LoRA vs CondLoRA per layer): ``{"modules": {m: {"A": [phi per layer], "B": [...], "BA": [...],
  "layers": [0, 1, ...] (optional), "random": {"A": x or [per layer], ..., "expected": x (optional)}}},
  "settings": {...}}``;
- Table 4 (parameters, speed): ``{"lora": N, "condlora": M, "ratio": x}``, where N and M may also be
  ``{"params": N, "speed": examples_per_s}``, or speeds given as ``"speed": {"lora": s, "condlora": s}``;
- the LoRA paper's analyses (Hu et al. 2022, Sec. 7): ``OverlapReport.to_dict()``, ``AmplificationReport.to_dict()``
  and ``SpectraReport.to_dict()`` of :mod:`loralens.analyses.lowrank` (per module ``"layers"`` and per-layer lists;
  null where a value is NaN).

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

from loralens.analyses.serialize import layer_span
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
    "table2",
    "table2_status_table",
    "table3",
    "table3_over_pairs",
    "table4",
    "overlap_table",
    "amplification_table",
    "spectra_table",
    "numeric_columns",
    "format_cell",
    "LAYERS_NUMBERED",
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
    numeric = numeric_columns(table)
    cells = [[format_cell(c, digits).replace("|", r"\|") for c in row] for row in table.rows]
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
    numeric = numeric_columns(table)
    spec = "".join("r" if n else "l" for n in numeric)
    body = [
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(_latex_escape(c) for c in table.columns) + r" \\",
        r"\midrule",
        *[" & ".join(_latex_escape(format_cell(c, digits)) for c in row) + r" \\" for row in table.rows],
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
    numeric = numeric_columns(table)
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
                f"<td{align(n)}>{html.escape(format_cell(c, digits))}</td>" for c, n in zip(row, numeric, strict=True)
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
                    *_w_null_cells(s.get("w_null")),
                )
            )
    return Table(
        (
            "module",
            "factor",
            "layers",
            "i",
            "j",
            "average similarity",
            "random (one draw)",
            "random E = max(i,j)/d",
            "W-null",
            "share of excess",
        ),
        tuple(rows),
        "Layer x layer similarity of conversion matrices (mean off-diagonal phi)",
        (
            "Random: Gaussian matrices of the same shape; E = max(i, j) / d is the exact expectation.",
            "W-null: W^-1 R (W^+ R where W is not square) with R Gaussian of the factor's shape, solved like the "
            "adapter's factors; its mean "
            "off-diagonal phi +- the std over draws. Share of excess: (W-null - random) / (average - random), "
            "how much of the excess over the Gaussian baseline W alone already gives.",
        ),
    )


def _w_null_cells(w_null: Any) -> tuple[Cell, Cell]:
    """``("0.0572 +- 0.0027", share)`` from a factor's ``"w_null"`` object; None (n/a) without one."""
    if not isinstance(w_null, Mapping):
        return None, None
    mean, std = w_null.get("mean_offdiag"), w_null.get("mean_offdiag_std")
    cell = None if mean is None or std is None else f"{mean:.4f} +- {std:.4f}"
    return cell, w_null.get("share_of_excess")


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
    ``analyses.condlora_vs_lora`` gives it) becomes its own ``<factor> (random)`` row; a scalar one goes in a ``random``
    column. Per-factor means (``mean[f]``, ``random["mean"][f]``), when the data has them, fill a ``mean``
    column; ``random["expected"]`` (a number or one per factor) and ``settings`` i, j, seed go into the notes.
    A W-conditioned null (``w_null[f]`` with ``mean_over_layers`` and ``mean_over_layers_std``, as
    ``ComparisonReport.to_dict()`` gives it) fills a ``W-null`` column (mean over layers ± std over draws) on each
    factor's row.
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
    has_null = any(isinstance(e[1].get("w_null"), Mapping) for e in entries)
    columns = ("module", "factor", *[str(k) for k in labels], *(("mean",) if has_mean else ()))
    columns += ("random",) if has_scalar else ()
    columns += ("W-null",) if has_null else ()
    rows: list[tuple[Cell, ...]] = []
    notes = []
    for module, d, factors, random, _ in entries:
        means, random_means = _submapping(d, "mean"), _submapping(random, "mean")
        nulls = _submapping(d, "w_null")
        for f in factors:
            ref: Any = random.get(f)  # JSON data: None, a number or a list of per-layer values
            per_layer = ref is not None and not isinstance(ref, (int, float))
            row: list[Cell] = [module, f, *[_number(v) for v in d[f]]]
            row += [_number(means.get(f))] if has_mean else []
            row += [None if per_layer or ref is None else float(ref)] if has_scalar else []
            row += [_mean_std(nulls.get(f), "mean_over_layers", "mean_over_layers_std")] if has_null else []
            rows.append(tuple(row))
            if per_layer:
                if len(ref) != len(labels):
                    raise LoralensError(f"table 3 data for module {module!r}: random {f!r} has {len(ref)} values")
                row = [module, f"{f} (random)", *[_number(v) for v in ref]]
                row += [_number(random_means.get(f))] if has_mean else []
                row += [None] if has_scalar else []
                row += [None] if has_null else []
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
    if has_null:
        notes.append(
            "W-null: theta replaced by Gaussian matrices R of its shape (phi(A_l, R_A W_l^T), phi(B_l, W_l R_B^T), "
            f"BA from those factors), mean over layers ± std over {settings.get('null_draws', 'the')} draws."
        )
    return Table(columns, tuple(rows), "phi(LoRA, CondLoRA) per layer (Table 3)", tuple(notes))


def table4(data: Mapping[str, Any]) -> Table:
    """The paper's Table 4: trainable parameters (and training speed when given) of LoRA and CondLoRA.

    When ``data`` lists ``not_square`` targets (``ParameterCounts.to_dict()``), a note says they are left out of
    the CondLoRA count (CondLoRA is undefined for non-square weights) and that the ratio covers the square targets."""
    speed_data = data.get("speed")
    speeds: Mapping[str, Any] = speed_data if isinstance(speed_data, Mapping) else {}
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
    not_square = [str(t) for t in data.get("not_square") or ()]
    if data.get("ratio") is not None:
        over = " over the square targets only" if not_square else ""
        notes.append(f"CondLoRA / LoRA parameters = {float(data['ratio']):.4f}{over}")
    if not_square:
        notes.append(
            f"Not square, so no CondLoRA (it is undefined there), left out of the CondLoRA count: "
            f"{', '.join(not_square)}; LoRA counts them."
        )
    return Table(
        columns, tuple(r if has_speed else r[:2] for r in rows), "Trainable parameters (Table 4)", tuple(notes)
    )


def table2(summary: Mapping[str, Any], digits: int = 4) -> Table:
    """The paper's Table 2 from :func:`loralens.analyses.seeds.compare_seeds`: per task the held-out score as
    mean ± sample std over seeds for LoRA and CondLoRA, their average over tasks, adapter parameters, and a last
    row with the paired t-test of CondLoRA against LoRA; the per-seed scores and settings as notes."""
    tasks = _submapping(summary, "tasks")
    if not tasks:
        raise LoralensError("table 2 data has no tasks; pass loralens.analyses.seeds.compare_seeds(...)")
    average = _submapping(summary, "average")
    columns = ("method", *(f"{task} ({_mapping(t, task)['metric']})" for task, t in tasks.items()), "Avg.", "params")
    rows: list[tuple[Cell, ...]] = []
    for key, name in _METHODS.items():
        cells: list[Cell] = []
        for t in tasks.values():
            mean, std = t["mean"][key], t["std"][key]
            cells.append(f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}"))
        params = next(iter(tasks.values()))["trainable_params"][key]
        avg = _number(average.get(key))
        rows.append((name, *cells, "" if avg is None else f"{avg:.{digits}f}", None if params is None else int(params)))
    tests: list[Cell] = []
    for t in tasks.values():
        test = t["paired_t"]
        tests.append("n/a" if test["p_value"] is None else f"t = {test['statistic']:.2f}, p = {test['p_value']:.3f}")
    rows.append(("paired t-test (CondLoRA − LoRA)", *tests, "", ""))
    notes = []
    for task, t in tasks.items():
        seeds = ", ".join(map(str, t["seeds"]))
        per_seed = "; ".join(f"{_METHODS[k]} " + ", ".join(f"{v:.{digits}f}" for v in t["scores"][k]) for k in _METHODS)
        settings = t.get("settings", {})
        shown = ", ".join(f"{k} {settings[k]}" for k in ("steps", "lr", "batch_size", "max_length") if k in settings)
        notes.append(f"{task}: seeds {seeds} ({per_seed}); {shown}.")
    notes.append("Mean ± sample standard deviation over seeds; the t-test pairs the runs by seed (two-sided).")
    return Table(columns, tuple(rows), "Held-out scores over seeds (Table 2)", tuple(notes))


def table2_status_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    """Where a Table 2 reproduction stands, from :func:`loralens.training.table2.table2_status`: a row per run in
    training order with its state, rate, best dev and test score, and how far a search or a run cut short got."""
    shown: list[tuple[Cell, ...]] = []
    for r in rows:
        progress = []
        if "n_trials" in r and r["state"] != "done":
            progress.append(f"{r['trials']} of {r['n_trials']} trials finished")
        if r.get("step") is not None:
            trial = f"trial at lr {r['step_lr']:.3g}: " if r["state"] == "searching" else ""
            progress.append(f"{trial}last saved at step {r['step']} of {r['steps']}")
        lr = r.get("lr")
        cells = (r["task"], _METHODS[r["method"]], r["seed"], r["state"], "" if lr is None else f"{lr:.3g}")
        scores = tuple("" if r.get(k) is None else f"{r[k]:.4f}" for k in ("dev", "test"))  # blank: not yet
        shown.append((*cells, *scores, "; ".join(progress)))
    notes = (
        "Runs train in this order. lr and dev of a search: its best trial so far. A run stopped resumes after its "
        "last saved step; rerun the reproduction to go on.",
    )
    columns = ("task", "method", "seed", "state", "lr", "dev", "test", "progress")
    return Table(columns, tuple(shown), "Table 2 reproduction: where it stands", notes)


def table3_over_pairs(data: Mapping[str, Any], digits: int = 4) -> Table:
    """Table 3 over several LoRA/CondLoRA pairs (e.g. training seeds), from
    :func:`~loralens.analyses.condlora_vs_lora.comparisons_to_dict`:
    per module and factor the mean phi over layers of each pair,
    their mean ± sample std over pairs, and the mean random baseline; with the W-conditioned null (``w_null`` in
    the summary), a ``W-null`` column: its mean over layers averaged over pairs ± the pairs' mean std over draws."""
    summary = _submapping(data, "summary")
    pairs = data.get("pairs") or []
    if not summary or not pairs:
        raise LoralensError("table 3 over pairs needs 'pairs' and 'summary'; pass compare.comparisons_to_dict(...)")
    factor_names = {**{f: f for f in _FACTORS}, "conv_A": "W^-1 A^T vs theta_A^T", "conv_B": "W^-1 B vs theta_B^T"}
    columns = ("module", "factor", *(f"pair {k + 1}" for k in range(len(pairs))), "mean ± std", "random")
    has_null = any(
        isinstance(s, Mapping) and s.get("w_null") is not None
        for factors in summary.values()
        if isinstance(factors, Mapping)
        for s in factors.values()
    )
    columns += ("W-null",) if has_null else ()
    rows = []
    for module, factors in summary.items():
        for factor, s in _mapping(factors, module).items():
            row: tuple[Cell, ...] = (
                module,
                factor_names.get(factor, factor),
                *(_number(v) for v in s["per_pair"]),
                f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}",
                _number(s.get("random")),
            )
            if has_null:
                w, spread = s.get("w_null"), _pairs_null_std(pairs, module, factor)
                cell = None if w is None else f"{w:.{digits}f}"
                row += (cell if cell is None or spread is None else f"{cell} ± {spread:.{digits}f}",)
            rows.append(row)
    notes = tuple(
        f"pair {k + 1}: LoRA {p['settings'].get('lora')}, CondLoRA {p['settings'].get('condlora')}"
        for k, p in enumerate(pairs)
    )
    title = "phi(LoRA, CondLoRA), mean over layers, per pair (Table 3 over seeds)"
    notes += ("A on right, B and BA on left singular vectors; i = j = r.",)
    if has_null:
        notes += (
            "W-null: theta replaced by Gaussians R (A, B, BA), or for the conversion matrices the LoRA factor by "
            "W_l^-1 R; its mean over layers, averaged over pairs ± the pairs' mean std over draws.",
        )
    return Table(columns, tuple(rows), title, notes)


def _mean_std(data: Any, mean_key: str, std_key: str, digits: int = 4) -> Cell:
    """``"0.0207 ± 0.0013"`` from ``data[mean_key]`` and ``data[std_key]``; None when either is missing."""
    if not isinstance(data, Mapping) or data.get(mean_key) is None or data.get(std_key) is None:
        return None
    return f"{data[mean_key]:.{digits}f} ± {data[std_key]:.{digits}f}"


def _pairs_null_std(pairs: Sequence[Any], module: str, factor: str) -> float | None:
    """Mean over pairs of the W-null's std over draws (of its mean over layers) for ``factor`` of the summary
    (``A``, ``B``, ``BA`` or ``conv_A``, ``conv_B``); None when a pair lacks it."""
    stds = []
    for p in pairs:
        entry = p.get("modules", {}).get(module, {}) if isinstance(p, Mapping) else {}
        block = entry.get("conv_vs_theta", {}).get("w_null") if factor.startswith("conv_") else entry.get("w_null")
        w = block.get(factor.removeprefix("conv_")) if isinstance(block, Mapping) else None
        if not isinstance(w, Mapping) or w.get("mean_over_layers_std") is None:
            return None
        stds.append(float(w["mean_over_layers_std"]))
    return sum(stds) / len(stds) if stds else None


# ------------------------------------------------------------------ the LoRA paper's analyses (Hu et al. 2022)

#: How tables number layers for people (the JSON keeps the checkpoint index); the terminal says it too.
LAYERS_NUMBERED = "Layers numbered from 1 (checkpoint layer index + 1)"
_LAYERS_NOTE = f"{LAYERS_NUMBERED}."


def overlap_table(data: Mapping[str, Any]) -> Table:
    """Subspace overlap of two adapters (LoRA paper, Figures 3 and 4), one row per module, factor and layer.

    ``data`` is ``OverlapReport.to_dict()``. Columns: the grid's extent ``r1,r2`` at that layer (each layer's
    rank unless ``i``, ``j`` were given), ``phi(1,1)`` (the top directions), ``phi(k,k)`` with ``k = min(r1, r2)``,
    ``phi(r1,r2)`` (the whole subspaces) and the random expectation ``phi(k, k) = k / d``.
    """
    rows: list[tuple[Cell, ...]] = []
    for module, mo in _lowrank_modules(data, "overlap").items():
        where = f"overlap data['modules'][{module!r}]"
        _require(mo, ("layers", "factors"), where)
        labels = _layer_labels(mo["layers"], len(mo["layers"]))
        for factor, fo in _mapping(mo["factors"], f"{where}['factors']").items():
            _require(fo, ("grid", "random_expected"), f"{where}['factors'][{factor!r}]")
            if len(fo["grid"]) != len(labels):
                raise LoralensError(f"{where}: factor {factor!r} has {len(fo['grid'])} grids for {len(labels)} layers")
            for label, grid in zip(labels, fo["grid"], strict=True):
                r1 = sum(any(v is not None for v in row) for row in grid)
                r2 = sum(any(row[c] is not None for row in grid) for c in range(len(grid[0]) if grid else 0))
                k = min(r1, r2)
                if k == 0:
                    raise LoralensError(f"{where}: factor {factor!r}, layer {label} has an empty grid")
                rows.append(
                    (
                        module,
                        factor,
                        label,
                        f"{r1},{r2}",
                        _number(grid[0][0]),
                        _number(grid[k - 1][k - 1]),
                        _number(grid[r1 - 1][r2 - 1]),
                        _number(fo["random_expected"][k - 1][k - 1]),
                    )
                )
    return Table(
        ("module", "factor", "layer", "r1,r2", "phi(1,1)", "phi(k,k)", "phi(r1,r2)", "random(k,k)"),
        tuple(rows),
        "Subspace overlap phi(i, j) of two adapters (A: right, B: left singular vectors; k = min(r1, r2); "
        "random: E[phi(k, k)] = k / d)",
        (_LAYERS_NOTE,),
    )


_AMPLIFICATION_COLUMNS = {
    "|W|": "W_norm",
    "|dW|": "dW_norm",
    "dW": "dW_projection",
    "W top-r": "W_top_projection",
    "random": "random_projection_mean",
    "rand. E": "random_expected",
    "ampl.": "amplification",
}


def amplification_table(data: Mapping[str, Any]) -> Table:
    """How dW relates to W (LoRA paper, Table 7), one row per module and layer.

    ``data`` is ``AmplificationReport.to_dict()``. Columns: rank, ``||W||_F``, ``||dW||_F``, ``||U^T W V||_F`` for
    dW's, W's top-r and random r-dimensional subspaces (the mean of the draws; n/a without draws), the random
    expectation ``r ||W||_F / sqrt(d_out d_in)`` and the amplification factor ``||dW||_F / ||U^T W V||_F``.
    """
    rows: list[tuple[Cell, ...]] = []
    for module, ma in _lowrank_modules(data, "amplification").items():
        where = f"amplification data['modules'][{module!r}]"
        _require(ma, ("layers", "ranks", *_AMPLIFICATION_COLUMNS.values()), where)
        labels = _layer_labels(ma["layers"], len(ma["layers"]))
        for n, label in enumerate(labels):
            values = [_number(_at(ma, key, n, where)) for key in _AMPLIFICATION_COLUMNS.values()]
            rows.append((module, label, int(_at(ma, "ranks", n, where)), *values))
    return Table(
        ("module", "layer", "r", *_AMPLIFICATION_COLUMNS),
        tuple(rows),
        "||U^T W V||_F for dW's, W's top-r and random r-dim subspaces (mean of the draws; E: r |W| / sqrt(d_out "
        "d_in)); amplification = |dW| / dW (Hu et al. 2022, Table 7; |.| = Frobenius norm)",
        (_LAYERS_NOTE,),
    )


#: The health numbers of a spectra row, in column order (absent from spectra data written before them).
_HEALTH_KEYS = ("dominance", "spike_ratio", "stable_rank")


def spectra_table(data: Mapping[str, Any]) -> Table:
    """Spectra of dW = s B A, one row per module and layer.

    ``data`` is ``SpectraReport.to_dict()``. Columns: rank, the largest and the r-th singular value, the entropy
    and energy effective ranks, the principal angles between col(dW) and W's top-r left singular subspace (degrees,
    smallest-largest), their phi (mean cos^2) and its random expectation ``r / d_out``, and the health numbers:
    dominance ``sigma_1(dW) / sigma_1(W)``, spike ratio ``sigma_1 / sigma_2`` (n/a when r = 1 or sigma_2 = 0) and
    stable rank ``||dW||_F^2 / sigma_1^2``. Spectra data written before the health numbers existed has none: its
    table has no health columns.
    """
    threshold = _mapping(data.get("settings"), "spectra data['settings']").get("energy_threshold")
    if not isinstance(threshold, (int, float)):
        raise LoralensError("spectra data['settings'] lacks the energy_threshold (a number)")
    rows: list[tuple[Cell, ...]] = []
    keys = ("layers", "shape", "ranks", "singular_values", "effective_rank_entropy", "effective_rank_energy")
    modules = _lowrank_modules(data, "spectra")
    health = any(isinstance(ms, Mapping) and all(k in ms for k in _HEALTH_KEYS) for ms in modules.values())
    for module, ms in modules.items():
        where = f"spectra data['modules'][{module!r}]"
        _require(ms, (*keys, "principal_angles_deg", "phi_W_top"), where)
        labels = _layer_labels(ms["layers"], len(ms["layers"]))
        for n, label in enumerate(labels):
            r = int(_at(ms, "ranks", n, where))
            sigma = _at(ms, "singular_values", n, where)
            angles = [float(a) for a in _at(ms, "principal_angles_deg", n, where)[:r]]
            energy = _at(ms, "effective_rank_energy", n, where)
            rows.append(
                (
                    module,
                    label,
                    r,
                    _number(sigma[0]),
                    _number(sigma[r - 1]),
                    _number(_at(ms, "effective_rank_entropy", n, where)),
                    None if energy is None else int(energy),
                    f"{min(angles):.0f}-{max(angles):.0f}",
                    _number(_at(ms, "phi_W_top", n, where)),
                    r / int(ms["shape"][0]),
                    *((_number(_at(ms, k, n, where)) if k in ms else None for k in _HEALTH_KEYS) if health else ()),
                )
            )
    cols = ("module", "layer", "r", "sigma_1", "sigma_r", "erank H", f"erank {threshold:.0%}", "angles", "phi")
    title = (
        "Spectra of dW: effective ranks (entropy H, energy share); principal angles (degrees, min-max) and phi "
        "between col(dW) and W's top-r left singular subspace (random: E[phi] = r / d_out)"
    )
    if health:
        title += (
            "; dominance = sigma_1(dW) / sigma_1(W), spike = sigma_1 / sigma_2 (n/a when r = 1 or sigma_2 = 0), "
            "stable rank = |dW|_F^2 / sigma_1^2"
        )
    health_cols = ("dominance", "spike", "stable rank") if health else ()
    return Table((*cols, "random", *health_cols), tuple(rows), title, (_LAYERS_NOTE,))


def _lowrank_modules(data: Mapping[str, Any], what: str) -> Mapping[str, Any]:
    """``data["modules"]`` of a ``lowrank_analysis`` report dict, non-empty, or a LoralensError naming ``what``."""
    modules = _mapping(data.get("modules") if isinstance(data, Mapping) else None, f"{what} data['modules']")
    if not modules:
        raise LoralensError(f"{what} data has no modules; pass the report's to_dict() ({what}.json)")
    return modules


def _require(d: Any, keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if not isinstance(d, Mapping) or k not in d]
    if missing:
        raise LoralensError(f"{where} lacks {', '.join(missing)}")


def _at(d: Mapping[str, Any], key: str, n: int, where: str) -> Any:
    """The ``n``-th per-layer value of ``d[key]``, or a LoralensError naming the short list."""
    values = d[key]
    if not isinstance(values, Sequence) or len(values) <= n:
        raise LoralensError(f"{where}[{key!r}] has fewer values than layers ({len(d['layers'])})")
    return values[n]


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
    return layer_span(_layer_labels(layers, L))


def numeric_columns(table: Table) -> list[bool]:
    """Per column: True when every non-empty cell is an int or float (right-aligned by every renderer)."""
    return [
        all(isinstance(row[k], (int, float)) for row in table.rows if row[k] is not None)
        and any(row[k] is not None for row in table.rows)
        for k in range(len(table.columns))
    ]


def format_cell(cell: Cell, digits: int = 3) -> str:
    """A cell as the renderers show it: floats with ``digits`` decimals, ints with thousands separators,
    None and NaN as ``n/a``."""
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
