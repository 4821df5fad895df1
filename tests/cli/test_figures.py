"""``loralens figure``, ``report`` and the demo's report, through a real subprocess (and in-process for errors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import checkpoints
import loralens
import loralens.cli.figures
import loralens.render.report
from clitools import run_cli
from loralens.analyses.lowrank import amplification_report, rank_overlap, spectra_report
from loralens.examples import default_condlora
from loralens.io.condlora import condlora_config, write_condlora_adapter

# intruder dimensions joined the low-rank section, and the overlap is drawn once per module (#20, deliberate)
LOWRANK = ("amplification", "spectra", "intruders")
LOWRANK_FILES = {f"{a}.{ext}" for a in LOWRANK for ext in ("png", "svg", "csv", "md", "tex")}


@pytest.fixture(scope="module")
def tiny_condlora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CondLoRA adapter (authors' format, r = 4, query + value, random thetas) for the 32-wide tiny BERT."""
    g = torch.Generator().manual_seed(0)
    thetas = {t: (torch.randn(4, 32, generator=g), torch.randn(4, 32, generator=g)) for t in ("query", "value")}
    out = tmp_path_factory.mktemp("condlora") / "adapter"
    write_condlora_adapter(out, condlora_config(r=4, lora_alpha=4, target_modules=["query", "value"]), thetas)
    (out / "metrics.json").write_text(json.dumps({"examples_per_s": 40.303}))
    return out


