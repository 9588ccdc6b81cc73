"""Test doubles for the fetcher's unit tests: a dict as the store, small JPEGs, a resolver that
answers a public address, and the options, rows and shard run the tests use."""

from __future__ import annotations

import io
import random
import threading

import httpx
from PIL import Image

from dermflow.ingestion.fetch import FetchOptions, fetch_shard


class MemoryStore:
    """The slice of ObjectStore the fetcher uses; the first `fail_puts` puts fail as a dropped
    connection does in `ObjectStore.put_bytes` (a transient StorageError)."""

    bucket = "memory"

    def __init__(self, fail_puts: int = 0):
        self.objects: dict[str, bytes] = {}
        self.fail_puts = fail_puts
        self.put_calls = 0
        self.lock = threading.Lock()

    def uri(self, key):
        return f"s3://{self.bucket}/{key}"

    def put_bytes(self, key, data, content_type=None, md5_hex=None):
        from dermflow.storage import StorageError

        with self.lock:
            self.put_calls += 1
            if self.fail_puts > 0:
                self.fail_puts -= 1
                raise StorageError(f"cannot put {self.uri(key)}: Could not connect to the endpoint URL")
            self.objects[key] = bytes(data)
        return self.uri(key)

    def get_bytes(self, key):
        return self.objects[key]

    def iter_keys(self, prefix=""):
        return iter(sorted(k for k in self.objects if k.startswith(prefix)))

    def key_names(self, folder):
        return list(self.iter_keys(folder))

    def delete_prefix(self, prefix):
        keys = [k for k in self.objects if k.startswith(prefix)]
        for key in keys:
            del self.objects[key]
        return len(keys)


def jpeg(seed: int, size: int = 40) -> bytes:
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    for _ in range(20):
        x, y = rng.randrange(size), rng.randrange(size)
        image.putpixel((x, y), (rng.randrange(256), 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG")
    return buffer.getvalue()


async def public_resolver(host, port):
    return ["93.184.216.34"]  # every test host "resolves" to a public address


def options(**overrides) -> FetchOptions:
    base = dict(max_attempts=3, backoff_base=0.01, backoff_max=0.02, connect_timeout=1, read_timeout=1,
                total_timeout=2, row_timeout=10, store_workers=2)
    base.update(overrides)
    return FetchOptions(**base)


def row(md5: str, url: str, **extra) -> dict:
    return {"md5hash": md5, "url": url, "label": "lab", "fitzpatrick_scale": 3, "qc": "", **extra}


def run(rows, store, handler, **kw):
    return fetch_shard(rows, store, kw.pop("opts", options()), transport=httpx.MockTransport(handler),
                       resolver=kw.pop("resolver", public_resolver), **kw)

