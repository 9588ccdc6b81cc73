"""dermflow.ingestion.http, the one guarded HTTP reader: how failures are classified, and that
the dataset CSV reader and predict's reader now refuse internal addresses, directly and
through a redirect (httpx MockTransport, and a local HTTP server on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import pickle
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from dermflow.errors import DermflowError, is_transient
from dermflow.evaluation.predict import read_source
from dermflow.ingestion.http import ReadPolicy, URLReader, URLReadError, read_url
from dermflow.ingestion.ingest import DatasetSourceError, read_csv_source, read_source_bytes
from dermflow.settings import get_settings

pytestmark = pytest.mark.unit

CSV = b"md5hash,fitzpatrick_scale,label,url\n" + b"0" * 32 + b",2,psoriasis,https://example.org/a.jpg\n"
METADATA_URL = "http://169.254.169.254/latest/meta-data/"


async def public_resolver(host: str, port: int) -> list[str]:
    return ["93.184.216.34"]  # every name is public: only literal addresses are internal here


def mock_read(handler, url: str = "http://public.example/a", **kwargs) -> bytes:
    return read_url(url, allowed_hosts=(), user_agent="test", transport=httpx.MockTransport(handler),
                    resolver=public_resolver, **kwargs)


def failure(handler, url: str = "http://public.example/a", **kwargs) -> URLReadError:
    with pytest.raises(URLReadError) as caught:
        mock_read(handler, url, **kwargs)
    return caught.value


# --- classification ---------------------------------------------------------------------------
def test_reads_a_body_and_follows_a_redirect_to_a_public_host():
    seen = []

    def handler(request):
        seen.append(str(request.url))
        if request.url.host == "public.example":
            return httpx.Response(302, headers={"location": "http://cdn.example/b"})
        return httpx.Response(200, content=b"payload")

    assert mock_read(handler) == b"payload"
    assert seen == ["http://public.example/a", "http://cdn.example/b"]


@pytest.mark.parametrize(
    ("answer", "reason", "transient"),
    [
        (lambda request: httpx.Response(404, content=b"SECRET BODY"), "http_404", False),
        (lambda request: httpx.Response(503, content=b"SECRET BODY"), "http_503", True),
        (lambda request: httpx.Response(429, headers={"retry-after": "7"}), "http_429", True),
        (lambda request: httpx.Response(200, content=b"x" * 2048), "too_large", False),
        (lambda request: httpx.Response(200, headers={"content-length": "10"}, content=b"SECRET"), "truncated", True),
    ],
)
def test_statuses_and_bodies_are_classified(answer, reason, transient):
    error = failure(answer, max_bytes=1024)
    assert (error.reason, error.transient, is_transient(error)) == (reason, transient, transient)
    assert isinstance(error, DermflowError) and isinstance(error, OSError)
    assert "SECRET" not in str(error)  # fetched content is never echoed
    if reason == "http_429":
        assert error.retry_after == 7 and error.status == 429


def test_streamed_body_over_the_cap_is_refused_without_a_content_length():
    async def chunks():
        yield b"x" * 600
        yield b"x" * 600

    def handler(request):
        return httpx.Response(200, content=chunks())  # streamed: no Content-Length

    assert failure(handler, max_bytes=1000).reason == "too_large"


@pytest.mark.parametrize(
    ("exception", "reason"),
    [(httpx.ReadTimeout("slow"), "timeout"), (httpx.ConnectTimeout("slow"), "timeout"),
     (httpx.ConnectError("refused"), "connect_error")],
)
def test_network_failures_are_transient(exception, reason):
    def handler(request):
        raise exception

    error = failure(handler)
    assert error.reason == reason and error.transient


def test_redirect_loops_scheme_and_credentials():
    def loop(request):
        return httpx.Response(302, headers={"location": "/again"})

    error = failure(loop, policy=ReadPolicy(max_redirects=2))
    assert error.reason == "too_many_redirects" and not error.transient
    bad = failure(loop, url="ftp://public.example/a")
    assert bad.reason == "bad_scheme" and not bad.transient
    secret = failure(lambda request: httpx.Response(404), url="http://user:hunter2@public.example/a?token=abc")
    assert "hunter2" not in str(secret) and "abc" not in str(secret) and "REDACTED" in str(secret)


def test_url_read_error_survives_pickling():
    error = failure(lambda request: httpx.Response(503))
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.reason, copy.transient, copy.status, str(copy)) == ("http_503", True, 503, str(error))


def test_one_reader_serves_many_threads():
    def handler(request):
        return httpx.Response(200, content=request.url.path.encode())

    with URLReader(allowed_hosts=(), user_agent="t", transport=httpx.MockTransport(handler),
                   resolver=public_resolver) as reader:
        results = {}
        threads = [threading.Thread(target=lambda i=i: results.update({i: reader.read(f"http://h.example/{i}")}))
                   for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert results == {i: f"/{i}".encode() for i in range(8)}


# --- the guard --------------------------------------------------------------------------------
def test_internal_addresses_are_refused_before_any_request():
    requests = []

    def handler(request):
        requests.append(str(request.url))
        return httpx.Response(200, content=b"secret")

    for url in ("http://127.0.0.1/a", METADATA_URL, "http://[::1]/a", "http://10.1.2.3/a"):
        error = failure(handler, url=url)
        assert error.reason == "blocked_address" and not error.transient
        assert "DERMFLOW_ALLOWED_HOSTS" in str(error)
    assert requests == []


def test_a_redirect_to_an_internal_address_is_refused():
    requests = []

    def handler(request):
        requests.append(str(request.url))
        return httpx.Response(302, headers={"location": METADATA_URL})

    error = failure(handler)
    assert error.reason == "blocked_address" and not error.transient
    assert requests == ["http://public.example/a"]  # the metadata address was never asked


class _Handler(BaseHTTPRequestHandler):
    """`/data` answers the CSV; `/to-metadata` redirects to the cloud metadata address."""

    def do_GET(self):  # noqa: N802 - http.server's name
        self.server.paths.append(self.path)
        if self.path == "/to-metadata":
            self.send_response(302)
            self.send_header("Location", METADATA_URL)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(CSV)))
        self.end_headers()
        self.wfile.write(CSV)

    def log_message(self, format, *args):  # noqa: A002
        pass


@pytest.fixture
def local_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.paths = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def allowed_hosts(monkeypatch, value: str | None):
    """DERMFLOW_ALLOWED_HOSTS set to `value` (None: unset) for the block, settings reloaded."""
    if value is None:
        monkeypatch.delenv("DERMFLOW_ALLOWED_HOSTS", raising=False)
    else:
        monkeypatch.setenv("DERMFLOW_ALLOWED_HOSTS", value)
    get_settings.cache_clear()
    try:
        yield
    finally:
        get_settings.cache_clear()


def test_csv_reader_refuses_loopback_without_allowed_hosts(local_server, monkeypatch):
    server, base = local_server
    with allowed_hosts(monkeypatch, None):
        with pytest.raises(DatasetSourceError, match="blocked_address") as caught:
            read_source_bytes(f"{base}/data")
    assert not caught.value.transient and server.paths == []
    with allowed_hosts(monkeypatch, "127.0.0.1"):
        assert len(read_csv_source(f"{base}/data")) == 1
    assert server.paths == ["/data"]


def test_csv_reader_refuses_a_redirect_to_an_internal_address(local_server, monkeypatch):
    server, base = local_server
    with allowed_hosts(monkeypatch, "127.0.0.1"):
        with pytest.raises(DatasetSourceError, match="blocked_address") as caught:
            read_source_bytes(f"{base}/to-metadata")
    assert not caught.value.transient and server.paths == ["/to-metadata"]


def test_predict_reader_refuses_loopback_and_a_redirect_to_an_internal_address(local_server, monkeypatch):
    server, base = local_server
    with allowed_hosts(monkeypatch, None):
        with pytest.raises(URLReadError, match="blocked_address"):
            read_source(f"{base}/data")
    assert server.paths == []
    with allowed_hosts(monkeypatch, "127.0.0.1"):
        assert read_source(f"{base}/data") == CSV
        with pytest.raises(URLReadError, match="blocked_address"):
            read_source(f"{base}/to-metadata")
    assert server.paths == ["/data", "/to-metadata"]


def test_csv_source_errors_say_whether_a_retry_can_help(tmp_path):
    with pytest.raises(DatasetSourceError, match="not found") as missing:
        read_source_bytes(tmp_path / "absent.csv")
    assert not missing.value.transient
    with pytest.raises(DatasetSourceError, match="scheme 'ftp' is not supported") as scheme:
        read_source_bytes("ftp://example.org/data.csv")
    assert not scheme.value.transient
