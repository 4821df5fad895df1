"""Tables from plain data: CSV round trips exactly; Markdown, LaTeX booktabs and HTML are well formed."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import loralens
from loralens.analyses.lowrank import rank_overlap
from loralens.errors import LoralensError
from loralens.render.tables import (
    Table,
    amplification_table,
    format_cell,
    overlap_table,
    phi_long_table,
    similarity_summary_table,
    spectra_table,
    table3,
    table3_over_pairs,
    table4,
    to_csv,
    to_html,
    to_latex,
    to_markdown,
)

#: Table 3 of the paper (RoBERTa-base, MNLI, value), in the plain shape the CondLoRA comparison produces.
PAPER_TABLE3 = {
    "modules": {
        "value": {
            "A": [0.05, 0.05, 0.06, 0.04, 0.04, 0.08, 0.03, 0.04, 0.03, 0.06, 0.05, 0.07],
            "B": [0.04, 0.03, 0.03, 0.05, 0.05, 0.04, 0.04, 0.03, 0.02, 0.07, 0.08, 0.10],
            "BA": [0.04, 0.03, 0.03, 0.05, 0.05, 0.05, 0.04, 0.03, 0.02, 0.07, 0.09, 0.12],
            "random": {"A": 0.0104, "B": 0.0103, "BA": 0.0105, "expected": 8 / 768},
        }
    },
    "settings": {"i": 8, "j": 8},
}
PAPER_TABLE4 = {
    "lora": 294912,
    "condlora": 24576,
    "ratio": 24576 / 294912,
    "speed": {"lora": 39.652, "condlora": 40.303},
}


def parse_csv(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def similarity_dict(L: int = 3) -> dict:
    rng = np.random.default_rng(0)
    factor = lambda: {  # noqa: E731
        "phi": rng.uniform(0, 1, (L, L)).tolist(),
        "random_phi": rng.uniform(0, 1, (L, L)).tolist(),
        "mean_offdiag": 0.1 + rng.uniform(),
        "random_mean_offdiag": 0.02,
        "random_expected": 8 / 384,
        "dim": 384,
        "i": 8,
        "j": 8,
    }
    return {
        "modules": {"query": {"A": factor(), "B": factor()}, "value": {"A": factor(), "B": factor()}},
        "settings": {"side": "left", "layers": {"query": [0, 1, 2], "value": [0, 2, 4]}},
    }


def test_csv_round_trips_every_cell() -> None:
    rows = ((f"m{k}", k * 1000, 1 / (k + 3), None) for k in range(5))
    table = Table(("name", "count", "value", "empty"), tuple(rows), "t")
    parsed = parse_csv(to_csv(table))
    assert parsed[0] == ["name", "count", "value", "empty"]
    back = [(a, int(b), float(c), None if d == "" else d) for a, b, c, d in parsed[1:]]
    assert back == list(table.rows)


def test_table3_from_plain_data_round_trips_through_csv() -> None:
    table = table3(PAPER_TABLE3)
    assert table.columns == ("module", "factor", *map(str, range(1, 13)), "random")
    parsed = parse_csv(to_csv(table))
    assert parsed[0] == list(table.columns)
    for row, factor in zip(parsed[1:], ("A", "B", "BA"), strict=True):
        assert row[:2] == ["value", factor]
        assert [float(v) for v in row[2:14]] == PAPER_TABLE3["modules"]["value"][factor]
        assert float(row[14]) == PAPER_TABLE3["modules"]["value"]["random"][factor]
    assert any("0.0104" in note for note in table.notes)  # 8 / 768, the exact expectation


def test_table3_with_per_layer_random_rows_and_layer_numbers() -> None:
    data = {"modules": {"query": {"layers": [0, 2], "A": [0.1, 0.2], "B": [0.3, 0.4], "random": {"A": [0.01, 0.02]}}}}
    table = table3(data)
    assert table.columns == ("module", "factor", "1", "3")
    assert table.rows == (("query", "A", 0.1, 0.2), ("query", "A (random)", 0.01, 0.02), ("query", "B", 0.3, 0.4))


def test_table3_takes_the_comparison_reports_dict() -> None:
    """The shape ``ComparisonReport.to_dict()`` gives: per-layer random, means, extra keys."""
    phi = {"A": [0.05, 0.07], "B": [0.04, 0.06], "BA": [0.03, 0.05]}
    rand = {"A": [0.02, 0.03], "B": [0.01, 0.02], "BA": [0.02, 0.02]}
    data = {
        "modules": {
            "value": {
                **phi,
                "mean": {"A": 0.06, "B": 0.05, "BA": 0.04},
                "random": {
                    **rand,
                    "mean": {"A": 0.025, "B": 0.015, "BA": 0.02},
                    "expected": dict.fromkeys(phi, 0.0208),
                },
                "conv_vs_theta": {"A": [0.2, 0.3], "B": [0.1, 0.2], "mean": {"A": 0.25}, "random_expected": 0.02},
                "layers": [0, 1],
                "sides": {"A": "right", "B": "left", "BA": "left"},
                "theta": "value",
                "i": 8,
                "j": 8,
            }
        },
        "settings": {"i": None, "j": None, "seed": 0, "random_baseline": "a long sentence", "sides": {"A": "right"}},
    }
    table = table3(data)
    assert table.columns == ("module", "factor", "1", "2", "mean")
    assert [r[1] for r in table.rows] == ["A", "A (random)", "B", "B (random)", "BA", "BA (random)"]
    assert table.rows[0] == ("value", "A", 0.05, 0.07, 0.06)
    assert table.rows[1] == ("value", "A (random)", 0.02, 0.03, 0.025)
    assert table.notes == ("value: random expectation max(i, j) / d = 0.0208", "Settings: seed = 0.")
    parsed = parse_csv(to_csv(table))
    assert [float(v) for v in parsed[5][2:4]] == phi["BA"]


def test_table3_with_the_w_null_column() -> None:
    """``ComparisonReport.to_dict()``'s ``w_null``: a W-null column (mean over layers ± std over draws) on each
    factor's row, empty on the random rows; absent without a W-null (the tables above)."""
    null = {"mean": [0.02, 0.03], "std": [0.001, 0.002], "z": [1.0, 2.0], "p": [0.2, 0.05]}
    data = {
        "modules": {
            "value": {
                "A": [0.05, 0.07],
                "B": [0.04, 0.06],
                "mean": {"A": 0.06, "B": 0.05},
                "random": {"A": [0.02, 0.03], "B": [0.01, 0.02], "mean": {"A": 0.025, "B": 0.015}},
                "w_null": {
                    "draws": 20,
                    "A": {**null, "mean_over_layers": 0.025, "mean_over_layers_std": 0.00125},
                    "B": {**null, "mean_over_layers": 0.0207, "mean_over_layers_std": 0.0013},
                },
                "layers": [0, 1],
            }
        },
        "settings": {"seed": 0, "null_draws": 20},
    }
    table = table3(data)
    assert table.columns == ("module", "factor", "1", "2", "mean", "W-null")
    assert table.rows[0] == ("value", "A", 0.05, 0.07, 0.06, "0.0250 ± 0.0013")
    assert table.rows[1] == ("value", "A (random)", 0.02, 0.03, 0.025, None)
    assert table.rows[2][-1] == "0.0207 ± 0.0013"
    assert any("W-null" in note and "20 draws" in note for note in table.notes)
    data["modules"]["value"]["w_null"] = None  # null_draws = 0
    assert "W-null" not in table3(data).columns


