"""Figures and a self-contained HTML report from analysis results: the level above :mod:`loralens.render`.

:func:`figure_files` renders Figure 1 (per module and factor, the layer x layer phi heatmap beside its random
baseline) as PNG and SVG; :func:`report_files` adds CSV/Markdown/LaTeX tables and ``report.html``, one file
that embeds every picture (base64 PNG) and opens offline. Both return ``{file name: writer}`` for
:func:`loralens.io.outputs.write_outputs`, which writes them atomically; nothing here prints.

Inputs are plain data: ``SimilarityReport.to_dict()``, the dict of :func:`input_identities`, and optionally
Table 3 / Table 4 data (see :mod:`loralens.render.tables`) and the LoRA paper's analyses (Hu et al. 2022, Sec. 7:
the ``to_dict()`` of :mod:`loralens.analyses.lowrank` reports), drawn by :func:`overlap_picture`,
:func:`amplification_picture` and :func:`spectra_picture`. Figures are drawn on
:class:`matplotlib.figure.Figure` objects rendered by the non-interactive Agg (PNG) and SVG canvases, so no
display and no global backend setting is needed.
"""

from __future__ import annotations

import base64
import copy
import html
import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import loralens
from loralens.analyses.conversion import CONVENTIONS
from loralens.analyses.lowrank import DEFINITIONS
from loralens.analyses.provenance import file_record, provenance
from loralens.errors import LoralensError
from loralens.io.adapters import LoraAdapter
from loralens.io.base_weights import BaseCheckpoint
from loralens.io.condlora import CondLoraAdapter
from loralens.io.outputs import Writer, bytes_writer, json_text
from loralens.render import tables
from loralens.render.intruders import intruders_figure, intruders_table
from loralens.render.lowrank import amplification_figure, overlap_figure, spectra_figure
from loralens.render.similarity import factor_label, per_layer_similarity, similarity_figure

__all__ = [
    "DPI",
    "LOWRANK_ANALYSES",
    "Picture",
    "input_identities",
    "render_figure",
    "figure1_pictures",
    "figure_files",
    "overlap_picture",
    "overlap_pictures",
    "intruders_picture",
    "VERDICT_STD",
    "COLLAPSE_ROWS",
    "amplification_picture",
    "spectra_picture",
    "report_files",
]

#: Resolution of the PNG files and of the pictures embedded in the report.
DPI = 150
#: The summary's rule: an average similarity is "above the W-null" when it exceeds the null's mean by more than this
#: many of the null's standard deviations over draws (observed > mean + 2 std), else "within the W-null".
VERDICT_STD = 2.0
#: Tables of more rows than this are folded into ``<details>`` with a one-line summary.
COLLAPSE_ROWS = 30


@dataclass(frozen=True)
class Picture:
    """A rendered figure: file stem, caption, PNG and SVG bytes."""

    stem: str
    caption: str
    png: bytes
    svg: bytes


