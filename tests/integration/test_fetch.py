"""The fetcher against a real SeaweedFS and local HTTP servers: faults, resume after SIGKILL,
a store restarted mid-fetch, and idempotent reruns."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from dermflow.ingestion.fetch import FetchOptions, fetch_shard
from dermflow.ingestion.images import HASH_HEX_DIGITS, verify_image
from dermflow.ingestion.manifest import plan_shards, reconcile_manifest, stored_image_md5s, summarize_manifest
from tests.support.image_servers import (
    PERMANENT_FAULTS,
    TRANSIENT_FAULTS,
    load_images,
    rewrite_csv_host,
    serve_atlas,
    serve_faults,
    synthetic_atlas,
)

pytestmark = pytest.mark.integration

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# Small timeouts keep the fault matrix fast; the stall fault outlasts the read timeout.
FAST = dict(
    allowed_hosts=("127.0.0.1",), connect_timeout=2, read_timeout=0.5, total_timeout=3, row_timeout=30,
    backoff_base=0.05, backoff_max=0.2, max_attempts=4, max_bytes=2**20, host_concurrency=8, store_workers=4,
)


def read_dataset(csv_path: Path) -> pd.DataFrame:
    return pd.read_csv(csv_path, dtype=str, keep_default_na=False)


def assert_bucket_holds_only_valid_images(store, expected: dict[str, bytes]) -> None:
    """Every object decodes; those of `expected` are byte-identical."""
    for key in store.list_keys("images/"):
        body = store.get_bytes(key)
        verify_image(body)  # raises if the object is not a complete image
        md5hash = key.split("/", 1)[1]
        if md5hash in expected:
            assert body == expected[md5hash], f"{key} differs from the served bytes"


def test_fault_matrix_ends_with_transients_stored_and_permanents_recorded(store, tmp_path):
    images = load_images(synthetic_atlas(tmp_path / "atlas", n_labels=3, per_label=7, size=48) / "images")
    names = list(images)
    faults = [*TRANSIENT_FAULTS, "ok", "redirect", "mismatch", *PERMANENT_FAULTS]
    assert len(names) >= len(faults)
    plan = dict(zip(names, faults))
    with serve_faults(images, failures=2, stall_s=1.5) as server:
        rows = [{"md5hash": name, "url": server.url(fault, name), "label": "x", "fitzpatrick_scale": "2", "qc": ""}
                for name, fault in plan.items()]
        rows.append({"md5hash": "0" * 32, "url": "", "label": "x", "fitzpatrick_scale": "-1", "qc": ""})
        dataset = pd.DataFrame(rows)
        shards = plan_shards(dataset, stored_image_md5s(store), shard_size=7)
        new_rows = [r for shard in shards for r in fetch_shard(shard, store, FetchOptions(**FAST))]
        hits = dict(server.hits)

    manifest = reconcile_manifest(dataset, store, None, new_rows)
    by = manifest.set_index("md5hash")
    stored = stored_image_md5s(store)
    for name, fault in plan.items():
        if fault in TRANSIENT_FAULTS or fault in ("ok", "redirect"):
            assert by.loc[name, "status"] == "ok", (fault, by.loc[name, "reason"])
            assert store.get_bytes(f"images/{name}") == images[name], fault
            assert not by.loc[name, "md5_mismatch"]
            expected_attempts = 3 if fault in TRANSIENT_FAULTS else 1
            assert by.loc[name, "attempts"] == expected_attempts, fault
        elif fault == "mismatch":
            assert by.loc[name, "status"] == "ok" and by.loc[name, "md5_mismatch"]
            assert name in stored
        else:
            assert by.loc[name, "status"] == "failed" and by.loc[name, "reason"] == PERMANENT_FAULTS[fault], fault
            assert name not in stored, f"{fault}: a failed row left an object"
            # Permanent failures are never retried (a redirect loop is one attempt of several hops).
            assert by.loc[name, "attempts"] == 1, fault
    assert hits[f"/f/404/{names[faults.index('404')]}"] == 1
    assert by.loc["0" * 32, "reason"] == "no_url"
    summary = summarize_manifest(manifest)
    assert summary["rows"] == len(dataset) == summary["ok"] + summary["failed"]
    assert summary["ok"] == len(TRANSIENT_FAULTS) + 3
    assert all(len(p) == HASH_HEX_DIGITS for p in manifest.loc[manifest["status"] == "ok", "phash"])
    assert_bucket_holds_only_valid_images(store, {n: images[n] for n, f in plan.items() if f != "mismatch"})


def test_local_addresses_are_refused_unless_allowed(store, tmp_path):
    images = load_images(synthetic_atlas(tmp_path / "atlas", n_labels=1, per_label=1, size=32) / "images")
    name = next(iter(images))
    with serve_faults(images) as server:
        rows = [{"md5hash": name, "url": server.url("ok", name)}]
        refused = fetch_shard(rows, store, FetchOptions(**{**FAST, "allowed_hosts": ()}))
        assert refused[0]["reason"] == "blocked_address" and server.hits == {}
        assert fetch_shard(rows, store, FetchOptions(**FAST))[0]["status"] == "ok"


def test_atlas_fetch_then_rerun_fetches_nothing(store, tmp_path):
    atlas = synthetic_atlas(tmp_path / "atlas", n_labels=3, per_label=5, size=48)
    with serve_atlas(atlas / "images", atlas / "rows.csv") as server:
        dataset = read_dataset(rewrite_csv_host(atlas / "rows.csv", server.base_url, tmp_path / "rows.csv"))
        options = FetchOptions(**FAST)
        shards = plan_shards(dataset, stored_image_md5s(store), shard_size=4)
        assert sum(map(len, shards)) == len(dataset) == 15
        new_rows = [r for shard in shards for r in fetch_shard(shard, store, options)]
        manifest = reconcile_manifest(dataset, store, None, new_rows)
        store.put_dataframe_csv("manifests/fetch.csv", manifest)
        assert summarize_manifest(manifest)["ok"] == 15 and sum(server.hits.values()) == 15

        assert plan_shards(dataset, stored_image_md5s(store)) == []
        previous = store.get_dataframe_csv("manifests/fetch.csv")
        again = reconcile_manifest(dataset, store, previous, [])
        # the same rows; only their source says that this time they were found already stored
        pd.testing.assert_frame_equal(again.drop(columns="source"), manifest.drop(columns="source"))
        assert set(manifest["source"]) == {"url"} and set(again["source"]) == {"already stored"}
        assert sum(server.hits.values()) == 15
    assert_bucket_holds_only_valid_images(store, load_images(atlas / "images"))


def test_real_atlas_images_round_trip(store, atlas_dir, tmp_path):
    with serve_atlas(atlas_dir / "images", atlas_dir / "rows.csv") as server:
        csv_path = rewrite_csv_host(atlas_dir / "rows.csv", server.base_url, tmp_path / "rows.csv", limit_per_label=2)
        dataset = read_dataset(csv_path)
        new_rows = [r for s in plan_shards(dataset, set(), shard_size=16) for r in fetch_shard(s, store, FetchOptions(**FAST))]
    manifest = reconcile_manifest(dataset, store, None, new_rows)
    assert (manifest["status"] == "ok").all() and not manifest["md5_mismatch"].any()
    assert set(manifest["fitzpatrick_range"]) <= {"I-II", "III-IV", "V-VI", "unknown"}
    for md5hash in manifest["md5hash"][:5]:
        assert store.get_bytes(f"images/{md5hash}") == (atlas_dir / "images" / f"{md5hash}.jpg").read_bytes()


FETCH_SCRIPT = """
import sys
import pandas as pd
from dermflow.settings import load_settings
from dermflow.storage import ObjectStore
from dermflow.ingestion.fetch import FetchOptions, fetch_shard
from dermflow.ingestion.manifest import plan_shards, reconcile_manifest, stored_image_md5s

