"""The report in a real headless Chromium: no console error, every picture decodes, the table and 3D view render.

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package; skipped when any is missing.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from mmiad.engine import evaluate_run
from mmiad.metrics import METRIC_KEYS
from mmiad.report.viewer import BACKGROUND

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
)


def _browser_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _missing() -> str | None:
    """Why the browser test cannot run here, checked before any fixture trains a model."""
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install selenium)"
    if _browser_binary() is None or shutil.which("chromedriver") is None:
        return "chromium/chromedriver not found (apt-get install -y chromium chromium-driver)"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_missing() is not None, reason=_missing() or "")]


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, chromedriver = _browser_binary(), shutil.which("chromedriver")
    assert browser is not None and chromedriver is not None
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    session = webdriver.Chrome(options=options, service=Service(chromedriver))
    session.set_page_load_timeout(30)
    yield session
    session.quit()


COUNT_FOREGROUND = """
var canvas = document.getElementById("mmiad-viewer");
var pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
var count = 0;
for (var i = 0; i < pixels.length; i += 4) {
  if (pixels[i] !== arguments[0] || pixels[i + 1] !== arguments[1] || pixels[i + 2] !== arguments[2]) { count++; }
}
return count;
"""


def test_report_renders_in_headless_chromium(driver, tiny_run: tuple[Path, Path, str], tiny_report: Path) -> None:
    driver.get(tiny_report.resolve().as_uri())
    assert driver.execute_script("return document.readyState") == "complete"
    assert driver.execute_script("return window.mmiadViewerReady") is True

    severe = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == []

    widths = driver.execute_script("return Array.from(document.images).map(function (i) { return i.naturalWidth; })")
    assert widths and all(width > 0 for width in widths)

    data, run, cache = tiny_run
    expected, _ = evaluate_run(run, data, cache_dir=cache)
    shown = driver.execute_script(
        "var out = {}; document.querySelectorAll('#metrics tr[data-category]').forEach(function (row) {"
        "  var cells = {}; row.querySelectorAll('td[data-key]').forEach(function (td) {"
        "    cells[td.getAttribute('data-key')] = td.textContent; });"
        "  out[row.getAttribute('data-category')] = cells; }); return out;"
    )
    for category, metrics in [*expected["per_category"].items(), ("mean", expected["mean"])]:
        for key in METRIC_KEYS:
            value = metrics[key]
            assert shown[category][key] == ("–" if value is None else f"{value:.3f}"), (category, key)

    # The first cloud is drawn: a good share of its points reached the canvas as non-background pixels.
    payload = json.loads(re.search(r'id="mmiad-clouds">(.*?)</script>', tiny_report.read_text()).group(1))
    first = payload["clouds"][0]["count"]
    assert driver.execute_script("return window.mmiadViewerDrawn") == first
    assert driver.execute_script(COUNT_FOREGROUND, *BACKGROUND) >= first

    # Dragging rotates the view: the picture changes.
    before = driver.execute_script("return document.getElementById('mmiad-viewer').toDataURL()")
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    canvas = driver.find_element(By.ID, "mmiad-viewer")
    ActionChains(driver).move_to_element(canvas).click_and_hold().move_by_offset(80, 30).release().perform()
    after = driver.execute_script("return document.getElementById('mmiad-viewer').toDataURL()")
    assert after != before
    assert [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"] == []
