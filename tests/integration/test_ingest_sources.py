"""dermflow.ingestion.ingest reading the dataset CSV from a local HTTP server and from SeaweedFS."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dermflow.ingestion.ingest import DatasetError, DatasetSourceError, load_dataset, read_csv_source

pytestmark = pytest.mark.integration

CSV_TEXT = "md5hash,fitzpatrick_scale,label,url,qc\n" + "".join(
    f"{hashlib.md5(str(i).encode()).hexdigest()},{1 + i % 6},label {i % 2},https://example.org/{i}.jpg,\n" for i in range(6)
)


@pytest.fixture(autouse=True)
def allow_loopback(monkeypatch):
    """The test servers listen on 127.0.0.1, which the URL guard refuses unless allowed."""
    from dermflow.settings import get_settings

    monkeypatch.setenv("DERMFLOW_ALLOWED_HOSTS", "127.0.0.1")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002
        pass


@contextlib.contextmanager
def serve_directory(directory):
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_reads_csv_over_http_and_reports_http_errors(tmp_path):
    (tmp_path / "dataset.csv").write_text(CSV_TEXT)
    (tmp_path / "broken.csv").write_text("md5hash,label\nnope,x\n")
    with serve_directory(tmp_path) as base_url:
        frame = load_dataset(f"{base_url}/dataset.csv")
        assert len(frame) == 6 and set(frame["label"]) == {"label 0", "label 1"}
        with pytest.raises(DatasetSourceError, match=r"absent\.csv answered HTTP 404"):
            read_csv_source(f"{base_url}/absent.csv")
        with pytest.raises(DatasetError, match="missing required column"):
            load_dataset(f"{base_url}/broken.csv")


def test_unreachable_http_source_is_a_clear_error():
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DatasetSourceError, match=f"cannot reach dataset CSV at http://127.0.0.1:{port}/"):
        read_csv_source(f"http://127.0.0.1:{port}/dataset.csv")


def test_reads_csv_from_s3_uri(store):
    store.put_bytes("inputs/dataset.csv", CSV_TEXT.encode())
    frame = load_dataset(store.uri("inputs/dataset.csv"), store=store, limit_per_label=2)
    assert frame.groupby("label").size().tolist() == [2, 2]
    with pytest.raises(DatasetSourceError, match="inputs/absent.csv"):
        read_csv_source(store.uri("inputs/absent.csv"), store=store)
