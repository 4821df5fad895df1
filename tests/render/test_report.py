"""The HTML report and figure files from the real default adapter: self-contained, complete, exact numbers."""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import loralens
from clitools import run_cli
from loralens.analyses.intruders import INTRUDER_DEFINITION, intruder_dimensions
from loralens.analyses.lowrank import DEFINITIONS, amplification_report, rank_overlap, spectra_report
from loralens.errors import LoralensError
from loralens.io.outputs import write_outputs
from loralens.render import similarity_figure
from loralens.render.report import (
    amplification_picture,
    figure_files,
    input_identities,
    overlap_picture,
    render_figure,
    report_files,
    spectra_picture,
)

TABLE3 = {
    "modules": {
        m: {
            "layers": list(range(6)),
            "A": [0.05, 0.05, 0.06, 0.04, 0.04, 0.08],
            "B": [0.04, 0.03, 0.03, 0.05, 0.05, 0.04],
            "BA": [0.04, 0.03, 0.03, 0.05, 0.05, 0.05],
            "random": {"A": 0.021, "B": 0.02, "BA": 0.022, "expected": 8 / 384},
        }
        for m in ("query", "value")
    },
    "settings": {"i": 8, "j": 8},
}
TABLE4 = {"lora": 36864, "condlora": 6144, "ratio": 1 / 6}


