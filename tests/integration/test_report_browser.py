"""The report, uploaded to a real SeaweedFS and opened from there in headless Chromium: it loads
offline, every image decodes, tables sort.

Chromium is driven over the DevTools protocol (a small websocket client) so that failed
requests, script errors and image sizes come from the browser itself. Screenshots go to
`test-artifacts/` for a person to look at.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.slow]  # SeaweedFS + Chromium: ~20-50 s

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = PROJECT_ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1366,900",
]


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.exists():
        script = PROJECT_ROOT / "scripts" / "install-chromium.sh"
        try:
            result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            pytest.skip("chromium is missing and scripts/install-chromium.sh timed out")
        if result.returncode != 0 or not CHROMIUM.exists():
            pytest.skip(f"chromium is missing and scripts/install-chromium.sh failed: {result.stderr.strip()[-300:]}")
    return CHROMIUM


class DevTools:
    """Just enough of the DevTools protocol: commands by id, events collected while waiting."""

    def __init__(self, websocket_url: str):
        from websockets.sync.client import connect

        self.socket = connect(websocket_url, max_size=None, open_timeout=20)
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, timeout: float = 60, **params) -> dict:
        self.next_id += 1
        command_id = self.next_id
        self.socket.send(json.dumps({"id": command_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.socket.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == command_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def wait_for(self, event: str, timeout: float = 60) -> dict:
        for seen in self.events:
            if seen["method"] == event:
                return seen
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.socket.recv(timeout=max(0.1, deadline - time.monotonic())))
            if "method" in message:
                self.events.append(message)
                if message["method"] == event:
                    return message

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self) -> None:
        self.socket.close()


def _launch_chromium(chromium: Path, profile: Path) -> tuple[subprocess.Popen, str]:
    """Start Chromium and return it with its first page's DevTools websocket address.

    Chromium writes DevToolsActivePort once it has bound the port, but on a loaded box the HTTP
    endpoint can still refuse a connection for a moment, or the browser can die right after
    starting; so the endpoint is polled until a page is listed, and a dead browser fails fast.
    """
    process = subprocess.Popen(
        [str(chromium), *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 90
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ChromiumDied(f"chromium exited with {process.returncode}: "
                               f"{process.stderr.read().decode()[-500:]}")
        if port_file.exists() and port_file.read_text().strip():
            port = int(port_file.read_text().split()[0])
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
                    pages = [t for t in json.load(response) if t["type"] == "page"]
                if pages:
                    return process, pages[0]["webSocketDebuggerUrl"]
            except OSError as error:  # refused or reset while Chromium finishes starting
                last_error = error
        time.sleep(0.2)
    _stop(process)
    raise ChromiumDied(f"chromium did not list a page on its DevTools port within 90 s ({last_error})")


class ChromiumDied(RuntimeError):
    """Chromium exited or never served its DevTools endpoint."""


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture
def browser(chromium, tmp_path):
    failures = []
    for attempt in range(3):  # a browser that dies while starting on a loaded box gets two more starts
        profile = Path(tempfile.mkdtemp(prefix=f"chromium-profile-{attempt}-", dir=tmp_path))
        try:
            process, websocket_url = _launch_chromium(chromium, profile)
            break
        except ChromiumDied as error:
            failures.append(str(error))
            shutil.rmtree(profile, ignore_errors=True)
    else:
        pytest.fail("chromium did not start three times: " + " | ".join(failures))
    try:
        devtools = DevTools(websocket_url)
        yield devtools
        devtools.close()
    finally:
        _stop(process)
        shutil.rmtree(profile, ignore_errors=True)


def _save_screenshot(devtools: DevTools, path: Path, *, full_page: bool) -> None:
    import base64

    params: dict = {"format": "png"}
    if full_page:
        size = devtools.send("Page.getLayoutMetrics")["cssContentSize"]
        params.update(captureBeyondViewport=True,
                      clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 0.5})
    data = devtools.send("Page.captureScreenshot", timeout=120, **params)["data"]
    path.write_bytes(base64.b64decode(data))


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
    _save_screenshot(browser, ARTIFACTS / "report-browser-top.png", full_page=False)
    _save_screenshot(browser, ARTIFACTS / "report-browser-full.png", full_page=True)
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
