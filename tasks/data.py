"""Prefect tasks for the data stages: ingest, fetch shards, manifests, split.

Thin wrappers: the work is in `dermflow.ingestion` (ingest, fetch, manifest) and
`dermflow.dataset.split`; every bucket key comes from `dermflow.layout`. Tasks exchange bucket
keys and counts: shards and their manifest rows are stored objects, handed over by key.
"""

from __future__ import annotations

from prefect import get_run_logger, task

from dermflow import layout
from dermflow.dataset import split
from dermflow.ingestion import fetch, ingest
from dermflow.ingestion import manifest as fetch_manifest
from dermflow.ingestion.guard import redact_url
from dermflow.runs import content_hash
from tasks.common import object_store, retry_unless_permanent, settings


@task(name="ingest-csv", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_permanent)
def ingest_dataset(csv: str, limit_per_label: int | None, seed: int) -> dict:
    """Validate the CSV and store the dataset rows: returns their key and counts."""
    store = object_store()
    dataset = ingest.load_dataset(csv, store=store, limit_per_label=limit_per_label, seed=seed)
    fingerprint = ingest.dataset_fingerprint(dataset)
    key = layout.dataset_key(fingerprint)
    store.put_dataframe_csv(key, dataset)
    get_run_logger().info(
        "ingested %d rows, %d labels, %d without URL from %s",
        len(dataset), dataset["label"].nunique(), int(dataset["no_url"].sum()), redact_url(csv),
    )
    return {"dataset_key": key, "rows": len(dataset), "labels": int(dataset["label"].nunique()),
            "fingerprint": fingerprint}


def latest_dataset_key() -> str:
    """The dataset of the latest fetch manifest (for `derm/refetch`)."""
    store = object_store()
    latest = fetch_manifest.read_latest_fetch(store)
    if latest is None:
        raise fetch_manifest.ManifestError(
            f"no fetch manifest in {store.uri(layout.MANIFESTS_PREFIX)}: run derm/fetch or derm/full first"
        )
    return latest[0]["dataset_key"]


@task(name="plan-fetch")
def plan_fetch(dataset_key: str, run_id: str, shard_size: int, only_failed: bool = False,
               parallel: int = 1) -> list[dict]:
    """Shards of the rows still to fetch (whole waves of `parallel` shards), each stored under
    `layout.shard_rows_key`: their keys and row counts. One paginated listing of `images/`, not
    a HEAD each. With `only_failed`, the rows that failed in the latest manifest."""
    store = object_store()
    rows = store.get_dataframe_csv(dataset_key)
    if only_failed:
        rows = fetch_manifest.failed_rows(_latest_manifest_of(store, dataset_key), rows)
    stored = fetch_manifest.stored_image_md5s(store)
    shards = fetch_manifest.plan_shards(rows, stored, shard_size=shard_size, parallel=parallel)
    get_run_logger().info(
        "%d rows, %d already stored, %d shards to fetch",
        len(rows), len(stored & set(rows["md5hash"])), len(shards),
    )
    return _store_shards(store, run_id, "fetch", shards)


def _store_shards(store, run_id: str, stage: str, shards: list[list[dict]]) -> list[dict]:
    """Each shard's rows under its key; [{"key", "rows"}]. Task runs hand shards over by key:
    a Prefect task parameter holding rows is walked item by item on every submit."""
    handles = []
    for index, shard in enumerate(shards):
        key = layout.shard_rows_key(run_id, stage, index)
        store.put_json(key, shard)
        handles.append({"key": key, "rows": len(shard)})
    return handles


def _store_results(store, rows_key: str, results: list[dict]) -> dict:
    """A shard's manifest rows under `layout.shard_results_key`; their key and counts."""
    key = layout.shard_results_key(rows_key)
    store.put_json(key, results)
    return {"key": key, "rows": len(results), "ok": sum(row["status"] == "ok" for row in results)}


def _latest_manifest_of(store, dataset_key: str):
    """The latest fetch's manifest, which must be of `dataset_key` (what a refetch retries)."""
    latest = fetch_manifest.read_latest_fetch(store)
    if latest is None or latest[0]["dataset_key"] != dataset_key:
        raise fetch_manifest.ManifestError(
            f"the latest fetch manifest is not of dataset {dataset_key}: run derm/fetch on it first"
        )
    return latest[1]


@task(name="fetch-shard", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_unless_permanent)
def fetch_shard(rows_key: str, host_concurrency: int, host_rate_limit: float | None, store_workers: int) -> dict:
    """Download the shard at `rows_key` concurrently (the shard's shares of the host's requests
    and of the store threads); a Prefect retry covers a crashed worker. Returns the key of its
    manifest rows and their counts."""
    options = fetch.FetchOptions.from_settings(
        settings(), host_concurrency=host_concurrency, host_rate_limit=host_rate_limit, store_workers=store_workers)
    store = object_store()
    return _store_results(store, rows_key, fetch.fetch_shard(store.get_json(rows_key), store, options))


