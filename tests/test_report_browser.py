"""The report in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`,
driven by selenium, offline) opens the report of a small real run -- scikit-learn's digits,
a real test set -- and every image loads, nothing is logged to the console, and no card's text
runs into another card or out of its own."""

from __future__ import annotations

from pathlib import Path

import pytest
from digits import digits_config, keep_classes, write_digits

from conftest import save_config, unavailable
from synthflux import ingest
from synthflux.config import load_config
from synthflux.pipeline import run_pipeline

CHROMIUM = "/usr/bin/chromium"
DRIVER = "/usr/bin/chromedriver"

# Run in the page: what a person would see wrong, as data.
CHECKS = """
const images = [...document.images];
const broken = images.filter(im => !im.complete || im.naturalWidth === 0).map(im => im.alt);
const cards = [...document.querySelectorAll('figure')].map(f => f.getBoundingClientRect());
const overlaps = [];
for (let i = 0; i < cards.length; i++) for (let j = i + 1; j < cards.length; j++) {
  const a = cards[i], b = cards[j];
  if (a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom) overlaps.push([i, j]);
}
const spilled = [...document.querySelectorAll('figure')].filter(f => {
  const box = f.getBoundingClientRect();
  return [...f.querySelectorAll('figcaption, figcaption *')].some(t => {
    const r = t.getBoundingClientRect();
    return r.right > box.right + 1 || r.bottom > box.bottom + 1;
  });
}).length;
const wrapped = [...document.querySelectorAll('figure .id')].filter(d => d.offsetHeight > 20).length;
return {images: images.length, wrapped, broken, cards: cards.length, overlaps: overlaps.length, spilled,
        headline: document.getElementById('headline').innerText};
"""


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run's report: three digit classes, trained on the real training images."""
    root = tmp_path_factory.mktemp("browser")
    train, test = write_digits(root / "digits")
    keep_classes((train, test), ["0", "1", "2"])
    raw = digits_config(root / "data", epochs=3)
    raw["classes"] = [{"name": c} for c in ("0", "1", "2")]
    path, cfg = save_config(root / "digits.toml", raw)
    ingest.run(cfg, train, split="train")
    ingest.run(cfg, test, split="test")
    run_pipeline(load_config(path), say=lambda line: None)
    return root / "data" / "report" / "index.html"


def browser():  # type: ignore[no-untyped-def]
    if not (Path(CHROMIUM).is_file() and Path(DRIVER).is_file()):
        unavailable("no headless Chromium (apt: chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(DRIVER))


def test_the_report_in_a_real_browser(report: Path, tmp_path: Path) -> None:
    driver = browser()
    try:
        driver.get(report.as_uri())
        seen = driver.execute_script(CHECKS)
        console = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        driver.save_screenshot(str(tmp_path / "report.png"))
    finally:
        driver.quit()
    assert seen["images"] > 20 and seen["broken"] == []  # every picture and thumbnail loads
    assert console == []
    assert seen["cards"] > 20 and seen["overlaps"] == 0 and seen["spilled"] == 0
    assert seen["wrapped"] == 0  # an id on one line: never a digit that reads as a label
    assert "real test set test (" in seen["headline"]
    assert (tmp_path / "report.png").stat().st_size > 10_000
    # Self-contained: nothing it shows is fetched from anywhere.
    page = report.read_text()
    assert "http://" not in page and "https://" not in page
