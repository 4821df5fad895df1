"""report.html in a real headless browser (Debian's Chromium via chromedriver): no console errors, every
picture decoded. ``make test`` installs Chromium when it is missing (``make browser``); without it this test
fails with the command to run, it never skips.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import loralens
from loralens.io.outputs import write_outputs
from loralens.render.report import input_identities, report_files

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
IMAGES = "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(
            f"the browser test needs Chromium and chromedriver, missing: {', '.join(missing)}; run `make browser` "
            "(apt-get install chromium chromium-driver), which `make test` does first",
            pytrace=False,
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,2000",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver: Any) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_report_opens_in_a_browser(browser: Any, tmp_path: Path) -> None:
    adapter = loralens.load_lora_adapter(loralens.examples.default_adapter())
    base = loralens.base_for(adapter, loralens.examples.default_base())
    similarity = loralens.layer_similarity(loralens.compute_conversions(base, adapter, device="cpu")).to_dict()
    out = tmp_path / "report"
    write_outputs(out, report_files(similarity, input_identities(base, adapter)))
    # the page must not need the files beside it: open a lone copy
    alone = tmp_path / "alone" / "report.html"
    alone.parent.mkdir()
    shutil.copy(out / "report.html", alone)

    browser.get(alone.as_uri())
    assert browser.execute_script("return document.readyState") == "complete"
    assert browser.title == "loralens report: minilm-rt-lora"
    images = browser.execute_script(IMAGES)
    assert len(images) == 6
    assert all(complete and width > 0 and height > 0 for complete, width, height in images), images
    assert console_errors(browser) == []
    # the summary comes first now, so Figure 1's heading is found by its id (#20)
    heading = browser.execute_script("return document.getElementById('figure1').textContent")
    assert heading.startswith("Figure 1")
    assert check_layout(browser) == []

    shot = tmp_path / "report-screenshot.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    print(f"report screenshot: {shot}")


#: What the layout checks read from the page: its size, the viewport, every picture's natural and shown width, and
#: the contents' links with whether each names an id of the page.
LAYOUT = """
const links = Array.from(document.querySelectorAll('nav#contents a'));
return {
  height: document.documentElement.scrollHeight,
  scrollWidth: document.body.scrollWidth,
  innerWidth: window.innerWidth,
  images: Array.from(document.images).map(i => [i.naturalWidth, i.getBoundingClientRect().width]),
  links: links.map(a => [a.getAttribute('href'), document.getElementById(a.getAttribute('href').slice(1)) !== null]),
};
"""


def check_layout(driver: Any, max_height: int | None = None) -> list[str]:
    """What is wrong with the open page's layout: anything wider than the viewport, a picture shown at under half its
    width, a contents link to no id, a page taller than ``max_height``."""
    page = driver.execute_script(LAYOUT)
    problems = []
    if page["scrollWidth"] > page["innerWidth"]:
        problems.append(f"page {page['scrollWidth']} px wide in a {page['innerWidth']} px viewport")
    problems += [f"picture {w} px wide shown at {shown:.0f} px" for w, shown in page["images"] if shown < 0.5 * w]
    problems += [f"contents link {href} names no id" for href, found in page["links"] if not found]
    if max_height is not None and page["height"] > max_height:
        problems.append(f"page {page['height']} px tall, more than {max_height}")
    return problems


#: The 30-layer report (2 modules x 3 factors of Figure 1, amplification, spectra, intruders, the overlap of 2
#: modules) is about 15,000 px tall at 1280 px wide (before #20: 12,275 px with every Figure-1 picture shrunk to 21 %
#: of its width); each Figure-1 picture takes about 900 px. The bound leaves room for wrapping, no more.
MAX_HEIGHT_30 = 20_000


def test_thirty_layer_report_fits_the_window(browser: Any, tmp_path: Path) -> None:
    """A synthetic 30-layer BERT and its PEFT LoRA adapter (tests/checkpoints.py): nothing wider than the window,
    every picture at half its size or more, the contents' links resolve, the page height bounded."""
    from checkpoints import bert_base, lora_adapter

    base_dir = bert_base(tmp_path / "base", layers=30)
    adapter = loralens.load_lora_adapter(lora_adapter(base_dir, tmp_path / "adapter", arch="bert", alpha=4))
    built = loralens.build_report(
        loralens.base_for(adapter, base_dir), adapter, overlap=adapter, device="cpu", null_draws=4
    )
    built.write(tmp_path / "report")
    browser.get((tmp_path / "report" / "report.html").as_uri())
    assert browser.execute_script("return document.readyState") == "complete"
    images = browser.execute_script(IMAGES)
    assert len(images) == 11 and all(complete and width > 0 for complete, width, _ in images), images
    assert len(browser.execute_script(LAYOUT)["links"]) >= 12
    assert check_layout(browser, MAX_HEIGHT_30) == []
    assert console_errors(browser) == []
    shot = tmp_path / "report-30-layers.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def test_the_checks_can_fail(browser: Any, tmp_path: Path) -> None:
    """A page with a console error and a broken picture is caught by the same checks."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!DOCTYPE html><html><body><img src="data:image/png;base64,AAAA" alt="broken">'
        "<script>console.error('deliberate')</script></body></html>",
        encoding="utf-8",
    )
    browser.get(bad.as_uri())
    [(complete, width, _)] = browser.execute_script(IMAGES)
    assert width == 0
    assert any("deliberate" in m for m in console_errors(browser))


def test_the_layout_checks_can_fail(browser: Any, tmp_path: Path) -> None:
    """A page wider than the window, a picture shrunk to a fifth, a dead contents link and a tall page are caught."""
    bad = tmp_path / "wide.html"
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
    bad.write_text(
        '<!DOCTYPE html><html><body><nav id="contents"><a href="#nowhere">x</a></nav>'
        f'<img src="data:image/png;base64,{png}" style="width: 0.2px">'
        '<div style="width: 5000px; height: 30000px">wide</div></body></html>',
        encoding="utf-8",
    )
    browser.get(bad.as_uri())
    problems = check_layout(browser, MAX_HEIGHT_30)
    assert [p.split(" ")[0] for p in problems] == ["page", "picture", "contents", "page"], problems
