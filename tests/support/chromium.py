"""Headless Chromium for the browser tests, driven over the DevTools protocol.

- `chromium`: the browser's path (installed by scripts/install-chromium.sh where missing, else
  the test is skipped);
- `browser`: a started browser's `DevTools` session on one page, stopped afterwards;
- `save_screenshot(devtools, path, full_page=)`: a PNG of the page, for a person to look at.

A small client of the protocol (not a browser library), so that failed requests, script errors
and image sizes come from the browser itself. It talks to Chromium over the pipe that
`--remote-debugging-pipe` opens (commands in on fd 3, answers out on fd 4, each message ended
by a NUL), as Playwright does: no TCP port, no DevToolsActivePort file to poll. A CI run once
found Chromium's DevTools port written to that file but refusing connections for 90 s, three
starts in a row, in three tests; a pipe leaves nothing between the test and the browser.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1366,900",
]
START_SECONDS = 90  # a loaded 2-core box has taken ~20 s to start Chromium


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


class ChromiumDied(RuntimeError):
    """Chromium exited, or did not answer on its DevTools pipe in time."""


class DevTools:
    """Just enough of the DevTools protocol over Chromium's pipe: commands by id on one page's
    session (attached with `flatten`, so they carry its `sessionId`), that page's events
    collected while waiting."""

    def __init__(self, process: subprocess.Popen, to_browser: int, from_browser: int, log: Path):
        self.process, self.log = process, log
        self._to_browser, self._from_browser = to_browser, from_browser
        self._received = b""
        self.next_id = 0
        self.events: list[dict] = []
        self.session_id: str | None = None

    def attach_to_a_page(self, timeout: float) -> None:
        """Attach to the page the browser opened, or to a new one."""
        pages = [t for t in self.send("Target.getTargets", timeout=timeout)["targetInfos"] if t["type"] == "page"]
        target_id = pages[0]["targetId"] if pages else self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session_id = self.send("Target.attachToTarget", targetId=target_id, flatten=True)["sessionId"]

    def send(self, method: str, timeout: float = 60, **params) -> dict:
        self.next_id += 1
        command = {"id": self.next_id, "method": method, "params": params}
        if self.session_id:
            command["sessionId"] = self.session_id
        self._write(json.dumps(command).encode() + b"\0", sending=method)
        deadline = time.monotonic() + timeout
        while True:
            message = self._read(deadline, waiting_for=method)
            if message.get("id") == command["id"]:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._keep_if_event(message)

    def wait_for(self, event: str, timeout: float = 60) -> dict:
        for seen in self.events:
            if seen["method"] == event:
                return seen
        deadline = time.monotonic() + timeout
        while True:
            message = self._read(deadline, waiting_for=event)
            if self._keep_if_event(message) and message["method"] == event:
                return message

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self) -> None:
        for fd in (self._to_browser, self._from_browser):
            os.close(fd)

    def _keep_if_event(self, message: dict) -> bool:
        """Keep the page's events; the browser's own (target created, attached) are not asked for."""
        if "method" in message and message.get("sessionId") == self.session_id:
            self.events.append(message)
            return True
        return False

    def _write(self, data: bytes, sending: str) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._to_browser, view):]
        except BrokenPipeError:  # a browser that exits before it reads: the same death as a closed read
            raise ChromiumDied(self._closed_pipe(f"sending {sending}")) from None

    def _closed_pipe(self, doing: str) -> str:
        return f"chromium closed its DevTools pipe (exit {self.process.poll()}) while {doing}: {_tail(self.log)}"

    def _read(self, deadline: float, waiting_for: str) -> dict:
        while b"\0" not in self._received:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._from_browser], [], [], remaining)[0]:
                raise TimeoutError(f"no answer to {waiting_for} from Chromium in time")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise ChromiumDied(self._closed_pipe(f"waiting for {waiting_for}"))
            self._received += chunk
        message, _, self._received = self._received.partition(b"\0")
        return json.loads(message)


def _tail(log: Path, chars: int = 600) -> str:
    try:
        return log.read_text(errors="replace")[-chars:].strip() or "(nothing on stderr)"
    except OSError:
        return "(no stderr log)"


def _high_fd(fd: int) -> int:
    """The same pipe end at fd >= 10, so that bash's `3<&N 4>&M` cannot overwrite one of
    the two ends with the other."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


def _launch_chromium(chromium: Path, profile: Path) -> DevTools:
    """Start Chromium with its DevTools pipe on fds 3 and 4, and attach to its page.

    Stderr goes to a file beside the profile (a pipe nobody reads could fill and stall the
    browser); its tail is in every error.
    """
    to_browser_read, to_browser = (_high_fd(fd) for fd in os.pipe())
    from_browser, from_browser_write = (_high_fd(fd) for fd in os.pipe())
    log = profile.with_suffix(".stderr.log")
    with open(log, "wb") as stderr:
        process = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_browser_read} 4>&{from_browser_write} '
                              f'{to_browser_read}<&- {from_browser_write}>&-',
             str(chromium), *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=stderr, pass_fds=(to_browser_read, from_browser_write),
        )
    os.close(to_browser_read)  # the browser's ends: closed here so that its exit reads as end of file
    os.close(from_browser_write)
    devtools = DevTools(process, to_browser, from_browser, log)
    try:
        devtools.attach_to_a_page(timeout=START_SECONDS)
    except (TimeoutError, ChromiumDied, OSError) as error:
        devtools.close()
        _stop(process)
        stderr = "" if isinstance(error, ChromiumDied) else f" | stderr: {_tail(log)}"
        raise ChromiumDied(f"chromium did not start: {error}{stderr}") from error
    return devtools


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
            devtools = _launch_chromium(chromium, profile)
            break
        except ChromiumDied as error:
            failures.append(str(error))
            shutil.rmtree(profile, ignore_errors=True)
    else:
        pytest.fail("chromium did not start three times: " + " | ".join(failures))
    try:
        yield devtools
    finally:
        devtools.close()
        _stop(devtools.process)
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
