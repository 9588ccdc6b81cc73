"""`dermflow mirror`: the offline route of the README (a local mirror of a folder of images)."""

from __future__ import annotations

import csv
import socket
from types import SimpleNamespace

import httpx
import pytest

from dermflow.ops.cli import main
from dermflow.ops.mirror import _Handler, _QuietServer, _serving, rewrite_csv_host, serve_atlas
from tests.support.image_servers import synthetic_atlas

pytestmark = pytest.mark.unit


def test_the_mirror_serves_each_row_of_its_rewritten_csv(tmp_path):
    atlas = synthetic_atlas(tmp_path / "atlas", n_labels=2, per_label=3)
    with serve_atlas(atlas / "images", atlas / "rows.csv") as server:
        rows = list(csv.DictReader(open(rewrite_csv_host(atlas / "rows.csv", server.base_url, tmp_path / "out.csv"))))
        assert len(rows) == 6
        for row in rows:
            response = httpx.get(row["url"])
            assert response.status_code == 200
            assert response.content == (atlas / "images" / f"{row['md5hash']}.jpg").read_bytes()


def test_a_folder_without_images_is_a_clear_error(tmp_path, capsys):
    assert main(["mirror", str(tmp_path)]) == 1
    assert "images/<md5hash>.jpg" in capsys.readouterr().err


def test_the_mirror_sends_without_nagle_delay():
    """The handler writes an answer's headers and body separately; with Nagle's algorithm on,
    the body of every answer after the first on a keep-alive connection waited for the client's
    delayed ACK (about 20 ms per request on loopback, measured)."""
    nodelay: list[int] = []

    class Probe(_Handler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            nodelay.append(self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            self.send_bytes(b"ok", "text/plain")

    state = SimpleNamespace(base_url="")
    with _serving(_QuietServer(("127.0.0.1", 0), Probe), state), httpx.Client() as client:
        for _ in range(2):
            assert client.get(f"{state.base_url}/img").content == b"ok"
    assert len(nodelay) == 2 and all(nodelay)
