"""The report, uploaded to a real SeaweedFS and opened from there in headless Chromium: it loads
offline, every image decodes, tables sort.

Chromium comes from `tests.support.chromium`. Screenshots go to `test-artifacts/` for a person
to look at.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.chromium import browser, chromium, save_screenshot  # noqa: F401 - fixtures, used by name

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.slow]  # SeaweedFS + Chromium: ~20-50 s

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = PROJECT_ROOT / "test-artifacts"


def test_report_page_loads_offline_and_every_figure_decodes(browser, store, tmp_path):
    from tests.unit.test_report import make_inputs

    from dermflow import layout
    from dermflow.evaluation.report import build_report, write_report

    run_id = "20261126-101500-browser-check"
    report = build_report(make_inputs(seed=2))
    uris = write_report(report, store, run_id)
    assert uris["report"] == store.uri(layout.report_key(run_id))
    assert store.get_json(layout.run_metrics_key(run_id)) == report.metrics
    assert sorted(store.list_keys(layout.run_key(run_id, "figures") + "/")) == sorted(
        layout.figure_key(run_id, name) for name in report.figures)
    # the page as a user downloads it from the bucket
    page = tmp_path / "report.html"
    page.write_bytes(store.get_bytes(layout.report_key(run_id)))

    for domain in ("Page", "Network", "Runtime", "Log"):
        browser.send(f"{domain}.enable")
    browser.send("Page.navigate", url=page.as_uri())
    browser.wait_for("Page.loadEventFired", timeout=90)

    _assert_loaded_offline_with_every_figure(browser, report)
    _assert_tables_sort_and_the_matrix_zooms(browser)

    ARTIFACTS.mkdir(exist_ok=True)
    browser.evaluate("window.scrollTo(0, 0)")
    save_screenshot(browser, ARTIFACTS / "report-browser-top.png", full_page=False)
    save_screenshot(browser, ARTIFACTS / "report-browser-full.png", full_page=True)
    (ARTIFACTS / "report-browser.html").write_text(report.html, encoding="utf-8")
    assert (ARTIFACTS / "report-browser-top.png").stat().st_size > 10_000


def _assert_loaded_offline_with_every_figure(browser: DevTools, report) -> None:
    """No request left the machine, nothing failed, every figure decoded, every section is there."""
    requests = [e["params"]["request"]["url"] for e in browser.events if e["method"] == "Network.requestWillBeSent"]
    failed = [e["params"] for e in browser.events if e["method"] == "Network.loadingFailed"]
    errors = [e["params"] for e in browser.events
              if e["method"] == "Runtime.exceptionThrown"
              or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    assert failed == [], failed
    assert errors == [], errors
    assert [url for url in requests if not url.startswith(("file:", "data:"))] == []

    images = browser.evaluate(
        "Array.from(document.images).map(i => ({name: i.dataset.figure, complete: i.complete,"
        " w: i.naturalWidth, h: i.naturalHeight}))")
    assert len(images) == len(report.figures)
    assert {i["name"] for i in images} == set(report.figures)
    for image in images:
        assert image["complete"] and image["w"] > 0 and image["h"] > 0, image

    sections = browser.evaluate("Array.from(document.querySelectorAll('section h2')).map(h => h.textContent)")
    assert "Per class" in sections and "Licence & use" in sections


def _assert_tables_sort_and_the_matrix_zooms(browser: DevTools) -> None:
    """The page's script works: headers sort, the big matrix zooms on click."""
    # header click sorts the per-class table by support, descending on the second click
    order = browser.evaluate("""(() => {
        const th = document.querySelectorAll('#per-class-table th')[1];
        th.click(); th.click();
        return Array.from(document.querySelectorAll('#per-class-table tbody tr'))
            .map(r => parseFloat(r.cells[1].dataset.v));
    })()""")
    assert order == sorted(order, reverse=True) and order[0] > order[-1]

    # the big confusion matrix fits the column, and a click shows it at full size
    widths = browser.evaluate("""(() => {
        const img = document.querySelector('#fig-confusion_all_labels img');
        const fitted = img.clientWidth; img.click(); const zoomed = img.clientWidth; img.click();
        return [fitted, zoomed, img.naturalWidth, img.closest('section').clientWidth];
    })()""")
    fitted, zoomed, natural, column = widths
    assert fitted <= column < natural and zoomed == natural, widths
