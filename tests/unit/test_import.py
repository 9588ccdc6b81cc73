"""Importing from an image source into an in-memory bucket: the fetcher's guarantees, the
fallback to URLs, idempotence; and the flow's `images` and `drop_small_labels` wiring."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dermflow import layout
from dermflow.ingestion import archive, importer
from dermflow.ingestion.images import verify_image
from dermflow.ingestion.manifest import reconcile_manifest, summarize_manifest
from dermflow.storage import ObjectStore
from tests.support.memory_s3 import memory_store

COLUMNS = ["md5hash", "fitzpatrick_scale", "fitzpatrick_centaur", "label", "nine_partition_label",
           "three_partition_label", "qc", "url", "url_alphanum"]


def noise_png(seed: int, size: int = 24) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_rows(n: int, url: str = "", labels: int = 2) -> list[dict]:
    rows = []
    for index in range(n):
        body = noise_png(index)
        rows.append({"md5hash": hashlib.md5(body).hexdigest(), "fitzpatrick_scale": 1 + index % 6,
                     "fitzpatrick_centaur": 1, "label": f"condition {index % labels}", "nine_partition_label": "x",
                     "three_partition_label": "y", "qc": "", "url": url, "url_alphanum": "", "_body": body})
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_zip(path: Path, rows: list[dict], damaged: int | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as handle:
        for index, row in enumerate(rows):
            body = b"not an image at all" if index == damaged else row["_body"]
            handle.writestr(f"images/part{index % 3}/{row['md5hash'].upper()}.PNG", body)
        handle.writestr("__MACOSX/._x.png", b"fork")
        handle.writestr("README.txt", b"the images")
        handle.writestr("photo.jpg", noise_png(999))
    return path


def frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{k: str(v) for k, v in row.items() if k != "_body"} for row in rows])


def test_import_stores_verified_images_and_reports_damaged_members(tmp_path):
    store = memory_store()
    rows = make_rows(7)
    rows[3]["md5hash"] = "f" * 32  # a member named by an md5 that is not its content's
    spec = str(write_zip(tmp_path / "a.zip", rows, damaged=5))
    with archive.open_source(spec) as source:
        plan = importer.plan_import(frame(rows), source, stored=set(), shard_size=3)
        assert plan.matched == 7 and [len(s) for s in plan.shards] == [3, 2, 2]
        assert plan.unused["counts"] == {"junk": 2, "not_md5": 1}
        results = [row for shard in plan.shards for row in importer.import_shard(shard, source, store)]
    by_md5 = {row["md5hash"]: row for row in results}
    for index, row in enumerate(rows):
        result = by_md5[row["md5hash"]]
        if index == 5:
            assert (result["status"], result["archive_reason"], result["source"]) == ("failed", "not_an_image", "archive")
            assert not store.exists(layout.image_key(row["md5hash"]))
            continue
        assert store.get_bytes(layout.image_key(row["md5hash"])) == row["_body"]  # byte-identical
        facts = verify_image(row["_body"])
        assert (result["status"], result["source"], result["phash"]) == ("ok", "archive", facts.phash)
        assert result["md5_mismatch"] is (index == 3)
        assert result["content_md5"] == hashlib.md5(row["_body"]).hexdigest()


def test_a_rerun_plans_nothing_and_stored_objects_are_never_rewritten(tmp_path):
    store = memory_store()
    rows = make_rows(4)
    spec = str(write_zip(tmp_path / "a.zip", rows))
    with archive.open_source(spec) as source:
        plan = importer.plan_import(frame(rows), source, set(), shard_size=10)
        importer.import_shard(plan.shards[0], source, store)
    store.client.objects[layout.image_key(rows[0]["md5hash"])] = b"kept as it is"
    stored = {row["md5hash"] for row in rows}
    with archive.open_source(spec) as source:
        again = importer.plan_import(frame(rows), source, stored, shard_size=10)
    assert again.shards == [] and again.already_stored == 4
    assert store.get_bytes(layout.image_key(rows[0]["md5hash"])) == b"kept as it is"


def test_a_streamed_tar_is_cut_into_at_most_stripes_shards(tmp_path):
    import tarfile

    rows = make_rows(10)
    path = tmp_path / "a.tar.gz"
    with tarfile.open(path, "w:gz") as handle:
        for row in rows:
            info = tarfile.TarInfo(f"{row['md5hash']}.png")
            info.size = len(row["_body"])
            handle.addfile(info, io.BytesIO(row["_body"]))
    store = memory_store()
    with archive.open_source(str(path)) as source:
        plan = importer.plan_import(frame(rows), source, set(), shard_size=2, stripes=3)
    assert len(plan.shards) == 3
    results = [r for shard in plan.shards for r in importer.import_shard_from(shard, str(path), store)]
    assert all(row["status"] == "ok" for row in results) and len(results) == 10


def test_no_matching_member_is_an_error_naming_the_source(tmp_path):
    rows = make_rows(2)
    path = write_zip(tmp_path / "other.zip", make_rows(3)[2:])
    with archive.open_source(str(path)) as source:
        with pytest.raises(archive.ArchiveError, match="other.zip: no member matches a CSV row"):
            importer.plan_import(frame(rows), source, set(), shard_size=10)


def test_a_damaged_members_row_keeps_both_reasons_after_its_url_failed(tmp_path):
    store = memory_store()
    rows = make_rows(3, url="https://images.example/x.jpg")
    spec = str(write_zip(tmp_path / "a.zip", rows, damaged=1))
    with archive.open_source(spec) as source:
        plan = importer.plan_import(frame(rows), source, set(), shard_size=10)
        imported = importer.import_shard(plan.shards[0], source, store)
    from dermflow.ingestion.manifest import manifest_row

    fetched = [manifest_row(rows[1], reason="http_404", attempts=1)]
    manifest = reconcile_manifest(frame(rows), store, None, importer.merge_fallback(imported, fetched))
    row = manifest.set_index("md5hash").loc[rows[1]["md5hash"]]
    assert (row["status"], row["reason"], row["archive_reason"], row["source"]) == ("failed", "http_404",
                                                                                   "not_an_image", "url")
    summary = summarize_manifest(manifest)
    assert summary["by_source"] == {"archive": 2, "url": 1}
    # a second reconcile (no new rows) calls what is in the bucket "already stored"
    again = reconcile_manifest(frame(rows), store, manifest, [])
    assert sorted(again["source"]) == ["already stored", "already stored", "url"]


# --------------------------------------------------------------------------------------------
# the flows


def test_derm_fetch_imports_from_images_then_fetches_the_rest(harness, bucket, tmp_path):
    from flows.derm import derm

    rows = make_rows(6)
    csv_path = write_csv(tmp_path / "rows.csv", rows)
    zip_path = write_zip(tmp_path / "images.zip", rows[:4], damaged=2)
    result = asyncio.run(derm(mode="fetch", csv=str(csv_path), images=str(zip_path), task_runner="threads"))
    summary = result["fetch"]["summary"]
    assert (summary["rows"], summary["ok"]) == (6, 3)
    assert summary["by_source"] == {"archive": 3, "url": 3}
    assert summary["import"]["unused"]["counts"] == {"junk": 2, "not_md5": 1}
    manifest = bucket.get_dataframe_csv(layout.FETCH_MANIFEST_KEY).set_index("md5hash")
    assert manifest.loc[rows[2]["md5hash"], ["reason", "archive_reason"]].tolist() == ["no_url", "not_an_image"]
    assert (manifest.loc[rows[5]["md5hash"], "reason"], manifest.loc[rows[5]["md5hash"], "archive_reason"]) == ("no_url", "")


def test_a_bad_images_source_fails_the_run_with_its_name(harness, bucket, tmp_path):
    from flows.derm import derm

    csv_path = write_csv(tmp_path / "rows.csv", make_rows(2))
    from dermflow.inputs import InputError

    # refused before any work, naming the parameter and the path (dermflow.inputs checks local paths)
    with pytest.raises(InputError, match=r"images='.*nowhere\.zip' is a local path that does not exist"):
        asyncio.run(derm(mode="fetch", csv=str(csv_path), images=str(tmp_path / "nowhere.zip"), task_runner="threads"))


def test_most_rows_failed_points_to_the_archive_route():
    from flows.fetch import failure_report

    summary = {"rows": 10, "failed": 8, "by_reason": {"http_404": 7, "timeout": 1}}
    report = failure_report(summary, None)
    assert "| http_404 | 7 |" in report and "images=" in report and "fitzpatrick17k" in report
    assert "images=" not in failure_report(summary, "/data/images.zip")
    assert failure_report({"rows": 3, "failed": 0, "by_reason": {}}, None) is None


def test_small_labels_name_the_way_on_or_are_dropped(monkeypatch):
    from dermflow.dataset.split import SplitError
    from tasks import data

    store = memory_store()
    import tasks.common

    monkeypatch.setattr(tasks.common, "object_store", lambda: store)
    monkeypatch.setattr(data, "object_store", lambda: store)
    rows = make_rows(40, labels=1) + [dict(make_rows(41)[40], label="rare")]
    manifest = pd.DataFrame([{**{k: str(v) for k, v in r.items() if k != "_body"}, "status": "ok",
                              "phash": f"{i:016x}", "key": layout.image_key(r["md5hash"]), "reason": "",
                              "fitzpatrick_range": "I-II"} for i, r in enumerate(rows)])
    store.put_dataframe_csv("manifests/fetch/test.csv", manifest)
    from prefect.logging import disable_run_logger

    with disable_run_logger():
        with pytest.raises(SplitError, match="'rare': 1"):
            data.split_dataset.fn("manifests/fetch/test.csv", 0, 0, True)
        result = data.split_dataset.fn("manifests/fetch/test.csv", 0, 0, True, drop_small_labels=True)
    assert result["summary"]["dropped_labels"] == ["rare"]


def test_cli_import_works_without_a_flow_run(bucket, tmp_path, capsys):
    import json

    from dermflow.ops.cli import main

    rows = make_rows(5)
    csv_path = write_csv(tmp_path / "rows.csv", rows)
    zip_path = write_zip(tmp_path / "images.zip", rows[:3])
    assert main(["import", "--csv", str(csv_path), "--images", str(zip_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["ok"], summary["by_source"]) == (3, {"archive": 3, "url": 2})
    assert summary["by_reason"] == {"no_url": 2}
    assert summary["import"]["unused"]["counts"] == {"junk": 2, "not_md5": 1}
    assert all(bucket.get_bytes(layout.image_key(r["md5hash"])) == r["_body"] for r in rows[:3])
    # a rerun imports nothing new
    assert main(["import", "--csv", str(csv_path), "--images", str(zip_path)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["import"]["to_import"] == 0 and again["by_source"] == {"already stored": 3, "url": 2}
    # a bad source: one line naming it, exit 1
    assert main(["import", "--csv", str(csv_path), "--images", str(tmp_path / "none.tgz")]) == 1
    assert "none.tgz: no such file or folder" in capsys.readouterr().err


def test_at_most_twice_the_store_workers_members_are_held(monkeypatch):
    """Reading runs ahead of verifying and storing by at most 2 x store_workers members."""
    import threading

    from dermflow.ingestion.fetch import FetchOptions

    rows = [{"md5hash": f"{i:032x}", "member": f"{i:032x}.png", "url": ""} for i in range(40)]
    release = threading.Event()
    read = []

    class Source(archive.ImageSource):
        label = "fake"

        def read_members(self, names):
            for name in names:
                read.append(name)
                yield name, b"body"

    def slow_import(store, row, body, options):
        release.wait(5)
        return {"md5hash": row["md5hash"], "status": "ok"}

    monkeypatch.setattr(importer, "_import_one", slow_import)
    worker = threading.Thread(target=importer.import_shard, args=(rows, Source(), memory_store(),
                                                                  FetchOptions(store_workers=3)))
    worker.start()
    import time

    time.sleep(0.5)
    held = len(read)
    release.set()
    worker.join()
    assert held == 2 * 3 + 1  # the reader is blocked on the 7th member until a slot frees
    assert len(read) == 40


def test_a_remote_archive_over_the_spool_limit_is_refused_before_download(tmp_path, monkeypatch):
    from dermflow.ingestion import spool

    class Client:
        def head_object(self, Bucket, Key):  # noqa: N803
            return {"ContentLength": 10 * 2**30}

        def download_file(self, *args):
            raise AssertionError("must not download")

    monkeypatch.setattr(archive, "MAX_SPOOL_BYTES", 2**30)
    store = ObjectStore("b", Client())
    with pytest.raises(archive.ArchiveError, match="over the spool limit"):
        spool.spool_remote("s3://other/images.zip", store, tmp_path)
    assert list(tmp_path.iterdir()) == []
