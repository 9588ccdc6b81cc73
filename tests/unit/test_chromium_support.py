"""The browser tests' Chromium launcher fails clearly, and fast, when the browser cannot start:
a browser that exits names its stderr; one that never answers on its DevTools pipe times out."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.support import chromium as support

pytestmark = pytest.mark.unit


def _fake_browser(tmp_path, body: str):
    script = tmp_path / "fake-chromium"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    profile = tmp_path / "profile"
    profile.mkdir()
    return script, profile


def test_a_browser_that_exits_is_reported_with_its_stderr(tmp_path):
    script, profile = _fake_browser(tmp_path, "echo 'no usable display: boom' >&2; exit 3")
    with pytest.raises(support.ChromiumDied, match="closed its DevTools pipe.*boom"):
        support._launch_chromium(script, profile)


def test_a_browser_gone_before_the_first_command_is_reported_with_its_stderr(tmp_path):
    # the race of the test above made certain: the browser closed its end before anything was sent
    read_end, write_end = os.pipe()
    os.close(read_end)
    process = subprocess.Popen(["true"])
    process.wait()
    log = tmp_path / "browser.stderr.log"
    log.write_text("no usable display: boom")
    devtools = support.DevTools(process, write_end, os.open(os.devnull, os.O_RDONLY), log)
    try:
        with pytest.raises(support.ChromiumDied, match="closed its DevTools pipe.*sending Target.getTargets.*boom"):
            devtools.attach_to_a_page(timeout=5)
    finally:
        devtools.close()


def test_a_browser_that_never_answers_times_out(tmp_path, monkeypatch):
    monkeypatch.setattr(support, "START_SECONDS", 1.0)
    script, profile = _fake_browser(tmp_path, "echo starting >&2; exec sleep 60")
    started = time.monotonic()
    with pytest.raises(support.ChromiumDied, match="no answer to Target.getTargets.*stderr: starting"):
        support._launch_chromium(script, profile)
    assert time.monotonic() - started < 15  # stopped, not waited for


def test_the_pipe_carries_commands_and_answers(tmp_path, monkeypatch):
    """A stand-in browser (Python on fds 3 and 4) answers each command: the session's id goes
    with every command after the attach, and the page's events are kept."""
    responder = tmp_path / "responder.py"
    responder.write_text('''
import json, os
inbox, outbox, buffer = os.fdopen(3, "rb", 0), os.fdopen(4, "wb", 0), b""
while True:
    chunk = inbox.read(65536)
    if not chunk:
        break
    buffer += chunk
    while b"\\0" in buffer:
        raw, _, buffer = buffer.partition(b"\\0")
        command = json.loads(raw)
        result = {"Target.getTargets": {"targetInfos": [{"type": "page", "targetId": "T1"}]},
                  "Target.attachToTarget": {"sessionId": "S1"}}.get(command["method"], {"echo": command})
        if command["method"] == "Page.navigate":
            outbox.write(json.dumps({"method": "Page.loadEventFired", "sessionId": "S1", "params": {}}).encode() + b"\\0")
        outbox.write(json.dumps({"id": command["id"], "result": result}).encode() + b"\\0")
''')
    import sys

    monkeypatch.setattr(support, "START_SECONDS", 10.0)
    script, profile = _fake_browser(tmp_path, f'exec {sys.executable} {responder}')
    devtools = support._launch_chromium(script, profile)
    try:
        assert devtools.session_id == "S1"
        echoed = devtools.send("Page.navigate", url="about:blank")["echo"]
        assert echoed["sessionId"] == "S1" and echoed["params"] == {"url": "about:blank"}
        assert devtools.wait_for("Page.loadEventFired", timeout=5)["sessionId"] == "S1"
    finally:
        devtools.close()
        support._stop(devtools.process)
