"""Local HTTP servers and data for fetch tests, end-to-end runs and the fetch benchmark.

- `synthetic_atlas(dir)`: a tiny dataset in the atlas20 layout (images/<md5>.jpg + rows.csv in
  the real schema), labels visually distinct, for where ../shared is absent.
- `serve_atlas(images_dir, rows_csv)`: answers the atlas URL shape `/img?imageId=N`.
- `rewrite_csv_host(rows_csv, base_url, out)`: a copy of rows.csv whose URLs hit that server.
- `serve_faults(images)`: a fault-injecting server, one URL per (fault, image).
"""

from __future__ import annotations

import contextlib
import csv
import email.utils
import hashlib
import io
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

ATLAS_COLUMNS = [
    "md5hash", "fitzpatrick_scale", "fitzpatrick_centaur", "label", "nine_partition_label",
    "three_partition_label", "qc", "url", "url_alphanum",
]


from dermflow.ops.mirror import (  # noqa: E402 - the servers the project itself ships
    AtlasServer,
    _Handler,
    _QuietServer,
    _serving,
    rewrite_csv_host,
    serve_atlas,
)


# --------------------------------------------------------------------------------------------
# synthetic data


def _pattern(kind: int, size: int, rng) -> "object":
    import numpy as np

    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    hues = [(200, 60, 60), (60, 170, 80), (70, 90, 210), (210, 190, 60), (170, 70, 190), (60, 190, 200)]
    base = np.array(hues[kind % len(hues)], dtype=np.float32)
    shape = kind // len(hues) % 4
    phase = rng.uniform(0, 1)
    if shape == 0:  # horizontal stripes
        mask = (np.sin((y * 6 + phase) * 2 * np.pi) > 0).astype(np.float32)
    elif shape == 1:  # a blob
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
        mask = (((y - cy) ** 2 + (x - cx) ** 2) < r * r).astype(np.float32)
    elif shape == 2:  # checkerboard
        mask = ((np.floor(x * 5 + phase) + np.floor(y * 5)) % 2).astype(np.float32)
    else:  # diagonal gradient
        mask = (x + y) / 2
    skin = np.array([225, 185, 160], dtype=np.float32) * rng.uniform(0.5, 1.0)
    image = skin * (1 - mask[..., None] * 0.8) + base * mask[..., None] * 0.8
    image += rng.normal(0, 12, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def synthetic_atlas(dir: Path, n_labels: int = 4, per_label: int = 12, size: int = 96, seed: int = 0) -> Path:  # noqa: A002
    """Write `dir/images/<md5>.jpg` and `dir/rows.csv` (real schema, atlas URLs); returns `dir`."""
    import numpy as np
    from PIL import Image

    dir = Path(dir)  # noqa: A001
    (dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scales = [1, 2, 3, 4, 5, 6, -1]
    rows = []
    image_id = 1000
    for label_index in range(n_labels):
        label = f"synthetic condition {chr(ord('a') + label_index)}"
        for item in range(per_label):
            buffer = io.BytesIO()
            Image.fromarray(_pattern(label_index, size, rng)).save(buffer, "JPEG", quality=90)
            data = buffer.getvalue()
            md5hash = hashlib.md5(data).hexdigest()
            (dir / "images" / f"{md5hash}.jpg").write_bytes(data)
            image_id += 1
            scale = scales[(label_index + item) % len(scales)]
            rows.append({
                "md5hash": md5hash,
                "fitzpatrick_scale": scale,
                "fitzpatrick_centaur": scales[(item * 3) % len(scales)],
                "label": label,
                "nine_partition_label": "synthetic",
                "three_partition_label": "benign" if label_index % 2 else "malignant",
                "qc": "1 Diagnostic" if item == 0 else "",
                "url": f"http://atlasdermatologico.com.br/img?imageId={image_id}",
                "url_alphanum": f"httpwwwatlasdermatologicocombrimgimageId{image_id}.jpg",
            })
    with open(dir / "rows.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=ATLAS_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return dir


# --------------------------------------------------------------------------------------------
# the fault-injecting server

TRANSIENT_FAULTS = ("5xx", "429", "429date", "reset", "truncate", "stall")
PERMANENT_FAULTS = {
    "404": "http_404", "410": "http_410", "403": "http_403", "html": "not_an_image",
    "corrupt": "not_an_image", "huge": "too_large", "hugechunked": "too_large",
    "redirectloop": "too_many_redirects", "redirectprivate": "blocked_address",
    "redirectscheme": "bad_scheme",
}


@dataclass
class FaultServer:
    """`url(fault, name)` serves image `name` after `fault`; `hits[path]` counts requests.

    Transient faults (`TRANSIENT_FAULTS`) fail the first `failures` requests of a URL, then
    serve the image. `ok` and `redirect` (one hop to `ok`) always succeed; `mismatch` serves
    another valid image. Permanent faults (`PERMANENT_FAULTS`, fault -> manifest reason) never do.
    """

    base_url: str
    failures: int
    hits: Counter = field(default_factory=Counter)

    def url(self, fault: str, name: str) -> str:
        return f"{self.base_url}/f/{fault}/{name}"


@contextlib.contextmanager
def serve_faults(
    images: Mapping[str, bytes], failures: int = 2, stall_s: float = 3.0, huge_bytes: int = 3 * 2**20
) -> Iterator[FaultServer]:
    """A fault-injecting image server on 127.0.0.1; `images` maps names to image bytes."""
    state = FaultServer(base_url="", failures=failures)
    lock = threading.Lock()
    other = {name: images[names] for name, names in zip(images, list(images)[1:] + list(images)[:1])}

    class Handler(_Handler):
        def reset(self):
            # SO_LINGER 0: close with RST instead of FIN, as a crashing proxy would.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.connection.close()
            self.close_connection = True

        def do_GET(self):  # noqa: N802, C901 - a table of faults
            parts = self.path.split("/")
            if len(parts) != 4 or parts[1] != "f":
                self.send_bytes(b"no such route", "text/plain", 404)
                return
            fault, name = parts[2], parts[3]
            with lock:
                state.hits[self.path] += 1
                count = state.hits[self.path]
            body = images.get(name)
            if body is None:
                self.send_bytes(b"no such image", "text/plain", 404)
                return
            failing = count <= failures
            if fault in ("ok",) or (fault in TRANSIENT_FAULTS and not failing):
                self.send_bytes(body)
            elif fault == "5xx":
                self.send_bytes(b"busy", "text/plain", 503)
            elif fault == "429":
                self.send_bytes(b"slow down", "text/plain", 429, {"Retry-After": "1"})
            elif fault == "429date":
                when = email.utils.formatdate(time.time() + 1, usegmt=True)
                self.send_bytes(b"slow down", "text/plain", 429, {"Retry-After": when})
            elif fault == "reset":
                self.reset()
            elif fault == "truncate":
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.reset()
            elif fault == "stall":
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:100])
                self.wfile.flush()
                time.sleep(stall_s)
                self.close_connection = True
            elif fault == "mismatch":
                self.send_bytes(other[name])
            elif fault == "redirect":
                self.send_bytes(b"", "text/plain", 302, {"Location": f"/f/ok/{name}"})
            elif fault == "redirectloop":
                self.send_bytes(b"", "text/plain", 302, {"Location": f"/f/redirectloop/{name}?n={count}"})
            elif fault == "redirectprivate":
                self.send_bytes(b"", "text/plain", 302, {"Location": "http://169.254.169.254/latest/meta-data/"})
            elif fault == "redirectscheme":
                self.send_bytes(b"", "text/plain", 302, {"Location": "file:///etc/passwd"})
            elif fault in ("404", "410", "403"):
                self.send_bytes(b"<html>gone</html>", "text/html", int(fault))
            elif fault == "html":
                self.send_bytes(b"<html><body>login required</body></html>", "text/html; charset=utf-8")
            elif fault == "corrupt":
                self.send_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 20)
            elif fault == "huge":
                self.send_bytes(b"\xff\xd8" + b"\x00" * huge_bytes)
            elif fault == "hugechunked":
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                chunk = b"\x00" * 65536
                try:
                    for _ in range(huge_bytes // len(chunk) + 2):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    pass  # the client hung up at its cap, as it should
                self.close_connection = True
            else:
                self.send_bytes(b"unknown fault", "text/plain", 400)

    # The redirect-loop path carries a query string: route on the path part only.
    class Routed(Handler):
        def do_GET(self):  # noqa: N802
            self.path = self.path.split("?", 1)[0]
            super().do_GET()

    with _serving(_QuietServer(("127.0.0.1", 0), Routed), state):
        yield state


def load_images(images_dir: Path, limit: int | None = None) -> dict[str, bytes]:
    """md5hash -> bytes of `images_dir/*.jpg` (sorted, first `limit`)."""
    paths = sorted(Path(images_dir).glob("*.jpg"))[:limit]
    return {path.stem: path.read_bytes() for path in paths}


__all__ = [
    "AtlasServer", "FaultServer", "PERMANENT_FAULTS", "TRANSIENT_FAULTS", "load_images", "rewrite_csv_host",
    "serve_atlas", "serve_faults", "synthetic_atlas",
]