@task(name="write-fetch-manifest", retries=1, retry_condition_fn=retry_unless_permanent)
def write_fetch_manifest(dataset_key: str, run_id: str, imported_keys: list[str], fetched_keys: list[str]) -> dict:
    """The complete manifest (one row per dataset row) from the shards' results at
    `imported_keys` and `fetched_keys`: history and latest copies, then the pointer to it
    (`layout.FETCH_STATE_KEY`), last: readers follow the pointer, so a run killed between
    these writes leaves the previous fetch's manifest and dataset, consistent. The run's
    shard objects are deleted after."""
    from dermflow.ingestion.importer import merge_fallback

    store = object_store()
    imported = [row for key in imported_keys for row in store.get_json(key)]
    fetched = [row for key in fetched_keys for row in store.get_json(key)]
    history_key, manifest = fetch_manifest.write_latest_fetch(
        store, store.get_dataframe_csv(dataset_key), dataset_key, merge_fallback(imported, fetched), run_id)
    summary = fetch_manifest.summarize_manifest(manifest)
    logger = get_run_logger()
    logger.info("fetch manifest: %s", summary)
    try:
        store.delete_prefix(layout.fetch_work_prefix(run_id))
    except Exception as error:  # noqa: BLE001 - the manifest is written; leftovers are only untidy
        logger.warning("could not delete the fetch's shard objects: %s", error)
    return {"manifest_key": history_key, "summary": summary, "hash": content_hash(
        manifest.sort_values("md5hash")[["md5hash", "status", "label", "fitzpatrick_range", "qc", "phash"]]
        .to_dict("list"))}


@task(name="split", retries=1, retry_condition_fn=retry_unless_permanent)
def split_dataset(manifest_key: str, seed: int, dup_threshold: int, exclude_wrongly_labelled: bool,
                  drop_small_labels: bool = False) -> dict:
    """70/15/15 split, stored as `manifests/split-<hash>.csv` and reused when unchanged."""
    store = object_store()
    manifest = store.get_dataframe_csv(manifest_key)
    params = {"seed": seed, "dup_threshold": dup_threshold, "exclude_wrongly_labelled": exclude_wrongly_labelled}
    if drop_small_labels:  # only when set, so the fingerprints of existing splits are unchanged
        params["drop_small_labels"] = True
    fingerprint = split.split_fingerprint(manifest, params)[:12]
    key = layout.split_manifest_key(fingerprint)
    summary_key = layout.split_summary_key(fingerprint)
    logger = get_run_logger()
    if store.exists(key) and store.exists(summary_key):
        logger.info("split unchanged: reusing %s", store.uri(key))
        return {"split_key": key, "summary": store.get_json(summary_key), "reused": True, "hash": fingerprint}
    frame, summary = split.split_dataset(
        manifest, seed=seed, dup_threshold=dup_threshold, exclude_wrongly_labelled=exclude_wrongly_labelled,
        drop_small_labels=drop_small_labels,
    )
    store.put_dataframe_csv(key, frame)
    store.put_json(summary_key, summary)
    logger.info("split %s: %s", store.uri(key), summary.get("sizes"))
    return {"split_key": key, "summary": summary, "reused": False, "hash": fingerprint}


# --------------------------------------------------------------------------------------------
# importing from an image source (archive, folder, S3 prefix): before the URL fetch


@task(name="plan-import", retries=1, retry_condition_fn=retry_unless_permanent)
def plan_import(dataset_key: str, run_id: str, images: str, shard_size: int, stripes: int) -> dict:
    """Match the source's members to the dataset's rows: shards of rows to import (rows already
    stored are left out), stored like `plan_fetch`'s, and what the source holds that is not used."""
    from dermflow.ingestion import archive, importer

    store = object_store()
    rows = store.get_dataframe_csv(dataset_key)
    stored = fetch_manifest.stored_image_md5s(store)
    with archive.open_source(images, store) as source:
        plan = importer.plan_import(rows, source, stored, shard_size, stripes)
    summary = plan.summary()
    get_run_logger().info(
        "image source %s: %d member(s), %d match CSV rows (%d already stored), %d to import in %d shard(s); "
        "not used: %s", images, plan.members, plan.matched, plan.already_stored, summary["to_import"],
        len(plan.shards), plan.unused["counts"])
    return {"shards": _store_shards(store, run_id, "import", plan.shards), "summary": summary}


@task(name="import-shard", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_unless_permanent)
def import_shard(rows_key: str, images: str, store_workers: int) -> dict:
    """Verify and store the members of the shard at `rows_key` (the fetcher's checks) with
    `store_workers` threads; a damaged member's row comes back failed, with `archive_reason`,
    to be fetched by URL. Returns the key of its manifest rows and their counts."""
    from dermflow.ingestion import importer

    options = fetch.FetchOptions.from_settings(settings(), store_workers=store_workers)
    store = object_store()
    return _store_results(store, rows_key, importer.import_shard_from(store.get_json(rows_key), images, store,
                                                                      options))


@task(name="release-import-source")
def release_import_source(images: str) -> None:
    """Delete the local spool of a remote archive (a local source is never touched)."""
    from dermflow.ingestion.spool import release_spool

    release_spool(images)
