"""Importing the dataset's images from an archive into a real SeaweedFS, with every image URL
dead (a local server answering 404): the archive route end to end through the `derm` flow,
reruns, a SIGKILL mid-import, and the S3 and https sources."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import http.server
import io
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dermflow import layout
from dermflow.ingestion import importer
from dermflow.ingestion.manifest import stored_image_md5s
from tests.support.image_servers import load_images, serve_faults, synthetic_atlas

pytestmark = pytest.mark.integration

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def dead_urls(s3_env, monkeypatch):
    """A server where every image URL answers 404 (and counts its hits), allowed by the guard."""
    monkeypatch.setenv("DERMFLOW_ALLOWED_HOSTS", "127.0.0.1")
    from dermflow.settings import get_settings

    get_settings.cache_clear()
    with serve_faults({}) as server:
        yield server
    get_settings.cache_clear()


@pytest.fixture
def atlas(tmp_path):
    atlas = synthetic_atlas(tmp_path / "atlas", n_labels=3, per_label=10, size=48)
    return atlas, load_images(atlas / "images")


def dead_csv(atlas_dir: Path, server, out: Path) -> Path:
    rows = pd.read_csv(atlas_dir / "rows.csv", dtype=str, keep_default_na=False)
    rows["url"] = [server.url("404", md5) for md5 in rows["md5hash"]]
    rows.to_csv(out, index=False)
    return out


def messy_zip(path: Path, images: dict[str, bytes], damaged: str, absent: str) -> Path:
    """Nested folders, mixed-case extensions, macOS junk, a README, a non-md5 name."""
    with zipfile.ZipFile(path, "w") as handle:
        for index, (md5, body) in enumerate(sorted(images.items())):
            if md5 == absent:
                continue
            name = f"fitz/{'ab'[index % 2]}/{index % 5}/{md5}{['.jpg', '.JPG', '.Jpeg'][index % 3]}"
            handle.writestr(name, b"\xff\xd8\xff\xe0 cut short" if md5 == damaged else body)
            handle.writestr(f"__MACOSX/fitz/._{md5}.jpg", b"\x00\x05\x16\x07 fork")
        handle.writestr("fitz/.DS_Store", b"\x00\x00\x00\x01Bud1")
        handle.writestr("README.txt", b"Fitzpatrick 17k images")
        handle.writestr("fitz/IMG_0001.jpg", next(iter(images.values())))
    return path


@pytest.fixture
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def run_fetch_flow(csv_path: Path, images: str) -> dict:
    import tasks.common
    from flows.derm import derm

    tasks.common.object_store.cache_clear()
    return asyncio.run(derm(mode="fetch", csv=str(csv_path), images=images))["fetch"]


def test_archive_import_with_dead_urls_then_a_rerun_imports_nothing(harness, dead_urls, store, atlas, tmp_path):
    atlas_dir, images = atlas
    md5s = sorted(images)
    damaged, absent = md5s[3], md5s[7]
    csv_path = dead_csv(atlas_dir, dead_urls, tmp_path / "rows.csv")
    archive_path = messy_zip(tmp_path / "fitzpatrick17k-images.zip", images, damaged, absent)

    fetched = run_fetch_flow(csv_path, str(archive_path))

    summary = fetched["summary"]
    assert (summary["rows"], summary["ok"], summary["failed"]) == (30, 28, 2)
    assert summary["by_source"] == {"archive": 28, "url": 2}
    assert summary["import"]["unused"]["counts"] == {"junk": 31, "not_md5": 1}
    for md5 in md5s:
        if md5 in (damaged, absent):
            assert not store.exists(layout.image_key(md5))
        else:
            assert store.get_bytes(layout.image_key(md5)) == images[md5]  # byte-identical
    manifest = store.get_dataframe_csv(layout.FETCH_MANIFEST_KEY).set_index("md5hash")
    assert manifest.loc[damaged, ["status", "reason", "archive_reason"]].tolist() == ["failed", "http_404", "not_an_image"]
    assert manifest.loc[absent, ["status", "reason", "archive_reason"]].tolist() == ["failed", "http_404", ""]
    # Only the two rows the archive could not give were asked of their URLs.
    assert set(dead_urls.hits) == {f"/f/404/{damaged}", f"/f/404/{absent}"}

    dead_urls.hits.clear()
    again = run_fetch_flow(csv_path, str(archive_path))["summary"]
    # Only the damaged member is read again (it is not stored); nothing is imported.
    assert again["import"]["to_import"] == 1 and again["import"]["already_stored"] == 28
    assert again["by_source"] == {"already stored": 28, "url": 2}
    assert set(dead_urls.hits) == {f"/f/404/{damaged}", f"/f/404/{absent}"}  # the failed rows are retried


def noise_archive(path: Path, n: int, size: int = 160) -> tuple[Path, dict[str, bytes]]:
    """A tar.gz of `n` distinct noise PNGs named by md5 (large enough that importing takes seconds)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = {}
    with tarfile.open(path, "w:gz") as handle:
        for _ in range(n):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
            body = buffer.getvalue()
            md5 = hashlib.md5(body).hexdigest()
            images[md5] = body
            info = tarfile.TarInfo(f"images/{md5}.png")
            info.size = len(body)
            handle.addfile(info, io.BytesIO(body))
    return path, images