def input_identities(
    base: BaseCheckpoint,
    adapter: LoraAdapter,
    condlora: CondLoraAdapter | None = None,
    *,
    recorded: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What the numbers come from: :func:`loralens.analyses.provenance.provenance` (paths, SHA-256 of the input files,
    versions) plus both configs in full (``adapter_config.json``, the base's ``config.json``), and the same for
    a CondLoRA adapter when given. ``recorded``: that provenance of ``base`` and ``adapter`` when an analysis has
    recorded it already (``settings["inputs"]``), so that the files are not hashed again; it is copied, not changed.
    """
    inputs = copy.deepcopy(dict(recorded)) if recorded is not None else provenance(base, adapter)
    inputs["adapter"]["config"] = adapter.config
    inputs["base"]["config"] = base.config
    if condlora is not None:
        inputs["condlora"] = {
            "path": str(condlora.path),
            "files": [file_record(p) for p in (condlora.path / "adapter_config.json", condlora.weights_file)],
            "r": condlora.r,
            "lora_alpha": condlora.lora_alpha,
            "targets": sorted(condlora.thetas),
            "config": condlora.config,
        }
    return inputs


def render_figure(fig: Figure, dpi: int = DPI) -> tuple[bytes, bytes]:
    """PNG (``dpi``) and SVG bytes of ``fig``, rendered without any interactive backend."""
    FigureCanvasAgg(fig)  # Agg for PNG; savefig switches to the SVG canvas for format="svg" by itself
    png, svg = io.BytesIO(), io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": "loralens"}):  # stable element ids: identical runs, identical files
        fig.savefig(png, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
        fig.savefig(svg, format="svg", bbox_inches="tight", facecolor="white", metadata={"Date": None})
    return png.getvalue(), svg.getvalue()


def figure1_pictures(similarity: Mapping[str, Any], dpi: int = DPI) -> list[Picture]:
    """Figure 1 for every module and factor of ``similarity`` (``SimilarityReport.to_dict()``)."""
    _check_similarity(similarity)
    settings = similarity.get("settings", {})
    pictures = []
    for module, factors in similarity["modules"].items():
        layers = settings.get("layers", {}).get(module)
        labels = None if layers is None else [k + 1 for k in layers]
        for factor, s in factors.items():
            side = settings.get("side", "left")
            fig = similarity_figure(
                s["phi"],
                s["random_phi"],
                module=module,
                factor=factor,
                average=_nan(s["mean_offdiag"]),
                random_average=_nan(s["random_mean_offdiag"]),
                random_expected=s["random_expected"],
                labels=labels,
                subtitle=f"i = {s['i']}, j = {s['j']}, {side} singular vectors, d = {s['dim']}",
                w_null=s.get("w_null"),
                convention=settings.get("conventions", {}).get(module, "solve"),
            )
            png, svg = render_figure(fig, dpi)
            caption = (
                f"{module}, factor {factor}: phi between the conversion matrices of every pair of layers (left) "
                f"and between random Gaussian matrices of the same shape (middle), on one 0..1 colour scale; "
                f"the second row draws the same panels on one colour scale fitted to their off-diagonal values "
                f"together (diagonal blank), where small differences show. "
                f"Average similarity (mean off-diagonal) {_fmt(s['mean_offdiag'])} vs "
                f"{_fmt(s['random_mean_offdiag'])} random (expected {s['random_expected']:.4f})."
            )
            w_null = s.get("w_null")
            if w_null:
                caption += (
                    f" Right: the W-conditioned null W_l^-1 R_l (R Gaussian, {w_null['draws']} draws), mean phi; its "
                    f"average {_fmt(w_null['mean_offdiag'])} +- {_fmt(w_null['mean_offdiag_std'])}: that much of the "
                    "similarity any adapter would show on this base. Ringed cells are not above the W-null (p > 0.05)."
                )
            else:
                caption = caption.replace("(middle)", "(right)")
            pictures.append(Picture(_figure1_stem(module, factor), caption, png, svg))
    return pictures


def figure_files(similarity: Mapping[str, Any], dpi: int = DPI) -> dict[str, Writer]:
    """Figure 1 as ``figure1_<module>_<factor>.png`` and ``.svg``, plus every phi value in ``phi_matrices.csv``."""
    return {
        **_picture_files(figure1_pictures(similarity, dpi)),
        "phi_matrices.csv": _text_writer(tables.to_csv(tables.phi_long_table(similarity))),
    }


# ------------------------------------------------------------------ the LoRA paper's analyses (Hu et al. 2022)


def overlap_picture(data: Mapping[str, Any], dpi: int = DPI) -> Picture:
    """The phi(i, j) grids of two adapters (LoRA paper, Figures 3 and 4) from ``OverlapReport.to_dict()``: one row
    of heatmaps per module and factor, one column per layer; stem ``overlap``."""
    modules = _lowrank_modules(data, "overlap", ("layers", "ranks", "factors"))
    for name, mo in modules.items():
        for f, fo in mo["factors"].items():
            if not isinstance(fo, Mapping) or "grid" not in fo or "side" not in fo:
                raise LoralensError(f"overlap data: module {name!r}, factor {f!r} lacks its grid or side")
    grids = {
        f"{name}, {f} ({fo['side']})": fo["grid"] for name, mo in modules.items() for f, fo in mo["factors"].items()
    }
    r1, r2 = (sorted({r for mo in modules.values() for r in mo["ranks"][k]}) for k in (0, 1))
    fig = overlap_figure(
        grids,
        labels=_layer_numbers(next(iter(modules.values()))["layers"]),
        i_label=f"i (first, r={','.join(map(str, r1))})",
        j_label=f"j (second, r={','.join(map(str, r2))})",
        title=r"Subspace overlap $\varphi(i, j)$ of two adapters (Hu et al. 2022, Fig. 3)",
    )
    adapters = data.get("adapters")
    first, second = (
        (Path(str(a)).name for a in adapters) if isinstance(adapters, Sequence) and len(adapters) == 2 else ("?", "?")
    )
    caption = (
        f"Do two adapters of one base learn the same directions? For each module, factor and layer, the grid "
        f"shows phi(i, j): how much of the top-i singular directions of the first adapter ({first}) lie in the "
        f"span of the top-j of the second ({second}), from 0 (orthogonal) to 1 (one contains the other). A bright "
        f"top-left corner means the two agree on their most important directions; random subspaces would give only "
        f"max(i, j) / d. Definition: {DEFINITIONS['overlap']}."
    )
    return _picture("overlap", caption, fig, dpi)


def overlap_pictures(data: Mapping[str, Any], dpi: int = DPI) -> list[Picture]:
    """:func:`overlap_picture` once per module (stems ``overlap_<module>``): each small enough to read unshrunk in
    the report, where one picture of every module and layer would be several thousand pixels wide."""
    modules = _lowrank_modules(data, "overlap", ("layers", "ranks", "factors"))
    pictures = []
    for name, mo in modules.items():
        one = overlap_picture({**data, "modules": {name: mo}}, dpi)
        pictures.append(Picture(f"overlap_{_safe(name)}", f"{name}: {one.caption}", one.png, one.svg))
    return pictures


def intruders_picture(data: Mapping[str, Any], dpi: int = DPI) -> Picture:
    """Intruder dimensions (Shuttleworth et al. 2024) from ``IntrudersReport.to_dict()``: per module and layer the
    intruders among the top-k directions, beside their count against epsilon; stem ``intruders``."""
    modules = _lowrank_modules(data, "intruders", ("layers", "count", "max_cos", "epsilon_sweep"))
    settings = data.get("settings") or {}
    fig = intruders_figure(data, title="Intruder dimensions of W0 + s B A (Shuttleworth et al. 2024)")
    caption = (
        f"Does the update bring in directions the base does not have? Left: per module ({len(modules)}) and layer, "
        f"how many of the top-{settings.get('k')} singular directions of W0 + s B A have no base singular direction "
        f"with |cos| >= {settings.get('epsilon')} (intruders). Right: intruders summed over layers against that "
        f"threshold. Definition: {data.get('definition', '')}"
    )
    return _picture("intruders", caption, fig, dpi)


def amplification_picture(data: Mapping[str, Any], dpi: int = DPI) -> Picture:
    """How dW relates to W (LoRA paper, Table 7) from ``AmplificationReport.to_dict()``: per module, the projections
    ``||U^T W V||_F`` per layer as bars beside the amplification factor; stem ``amplification``."""
    fields = ("layers", "dW_projection", "W_top_projection", "random_projection_mean", "amplification")
    modules = _lowrank_modules(data, "amplification", fields)
    projections = {}
    for name, ma in modules.items():
        draws = len((ma.get("random_projection_draws") or [[]])[0])
        projections[name] = {
            r"$\Delta W$ subspaces": ma["dW_projection"],
            "W top-r": ma["W_top_projection"],
            **({f"random (mean of {draws})": ma["random_projection_mean"]} if draws else {}),
        }
    fig = amplification_figure(
        projections,
        {name: ma["amplification"] for name, ma in modules.items()},
        labels={name: _layer_numbers(ma["layers"]) for name, ma in modules.items()},
        title=r"$\|U^\top W V\|_F$ and amplification $\|\Delta W\|_F / \|U^\top W V\|_F$ (Hu et al. 2022, Table 7)",
    )
    caption = (
        "Does each layer's update dW amplify directions that W already emphasises? Left: how large W is inside "
        "dW's own r-dimensional singular subspaces, beside W's top-r singular subspaces (the most W can have in r "
        "dimensions) and random subspaces (log scale). Right: the amplification factor ||dW||_F / ||U^T W V||_F. "
        "A projection far below W's top-r and near random, with a large factor, means dW amplifies directions "
        f"that W does not emphasise, as Hu et al. found. Definition: {DEFINITIONS['amplification']}."
    )
    return _picture("amplification", caption, fig, dpi)


def spectra_picture(data: Mapping[str, Any], dpi: int = DPI) -> Picture:
    """Spectra of dW from ``SpectraReport.to_dict()``: per module, dW's singular values, its principal angles to
    W's top-r left singular subspace and its effective ranks, one line per layer; stem ``spectra``."""
    fields = ("layers", "ranks", "singular_values", "principal_angles_deg")
    modules = _lowrank_modules(data, "spectra", (*fields, "effective_rank_entropy", "effective_rank_energy"))
    threshold = (data.get("settings") or {}).get("energy_threshold")
    if not isinstance(threshold, (int, float)):
        raise LoralensError("spectra data['settings'] lacks the energy_threshold (a number)")
    fig = spectra_figure(
        {name: ms["singular_values"] for name, ms in modules.items()},
        {name: ms["principal_angles_deg"] for name, ms in modules.items()},
        {
            name: {"entropy": ms["effective_rank_entropy"], f"energy {threshold:.0%}": ms["effective_rank_energy"]}
            for name, ms in modules.items()
        },
        ranks={name: ms["ranks"] for name, ms in modules.items()},
        labels={name: _layer_numbers(ms["layers"]) for name, ms in modules.items()},
        title="Spectra of dW and its column space against W's top-r left singular subspace",
    )
    caption = (
        "How many directions does each layer's update dW = s B A really use, and where do they point? Left: dW's "
        "singular values, one line per layer (log scale). Middle: the principal angles between dW's column space "
        "and W's top-r left singular subspace (0 degrees: inside it, 90: orthogonal to it). Right: dW's effective "
        f"ranks (entropy, and the fewest directions holding {threshold:.0%} of the energy) against its rank r, "
        f"dashed. The table adds each layer's health numbers: dominance, spike ratio and stable rank. Definition: "
        f"{DEFINITIONS['spectra']}."
    )
    checks = [c.get("message") for c in data.get("checks") or () if isinstance(c, Mapping) and c.get("message")]
    if checks:
        caption += " Config checks: " + " ".join(f"{m}." for m in checks)
    return _picture("spectra", caption, fig, dpi)


#: The analyses :func:`report_files` takes in ``lowrank``, in report order: name -> (picture, table builder, title).
LOWRANK_ANALYSES = {
    "amplification": (amplification_picture, tables.amplification_table, "How dW relates to W (Table 7)"),
    "spectra": (spectra_picture, tables.spectra_table, "Spectra and effective ranks of dW"),
    "intruders": (intruders_picture, intruders_table, "Intruder dimensions (Shuttleworth et al. 2024)"),
    "overlap": (overlap_picture, tables.overlap_table, "Subspace overlap of two adapters (Figures 3 and 4)"),
}


def report_files(
    similarity: Mapping[str, Any],
    inputs: Mapping[str, Any],
    *,
    comparison: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    lowrank: Mapping[str, Mapping[str, Any]] | None = None,
    seeds: Mapping[str, Any] | None = None,
    pairs: Mapping[str, Any] | None = None,
    title: str | None = None,
    dpi: int = DPI,
) -> dict[str, Writer]:
    """``report.html`` with everything embedded, and beside it the pictures (PNG, SVG) and tables (CSV, MD, TeX).

    Parameters
    ----------
    similarity : mapping
        ``SimilarityReport.to_dict()`` (Figure 1).
    inputs : mapping
        :func:`input_identities` (paths, hashes, configs, versions).
    comparison, params : mapping, optional
        Table 3 and Table 4 data (LoRA vs CondLoRA), in the shapes :func:`loralens.render.tables.table3` and
        :func:`~loralens.render.tables.table4` take.
    lowrank : mapping, optional
        The LoRA paper's analyses (Hu et al. 2022, Sec. 7), any of ``"amplification"``, ``"spectra"`` and
        ``"overlap"``, each the ``to_dict()`` of :func:`loralens.analyses.lowrank.amplification_report`,
        :func:`~loralens.analyses.lowrank.spectra_report` or :func:`~loralens.analyses.lowrank.rank_overlap`, and
        ``"intruders"`` (:func:`loralens.analyses.intruders.intruder_dimensions`). Adds a section with each one's
        picture, table and caption, and ``<name>.png/.svg/.csv/.md/.tex`` (the overlap: one picture per module,
        ``overlap_<module>.png/.svg``).

    The page opens with a table of contents and a summary: per module and factor, the average similarity against
    the Gaussian baseline and the W-conditioned null, with a verdict by the rule of :data:`VERDICT_STD` ("above the
    W-null by X std" when observed > null mean + 2 std, else "within the W-null"), and the same for Table 3. Tables
    of more than :data:`COLLAPSE_ROWS` rows are folded.
    seeds : mapping, optional
        Table 2 (held-out scores over seeds, paired t-test): :func:`loralens.analyses.seeds.compare_seeds`.
    pairs : mapping, optional
        Table 3 over several pairs: :func:`loralens.analyses.condlora_vs_lora.comparisons_to_dict`.
    """
    unknown = sorted(set(lowrank or {}) - set(LOWRANK_ANALYSES))
    if unknown:
        raise LoralensError(f"lowrank: unknown analysis {unknown[0]!r}; choose from {', '.join(LOWRANK_ANALYSES)}")
    lowrank_parts = [
        (
            name,
            overlap_pictures(lowrank[name], dpi) if name == "overlap" else [picture(lowrank[name], dpi)],
            table(lowrank[name]),
            lowrank[name].get("settings") or {},
        )
        for name, (picture, table, _) in LOWRANK_ANALYSES.items()
        if lowrank and name in lowrank
    ]
    pictures = figure1_pictures(similarity, dpi)
    named_tables = {
        "similarity_summary": tables.similarity_summary_table(similarity),
    }
    line_pictures = []
    if seeds is not None:
        named_tables["table2"] = tables.table2(seeds)
    if pairs is not None:
        named_tables["table3_over_pairs"] = tables.table3_over_pairs(pairs)
    if comparison is not None:
        named_tables["table3"] = tables.table3(comparison)
        line_pictures = _table3_pictures(comparison, dpi)
    if params is not None:
        named_tables["table4"] = tables.table4(params)
    files: dict[str, Writer] = {}
    files.update(_picture_files([*pictures, *line_pictures, *(pic for part in lowrank_parts for pic in part[1])]))
    for name, table in named_tables.items():
        files.update(_table_files(name, table, 3))
    for name, _, table, _ in lowrank_parts:
        files.update(_table_files(name, table, _LOWRANK_DIGITS))
    files["phi_matrices.csv"] = _text_writer(tables.to_csv(tables.phi_long_table(similarity)))
    page = _html_page(
        title or _default_title(inputs),
        similarity,
        inputs,
        pictures,
        named_tables,
        line_pictures,
        ["report.html", *sorted(files)],
        None if comparison is None else comparison.get("settings"),
        lowrank_parts,
        comparison,
    )
    return {"report.html": _text_writer(page), **files}


# ---------------------------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 2rem auto;
       max-width: 72rem; padding: 0 1rem; color: #1a1a1a; line-height: 1.45; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2rem; margin-top: 2.2rem; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .9rem; }
th, td { border-bottom: 1px solid #ddd; padding: .25rem .6rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: .3rem; }
figure { margin: 1.5rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .9rem; color: #333; max-width: 60rem; }
code, pre { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: .85rem; }
pre { background: #f7f7f7; padding: .6rem; overflow-x: auto; }
.notes { font-size: .85rem; color: #444; } .hash { word-break: break-all; }
details { margin: .4rem 0 1rem; } summary { cursor: pointer; color: #0550ae; }
.wide { overflow-x: auto; max-width: 100%; }
nav#contents { background: #f7f7f7; padding: .6rem 1rem; margin: 1rem 0; font-size: .9rem; }
nav#contents ul { margin: .2rem 0; padding-left: 1.2rem; } nav#contents ul.sub { columns: 3; font-size: .85rem; }
"""


def _html_page(
    title: str,
    similarity: Mapping[str, Any],
    inputs: Mapping[str, Any],
    pictures: Sequence[Picture],
    named_tables: Mapping[str, tables.Table],
    line_pictures: Sequence[Picture],
    files: Sequence[str],
    comparison_settings: Mapping[str, Any] | None = None,
    lowrank_parts: Sequence[tuple[str, Sequence[Picture], tables.Table, Mapping[str, Any]]] = (),
    comparison: Mapping[str, Any] | None = None,
) -> str:
    e = html.escape
    settings = {
        k: v for k, v in similarity.get("settings", {}).items() if k not in ("inputs", "layers") and v is not None
    }
    toc: list[tuple[int, str, str]] = []  # (level, id, text)

    def heading(level: int, anchor: str, text: str) -> str:
        toc.append((level, anchor, text))
        return f'<h{level + 1} id="{e(anchor)}">{e(text)}</h{level + 1}>'

    body = [
        heading(1, "summary", "Summary"),
        _summary_html(similarity, comparison),
        heading(1, "inputs", "Inputs"),
        _inputs_html(inputs),
        heading(1, "settings", "Settings"),
        _key_values_html(settings),
        heading(1, "figure1", "Figure 1: layer x layer similarity of conversion matrices"),
        _table_html(named_tables["similarity_summary"], 4),
    ]
    by_stem = {pic.stem: pic for pic in pictures}
    module_layers, module_conventions = (similarity.get("settings", {}).get(k, {}) for k in ("layers", "conventions"))
    for module, factors in similarity["modules"].items():
        for factor, s in factors.items():
            pic = by_stem[_figure1_stem(module, factor)]
            toc.append((2, pic.stem, f"{module}, {factor}"))
            body.append(_figure_html(pic))
            convention = module_conventions.get(module, "solve")
            body.append(_phi_details_html(module, factor, s, module_layers.get(module), convention))
    if {"table2", "table3", "table3_over_pairs", "table4"} & set(named_tables):
        body.append(heading(1, "condlora", "LoRA vs CondLoRA"))
        if "table2" in named_tables:
            body.append(_table_html(named_tables["table2"], 4))
        if "table3_over_pairs" in named_tables:
            body.append(_table_html(named_tables["table3_over_pairs"], 4))
        if "table3" in named_tables:
            body.append(_table_html(named_tables["table3"], 3))
            if comparison_settings:
                body.append("<details><summary>settings of the comparison</summary>")
                body.append(_key_values_html(comparison_settings) + "</details>")
            body.extend(_figure_html(pic) for pic in line_pictures)
        if "table4" in named_tables:
            body.append(_table_html(named_tables["table4"], 4))
    if lowrank_parts:
        body.append(heading(1, "lowrank", _LOWRANK_HEADING))
        body.append(
            "<p>The analyses of the LoRA paper itself (Hu et al. 2022, <i>LoRA: Low-Rank Adaptation of Large "
            "Language Models</i>, Section 7) on the same adapter and base: each layer's update "
            "&Delta;W = s B A, computed through its factors.</p>"
        )
        for name, pics, table, lowrank_settings in lowrank_parts:
            body.append(heading(2, f"lowrank-{name}", LOWRANK_ANALYSES[name][2]))
            body.extend(_figure_html(pic) for pic in pics)
            body.append(_table_html(table, _LOWRANK_DIGITS))
            if lowrank_settings:
                body.append(f"<details><summary>settings of the {e(name)} analysis</summary>")
                body.append(_key_values_html(lowrank_settings) + "</details>")
    conventions = sorted(set(settings.get("conventions", {}).values()))
    if conventions:
        body.append(heading(1, "conventions", "Conventions") + "<ul>")
        body += [f"<li><b>{e(c)}</b>: {e(CONVENTIONS.get(c, c))}</li>" for c in conventions]
        body.append("</ul>")
    body.append(heading(1, "files", "Files beside this report") + "<ul>")
    body += [f'<li><a href="{e(name)}">{e(name)}</a></li>' for name in files]
    body.append("</ul>")
    body.append(f'<p class="notes">Written by loralens {e(loralens.__version__)}.</p></body></html>')
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        "<p>Conversion matrices W<sup>-1</sup>A<sup>T</sup>, W<sup>-1</sup>B and W<sup>-1</sup>BA of a LoRA adapter "
        "and their normalized subspace similarity &phi; between layers, after Kim et al. 2024 "
        "(<i>A Single Linear Layer Yields Task-Adapted Low-Rank Matrices</i>, CondLoRA). "
        "Layers are numbered from 1 as in the paper (checkpoint layer index + 1).</p>",
        _toc_html(toc),
        *body,
    ]
    return "\n".join(parts) + "\n"


def _toc_html(toc: Sequence[tuple[int, str, str]]) -> str:
    """The table of contents: sections, and under them Figure 1's pictures and the low-rank analyses, as links."""
    e = html.escape
    out = ['<nav id="contents" aria-label="Contents"><b>Contents</b><ul>']
    open_sub = False
    for level, anchor, text in toc:
        if level == 1 and open_sub:
            out.append("</ul></li>")
            open_sub = False
        elif level == 1 and len(out) > 1:
            out.append("</li>")
        if level == 2 and not open_sub:
            out.append('<ul class="sub">')
            open_sub = True
        out.append(f'<li><a href="#{e(anchor)}">{e(text)}</a>' + ("</li>" if level == 2 else ""))
    out.append("</ul></li>" if open_sub else "</li>")
    out.append("</ul></nav>")
    return "".join(out)


def _table_html(table: tables.Table, digits: int) -> str:
    """A table in a horizontally scrolling box (a wide table never widens the page); folded into ``<details>``
    with a one-line summary when it has more than :data:`COLLAPSE_ROWS` rows."""
    inner = f'<div class="wide">{tables.to_html(table, digits)}</div>'
    if len(table.rows) <= COLLAPSE_ROWS:
        return inner
    name = re.split(r"[:;]", table.title)[0].strip()[:80] or "table"  # one line: the title's first clause
    summary = f"{name}: {len(table.rows)} rows x {len(table.columns)} columns (click to open)"
    return f'<details class="table"><summary>{html.escape(summary)}</summary>{inner}</details>'


def _verdict(observed: float | None, mean: float | None, std: float | None) -> str:
    """The summary's plain-words verdict on ``observed`` against a null of ``mean`` +- ``std`` (over draws), by
    the rule observed > mean + :data:`VERDICT_STD` std."""
    if observed is None or observed != observed or mean is None or mean != mean:
        return "no W-null computed (null_draws = 0): only the Gaussian baseline applies"
    if std is None or std != std or std <= 0:
        return (
            "above the W-null mean (its std is 0)"
            if observed > mean
            else "within the W-null (not evidence of learning)"
        )
    z = (observed - mean) / std
    if z > VERDICT_STD:
        return f"above the W-null by {z:.1f} std"
    return f"within the W-null (not evidence of learning; {z:+.1f} std)"


def _summary_html(similarity: Mapping[str, Any], comparison: Mapping[str, Any] | None) -> str:
    """Per module and factor: observed average similarity, Gaussian baseline, W-null mean +- std and a verdict; the
    same for Table 3 when ``comparison`` is given."""
    rule = (
        f"<p>Which modules and factors stand clearly above their baselines? The Gaussian baseline is what random "
        f"matrices of the same shape give; the W-conditioned null (W-null) is what any adapter shows on this base, "
        f"since the conversion matrices share W<sup>-1</sup>. Rule: <b>above the W-null</b> when the observed "
        f"average exceeds the null's mean by more than {VERDICT_STD:g} of its standard deviations over draws "
        f"(observed &gt; mean + {VERDICT_STD:g} std), reported as &quot;above the W-null by X std&quot;, X = "
        f"(observed - mean) / std; otherwise <b>within the W-null</b> (not evidence of learning). Share of excess: "
        f"(null - Gaussian) / (observed - Gaussian), how much of the excess over the Gaussian baseline the W-null "
        f"already reaches.</p>"
    )
    rows: list[tuple[tables.Cell, ...]] = []
    for module, factors in similarity["modules"].items():
        for factor, s in factors.items():
            null = s.get("w_null") or {}
            observed, gaussian = s.get("mean_offdiag"), s.get("random_mean_offdiag")
            mean, std = null.get("mean_offdiag"), null.get("mean_offdiag_std")
            verdict = _verdict(observed, mean, std)
            if not null and observed is not None and gaussian is not None:
                verdict += "; above it" if observed > gaussian else "; not above it"
            rows.append((module, factor, observed, gaussian, _pm(mean, std), null.get("share_of_excess"), verdict))
    columns = ("module", "factor", "observed", "Gaussian", "W-null", "share of excess", "verdict")
    out = [
        rule,
        _table_html(tables.Table(columns, tuple(rows), "Figure 1: average similarity (mean off-diagonal phi)"), 4),
    ]
    if comparison is not None and isinstance(comparison.get("modules"), Mapping):
        rows3: list[tuple[tables.Cell, ...]] = []
        for module, d in comparison["modules"].items():
            nulls = d.get("w_null") if isinstance(d.get("w_null"), Mapping) else {}
            means = d.get("mean") if isinstance(d.get("mean"), Mapping) else {}
            for f in ("A", "B", "BA"):
                if f not in d:
                    continue
                values = [float(v) for v in d[f] if v is not None]
                observed = means.get(f, sum(values) / len(values) if values else None)
                null = nulls.get(f) or {}
                mean, std = null.get("mean_over_layers"), null.get("mean_over_layers_std")
                rows3.append((module, f, observed, _pm(mean, std), _verdict(observed, mean, std)))
        if rows3:
            out.append(
                _table_html(
                    tables.Table(
                        ("module", "factor", "phi(LoRA, CondLoRA), mean over layers", "W-null", "verdict"),
                        tuple(rows3),
                        "Table 3: phi between LoRA and CondLoRA against the W-null (theta replaced by Gaussians)",
                    ),
                    4,
                )
            )
    return "\n".join(out)


def _pm(mean: float | None, std: float | None) -> str | None:
    if mean is None or mean != mean:
        return None
    return f"{mean:.4f} ± {std:.4f}" if std is not None and std == std else f"{mean:.4f}"


def _inputs_html(inputs: Mapping[str, Any]) -> str:
    e = html.escape
    adapter, base = inputs.get("adapter", {}), inputs.get("base", {})
    rows = [("adapter", f"<code>{e(str(adapter.get('path')))}</code>")]
    for record in adapter.get("files") or [{"name": adapter.get("weights_file"), "sha256": adapter.get("sha256")}]:
        rows += _file_rows("adapter file", record)
    rows += [
        (
            "adapter settings",
            e(
                f"{adapter.get('peft_type')}, r = {adapter.get('r')}, lora_alpha = {adapter.get('lora_alpha')}, "
                f"target modules {adapter.get('target_modules')}, rsLoRA {adapter.get('use_rslora')}, "
                f"DoRA {adapter.get('use_dora')}"
            ),
        ),
        ("base", f"<code>{e(str(base.get('path')))}</code>"),
    ]
    for record in base.get("files", []):
        rows += _file_rows("base file", record)
    config = base.get("config") or {}
    if config:
        summary = ", ".join(
            f"{k} = {config[k]}"
            for k in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads")
            if k in config
        )
        rows.append(("base config", e(summary)))
    condlora = inputs.get("condlora")
    if condlora:
        rows.append(("CondLoRA adapter", f"<code>{e(str(condlora.get('path')))}</code>"))
        for record in condlora.get("files", []):
            rows += _file_rows("CondLoRA file", record)
        rows.append(
            (
                "CondLoRA settings",
                e(
                    f"r = {condlora.get('r')}, lora_alpha = {condlora.get('lora_alpha')}, "
                    f"targets {condlora.get('targets')}"
                ),
            )
        )
    rows += [(f"version: {k}", e(str(v))) for k, v in inputs.get("versions", {}).items()]
    body = "".join(f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    details = [
        ("adapter_config.json", adapter.get("config")),
        ("base config.json", base.get("config")),
        ("CondLoRA config", (condlora or {}).get("config")),
    ]
    extra = "".join(
        f"<details><summary>{e(name)}</summary><pre>{e(json_text(value))}</pre></details>"
        for name, value in details
        if value
    )
    return f'<table class="inputs">{body}</table>{extra}'


def _file_rows(what: str, record: Any) -> list[tuple[str, str]]:
    """A file record of :func:`loralens.analyses.provenance.file_record` (or a bare name) as table rows."""
    e = html.escape
    if not isinstance(record, Mapping):
        return [(what, f"<code>{e(str(record))}</code>")]
    size = f" ({record['bytes']:,} bytes)" if isinstance(record.get("bytes"), int) else ""
    rows = [(what, f"<code>{e(str(record.get('name')))}</code>{size}")]
    if record.get("sha256"):
        rows.append(("SHA-256", f'<code class="hash">{e(record["sha256"])}</code>'))
    elif record.get("header_sha256"):
        rows.append(("SHA-256 of the header", f'<code class="hash">{e(record["header_sha256"])}</code>'))
    return rows


def _key_values_html(values: Mapping[str, Any]) -> str:
    e = html.escape
    body = "".join(f"<tr><th>{e(str(k))}</th><td><code>{e(_plain(v))}</code></td></tr>" for k, v in values.items())
    return f'<table class="settings">{body}</table>'


def _figure_html(pic: Picture) -> str:
    e = html.escape
    data = base64.b64encode(pic.png).decode("ascii")
    return (
        f'<figure id="{e(pic.stem)}"><img src="data:image/png;base64,{data}" alt="{e(pic.caption)}">'
        f"<figcaption>{e(pic.caption)} Files: "
        f'<a href="{e(pic.stem)}.png">PNG</a>, <a href="{e(pic.stem)}.svg">SVG</a>.</figcaption></figure>'
    )


def _phi_details_html(
    module: str, factor: str, s: Mapping[str, Any], layers: Sequence[int] | None, convention: str
) -> str:
    """The numbers behind one Figure-1 picture, folded: phi and random phi as L x L tables, captioned with the
    conversion matrix's name under the module's ``convention`` (``W^+`` for ``"lstsq"``)."""
    labels = [str(k + 1) for k in (layers if layers is not None else range(len(s["phi"])))]
    out = []
    for name, matrix in (("phi", s["phi"]), ("random phi", s["random_phi"])):
        rows = tuple((lab, *row) for lab, row in zip(labels, matrix, strict=True))
        title = f"{module}, {factor_label(factor, convention, text=True)}: {name}"
        table = tables.Table(("layer", *labels), rows, title)
        out.append(f'<div class="wide">{tables.to_html(table, 3)}</div>')
    summary = f"numbers: {html.escape(module)}, {html.escape(factor)}"
    return f"<details><summary>{summary}</summary>{''.join(out)}</details>"


_LOWRANK_HEADING = "Low-rank updates (Hu et al. 2022, Section 7)"
_LOWRANK_DIGITS = 4


# ---------------------------------------------------------------------------------------------- helpers


def _table3_pictures(comparison: Mapping[str, Any], dpi: int) -> list[Picture]:
    """Table 3 as a per-layer line plot per module (an extra view of the same numbers)."""
    pictures = []
    for module, d in comparison["modules"].items():
        series = {f: d[f] for f in ("A", "B", "BA") if f in d}
        random = d.get("random")
        baseline = {f: v for f, v in random.items() if f in series} if isinstance(random, Mapping) else random
        layers = d.get("layers")
        labels = None if layers is None else [k + 1 for k in layers]
        ax = per_layer_similarity(
            series, baseline=baseline or None, labels=labels, title=f"{module}: phi(LoRA, CondLoRA) per layer"
        )
        png, svg = render_figure(ax.figure, dpi)  # type: ignore[arg-type]
        caption = f"{module}: per-layer phi between the LoRA and CondLoRA factors (Table 3), random baselines dashed."
        pictures.append(Picture(f"table3_{_safe(module)}", caption, png, svg))
    return pictures


_FACTOR_KEYS = ("phi", "random_phi", "mean_offdiag", "random_mean_offdiag", "random_expected", "dim", "i", "j")


def _check_similarity(similarity: Mapping[str, Any]) -> None:
    """The shape of ``SimilarityReport.to_dict()``, or a LoralensError naming what is missing."""
    modules = similarity.get("modules") if isinstance(similarity, Mapping) else None
    if not isinstance(modules, Mapping) or not modules:
        raise LoralensError("similarity data has no modules; pass SimilarityReport.to_dict() (similarity.json)")
    for module, factors in modules.items():
        if not isinstance(factors, Mapping) or not factors:
            raise LoralensError(f"similarity data: module {module!r} has no factors")
        for factor, s in factors.items():
            missing = [k for k in _FACTOR_KEYS if not isinstance(s, Mapping) or k not in s]
            if missing:
                raise LoralensError(f"similarity data: {module!r} / {factor!r} lacks {', '.join(missing)}")


def _picture(stem: str, caption: str, fig: Figure, dpi: int) -> Picture:
    png, svg = render_figure(fig, dpi)
    return Picture(stem, caption, png, svg)


def _lowrank_modules(data: Mapping[str, Any], what: str, keys: Sequence[str]) -> Mapping[str, Any]:
    """``data["modules"]`` of a ``lowrank_analysis`` report dict with ``keys`` in every module, or a
    LoralensError naming what is missing."""
    modules = data.get("modules") if isinstance(data, Mapping) else None
    if not isinstance(modules, Mapping) or not modules:
        raise LoralensError(f"{what} data has no modules; pass the report's to_dict() ({what}.json)")
    for name, m in modules.items():
        missing = [k for k in keys if not isinstance(m, Mapping) or k not in m]
        if missing:
            raise LoralensError(f"{what} data: module {name!r} lacks {', '.join(missing)}")
    return modules


def _layer_numbers(layers: Sequence[int]) -> list[int]:
    """Checkpoint layer indices -> the 1-based numbers the report shows."""
    return [int(k) + 1 for k in layers]


def _table_files(name: str, table: tables.Table, digits: int) -> dict[str, Writer]:
    return {
        f"{name}.csv": _text_writer(tables.to_csv(table)),
        f"{name}.md": _text_writer(tables.to_markdown(table, digits)),
        f"{name}.tex": _text_writer(tables.to_latex(table, digits, label=f"tab:{name}")),
    }


def _picture_files(pictures: Sequence[Picture]) -> dict[str, Writer]:
    files: dict[str, Writer] = {}
    for pic in pictures:
        files[f"{pic.stem}.png"] = bytes_writer(pic.png)
        files[f"{pic.stem}.svg"] = bytes_writer(pic.svg)
    return files


def _text_writer(text: str) -> Writer:
    return bytes_writer(text.encode("utf-8"))


def _default_title(inputs: Mapping[str, Any]) -> str:
    return f"loralens report: {Path(str(inputs.get('adapter', {}).get('path', 'adapter'))).name}"


def _figure1_stem(module: str, factor: str) -> str:
    return f"figure1_{_safe(module)}_{_safe(factor)}"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _nan(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{x:.4f}"


def _plain(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)
