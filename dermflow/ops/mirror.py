"""A local mirror of a folder of dataset images, for runs without internet access.

`dermflow mirror ATLAS_DIR` serves `ATLAS_DIR/images/<md5hash>.jpg` on 127.0.0.1 by the URL shape
of the dataset's atlas host (`/img?imageId=N`, the ids taken from `ATLAS_DIR/rows.csv`), and
writes a copy of the CSV whose URLs point at it (`rewrite_csv_host`). The fetcher then runs
exactly as it does against the real host (allow loopback with `DERMFLOW_ALLOWED_HOSTS`). The
tests and benchmarks use the same server.
"""

from __future__ import annotations

import contextlib
import csv
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

from dermflow.errors import DermflowError


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def handle_error(self, request, client_address):  # resets and aborted clients are expected here
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like real image hosts
    # TCP_NODELAY: headers and body are two writes, and with Nagle on, the body of each keep-alive
    # answer after the first waited for the client's delayed ACK (about 20 ms per request, measured)
    disable_nagle_algorithm = True

    def log_message(self, format, *args):  # noqa: A002 - silence per-request logging
        pass

    def send_bytes(self, body: bytes, content_type: str = "image/jpeg", status: int = 200, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


def _start(server: ThreadingHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def _serving(server: ThreadingHTTPServer, state) -> Iterator[None]:
    """Serve in a thread, set `state.base_url`, and shut the server down afterwards."""
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    _start(server)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------------------------
# the atlas server


@dataclass
class AtlasServer:
    base_url: str
    hits: Counter = field(default_factory=Counter)  # imageId -> requests served


def _image_ids(rows_csv: Path) -> dict[str, str]:
    """imageId -> md5hash from a rows.csv's atlas URLs."""
    ids: dict[str, str] = {}
    with open(rows_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            query = parse_qs(urlsplit(row.get("url") or "").query)
            if "imageId" in query:
                ids[query["imageId"][0]] = row["md5hash"]
    return ids


@contextlib.contextmanager
def serve_atlas(images_dir: Path, rows_csv: Path, latency_s: float = 0.0, port: int = 0) -> Iterator[AtlasServer]:
    """A threaded server on 127.0.0.1 answering `/img?imageId=N` with `images_dir/<md5hash>.jpg`."""
    images_dir, ids = Path(images_dir), _image_ids(Path(rows_csv))
    state = AtlasServer(base_url="")
    lock = threading.Lock()

    class Handler(_Handler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            if latency_s:
                time.sleep(latency_s)
            parts = urlsplit(self.path)
            image_id = (parse_qs(parts.query).get("imageId") or [""])[0]
            md5hash = ids.get(image_id)
            path = images_dir / f"{md5hash}.jpg" if md5hash else None
            if parts.path != "/img" or path is None or not path.exists():
                self.send_bytes(b"<html>not found</html>", "text/html", 404)
                return
            with lock:
                state.hits[image_id] += 1
            self.send_bytes(path.read_bytes())

    with _serving(_QuietServer(("127.0.0.1", port), Handler), state):
        yield state


def rewrite_csv_host(rows_csv: Path, base_url: str, out: Path, limit_per_label: int | None = None) -> Path:
    """A copy of `rows_csv` whose URLs keep path and query but point at `base_url`."""
    target = urlsplit(base_url)
    per_label: Counter = Counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(rows_csv, newline="") as source, open(out, "w", newline="") as sink:
        reader = csv.DictReader(source)
        writer = csv.DictWriter(sink, fieldnames=reader.fieldnames)
        writer.writeheader()
        for row in reader:
            if limit_per_label is not None:
                if per_label[row["label"]] >= limit_per_label:
                    continue
                per_label[row["label"]] += 1
            if row.get("url"):
                parts = urlsplit(row["url"])
                row["url"] = urlunsplit((target.scheme, target.netloc, parts.path, parts.query, ""))
            writer.writerow(row)
    return out


def run_mirror(atlas_dir: Path, port: int, csv_out: Path | None = None, *, host_in_csv: str = "127.0.0.1",
               limit_per_label: int | None = None, latency_s: float = 0.0) -> None:
    """Serve `atlas_dir` until interrupted; with `csv_out`, first write the CSV that fetches
    from it. Prints where it serves and the CSV's path."""
    images_dir, rows_csv = Path(atlas_dir) / "images", Path(atlas_dir) / "rows.csv"
    for needed in (images_dir, rows_csv):
        if not needed.exists():
            raise DermflowError(f"{needed} does not exist: expected ATLAS_DIR/images/<md5hash>.jpg and ATLAS_DIR/rows.csv")
    with serve_atlas(images_dir, rows_csv, latency_s, port) as server:
        if csv_out is not None:
            base_url = server.base_url.replace("127.0.0.1", host_in_csv)
            print(f"wrote {rewrite_csv_host(rows_csv, base_url, csv_out, limit_per_label)}", flush=True)
        print(f"serving {images_dir} at {server.base_url} (Ctrl-C stops)", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