def noise_csv(path: Path, md5s: list[str]) -> Path:
    pd.DataFrame({"md5hash": md5s, "fitzpatrick_scale": "2", "fitzpatrick_centaur": "2",
                  "label": [f"condition {i % 3}" for i in range(len(md5s))], "nine_partition_label": "x",
                  "three_partition_label": "y", "qc": "", "url": "", "url_alphanum": ""}).to_csv(path, index=False)
    return path


def cli_import(csv_path: Path, images: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.Popen([sys.executable, "-m", "dermflow.ops.cli", "import", "--csv", str(csv_path),
                             "--images", images, "--shard-size", "16"], env=env, cwd=PROJECT_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkill_mid_import_then_rerun_completes(store, tmp_path):
    archive_path, images = noise_archive(tmp_path / "images.tar.gz", 400)
    csv_path = noise_csv(tmp_path / "rows.csv", sorted(images))
    process = cli_import(csv_path, str(archive_path))
    try:
        deadline = time.monotonic() + 120
        while len(stored_image_md5s(store)) < 20:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    at_kill = stored_image_md5s(store)
    assert len(at_kill) < len(images), "the import finished before it was killed"

    rerun = cli_import(csv_path, str(archive_path))
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output
    assert stored_image_md5s(store) == set(images)
    manifest = store.get_dataframe_csv(layout.FETCH_MANIFEST_KEY)
    assert set(manifest["status"]) == {"ok"} and len(manifest) == len(images)
    for md5 in list(images)[:50]:
        assert store.get_bytes(layout.image_key(md5)) == images[md5]


@contextlib.contextmanager
def serve_folder(folder: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_s3_prefix_s3_archive_and_https_archive_sources(dead_urls, store, atlas, tmp_path):
    atlas_dir, images = atlas
    dataset = pd.read_csv(atlas_dir / "rows.csv", dtype=str, keep_default_na=False)
    md5s = sorted(images)
    # s3://bucket/prefix/ with nested keys
    for index, md5 in enumerate(md5s[:10]):
        store.put_bytes(f"incoming/batch{index % 2}/{md5}.JPG", images[md5])
    results, plan = importer.import_dataset(store, dataset, f"s3://{store.bucket}/incoming/")
    assert plan["matched"] == 10 and all(row["status"] == "ok" for row in results)
    # s3://bucket/key.tar.gz, spooled then streamed
    archive_path = tmp_path / "more.tar.gz"
    with tarfile.open(archive_path, "w:gz") as handle:
        for md5 in md5s[10:20]:
            handle.add(atlas_dir / "images" / f"{md5}.jpg", arcname=f"{md5}.jpg")
    store.put_file("incoming/more.tar.gz", archive_path)
    results, plan = importer.import_dataset(store, dataset, f"s3://{store.bucket}/incoming/more.tar.gz")
    assert plan["to_import"] == 10 and all(row["status"] == "ok" for row in results)
    # https:// archive through the guarded reader
    zip_path = tmp_path / "web" / "rest.zip"
    zip_path.parent.mkdir()
    with zipfile.ZipFile(zip_path, "w") as handle:
        for md5 in md5s[20:]:
            handle.write(atlas_dir / "images" / f"{md5}.jpg", arcname=f"x/{md5}.jpg")
    with serve_folder(zip_path.parent) as base:
        results, plan = importer.import_dataset(store, dataset, f"{base}/rest.zip")
    assert plan["to_import"] == 10 and all(row["status"] == "ok" for row in results)
    assert stored_image_md5s(store) == set(md5s)
    assert all(store.get_bytes(layout.image_key(md5)) == images[md5] for md5 in md5s)
    # a missing remote archive: a clear error naming it
    from dermflow.ingestion.archive import ArchiveError

    with pytest.raises(ArchiveError, match="missing.zip"):
        importer.import_dataset(store, dataset, f"s3://{store.bucket}/incoming/missing.zip")
