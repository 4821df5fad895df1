"""The HTML report and figure files from the real default adapter: self-contained, complete, exact numbers."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import loralens
from loralens.errors import LoralensError
from loralens.io.outputs import write_outputs
from loralens.plots import similarity_figure
from loralens.report import figure_files, input_identities, render_figure, report_files

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
    for tag, attrs in page.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed")
        for key in ("src", "href"):
            value = attrs.get(key)
            if value and not value.startswith("data:"):
                assert key == "href" and (written / value).is_file(), value  # links only to files beside it


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


def test_pictures_are_150_dpi_png_and_valid_svg(written: Path) -> None:
    png = Image.open(written / "figure1_value_B.png")
    assert png.info["dpi"][0] == pytest.approx(150, abs=1)
    root = ET.parse(written / "figure1_value_B.svg").getroot()
    assert root.tag.endswith("svg")


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
    assert "LoRA vs CondLoRA" not in text
    assert not (tmp_path / "r" / "table3.csv").exists()


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
