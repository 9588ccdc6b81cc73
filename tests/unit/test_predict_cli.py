"""`dermflow predict`: every source's error is printed and any failure exits non-zero; URLs go
through the guarded reader (a blocked address is that source's error)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from dermflow.ops import cli

pytestmark = pytest.mark.unit


class UniformModel:
    def predict_on_batch(self, batch):
        return np.full((len(batch), 3), 1 / 3, dtype=np.float32)


@pytest.fixture
def fake_model(monkeypatch):
    from dermflow.evaluation.predict import bundle_from_model

    bundle = bundle_from_model(UniformModel(), {"class_names": ["a", "b", "c"], "image_size": 8})
    monkeypatch.setattr(cli, "_model_bundle", lambda args: bundle)


class _NotFound(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.server.paths.append(self.path)
        body = b"SECRET-FIRST-LINE\n"
        self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    httpd.paths = []
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def allow(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("DERMFLOW_ALLOWED_HOSTS", raising=False)
    else:
        monkeypatch.setenv("DERMFLOW_ALLOWED_HOSTS", value)
    cli.get_settings.cache_clear()


def test_text_mode_prints_each_error_and_exits_non_zero(fake_model, server, tmp_path, monkeypatch, capsys):
    httpd, base = server
    allow(monkeypatch, "127.0.0.1")
    try:
        good = tmp_path / "good.png"
        Image.new("RGB", (12, 12), (10, 200, 10)).save(good)
        text = tmp_path / "notes.txt"
        text.write_text("not an image\n")
        empty = tmp_path / "empty.jpg"
        empty.write_bytes(b"")
        missing = tmp_path / "missing.jpg"
        sources = [str(good), str(text), str(empty), str(missing), f"{base}/gone.jpg"]
        assert cli.main(["predict", *sources]) == 1
    finally:
        cli.get_settings.cache_clear()
    out, err = capsys.readouterr()
    blocks = out.split("\n" + str(tmp_path))
    assert "error:" not in blocks[1]  # the good image: its labels, no error
    assert out.count("  error: ") == 4
    assert "not a decodable image" in out and "no such image file" in out and "http_404" in out
    assert "SECRET-FIRST-LINE" not in out + err  # a fetched body is never echoed
    assert "4 of 5 source(s) failed" in err
    assert httpd.paths == ["/gone.jpg"]


def test_all_good_sources_exit_zero(fake_model, tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.new("RGB", (12, 12)).save(good)
    assert cli.main(["predict", str(good)]) == 0
    assert cli.main(["predict", "--json", str(good)]) == 0


def test_predict_urls_go_through_the_guard(fake_model, server, monkeypatch, capsys):
    httpd, base = server
    allow(monkeypatch, None)  # loopback is not allowed
    try:
        assert cli.main(["predict", "--json", f"{base}/a.jpg"]) == 1
    finally:
        cli.get_settings.cache_clear()
    out = capsys.readouterr().out
    assert "blocked_address" in out and httpd.paths == []