def test_table3_over_pairs_with_the_w_null_column() -> None:
    def pair(w: float, std: float, conv: float) -> dict:
        block = {"mean_over_layers": w, "mean_over_layers_std": std}
        module = {"w_null": {"draws": 4, "A": block}, "conv_vs_theta": {"w_null": {"draws": 4, "A": {**block}}}}
        module["conv_vs_theta"]["w_null"]["A"]["mean_over_layers_std"] = conv
        return {"modules": {"value": module}, "settings": {"lora": "l", "condlora": "c"}}

    row = {"per_pair": [0.05, 0.07], "mean": 0.06, "std": 0.014, "random": 0.02}
    data = {
        "pairs": [pair(0.02, 0.001, 0.003), pair(0.03, 0.003, 0.005)],
        "summary": {"value": {"A": {**row, "w_null": 0.025}, "conv_A": {**row, "w_null": 0.025}}},
    }
    table = table3_over_pairs(data)
    assert table.columns[-1] == "W-null"
    assert table.rows[0][-1] == "0.0250 ± 0.0020"  # ± the pairs' mean std over draws
    assert table.rows[1][-1] == "0.0250 ± 0.0040"
    assert any("W-null" in note for note in table.notes)
    for r in data["summary"]["value"].values():
        r["w_null"] = None
    assert "W-null" not in table3_over_pairs(data).columns


