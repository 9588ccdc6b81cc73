"""tasks.data without a stack: each task's `.fn` over an in-memory object store. Covers where
the tasks store things (`dermflow.layout`), the split reuse key, and which failures are retried."""

from __future__ import annotations

import hashlib

import pandas as pd
import pytest
from prefect.logging import disable_run_logger
from prefect.states import Failed

import tasks.data as data_tasks
from dermflow import layout
from dermflow.errors import DermflowError
from dermflow.ingestion.http import URLReadError
from dermflow.ingestion.ingest import DatasetError, DatasetSourceError, dataset_fingerprint, load_dataset
from dermflow.ingestion.manifest import ManifestError
from tasks.common import retry_unless_permanent
from tests.support.memory_s3 import memory_store

pytestmark = pytest.mark.unit

LABELS = ("psoriasis", "eczema")


def md5_of(index: int) -> str:
    return hashlib.md5(str(index).encode()).hexdigest()


@pytest.fixture
def store(monkeypatch):
    memory = memory_store()
    monkeypatch.setattr(data_tasks, "object_store", lambda: memory)
    with disable_run_logger():
        yield memory


def write_manifest(store, dataset_key: str, results: list[dict], run_id: str) -> dict:
    """`write_fetch_manifest` over `results`, stored as one fetch shard's results would be."""
    key = layout.shard_results_key(layout.shard_rows_key(run_id, "fetch", 0))
    store.put_json(key, results)
    return data_tasks.write_fetch_manifest.fn(dataset_key, run_id, [], [key])


def planned_md5s(store, dataset_key: str, run_id: str = "20261203-100000-plan", **kwargs) -> list[str]:
    """The md5hashes of the shards `plan_fetch` stores, sorted."""
    shards = data_tasks.plan_fetch.fn(dataset_key, run_id, **kwargs)
    return sorted(row["md5hash"] for shard in shards for row in store.get_json(shard["key"]))


def write_dataset_csv(tmp_path, rows: int = 24):
    lines = ["md5hash,fitzpatrick_scale,label,url,qc"]
    lines += [f"{md5_of(i)},{1 + i % 6},{LABELS[i % 2]},https://example.org/{i}.jpg," for i in range(rows)]
    path = tmp_path / "dataset.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def ok_manifest(rows: int = 24) -> pd.DataFrame:
    return pd.DataFrame({
        "md5hash": [md5_of(i) for i in range(rows)],
        "label": [LABELS[i % 2] for i in range(rows)],
        "fitzpatrick_scale": [str(1 + i % 6) for i in range(rows)],
        "qc": [""] * rows,
        "status": ["ok"] * rows,
        "phash": [f"{(i * 0x0F0F0F0F0F0F0F0F) % 2**64:016x}" if i % 3 else "" for i in range(rows)],
    })


def test_ingest_stores_the_dataset_under_its_layout_key(store, tmp_path):
    csv = write_dataset_csv(tmp_path)
    result = data_tasks.ingest_dataset.fn(str(csv), limit_per_label=None, seed=0)
    expected = load_dataset(csv)
    fingerprint = dataset_fingerprint(expected)
    assert result == {"dataset_key": layout.dataset_key(fingerprint), "rows": 24, "labels": 2,
                      "fingerprint": fingerprint}
    stored = store.get_dataframe_csv(result["dataset_key"])
    assert stored["md5hash"].tolist() == expected["md5hash"].tolist()