class Page(HTMLParser):
    """Every tag with its attributes, and the text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(html_text: str) -> Page:
    page = Page()
    page.feed(html_text)
    return page


@pytest.fixture(scope="module")
def default_analysis() -> tuple[dict[str, Any], dict[str, Any]]:
    """Figure-1 data and input identities of the embedded default adapter on the real MiniLM base."""
    adapter = loralens.load_lora_adapter(loralens.examples.default_adapter())
    base = loralens.base_for(adapter, loralens.examples.default_base())
    report = loralens.layer_similarity(loralens.compute_conversions(base, adapter, device="cpu"))
    return report.to_dict(), input_identities(base, adapter)


@pytest.fixture(scope="module")
def written(default_analysis: tuple[dict, dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    similarity, inputs = default_analysis
    out = tmp_path_factory.mktemp("report") / "report"
    write_outputs(out, report_files(similarity, inputs, comparison=TABLE3, params=TABLE4))
    return out


@pytest.mark.slow  # builds a whole report (tens of seconds here): make test runs it, test-fast does not
def test_report_writes_html_pictures_and_tables(written: Path) -> None:
    names = {p.name for p in written.iterdir()}
    pictures = {f"figure1_{m}_{f}" for m in ("query", "value") for f in ("A", "B", "BA")} | {
        "table3_query",
        "table3_value",
    }
    expected = {"report.html", "phi_matrices.csv", ".loralens-output"}
    expected |= {f"{p}.{ext}" for p in pictures for ext in ("png", "svg")}
    expected |= {f"{t}.{ext}" for t in ("similarity_summary", "table3", "table4") for ext in ("csv", "md", "tex")}
    assert names == expected


@pytest.mark.slow  # builds a whole report (tens of seconds here): make test runs it, test-fast does not
def test_report_is_self_contained(written: Path) -> None:
    page = parse((written / "report.html").read_text(encoding="utf-8"))
    images = [attrs for tag, attrs in page.tags if tag == "img"]
    assert len(images) == 6 + 2
    for attrs in images:
        src = attrs["src"] or ""
        assert src.startswith("data:image/png;base64,")
        png = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert png.format == "PNG" and png.width > 600
        assert attrs["alt"]
    ids = {attrs["id"] for _, attrs in page.tags if attrs.get("id")}
    for tag, attrs in page.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed")
        for key in ("src", "href"):
            value = attrs.get(key)
            if value and value.startswith("#"):
                assert key == "href" and value[1:] in ids, value  # the contents link to sections of the page
            elif value and not value.startswith("data:"):
                assert key == "href" and (written / value).is_file(), value  # links only to files beside it


@pytest.mark.slow  # builds a whole report (tens of seconds here): make test runs it, test-fast does not
def test_report_names_inputs_hashes_and_settings(written: Path, default_analysis: tuple[dict, dict]) -> None:
    similarity, inputs = default_analysis
    text = (written / "report.html").read_text(encoding="utf-8")
    weights = Path(inputs["adapter"]["path"]) / "adapter_model.safetensors"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() in text
    base_weights = Path(inputs["base"]["path"]) / "model.safetensors"
    assert hashlib.sha256(base_weights.read_bytes()).hexdigest() in text
    assert str(inputs["adapter"]["path"]) in text and str(inputs["base"]["path"]) in text
    assert "adapter_config.json" in text and "lora_alpha" in text and "hidden_size = 384" in text
    for key in ("side", "seed", "random_baseline", "conventions"):
        assert f"<th>{key}</th>" in text
    for factors in similarity["modules"].values():
        for s in factors.values():
            assert f"{s['mean_offdiag']:.4f}" in text
    assert "Table 3" in text and "36,864" in text  # Tables 3 and 4 from the data given


@pytest.mark.slow  # builds a whole report (tens of seconds here): make test runs it, test-fast does not
def test_pictures_are_150_dpi_png_and_valid_svg(written: Path) -> None:
    png = Image.open(written / "figure1_value_B.png")
    assert png.info["dpi"][0] == pytest.approx(150, abs=1)
    root = ET.parse(written / "figure1_value_B.svg").getroot()
    assert root.tag.endswith("svg")


@pytest.mark.slow  # builds a whole report (tens of seconds here): make test runs it, test-fast does not
def test_csv_files_hold_the_exact_numbers(written: Path, default_analysis: tuple[dict, dict]) -> None:
    similarity, _ = default_analysis
    with (written / "phi_matrices.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3 * 2 * 36
    for row in rows:
        key = "phi" if row["matrix"] == "conversion" else "random_phi"
        a, b = int(row["row_layer"]) - 1, int(row["col_layer"]) - 1
        assert float(row["phi"]) == similarity["modules"][row["module"]][row["factor"]][key][a][b]
    with (written / "table3.csv").open(newline="") as f:
        table3_rows = list(csv.reader(f))
    assert [float(v) for v in table3_rows[1][2:8]] == TABLE3["modules"]["query"]["A"]


def test_figure_files_are_pictures_and_the_phi_csv(default_analysis: tuple[dict, dict]) -> None:
    similarity, _ = default_analysis
    one = {"modules": {"value": {"B": similarity["modules"]["value"]["B"]}}, "settings": similarity["settings"]}
    assert set(figure_files(one)) == {"figure1_value_B.png", "figure1_value_B.svg", "phi_matrices.csv"}


def test_report_without_condlora_has_no_comparison_section(default_analysis: tuple[dict, dict], tmp_path: Path) -> None:
    similarity, inputs = default_analysis
    one = {"modules": {"value": {"A": similarity["modules"]["value"]["A"]}}, "settings": similarity["settings"]}
    write_outputs(tmp_path / "r", report_files(one, inputs, title="A <small> report"))
    text = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    assert "<title>A &lt;small&gt; report</title>" in text
    assert "LoRA vs CondLoRA" not in text and "Low-rank updates" not in text
    assert not (tmp_path / "r" / "table3.csv").exists()
    assert not (tmp_path / "r" / "amplification.png").exists()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({}, "no modules"),
        ({"modules": {"value": {}}}, "'value' has no factors"),
        ({"modules": {"value": {"B": {"phi": [[1.0]]}}}}, "'value' / 'B' lacks random_phi, mean_offdiag"),
    ],
)
def test_malformed_similarity_data_is_named(data: dict, match: str) -> None:
    with pytest.raises(LoralensError, match=match):
        figure_files(data)


def test_rendering_is_deterministic_and_png_is_agg() -> None:
    phi = [[1.0, 0.2], [0.2, 1.0]]
    first, second = (render_figure(similarity_figure(phi, phi, module="m", factor="A")) for _ in range(2))
    assert first == second  # identical runs give identical files (SVG ids are salted, no dates)
    assert first[0].startswith(b"\x89PNG") and b"<svg" in first[1]


# ---------------------------------------------------------------------- the LoRA paper's analyses (Hu et al. 2022)

LOWRANK = ("amplification", "spectra", "intruders", "overlap")
#: The pictures: the overlap is drawn once per module (#20: one picture of every module and layer was unreadable).
LOWRANK_PICTURES = ("amplification", "spectra", "intruders", "overlap_query", "overlap_value")
LOWRANK_DEFINITIONS = {**DEFINITIONS, "intruders": INTRUDER_DEFINITION}


@pytest.fixture(scope="module")
def lowrank_data() -> dict[str, dict[str, Any]]:
    """Amplification and spectra of the default adapter, and its overlap with itself (a known answer: phi(i, i) = 1)."""
    adapter = loralens.load_lora_adapter(loralens.examples.default_adapter())
    base = loralens.base_for(adapter, loralens.examples.default_base())
    return {
        "amplification": amplification_report(base, adapter, n_random=4, seed=1, device="cpu").to_dict(),
        "spectra": spectra_report(base, adapter, energy_threshold=0.8, device="cpu").to_dict(),
        "intruders": intruder_dimensions(base, adapter, device="cpu", record_inputs=False).to_dict(),
        "overlap": rank_overlap(adapter, adapter, base=base, device="cpu").to_dict(),
    }


@pytest.fixture(scope="module")
def one_factor(default_analysis: tuple[dict, dict]) -> dict[str, Any]:
    """Figure-1 data cut to one module and factor, so reports here render few pictures."""
    similarity, _ = default_analysis
    return {"modules": {"value": {"B": similarity["modules"]["value"]["B"]}}, "settings": similarity["settings"]}


@pytest.fixture(scope="module")
def written_lowrank(
    one_factor: dict, default_analysis: tuple[dict, dict], lowrank_data: dict, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("lowrank") / "report"
    write_outputs(out, report_files(one_factor, default_analysis[1], lowrank=lowrank_data))
    return out


@pytest.mark.slow  # builds a whole report (tens of seconds here): make test runs it, test-fast does not
def test_report_with_lowrank_writes_pictures_and_tables(written_lowrank: Path) -> None:
    names = {p.name for p in written_lowrank.iterdir()}
    assert {f"{a}.{ext}" for a in LOWRANK for ext in ("csv", "md", "tex")} <= names
    assert {f"{a}.{ext}" for a in LOWRANK_PICTURES for ext in ("png", "svg")} <= names and "overlap.png" not in names
    for a in LOWRANK_PICTURES:
        assert Image.open(written_lowrank / f"{a}.png").format == "PNG"
        assert ET.parse(written_lowrank / f"{a}.svg").getroot().tag.endswith("svg")
    for a in LOWRANK:
        assert (written_lowrank / f"{a}.tex").read_text().startswith(r"\begin{table}")


@pytest.mark.slow  # builds a whole report (tens of seconds here): make test runs it, test-fast does not
def test_report_lowrank_section_embeds_pictures_tables_and_captions(written_lowrank: Path) -> None:
    text = (written_lowrank / "report.html").read_text(encoding="utf-8")
    page = parse(text)
    assert "<h2" in text and "Low-rank updates (Hu et al. 2022, Section 7)</h2>" in text
    figures = {attrs["id"] for tag, attrs in page.tags if tag == "figure"}
    assert set(LOWRANK_PICTURES) <= figures
    images = [attrs for tag, attrs in page.tags if tag == "img"]
    assert len(images) == 1 + 5  # Figure 1 for value/B, then the analyses, the overlap once per module
    for attrs in images[1:]:
        png = Image.open(io.BytesIO(base64.b64decode((attrs["src"] or "").split(",", 1)[1])))
        assert png.format == "PNG" and png.width > 600
    section = text[text.index("Low-rank updates") :]
    for a in LOWRANK:
        assert html.escape(LOWRANK_DEFINITIONS[a]) in section  # the caption states the definition
        assert f'href="{a}.csv"' in section
    for a in LOWRANK_PICTURES:
        assert f'href="{a}.png"' in section
    assert section.count("<table") >= 3 and "phi(k,k)" in section and "ampl." in section and "erank 80%" in section


@pytest.mark.slow  # builds a whole report (tens of seconds here): make test runs it, test-fast does not
def test_lowrank_csv_tables_hold_the_librarys_numbers(written_lowrank: Path, lowrank_data: dict) -> None:
    with (written_lowrank / "amplification.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    modules = lowrank_data["amplification"]["modules"]
    assert len(rows) == sum(len(m["layers"]) for m in modules.values())
    for row in rows:
        m = modules[row["module"]]
        n = m["layers"].index(int(row["layer"]) - 1)
        assert float(row["ampl."]) == m["amplification"][n] and float(row["dW"]) == m["dW_projection"][n]
        assert float(row["random"]) == m["random_projection_mean"][n] and int(row["r"]) == m["ranks"][n]
    with (written_lowrank / "overlap.csv").open(newline="") as f:
        overlap_rows = list(csv.DictReader(f))
    assert overlap_rows and all(float(r["phi(k,k)"]) == pytest.approx(1.0) for r in overlap_rows)  # itself
    with (written_lowrank / "spectra.csv").open(newline="") as f:
        spectra_rows = list(csv.DictReader(f))
    value = lowrank_data["spectra"]["modules"]["value"]
    first = next(r for r in spectra_rows if r["module"] == "value")
    assert float(first["sigma_1"]) == value["singular_values"][0][0]
    assert int(first["erank 80%"]) == value["effective_rank_energy"][0]


@pytest.mark.slow  # tens of seconds: make test runs it, make test-fast does not
def test_lowrank_report_is_byte_identical_on_reruns(one_factor: dict, lowrank_data: dict, tmp_path: Path) -> None:
    inputs = {"adapter": {"path": "a"}, "base": {"path": "b"}}
    for name in ("a", "b"):  # two independent renderings, from JSON round trips of the data
        data = json.loads(json.dumps(lowrank_data))
        write_outputs(tmp_path / name, report_files(one_factor, inputs, lowrank=data))
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@pytest.mark.slow  # builds a whole report (tens of seconds here): make test runs it, test-fast does not
def test_lowrank_pictures_from_the_dicts(lowrank_data: dict) -> None:
    for build, name in ((amplification_picture, "amplification"), (spectra_picture, "spectra")):
        pic = build(lowrank_data[name], 72)
        assert pic.stem == name and pic.png.startswith(b"\x89PNG") and b"<svg" in pic.svg[:2000]
        assert DEFINITIONS[name] in pic.caption
    overlap = overlap_picture(lowrank_data["overlap"], 72)
    adapter_name = Path(lowrank_data["overlap"]["adapters"][0]).name
    assert overlap.stem == "overlap" and adapter_name in overlap.caption
    assert Image.open(io.BytesIO(overlap.png)).info["dpi"][0] == pytest.approx(72, abs=1)


@pytest.mark.parametrize(
    ("lowrank", "match"),
    [
        ({"amplification": {}}, "amplification data has no modules"),
        ({"spectra": {"modules": {"value": {"layers": [0]}}}}, "'value' lacks ranks, singular_values"),
        ({"overlap": {"modules": {"value": {"layers": [0], "ranks": [[1], [1]], "factors": {"A": {}}}}}}, "grid"),
        ({"svd": {"modules": {}}}, "unknown analysis 'svd'; choose from amplification, spectra, intruders, overlap"),
    ],
)
def test_malformed_lowrank_data_is_named(one_factor: dict, lowrank: dict, match: str) -> None:
    with pytest.raises(LoralensError, match=match):
        report_files(one_factor, {}, lowrank=lowrank)


@pytest.mark.slow  # tens of seconds: make test runs it, make test-fast does not
def test_build_report_writes_what_the_cli_writes(minilm_path: Path, tmp_path: Path) -> None:
    """The Python API's report (loralens.build_report) is the CLI's: the same files, byte for byte, and the same
    report.json, for two seed pairs (Tables 2 and 3 over pairs, training speeds), the overlap and the low-rank
    analyses. report.json has no timing field, so nothing is dropped before comparing."""
    from loralens.examples import default_adapter, default_condlora

    out_cli, out_api = tmp_path / "cli", tmp_path / "api"
    pairs = [(default_adapter(s), default_condlora(s)) for s in (0, 1)]
    argv = ["report", "--base", minilm_path, "--out", out_cli, "--overlap", default_adapter(2)]
    for lora_folder, cond_folder in pairs:
        argv += ["--lora", lora_folder, "--condlora", cond_folder]
    proc = run_cli(*argv, "--modules", "value", "--seed", "3", "--dpi", "72", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr

    loras = [loralens.load_lora_adapter(lo) for lo, _ in pairs]
    built = loralens.build_report(
        loralens.base_for(loras[0], minilm_path),
        loras,
        [loralens.load_condlora_adapter(c) for _, c in pairs],
        overlap=loralens.load_lora_adapter(default_adapter(2)),
        modules=["value"],
        seed=3,
        dpi=72,
        device="cpu",
    )
    built.write(out_api)

    from_cli = json.loads((out_cli / "report.json").read_text())
    assert built.to_dict() == from_cli == json.loads((out_api / "report.json").read_text())
    assert from_cli["pairs"]["table2"] is not None
    assert set(from_cli["lowrank"]) == {"amplification", "spectra", "intruders", "overlap"}
    assert from_cli["settings"]["device"] == "cpu" and from_cli["settings"]["dtype"] == "float64"
    # Table 4's speeds are the runs' recorded wall clocks: the note says when they compare
    assert "had the same machine to themselves" in (out_cli / "report.html").read_text()
    names = sorted(p.name for p in out_cli.iterdir())
    assert names == sorted(p.name for p in out_api.iterdir()) and "report.html" in names
    for name in names:
        assert (out_cli / name).read_bytes() == (out_api / name).read_bytes(), name


# ---------------------------------------------------------------------- at 30 layers (#20)

#: The report's content width: body max-width 72rem at 16 px. A picture wider than twice this would be shown at
#: under half its size (the 30-layer Figure 1 was 5,428 px, shown at 21 %).
CONTENT_PX = 72 * 16


@pytest.fixture(scope="module")
def written_30(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole report of a synthetic 30-layer BERT and its PEFT LoRA adapter (query, value; r = 4), with the
    W-null (4 draws) and the overlap of the adapter with itself."""
    from checkpoints import bert_base, lora_adapter

    folder = tmp_path_factory.mktemp("layers30")
    base_dir = bert_base(folder / "base", layers=30)
    adapter = loralens.load_lora_adapter(lora_adapter(base_dir, folder / "adapter", arch="bert", alpha=4))
    built = loralens.build_report(
        loralens.base_for(adapter, base_dir), adapter, overlap=adapter, device="cpu", null_draws=4
    )
    built.write(folder / "report")
    return folder / "report"


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR header."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.slow  # builds a 30-layer model and its whole report (about a minute here)
def test_thirty_layer_report_is_readable_without_shrinking(written_30: Path) -> None:
    text = (written_30 / "report.html").read_text(encoding="utf-8")
    page = parse(text)
    images = [attrs["src"] or "" for tag, attrs in page.tags if tag == "img"]
    assert len(images) == 6 + 3 + 2  # Figure 1 (2 modules x 3 factors), amplification/spectra/intruders, overlap x 2
    for src in images:
        width, height = png_size(base64.b64decode(src.split(",", 1)[1]))
        assert width <= 2 * CONTENT_PX, (width, height)  # shown at >= 50 % of its size
        assert height <= 3_000, (width, height)  # the tallest: one module's overlap, 2 factors x 5 lines of 6
    # a table of contents first, its links resolving to ids of the page
    ids = {attrs["id"] for _, attrs in page.tags if attrs.get("id")}
    links = [attrs["href"] or "" for tag, attrs in page.tags if tag == "a" and (attrs["href"] or "").startswith("#")]
    assert text.index('<nav id="contents"') < text.index('<h2 id="summary"') < text.index('<h2 id="inputs"')
    assert {"#summary", "#figure1", "#lowrank", "#lowrank-intruders", "#figure1_query_A"} <= set(links)
    assert all(link[1:] in ids for link in links)
    # the summary: a verdict per module and factor by the stated rule
    summary = text[text.index('<h2 id="summary"') : text.index('<h2 id="inputs"')]
    assert "observed &gt; mean + 2 std" in summary
    assert summary.count("within the W-null") + summary.count("above the W-null by") >= 6
    # long tables folded (spectra, amplification, intruders: 2 modules x 30 layers = 60 rows), with a one-line summary
    folded = re.findall(r'<details class="table"><summary>([^<]*)</summary>', text)
    assert len(folded) >= 3 and all("60 rows" in s or "rows" in s for s in folded)
    assert any(s.startswith("Intruder dimensions") for s in folded)
    # every table scrolls in its own box: a wide one never widens the page
    assert text.count("<table") == text.count('<div class="wide"><table') + text.count('<table class="inputs">') + (
        text.count('<table class="settings">')
    )