def test_table3_rejects_bad_data() -> None:
    with pytest.raises(LoralensError, match="has no modules"):
        table3({"modules": {}})
    with pytest.raises(LoralensError, match="none of A, B, BA"):
        table3({"modules": {"value": {"random": {}}}})
    with pytest.raises(LoralensError, match="different numbers of layers"):
        table3({"modules": {"value": {"A": [0.1, 0.2], "B": [0.1]}}})
    with pytest.raises(LoralensError, match="different layers"):
        table3({"modules": {"q": {"A": [0.1, 0.2]}, "v": {"A": [0.1, 0.2, 0.3]}}})
    with pytest.raises(LoralensError, match="must be a mapping"):
        table3({"modules": [1, 2]})


def test_table4_markdown_latex_and_csv() -> None:
    table = table4(PAPER_TABLE4)
    assert table.rows == (("LoRA", 294912, 39.652), ("CondLoRA", 24576, 40.303))
    md = to_markdown(table)
    assert "| LoRA | 294,912 | 39.652 |" in md and "| CondLoRA | 24,576 | 40.303 |" in md
    assert "|---|---:|---:|" in md
    assert "0.0833" in md  # the 1/12 ratio, as a note
    tex = to_latex(table, label="tab:params")
    for piece in (r"\begin{tabular}{lrr}", r"\toprule", r"\midrule", r"\bottomrule", r"\label{tab:params}"):
        assert piece in tex
    assert r"LoRA & 294,912 & 39.652 \\" in tex
    parsed = parse_csv(to_csv(table))
    assert [(a, int(b), float(c)) for a, b, c in parsed[1:]] == list(table.rows)
    assert "speed" not in to_csv(table4({"lora": {"params": 10}, "condlora": {"params": 2}}))
    with pytest.raises(LoralensError, match="needs 'condlora'"):
        table4({"lora": 1})


