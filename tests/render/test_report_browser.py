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
    heading = browser.execute_script("return document.querySelector('h2:nth-of-type(3)').textContent")
    assert heading.startswith("Figure 1")

    shot = tmp_path / "report-screenshot.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    print(f"report screenshot: {shot}")


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
