"""Fetch shards and manifests: what is planned, in what waves, and how the manifest covers every row."""

from __future__ import annotations

import hashlib

import pandas as pd
import pytest

from dermflow.ingestion.images import verify_image
from dermflow.ingestion.manifest import (
    MANIFEST_COLUMNS,
    failed_rows,
    plan_shards,
    reconcile_manifest,
    stored_image_md5s,
    summarize_manifest,
)

from tests.support.fetch_doubles import MemoryStore, jpeg

pytestmark = pytest.mark.unit


# ------------------------------------------------------------------ shards


def test_plan_shards_skips_stored_dedupes_and_interleaves_hosts():
    frame = pd.DataFrame({
        "md5hash": [f"{i:032x}" for i in range(10)] + [f"{0:032x}"],
        "url": [f"http://{'a' if i < 5 else 'b'}.example/{i}" for i in range(10)] + ["http://a.example/dup"],
        "label": ["x"] * 11, "fitzpatrick_scale": [1] * 11, "qc": [float("nan")] * 11,
    })
    shards = plan_shards(frame, stored={f"{1:032x}"}, shard_size=4)
    flat = [r["md5hash"] for shard in shards for r in shard]
    assert [len(s) for s in shards] == [3, 3, 3]  # at most 4, near-equal
    assert sorted(flat) == sorted({f"{i:032x}" for i in range(10)} - {f"{1:032x}"})
    assert [r["url"][7] for r in shards[0]] == ["a", "b", "a"]
    assert shards[0][0]["qc"] == ""
    with pytest.raises(ValueError, match="url"):
        plan_shards(frame.drop(columns=["url"]), set())


@pytest.mark.parametrize(("rows", "shard_size", "parallel", "sizes"), [
    (2076, 256, 4, [173] * 12),  # 9 shards would leave one running alone at the end
    (16608, 256, 4, [245] * 16 + [244] * 52),
    (10, 256, 4, [3, 3, 2, 2]),
    (3, 256, 4, [1, 1, 1]),  # never an empty shard
    (9, 4, 1, [3, 3, 3]),
    (8, 4, 2, [4, 4]),
])
def test_shards_come_in_whole_waves_of_near_equal_size(rows, shard_size, parallel, sizes):
    frame = pd.DataFrame({"md5hash": [f"{i:032x}" for i in range(rows)],
                          "url": [f"http://h{i % 3}.example/{i}" for i in range(rows)]})
    shards = plan_shards(frame, set(), shard_size=shard_size, parallel=parallel)
    assert [len(shard) for shard in shards] == sizes
    assert sum(sizes) == rows and max(sizes) <= shard_size


# ------------------------------------------------------------------ manifests


def test_reconcile_covers_every_row_from_new_previous_and_orphans():
    images = {i: jpeg(20 + i) for i in range(6)}
    md5 = {i: hashlib.md5(b).hexdigest() for i, b in images.items()}
    dataset = pd.DataFrame({
        "md5hash": [md5[i] for i in range(6)] + ["9" * 32, "8" * 32],
        "url": [f"https://img.example/{i}" for i in range(6)] + ["", "https://img.example/never"],
        "label": ["x"] * 8, "fitzpatrick_scale": [1, 2, 3, 4, 5, 6, -1, 2], "qc": [""] * 8,
    })
    store = MemoryStore()
    for i in (0, 1, 2, 3):
        store.objects[f"images/{md5[i]}"] = images[i]
    store.objects[f"images/{md5[5]}"] = b"not an image"  # a stray object must not survive
    new_rows = [
        {**dict(dataset.iloc[0]), "status": "ok", "reason": "", "md5_mismatch": False, "attempts": 1,
         "bytes": len(images[0]), "width": 40, "height": 40, "phash": "0" * 16, "key": f"images/{md5[0]}"},
        {**dict(dataset.iloc[4]), "status": "failed", "reason": "http_404", "attempts": 1},
    ]
    previous = pd.DataFrame([{  # as read back from CSV: all strings
        "md5hash": md5[1], "label": "x", "fitzpatrick_scale": "2", "fitzpatrick_range": "I-II", "qc": "",
        "url": "https://img.example/1", "status": "ok", "reason": "", "md5_mismatch": "False", "attempts": "2",
        "bytes": str(len(images[1])), "width": "40", "height": "40", "phash": "1" * 48, "key": f"images/{md5[1]}"}])
    manifest = reconcile_manifest(dataset, store, previous, new_rows)
    assert list(manifest.columns) == MANIFEST_COLUMNS and len(manifest) == len(dataset)
    assert list(manifest["md5hash"]) == list(dataset["md5hash"])
    by = manifest.set_index("md5hash")
    assert by.loc[md5[0], "phash"] == "0" * 16  # this run's row
    assert by.loc[md5[1], "attempts"] == 2  # the previous manifest's row
    for i in (2, 3):  # orphans: verified by reading back
        assert by.loc[md5[i], "status"] == "ok" and by.loc[md5[i], "phash"] == verify_image(images[i]).phash
        assert by.loc[md5[i], "bytes"] == len(images[i]) and by.loc[md5[i], "width"] == 40
    assert by.loc[md5[4], "reason"] == "http_404"
    assert by.loc[md5[5], "reason"] == "not_an_image" and f"images/{md5[5]}" not in store.objects
    assert by.loc["9" * 32, "reason"] == "no_url" and by.loc["8" * 32, "reason"] == "not_fetched"
    summary = summarize_manifest(manifest)
    assert summary["rows"] == 8 == summary["ok"] + summary["failed"] and summary["ok"] == 4
    assert summary["by_reason"] == {"http_404": 1, "no_url": 1, "not_an_image": 1, "not_fetched": 1}
    assert stored_image_md5s(store) == {md5[i] for i in range(4)}

    retry = failed_rows(manifest)
    assert set(retry["reason"]) == {"http_404", "not_an_image", "not_fetched"}
    assert set(failed_rows(manifest, include_permanent=False)["reason"]) == {"not_fetched"}
    real = failed_rows(manifest, dataset)
    assert set(real.columns) == set(dataset.columns) and len(real) == 3


def test_reconcile_rehashes_rows_of_a_manifest_hashed_before_the_crop_hashes():
    image = jpeg(31)
    md5hash = hashlib.md5(image).hexdigest()
    dataset = pd.DataFrame({"md5hash": [md5hash], "url": ["https://img.example/1"], "label": ["x"],
                            "fitzpatrick_scale": [2], "qc": [""]})
    store = MemoryStore()
    store.objects[f"images/{md5hash}"] = image
    previous = pd.DataFrame([{  # an old manifest: one 16-digit pHash
        "md5hash": md5hash, "label": "x", "fitzpatrick_scale": "2", "fitzpatrick_range": "I-II", "qc": "",
        "url": "https://img.example/1", "status": "ok", "reason": "", "md5_mismatch": "False", "attempts": "2",
        "bytes": str(len(image)), "width": "40", "height": "40", "phash": "1" * 16, "key": f"images/{md5hash}"}])
    row = reconcile_manifest(dataset, store, previous, []).iloc[0]
    assert (row["status"], row["source"]) == ("ok", "already stored")
    assert row["phash"] == verify_image(image).phash and len(row["phash"]) == 48