def test_markdown_rows_have_as_many_cells_as_the_header() -> None:
    md = to_markdown(table3(PAPER_TABLE3))
    lines = [line for line in md.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + 3
    assert len({line.count("|") for line in lines}) == 1


def test_latex_escapes_special_characters_and_stands_alone_without_float() -> None:
    table = Table(("q_proj & more", "50%"), (("a_b", 1.5),), "x_{1}")
    tex = to_latex(table, float_env=False)
    assert tex.startswith(r"\begin{tabular}{lr}")
    assert r"q\_proj \& more & 50\% \\" in tex and r"a\_b & 1.500 \\" in tex
    assert r"\caption" not in tex
    assert r"\caption{x\_\{1\}}" in to_latex(table)


def test_html_escapes_and_marks_numeric_columns() -> None:
    out = to_html(Table(("<name>", "value"), (("<script>", 0.5), ("b", None)), "t & u"))
    assert "<script>" not in out and "&lt;script&gt;" in out
    assert "<caption>t &amp; u</caption>" in out
    assert '<td class="num">0.500</td>' in out and '<td class="num">n/a</td>' in out


def test_similarity_summary_and_long_phi_tables() -> None:
    data = similarity_dict()
    summary = similarity_summary_table(data)
    assert [r[:3] for r in summary.rows] == [
        ("query", "A", "1-3"),
        ("query", "B", "1-3"),
        ("value", "A", "1,3,5"),
        ("value", "B", "1,3,5"),
    ]
    assert summary.rows[0][5] == data["modules"]["query"]["A"]["mean_offdiag"]
    long = phi_long_table(data)
    assert len(long.rows) == 4 * 2 * 9
    parsed = parse_csv(to_csv(long))[1:]
    for module, factor, kind, a, b, value in parsed:
        labels = [k + 1 for k in data["settings"]["layers"][module]]
        key = "phi" if kind == "conversion" else "random_phi"
        assert float(value) == data["modules"][module][factor][key][labels.index(int(a))][labels.index(int(b))]


def test_rows_must_match_the_columns() -> None:
    with pytest.raises(LoralensError, match="row 0 has 1 cells for 2 columns"):
        Table(("a", "b"), (("x",),))


def test_tables_import_without_matplotlib() -> None:
    code = "import sys, loralens.render.tables; print('matplotlib' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert proc.stdout.strip() == "False"


# ---------------------------------------------------------------------- the LoRA paper's analyses (Hu et al. 2022)

#: ``OverlapReport.to_dict()`` in miniature: layers 0 and 3; at layer 3 the first adapter has rank 1 (padded).
OVERLAP = {
    "modules": {
        "value": {
            "layers": [0, 3],
            "shape": [8, 8],
            "ranks": [[2, 1], [3, 3]],
            "factors": {
                "A": {
                    "side": "right",
                    "dim": 8,
                    "grid": [[[0.9, 0.5, 0.4], [0.6, 0.7, 0.55]], [[0.8, 0.45, 0.3], [None, None, None]]],
                    "random_expected": [[1 / 8, 2 / 8, 3 / 8], [2 / 8, 2 / 8, 3 / 8]],
                }
            },
        }
    },
    "adapters": ["/runs/r2", "/runs/r3"],
}

AMPLIFICATION = {
    "modules": {
        "query": {
            "layers": [1, 2],
            "ranks": [4, 4],
            "W_norm": [20.0, 21.0],
            "dW_norm": [1.5, 1.25],
            "dW_projection": [0.3, 0.25],
            "W_top_projection": [9.0, 9.5],
            "random_projection_mean": [0.21, None],  # None: no random draws (NaN in the report)
            "random_expected": [0.2083, 0.21875],
            "amplification": [5.0, 5.0],
        }
    },
    "settings": {"n_random": 10},
}

SPECTRA = {
    "modules": {
        "value": {
            "layers": [0, 1],
            "shape": [16, 8],
            "ranks": [2, 3],
            "singular_values": [[2.0, 0.5, None], [3.0, 1.0, 0.25]],
            "effective_rank_entropy": [1.6, 2.4],
            "effective_rank_energy": [1, 2],
            "principal_angles_deg": [[10.4, 80.6, None], [5.0, 45.0, 89.5]],
            "phi_W_top": [0.51, 0.34],
        }
    },
    "settings": {"energy_threshold": 0.8},
}


def test_overlap_table_reads_the_grid_extents_per_layer() -> None:
    table = overlap_table(OVERLAP)
    assert table.columns == ("module", "factor", "layer", "r1,r2", "phi(1,1)", "phi(k,k)", "phi(r1,r2)", "random(k,k)")
    assert table.rows == (
        ("value", "A", 1, "2,3", 0.9, 0.7, 0.55, 2 / 8),  # k = 2
        ("value", "A", 4, "1,3", 0.8, 0.8, 0.3, 1 / 8),  # rank 1 at layer 3: k = 1, phi(1, 3) = 0.3
    )
    parsed = parse_csv(to_csv(table))
    assert [float(v) for v in parsed[1][4:]] == [0.9, 0.7, 0.55, 0.25]


def test_amplification_table_keeps_every_number() -> None:
    table = amplification_table(AMPLIFICATION)
    assert table.columns == ("module", "layer", "r", "|W|", "|dW|", "dW", "W top-r", "random", "rand. E", "ampl.")
    assert table.rows[0] == ("query", 2, 4, 20.0, 1.5, 0.3, 9.0, 0.21, 0.2083, 5.0)
    assert table.rows[1][7] is None and "| n/a |" in to_markdown(table)
    parsed = parse_csv(to_csv(table))
    assert [float(v) for v in parsed[2][3:7]] == [21.0, 1.25, 0.25, 9.5] and parsed[2][7] == ""


def test_spectra_table_uses_each_layers_rank() -> None:
    table = spectra_table(SPECTRA)
    assert table.columns[5:7] == ("erank H", "erank 80%")
    assert table.rows == (
        ("value", 1, 2, 2.0, 0.5, 1.6, 1, "10-81", 0.51, 2 / 16),
        ("value", 2, 3, 3.0, 0.25, 2.4, 2, "5-90", 0.34, 3 / 16),
    )
    assert "Layers numbered from 1" in table.notes[0]


def test_lowrank_tables_take_the_librarys_dicts(tiny_bert_adapter: Path) -> None:
    adapter = loralens.load_lora_adapter(tiny_bert_adapter)
    data = rank_overlap(adapter, adapter, device="cpu").to_dict()
    table = overlap_table(data)
    assert len(table.rows) == 2 * 2 * len(data["modules"]["value"]["layers"])  # modules x factors x layers
    assert all(row[3] == "4,4" and row[5] == pytest.approx(1.0) for row in table.rows)  # phi(X, X) = 1


def test_format_cell_is_what_the_renderers_show() -> None:
    assert (format_cell(0.12345, 4), format_cell(1234, 4), format_cell(None), format_cell(float("nan"))) == (
        "0.1235",
        "1,234",
        "n/a",
        "n/a",
    )


@pytest.mark.parametrize(
    ("build", "data", "match"),
    [
        (overlap_table, {}, "overlap data\\['modules'\\] must be a mapping"),
        (amplification_table, {"modules": {}}, "amplification data has no modules"),
        (amplification_table, {"modules": {"q": {"layers": [0]}}}, "lacks ranks, W_norm"),
        (spectra_table, {"modules": {"v": {}}}, "spectra data\\['settings'\\] must be a mapping"),
        (spectra_table, {**SPECTRA, "settings": {}}, "lacks the energy_threshold"),
        (
            amplification_table,
            {"modules": {"q": {**AMPLIFICATION["modules"]["query"], "ranks": [4]}}},
            "'ranks'\\] has fewer values than layers",
        ),
    ],
)
def test_lowrank_tables_name_malformed_data(build: Callable[[dict], Table], data: dict, match: str) -> None:
    with pytest.raises(LoralensError, match=match):
        build(data)


def test_table2_from_the_shipped_seeds() -> None:
    from loralens import examples
    from loralens.analyses.seeds import compare_seeds, runs_from_folders
    from loralens.render.tables import table2, to_markdown

    pairs = examples.default_adapters()
    summary = compare_seeds(runs_from_folders([lo for _, lo, _ in pairs], [c for _, _, c in pairs]))
    table = table2(summary)
    t = summary["tasks"]["rt-polarity"]
    assert table.columns == ("method", "rt-polarity (accuracy)", "Avg.", "params")
    assert table.rows[0] == (
        "LoRA",
        f"{t['mean']['lora']:.4f} ± {t['std']['lora']:.4f}",
        f"{t['mean']['lora']:.4f}",
        73728,
    )
    assert table.rows[1][0] == "CondLoRA" and table.rows[1][3] == 12288
    p = t["paired_t"]["p_value"]
    assert table.rows[2][:2] == (
        "paired t-test (CondLoRA − LoRA)",
        f"t = {t['paired_t']['statistic']:.2f}, p = {p:.3f}",
    )
    assert "seeds 0, 1, 2" in table.notes[0]
    text = to_markdown(table)
    # the cell against the runs' own test scores, in float64 numpy
    scores = np.array([json.loads((lo / "metrics.json").read_text())["after"] for _, lo, _ in pairs])
    assert f"{scores.mean():.4f} ± {scores.std(ddof=1):.4f}" in text and "| CondLoRA |" in text
    with pytest.raises(LoralensError, match="no tasks"):
        table2({"tasks": {}})


def test_table4_says_which_targets_are_not_square() -> None:
    """ParameterCounts.to_dict() of a target list with a non-square module: the notes name it and say the ratio
    covers the square targets; without one, neither note."""
    data = {"lora": 165_888, "condlora": 12_288, "ratio": 1 / 6, "lora_square": 73_728}
    notes = " ".join(table4({**data, "not_square": ["intermediate.dense"]}).notes)
    assert "CondLoRA / LoRA parameters = 0.1667 over the square targets only" in notes
    assert "left out of the CondLoRA count: intermediate.dense" in notes
    assert " ".join(table4({**data, "not_square": []}).notes) == "CondLoRA / LoRA parameters = 0.1667"
    assert "square" not in " ".join(table4({**data, "ratio": None, "not_square": []}).notes)
