"""Headless Chromium for the browser tests, driven over the DevTools protocol.

- `chromium`: the browser's path (installed by scripts/install-chromium.sh where missing, else
  the test is skipped);
- `browser`: a started browser's `DevTools` session on one page, stopped afterwards;
- `save_screenshot(devtools, path, full_page=)`: a PNG of the page, for a person to look at.

A small client of the protocol (not a browser library), so that failed requests, script errors
and image sizes come from the browser itself.
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

PROJECT_ROOT = Path(__file__).resolve().parents[2]
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


def save_screenshot(devtools: DevTools, path: Path, *, full_page: bool) -> None:
    import base64

    params: dict = {"format": "png"}
    if full_page:
        size = devtools.send("Page.getLayoutMetrics")["cssContentSize"]
        params.update(captureBeyondViewport=True,
                      clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 0.5})
    data = devtools.send("Page.captureScreenshot", timeout=120, **params)["data"]
    path.write_bytes(base64.b64decode(data))