@pytest.mark.slow  # renders a Figure-1 picture (seconds)
def test_summary_gives_a_verdict_by_the_stated_rule(one_factor: dict, tmp_path: Path) -> None:
    """Observed > W-null mean + 2 std: "above the W-null by X std"; else "within the W-null"; also for Table 3."""
    table3 = json.loads(json.dumps(TABLE3))
    table3["modules"]["query"]["w_null"] = {
        "A": {"mean_over_layers": 0.02, "mean_over_layers_std": 0.005},  # observed mean 0.0533: (0.0533-0.02)/0.005
        "B": {"mean_over_layers": 0.04, "mean_over_layers_std": 0.01},  # observed mean 0.04: 0 std
    }
    write_outputs(tmp_path / "r", report_files(one_factor, {}, comparison=table3))
    text = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    summary = text[text.index('<h2 id="summary"') : text.index('<h2 id="inputs"')]
    assert "observed &gt; mean + 2 std" in summary
    assert (
        "above the W-null by 6.7 std" in summary and "within the W-null (not evidence of learning; +0.0 std)" in summary
    )
    s = one_factor["modules"]["value"]["B"]
    null = s.get("w_null")
    if null is None:  # no W-null computed: the verdict says so and compares with the Gaussian baseline only
        assert "no W-null computed" in summary
    else:
        z = (s["mean_offdiag"] - null["mean_offdiag"]) / null["mean_offdiag_std"]
        assert (f"above the W-null by {z:.1f} std" if z > 2 else f"{z:+.1f} std)") in summary


@pytest.mark.slow  # renders two Figure-1 pictures (seconds)
def test_phi_tables_name_a_non_square_module_with_the_pseudo_inverse(
    default_analysis: tuple[dict, dict], tmp_path: Path
) -> None:
    """The folded phi tables' captions say W^+ for a module solved by least squares (a non-square W), as its
    figure does, and W^-1 for a square one."""
    similarity, _ = default_analysis
    data = json.loads(json.dumps(similarity))
    data["modules"] = {m: {"B": data["modules"][m]["B"]} for m in ("query", "value")}
    data["settings"]["conventions"] = {"query": "solve", "value": "lstsq"}
    write_outputs(tmp_path / "r", report_files(data, {}))
    text = html.unescape((tmp_path / "r" / "report.html").read_text(encoding="utf-8"))
    for name in ("phi", "random phi"):
        assert f"value, W^+ B: {name}" in text and f"value, W^-1 B: {name}" not in text
        assert f"query, W^-1 B: {name}" in text and f"query, W^+ B: {name}" not in text
