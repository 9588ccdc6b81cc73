"""Attacks on the one guarded reader, against real local HTTP servers: a gzip bomb served as the
CSV, redirects to a loopback address that is not allowed, oversized bodies per use, and fetched
content that must never come back in an error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dermflow.evaluation.predict import read_source
from dermflow.ingestion.http import MAX_CSV_BYTES, MAX_PREDICT_IMAGE_BYTES, URLReadError
from dermflow.ingestion.ingest import DatasetError, DatasetSourceError, load_dataset, read_source_bytes
from dermflow.settings import get_settings
from tests.support.hostile import gzip_bomb

pytestmark = pytest.mark.unit

SECRET = b"SECRET-FIRST-LINE internal=1\n"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


class _Routes(BaseHTTPRequestHandler):
    """Answers from `server.routes`: path -> (status, headers, body)."""

    def do_GET(self):  # noqa: N802 - http.server's name
        self.server.paths.append(self.path)
        status, headers, body = self.server.routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the reader gave up, as it should
            pass

    def log_message(self, *args):
        pass


def serve(host: str, routes: dict):
    server = ThreadingHTTPServer((host, 0), _Routes)
    server.routes, server.paths = routes, []
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}"


@pytest.fixture
def servers():
    started = []

    def start(host: str, routes: dict):
        server, base = serve(host, routes)
        started.append(server)
        return server, base

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


@pytest.fixture
def allow(monkeypatch):
    def set_allowed(value: str | None):
        if value is None:
            monkeypatch.delenv("DERMFLOW_ALLOWED_HOSTS", raising=False)
        else:
            monkeypatch.setenv("DERMFLOW_ALLOWED_HOSTS", value)
        get_settings.cache_clear()

    yield set_allowed
    get_settings.cache_clear()


# --- redirects, checked at every hop ----------------------------------------------------------
def test_a_redirect_to_a_loopback_address_not_allowed_is_refused(servers, allow):
    internal, internal_base = servers("127.0.0.1", {"/secret.csv": (200, {}, SECRET)})
    public, public_base = servers("127.0.0.2", {})  # stands for an allowed host
    public.routes.update({
        "/data.csv": (302, {"Location": f"{public_base}/hop"}, b""),
        "/hop": (302, {"Location": f"{internal_base}/secret.csv"}, b""),
    })
    allow("127.0.0.2")
    with pytest.raises(DatasetSourceError, match="blocked_address") as caught:
        read_source_bytes(f"{public_base}/data.csv")
    assert public.paths == ["/data.csv", "/hop"] and internal.paths == []  # refused at the 3rd hop
    assert "SECRET" not in str(caught.value)
    with pytest.raises(URLReadError, match="blocked_address"):  # predict's reads alike
        read_source(f"{public_base}/hop")
    assert internal.paths == []


# --- never echo fetched content -----------------------------------------------------------------
def test_an_error_never_quotes_the_fetched_body(servers, allow):
    internal, base = servers("127.0.0.1", {
        "/secret": (200, {}, SECRET + b"1\n2\n"),
        "/gone": (404, {}, SECRET),
        "/binary": (200, {}, b"\xff\xfe" + SECRET),
    })
    allow("127.0.0.1")
    messages = []
    for path in ("/secret", "/gone", "/binary"):
        with pytest.raises((DatasetError, DatasetSourceError)) as caught:
            load_dataset(f"{base}{path}")
        messages.append(str(caught.value))
    assert all("SECRET" not in message and "internal=1" not in message for message in messages), messages
    assert "missing required column" in messages[0] and "HTTP 404" in messages[1]


# --- size caps per use --------------------------------------------------------------------------
def test_each_use_has_its_own_size_cap(servers, allow):
    claims = {"/csv": MAX_CSV_BYTES + 1, "/image": MAX_PREDICT_IMAGE_BYTES + 1}
    server, base = servers("127.0.0.1", {path: (200, {"Content-Length": str(size)}, b"")
                                         for path, size in claims.items()})
    allow("127.0.0.1")
    with pytest.raises(DatasetSourceError, match="too_large"):
        read_source_bytes(f"{base}/csv")
    with pytest.raises(URLReadError, match="too_large"):
        read_source(f"{base}/image")


def test_a_gzip_encoded_body_is_inflated(servers, allow):
    import gzip

    csv = b"md5hash,fitzpatrick_scale,label,url\n" + b"0" * 32 + b",2,psoriasis,https://example.org/a.jpg\n"
    _, base = servers("127.0.0.1", {"/data.csv": (200, {"Content-Encoding": "gzip"}, gzip.compress(csv))})
    allow("127.0.0.1")
    assert read_source_bytes(f"{base}/data.csv") == csv


_CHILD = """
import json, sys
from dermflow.ingestion.ingest import DatasetSourceError, read_source_bytes

def status(field):  # kB
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0])

with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # resets the peak (VmHWM) to the current RSS: the imports' peak does not count
before = status("VmRSS")
try:
    read_source_bytes(sys.argv[1])
    outcome = "read"
except DatasetSourceError as error:
    outcome = str(error)
print(json.dumps({"grown_kib": status("VmHWM") - before, "outcome": outcome}))
"""


def test_a_gzip_bomb_served_as_the_csv_is_refused_in_bounded_memory(servers):
    bomb = gzip_bomb(512 * 2**20)  # 512 MiB of CSV lines in about 0.8 MB
    _, base = servers("127.0.0.1", {"/data.csv": (200, {"Content-Encoding": "gzip",
                                                        "Content-Type": "text/csv"}, bomb)})
    env = {**os.environ, "DERMFLOW_ALLOWED_HOSTS": "127.0.0.1", "PYTHONPATH": str(PROJECT_ROOT)}
    child = subprocess.run([sys.executable, "-c", _CHILD, f"{base}/data.csv"], env=env, capture_output=True,
                           text=True, timeout=120, check=True)
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert "too_large" in report["outcome"], report
    # At most the cap of decoded bytes is held (twice while the buffer grows), never the bomb:
    # measured 97 MiB here for a 512 MiB bomb, against 363 MiB before the bounded inflater.
    assert report["grown_kib"] * 1024 < 2 * MAX_CSV_BYTES + 16 * 2**20, report


def test_a_cut_gzip_body_is_truncated_and_an_unknown_encoding_refused(servers, allow):
    import gzip

    whole = gzip.compress(b"a,b\n" * 1000)
    _, base = servers("127.0.0.1", {"/cut": (200, {"Content-Encoding": "gzip"}, whole[: len(whole) // 2]),
                                    "/br": (200, {"Content-Encoding": "br"}, b"\x00" * 10)})
    allow("127.0.0.1")
    with pytest.raises(URLReadError) as cut:
        read_source(f"{base}/cut")
    assert cut.value.reason == "truncated" and cut.value.transient
    with pytest.raises(URLReadError) as brotli:
        read_source(f"{base}/br")
    assert not brotli.value.transient and "Content-Encoding 'br'" in str(brotli.value)
