"""``loralens figure``, ``report`` and the demo's report, through a real subprocess (and in-process for errors)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import loralens.cli.figures
import loralens.report
from loralens.cli import app
from loralens.io.condlora import condlora_config, write_condlora_adapter


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loralens", *map(str, args)], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def tiny_condlora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CondLoRA adapter (authors' format, r = 4, query + value, random thetas) for the 32-wide tiny BERT."""
    g = torch.Generator().manual_seed(0)
    thetas = {t: (torch.randn(4, 32, generator=g), torch.randn(4, 32, generator=g)) for t in ("query", "value")}
    out = tmp_path_factory.mktemp("condlora") / "adapter"
    write_condlora_adapter(out, condlora_config(r=4, lora_alpha=4, target_modules=["query", "value"]), thetas)
    (out / "metrics.json").write_text(json.dumps({"examples_per_s": 40.303}))
    return out


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


def test_figure_options_pick_modules_and_dimensions(tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    out = tmp_path / "figs"
    argv = ["figure", "--base", tiny_bert, "--adapter", tiny_bert_adapter, "--out", out, "--modules", "value"]
    result = CliRunner().invoke(app, [*map(str, argv), "--i", "2", "--side", "right", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.png")) == [f"figure1_value_{f}.png" for f in ("A", "B", "BA")]
    assert loralens.cli.figures.DPI == loralens.report.DPI


def test_report_with_condlora_writes_one_self_contained_html(
    tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path, tiny_condlora: Path
) -> None:
    out = tmp_path / "report"
    argv = ["report", "--base", tiny_bert, "--lora", tiny_bert_adapter, "--condlora", tiny_condlora, "--out", out]
    proc = run_cli(*argv, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"report: {out / 'report.html'}"
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count('<img src="data:image/png;base64,') == 6 + 2  # Figure 1 x 6, Table 3 lines x 2 modules
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
    cases = [
        (["figure", "--base", tiny_bert, "--adapter", adapter, "--out", o, "--modules", "key"], "matches no"),
        (["figure", "--base", tiny_bert, "--adapter", adapter, "--out", o, "--i", "9"], "exceeds the rank"),
        (["report", "--base", tiny_bert, "--lora", adapter, "--out", tmp_path / "file.txt"], "is a file"),
        (["report", "--base", tmp_path / "nobase", "--lora", adapter, "--out", o], "not a folder"),
        (["report", "--base", tiny_bert, "--lora", adapter, "--condlora", tmp_path / "nope", "--out", o], "nope"),
    ]
    for argv, words in cases:
        result = CliRunner().invoke(app, list(map(str, argv)))
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2, (argv, result.output)
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], (argv, lines)
    assert not o.exists()


def test_demo_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = run_cli("demo", "--out", out, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "report.html" in proc.stdout and str(out) in proc.stdout.replace("\n", "")
    names = {p.name for p in out.iterdir()}
    assert {"report.html", "conversion.safetensors", "similarity.json", "figure1_value_B.png"} <= names
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "minilm-rt-lora" in html and html.count("<img ") == 6