settings = load_settings()
store = ObjectStore.from_settings(settings)
dataset = pd.read_csv(sys.argv[1], dtype=str, keep_default_na=False)
options = FetchOptions.from_settings(settings, host_concurrency=2, read_timeout=5, total_timeout=10)
new_rows = []
for shard in plan_shards(dataset, stored_image_md5s(store), shard_size=6):
    new_rows += fetch_shard(shard, store, options)
previous = store.get_dataframe_csv("manifests/fetch.csv") if store.exists("manifests/fetch.csv") else None
manifest = reconcile_manifest(dataset, store, previous, new_rows)
store.put_dataframe_csv("manifests/fetch.csv", manifest)
print("done", (manifest["status"] == "ok").sum())
"""


def run_fetch_process(csv_path: Path) -> subprocess.Popen:
    env = {**os.environ, "DERMFLOW_ALLOWED_HOSTS": "127.0.0.1", "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.Popen([sys.executable, "-c", FETCH_SCRIPT, str(csv_path)], env=env, cwd=PROJECT_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_objects(store, at_least: int, timeout: float, process: subprocess.Popen | None = None) -> set[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stored = stored_image_md5s(store)
        if len(stored) >= at_least:
            return stored
        if process is not None and process.poll() is not None:
            raise AssertionError(f"fetch process exited early:\n{process.stdout.read()}")
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} objects after {timeout}s")


def test_sigkill_mid_fetch_then_rerun_completes(store, tmp_path):
    atlas = synthetic_atlas(tmp_path / "atlas", n_labels=4, per_label=8, size=48)
    images = load_images(atlas / "images")
    with serve_atlas(atlas / "images", atlas / "rows.csv", latency_s=0.25) as server:
        csv_path = rewrite_csv_host(atlas / "rows.csv", server.base_url, tmp_path / "rows.csv")
        process = run_fetch_process(csv_path)
        try:
            before = wait_for_objects(store, 4, timeout=60, process=process)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        stored_at_kill = stored_image_md5s(store)
        assert len(stored_at_kill) < len(images), "the fetch finished before it was killed"
        assert not store.exists("manifests/fetch.csv")

        rerun = run_fetch_process(csv_path)
        output, _ = rerun.communicate(timeout=120)
        assert rerun.returncode == 0, output
        hits = dict(server.hits)

    manifest = store.get_dataframe_csv("manifests/fetch.csv")
    assert len(manifest) == len(images) and set(manifest["status"]) == {"ok"}
    assert stored_image_md5s(store) == set(images)
    # What was stored before the kill was verified by reading back, not downloaded again.
    by_md5 = manifest.set_index("md5hash")
    image_ids = {m: u.split("imageId=")[1] for m, u in zip(manifest["md5hash"], manifest["url"])}
    for md5hash in before:
        assert hits[image_ids[md5hash]] == 1
        assert by_md5.loc[md5hash, "phash"] == verify_image(images[md5hash]).phash
    assert_bucket_holds_only_valid_images(store, images)


@pytest.mark.slow
def test_store_restarted_mid_fetch_still_completes(tmp_path):
    from dermflow.settings import load_settings
    from dermflow.ops.stack import SeaweedServer, free_port_block
    from dermflow.storage import ObjectStore

    seaweed = SeaweedServer(data_dir=tmp_path / "seaweed", s3_port=free_port_block(4),
                            access_key="k-" + secrets.token_hex(4), secret_key=secrets.token_hex(16))
    seaweed.start()
    try:
        settings = load_settings(aws_endpoint_url=seaweed.endpoint_url, aws_access_key_id=seaweed.access_key,
                                 aws_secret_access_key=seaweed.secret_key, bucket="restart")
        store = ObjectStore.from_settings(settings)
        store.ensure_bucket()
        atlas = synthetic_atlas(tmp_path / "atlas", n_labels=4, per_label=8, size=48)
        images = load_images(atlas / "images")
        with serve_atlas(atlas / "images", atlas / "rows.csv", latency_s=0.3) as server:
            dataset = read_dataset(rewrite_csv_host(atlas / "rows.csv", server.base_url, tmp_path / "rows.csv"))
            options = FetchOptions(**{**FAST, "host_concurrency": 2, "store_deadline": 120})
            results: list = []
            errors: list = []

            def fetch_all():
                try:
                    for shard in plan_shards(dataset, set(), shard_size=32):
                        results.extend(fetch_shard(shard, store, options))
                except Exception as error:  # noqa: BLE001 - reported by the assertion below
                    errors.append(error)

            worker = threading.Thread(target=fetch_all)
            worker.start()
            assert len(wait_for_objects(store, 3, timeout=60)) < len(images)
            # A crash, not a graceful stop (which takes SeaweedFS ~25 s): the store vanishes
            # mid-put, refuses connections, then comes back on the same data.
            pid = seaweed.process.pid()
            os.killpg(pid, signal.SIGKILL)
            while seaweed.process.pid() is not None:
                time.sleep(0.05)
            time.sleep(1.0)
            seaweed.start()
            worker.join(timeout=180)
            assert not worker.is_alive() and not errors, errors
        manifest = reconcile_manifest(dataset, store, None, results)
        assert (manifest["status"] == "ok").all(), summarize_manifest(manifest)
        assert stored_image_md5s(store) == set(images)
        assert_bucket_holds_only_valid_images(store, images)
    finally:
        pid = seaweed.process.pid()
        if pid is not None:  # its data is throw-away: skip the slow graceful stop
            os.killpg(pid, signal.SIGKILL)
        seaweed.stop()