def test_ingest_of_a_bad_csv_fails_permanently(store, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("md5hash,label\nnope,x\n")
    with pytest.raises(DatasetError) as caught:
        data_tasks.ingest_dataset.fn(str(path), limit_per_label=None, seed=0)
    assert not retry_unless_permanent(None, None, Failed(data=caught.value))
    assert store.client.objects == {}


def test_split_is_stored_under_its_reuse_key_and_reused(store, monkeypatch):
    store.put_dataframe_csv("inputs/manifest.csv", ok_manifest())
    first = data_tasks.split_dataset.fn("inputs/manifest.csv", seed=1, dup_threshold=8, exclude_wrongly_labelled=True)
    assert first["reused"] is False
    assert first["split_key"] == layout.split_manifest_key(first["hash"])
    assert store.exists(layout.split_summary_key(first["hash"]))
    assert first["summary"]["sizes"]["train"] > 0

    def must_not_split(*args, **kwargs):
        raise AssertionError("an unchanged split is reused, not recomputed")

    original = data_tasks.split.split_dataset
    monkeypatch.setattr(data_tasks.split, "split_dataset", must_not_split)
    again = data_tasks.split_dataset.fn("inputs/manifest.csv", seed=1, dup_threshold=8, exclude_wrongly_labelled=True)
    assert again == {**first, "reused": True}
    monkeypatch.setattr(data_tasks.split, "split_dataset", original)
    other_seed = data_tasks.split_dataset.fn("inputs/manifest.csv", seed=2, dup_threshold=8,
                                             exclude_wrongly_labelled=True)
    assert other_seed["hash"] != first["hash"] and other_seed["reused"] is False


def test_fetch_manifest_is_written_under_the_layout_keys(store, tmp_path):
    dataset = load_dataset(write_dataset_csv(tmp_path, rows=4))
    store.put_dataframe_csv("inputs/dataset.csv", dataset)
    with pytest.raises(ManifestError, match="run derm/fetch") as none_yet:
        data_tasks.latest_dataset_key()
    assert not retry_unless_permanent(None, None, Failed(data=none_yet.value))

    results = [{"md5hash": md5_of(0), "status": "failed", "reason": "http_404", "url": "https://example.org/0.jpg"}]
    written = write_manifest(store, "inputs/dataset.csv", results, "run-1")
    assert written["manifest_key"] == layout.fetch_manifest_history_key("run-1")
    assert store.exists(layout.FETCH_MANIFEST_KEY) and written["summary"]["rows"] == 4
    assert data_tasks.latest_dataset_key() == "inputs/dataset.csv"
    # refetch plans the failed rows only, with the dataset's real URLs
    assert planned_md5s(store, "inputs/dataset.csv", shard_size=10, only_failed=True) == sorted(
        md5_of(i) for i in range(4))


def test_shards_go_between_task_runs_by_key_and_are_deleted_with_the_manifest(store, tmp_path):
    """Task runs hand shards and their manifest rows over as private objects, not parameters;
    the manifest task merges the import's and the URL fetch's rows, then deletes them."""
    from dermflow.ingestion.manifest import manifest_row

    dataset = load_dataset(write_dataset_csv(tmp_path, rows=3))
    store.put_dataframe_csv("inputs/dataset.csv", dataset)
    run_id = "20261203-100000-keys"
    shards = data_tasks.plan_fetch.fn("inputs/dataset.csv", run_id, shard_size=2)
    assert [shard["rows"] for shard in shards] == [2, 1]
    assert all(shard["key"].startswith(layout.fetch_work_prefix(run_id)) for shard in shards)
    assert layout.fetch_work_prefix(run_id).startswith(layout.PRIVATE_PREFIX)  # the rows' URLs as given
    planned = [row for shard in shards for row in store.get_json(shard["key"])]
    assert sorted(row["url"] for row in planned) == [f"https://example.org/{i}.jpg" for i in range(3)]

    rows = {row["md5hash"]: row for row in dataset.to_dict("records")}
    ok = {"status": "ok", "reason": "", "phash": "0" * 48, "bytes": 10}
    imported_key = layout.shard_results_key(layout.shard_rows_key(run_id, "import", 0))
    store.put_json(imported_key, [manifest_row(rows[md5_of(0)], **ok, source="archive"),
                                  manifest_row(rows[md5_of(1)], reason="damaged_member", source="archive",
                                               archive_reason="damaged_member")])
    fetched_key = layout.shard_results_key(shards[0]["key"])
    store.put_json(fetched_key, [manifest_row(rows[md5_of(1)], **ok)])
    written = data_tasks.write_fetch_manifest.fn("inputs/dataset.csv", run_id, [imported_key], [fetched_key])

    manifest = store.get_dataframe_csv(written["manifest_key"]).set_index("md5hash")
    assert manifest.loc[md5_of(0), ["status", "source"]].tolist() == ["ok", "archive"]
    assert manifest.loc[md5_of(1), ["status", "source", "archive_reason"]].tolist() == ["ok", "url", "damaged_member"]
    assert manifest.loc[md5_of(2), ["status", "reason"]].tolist() == ["failed", "not_fetched"]
    assert store.list_keys(layout.fetch_work_prefix(run_id)) == []


def test_a_shard_key_names_its_stage():
    key = layout.shard_rows_key("20261203-100000-keys", "import", 7)
    assert key.endswith("/import-00007.rows.json")
    assert layout.shard_results_key(key).endswith("/import-00007.results.json")
    with pytest.raises(ValueError, match="fetch stage 'copy'"):
        layout.shard_rows_key("20261203-100000-keys", "copy", 0)
    with pytest.raises(ValueError, match="not a shard's rows key"):
        layout.shard_results_key("private/runs/x/fetch/import-00007.results.json")


@pytest.mark.parametrize(
    ("error", "retried"),
    [(DatasetError(["column label: empty"]), False),
     (DatasetSourceError("dataset CSV not found: x.csv"), False),
     (DatasetSourceError("cannot reach dataset CSV", transient=True), True),
     (URLReadError("timeout", "https://example.org/a.csv", transient=True), True),
     (URLReadError("http_404", "https://example.org/a.csv", status=404), False),
     (ConnectionError("S3 refused the connection"), True)],
)
def test_only_transient_failures_are_retried(error, retried):
    assert retry_unless_permanent(None, None, Failed(data=error)) is retried


def test_every_data_task_with_retries_retries_only_transient_errors():
    with_retries = [task for task in (data_tasks.ingest_dataset, data_tasks.plan_fetch, data_tasks.fetch_shard,
                                      data_tasks.write_fetch_manifest, data_tasks.split_dataset) if task.retries]
    assert len(with_retries) == 4
    for task in with_retries:
        assert task.retry_condition_fn is retry_unless_permanent, task.name
    assert issubclass(ManifestError, DermflowError)


class KilledBetweenWrites(Exception):
    """Stands for the process dying between two writes of the fetch manifest."""


@pytest.mark.parametrize("killed_at", [layout.FETCH_MANIFEST_KEY, layout.FETCH_STATE_KEY])
def test_a_fetch_killed_between_manifest_writes_leaves_the_previous_fetch_consistent(store, tmp_path, monkeypatch,
                                                                                      killed_at):
    """Issue 14, finding 14: the latest manifest copy and its pointer are two objects. A
    refetch after a kill between them must still retry the failed rows of one fetch, of the
    dataset that fetch was of, and the next fetch must complete normally."""
    first = load_dataset(write_dataset_csv(tmp_path, rows=4))
    store.put_dataframe_csv("inputs/first.csv", first)
    failed_first = [{"md5hash": md5_of(1), "status": "failed", "reason": "http_503", "url": "https://example.org/1.jpg"}]
    write_manifest(store, "inputs/first.csv", failed_first, "20261126-100000-first")

    second = first.assign(md5hash=[md5_of(i) for i in range(10, 14)])  # another dataset, other images
    store.put_dataframe_csv("inputs/second.csv", second)
    real_put_bytes = store.put_bytes

    def put_bytes_then_die(key, data, content_type=None):
        if key == killed_at:
            raise KilledBetweenWrites(key)
        return real_put_bytes(key, data, content_type)

    monkeypatch.setattr(store, "put_bytes", put_bytes_then_die)
    failed_second = [{"md5hash": md5_of(12), "status": "failed", "reason": "http_503",
                      "url": "https://example.org/12.jpg"}]
    with pytest.raises(KilledBetweenWrites):
        write_manifest(store, "inputs/second.csv", failed_second, "20261126-110000-second")
    monkeypatch.setattr(store, "put_bytes", real_put_bytes)

    # a refetch now retries the first fetch's failures (every row: none was stored), of the
    # first dataset
    assert data_tasks.latest_dataset_key() == "inputs/first.csv"
    assert planned_md5s(store, data_tasks.latest_dataset_key(), shard_size=10, only_failed=True) == sorted(
        md5_of(i) for i in range(4))
    # the killed fetch, run again, completes and becomes the latest
    write_manifest(store, "inputs/second.csv", failed_second, "20261126-120000-second")
    assert data_tasks.latest_dataset_key() == "inputs/second.csv"
    assert planned_md5s(store, "inputs/second.csv", shard_size=10, only_failed=True) == sorted(
        md5_of(i) for i in range(10, 14))


def test_a_refetch_of_a_dataset_the_latest_fetch_is_not_of_is_refused(store, tmp_path):
    dataset = load_dataset(write_dataset_csv(tmp_path, rows=4))
    store.put_dataframe_csv("inputs/first.csv", dataset)
    store.put_dataframe_csv("inputs/other.csv", dataset)
    write_manifest(store, "inputs/first.csv", [], "20261126-100000-first")
    with pytest.raises(ManifestError, match="not of dataset inputs/other.csv"):
        data_tasks.plan_fetch.fn("inputs/other.csv", "20261126-120000-other", shard_size=10, only_failed=True)