@pytest.mark.slow
def test_figure_writes_png_svg_and_csv(tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    out = tmp_path / "figs"
    proc = run_cli("figure", "--base", tiny_bert, "--adapter", tiny_bert_adapter, "--out", out, "--dpi", "160")
    assert proc.returncode == 0, proc.stderr
    stems = {f"figure1_{m}_{f}" for m in ("query", "value") for f in ("A", "B", "BA")}
    expected = {f"{s}.{ext}" for s in stems for ext in ("png", "svg")} | {"phi_matrices.csv", ".loralens-output"}
    assert {p.name for p in out.iterdir()} == expected
    png = Image.open(out / "figure1_value_B.png")
    assert png.info["dpi"][0] == pytest.approx(160, abs=1)
    assert str(out / "figure1_value_B.png") in proc.stdout


@pytest.mark.slow  # builds a whole report or several figures: make test runs it, test-fast does not
def test_figure_options_pick_modules_and_dimensions(tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    out = tmp_path / "figs"
    argv = ["figure", "--base", tiny_bert, "--adapter", tiny_bert_adapter, "--out", out, "--modules", "value"]
    result = run_cli(*argv, "--i", "2", "--side", "right", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.glob("*.png")) == [f"figure1_value_{f}.png" for f in ("A", "B", "BA")]
    assert loralens.cli.figures.DPI == loralens.render.report.DPI


@pytest.mark.slow
def test_report_with_condlora_writes_one_self_contained_html(
    tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path, tiny_condlora: Path
) -> None:
    out = tmp_path / "report"
    argv = ["report", "--base", tiny_bert, "--lora", tiny_bert_adapter, "--condlora", tiny_condlora, "--out", out]
    proc = run_cli(*argv, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"report: {out / 'report.html'}"
    html = (out / "report.html").read_text(encoding="utf-8")
    # Figure 1 x 6, Table 3 lines x 2 modules, amplification, spectra and intruders (included by default)
    assert html.count('<img src="data:image/png;base64,') == 6 + 2 + 3
    numbers = json.loads((out / "report.json").read_text())
    assert numbers["inputs"]["adapter"]["sha256"] in html
    assert numbers["settings"]["device"] == "cpu"
    assert numbers["parameters"]["lora"] == 2 * 2 * 4 * (32 + 32)  # modules x layers x r (d_in + d_out)
    assert numbers["parameters"]["condlora"] == 2 * 2 * 4 * 32  # modules x 2 r d_in
    assert numbers["parameters"]["speed"] == {"condlora": 40.303}
    assert str(tiny_condlora) in html and "Table 3" in html and "Table 4" in html
    names = {p.name for p in out.iterdir()}
    for table in ("similarity_summary", "table3", "table4"):
        assert {f"{table}.csv", f"{table}.md", f"{table}.tex"} <= names
    assert {"table3_query.png", "table3_value.svg"} <= names
    assert LOWRANK_FILES <= names and "Low-rank updates (Hu et al. 2022, Section 7)" in html
    assert set(numbers["lowrank"]) == set(LOWRANK)
    assert "Table 3: phi between LoRA and CondLoRA against the W-null" in html  # the summary's Table 3 verdicts


def test_report_lowrank_numbers_and_overlap_on_real_adapters(
    tmp_path: Path, minilm_path: Path, rt_adapters: dict[int, Path]
) -> None:
    out = tmp_path / "report"
    argv = ["report", "--base", minilm_path, "--lora", rt_adapters[4], "--overlap", rt_adapters[16], "--out", out]
    proc = run_cli(*argv, "--device", "cpu", "--seed", "3", "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr
    names = {p.name for p in out.iterdir()}
    overlap_pictures = {f"overlap_{m}.{ext}" for m in ("query", "value") for ext in ("png", "svg")}
    assert LOWRANK_FILES | overlap_pictures | {f"overlap.{ext}" for ext in ("csv", "md", "tex")} <= names
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count('<img src="data:image/png;base64,') == 6 + 3 + 2
    assert html.index("Low-rank updates") < html.index('<figure id="overlap_query">')
    low = json.loads((out / "report.json").read_text())["lowrank"]
    base, a4, a16 = loralens.open_base(minilm_path), *map(loralens.load_lora_adapter, (rt_adapters[4], rt_adapters[16]))
    options = {"device": "cpu", "dtype": torch.float32}
    # the report holds the library's numbers, with --seed passed through
    assert low["amplification"]["modules"] == amplification_report(base, a4, seed=3, **options).to_dict()["modules"]
    assert low["spectra"]["modules"] == spectra_report(base, a4, **options).to_dict()["modules"]
    assert low["overlap"]["modules"] == rank_overlap(a4, a16, base=base, **options).to_dict()["modules"]
    for analysis in low.values():
        assert analysis["settings"]["dtype"] == "float32" and analysis["settings"]["device"] == "cpu"
    assert low["amplification"]["settings"]["seed"] == 3
    for module in low["overlap"]["modules"].values():
        assert module["ranks"] == [[4] * 6, [16] * 6]
        for f in ("A", "B"):
            grids = module["factors"][f]["grid"]
            assert len(grids) == 6 and all(len(g) == 4 and len(g[0]) == 16 for g in grids)
    assert [a["path"] for a in low["overlap"]["settings"]["inputs"]["adapters"]] == [
        str(rt_adapters[4]),
        str(rt_adapters[16]),
    ]
    assert rt_adapters[16].name in html  # the overlap's caption names the second adapter


@pytest.mark.slow
def test_report_no_lowrank_leaves_the_analyses_out(tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    argv = ["report", "--base", tiny_bert, "--lora", tiny_bert_adapter, "--device", "cpu"]
    result = run_cli(*argv, "--out", tmp_path / "without", "--no-lowrank")
    assert result.returncode == 0, result.stderr
    names = {p.name for p in (tmp_path / "without").iterdir()}
    assert not names & (LOWRANK_FILES | {"overlap.png"})
    assert "Low-rank updates" not in (tmp_path / "without" / "report.html").read_text(encoding="utf-8")
    assert json.loads((tmp_path / "without" / "report.json").read_text())["lowrank"] is None
    # --overlap is still drawn with --no-lowrank (here the adapter against itself: phi(i, i) = 1)
    only = tmp_path / "only-overlap"
    result = run_cli(*argv, "--out", only, "--no-lowrank", "--overlap", tiny_bert_adapter)
    assert result.returncode == 0, result.stderr
    low = json.loads((only / "report.json").read_text())["lowrank"]
    assert set(low) == {"overlap"} and (only / "overlap_value.png").is_file()
    assert not (only / "amplification.png").exists() and not (only / "intruders.png").exists()
    diagonal = low["overlap"]["modules"]["value"]["factors"]["B"]["diagonal"]
    assert all(v == pytest.approx(1.0) for d in diagonal for v in d)


def test_bad_input_gives_one_line_and_exit_2(tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    adapter = tiny_bert_adapter
    for argv, words in [
        (["figure", "--base", tiny_bert, "--adapter", tmp_path / "nope", "--out", tmp_path / "o"], "no such adapter"),
        (["figure", "--base", tiny_bert, "--adapter", adapter, "--out", tmp_path / "o", "--dpi", "10"], "--dpi"),
    ]:
        proc = run_cli(*argv)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (argv, proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, proc.stderr)
        assert words in lines[0], (argv, lines[0])


def test_more_bad_input_in_process(tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    (tmp_path / "file.txt").write_text("x")
    adapter, o = tiny_bert_adapter, tmp_path / "o"
    wide = checkpoints.lora_adapter(checkpoints.bert_base(tmp_path / "wide", hidden=48), tmp_path / "wl", arch="bert")
    cases = [
        (["figure", "--base", tiny_bert, "--adapter", adapter, "--out", o, "--modules", "key"], "matches no"),
        (["figure", "--base", tiny_bert, "--adapter", adapter, "--out", o, "--i", "9"], "exceeds the rank"),
        (["report", "--base", tiny_bert, "--lora", adapter, "--out", tmp_path / "file.txt"], "is a file"),
        (["report", "--base", tmp_path / "nobase", "--lora", adapter, "--out", o], "not a folder"),
        (["report", "--base", tiny_bert, "--lora", adapter, "--condlora", tmp_path / "nope", "--out", o], "nope"),
        (["report", "--base", tiny_bert, "--lora", adapter, "--overlap", tmp_path / "nada", "--out", o], "nada"),
        (["report", "--base", tiny_bert, "--lora", adapter, "--overlap", wide, "--out", o], "another base"),
        (["report", "--base", tiny_bert, "--lora", adapter, "--lora", adapter, "--out", o], "without CondLoRA"),
        (
            ["report", "--base", tiny_bert, "--lora", adapter, "--lora", adapter, "--condlora", adapter, "--out", o],
            "2 LoRA and 1 CondLoRA adapters given",
        ),
    ]
    for argv, words in cases:
        result = run_cli(*argv)
        # warning: lines may come first (the tiny adapters' alpha 8 at r = 4 draws spectra's default-alpha check)
        lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning: ")]
        assert result.returncode == 2, (argv, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], (argv, lines)
    assert not o.exists()


@pytest.mark.slow  # tens of seconds: make test runs it, make test-fast does not
def test_demo_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = run_cli("demo", "--out", out, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "report.html" in proc.stdout and str(out) in proc.stdout.replace("\n", "")
    names = {p.name for p in out.iterdir()}
    assert {"report.html", "conversion.safetensors", "similarity.json", "figure1_value_B.png"} <= names
    html = (out / "report.html").read_text(encoding="utf-8")
    # Figure 1 (6), Table 3 line plots (2), amplification, spectra, intruders, overlap of the seed-0 and seed-1 LoRA
    # adapters (one picture per module)
    assert "minilm-rt-lora" in html and html.count("<img ") == 6 + 2 + 3 + 2
    assert {"table2.md", "table3_over_pairs.csv", "table3.csv", "table4.tex", "overlap_value.png"} <= names
    numbers = json.loads((out / "report.json").read_text(encoding="utf-8"))
    # Table 2 of the three shipped seed pairs, from their metrics.json, with the paired t-test
    table2 = numbers["pairs"]["table2"]["tasks"]["rt-polarity"]
    assert table2["seeds"] == [0, 1, 2] and table2["paired_t"]["p_value"] is not None
    assert [p["settings"]["condlora"] for p in numbers["pairs"]["pairs"]] == [
        str(default_condlora(s)) for s in (0, 1, 2)
    ]
    assert set(numbers["lowrank"]) == {*LOWRANK, "overlap"}
    assert "Held-out scores over seeds (Table 2)" in html and "t = " in proc.stdout
