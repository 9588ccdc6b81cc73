"""Flow `derm-fetch`: import what an image source holds, then fetch every missing image by
URL, one task run per shard (both on the same task runner).

A subflow of `derm`, so the task runner can be chosen per run: `auto` (the default: Prefect's
process pool, one worker per core, where the fetch is long enough to win back the pool's start on
more than one core, else threads; see `dermflow.ingestion.parallelism`), `processes`,
`threads`, or a Dask cluster (`task_runner="dask"`, `dask_address=tcp://scheduler:8786`, or a
local cluster). Decoding and hashing are CPU-bound: threads get a little over one core (Pillow
and NumPy release the GIL for part of it), processes every core once they have started.
"""

from __future__ import annotations

import os

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed

from dermflow.config import (
    RUN_DEFAULTS,
    HostConcurrency,
    HostRateLimit,
    Images,
    RunConfig,
    ShardSize,
    describe_parameters,
)
from dermflow.ingestion.fetch import FetchOptions
from dermflow.ingestion.parallelism import FETCH_COSTS, IMPORT_COSTS, pool_pays, shard_budgets
from dermflow.runs import check_run_id
from tasks.data import (
    fetch_shard,
    import_shard,
    plan_fetch,
    plan_import,
    release_import_source,
    write_fetch_manifest,
)

# Shards fetched at once by the default thread runner (each shard is itself concurrent).
SHARD_PARALLELISM = 4


@flow(name="derm-fetch")
@describe_parameters(
    RunConfig,
    dataset_key="Bucket key of the ingested dataset rows.",
    run_id="The derm run this fetch belongs to (its manifest history is kept under this id).",
    only_failed="Only the rows that failed in the latest fetch manifest (derm/refetch).",
    shard_parallelism="Shards fetched at once; host_concurrency and host_rate_limit are shared among them.",
)
def fetch_images(
    dataset_key: str,
    run_id: str,
    shard_size: ShardSize = RUN_DEFAULTS["shard_size"],
    host_concurrency: HostConcurrency = RUN_DEFAULTS["host_concurrency"],
    host_rate_limit: HostRateLimit = RUN_DEFAULTS["host_rate_limit"],
    only_failed: bool = False,
    shard_parallelism: int = SHARD_PARALLELISM,
    images: Images = RUN_DEFAULTS["images"],
) -> dict:
    """Import the dataset's images that `images` holds, then fetch every image not yet in the
    bucket (or only the failed rows) by URL, one task run per shard, and write the fetch
    manifest. `host_concurrency` and `host_rate_limit` are per host for the whole fetch: each
    of the shards running at once gets its share."""
    check_run_id(run_id)  # an API caller's id becomes the manifest history's key
    # Each shard running at once gets its share of the store threads and of the host's politeness.
    per_shard_concurrency, store_workers = shard_budgets(host_concurrency, FetchOptions.store_workers,
                                                         shard_parallelism)
    imported_keys, import_summary = (
        import_images(dataset_key, run_id, images, shard_size, shard_parallelism, store_workers)
        if images else ([], None))
    shards = plan_fetch(dataset_key, run_id, shard_size, only_failed=only_failed, parallel=shard_parallelism)
    per_shard_rate = host_rate_limit / shard_parallelism if host_rate_limit else None
    fetched_keys = run_shards(
        [fetch_shard.submit(shard["key"], per_shard_concurrency, per_shard_rate, store_workers) for shard in shards],
        total=sum(shard["rows"] for shard in shards))
    fetched = write_fetch_manifest(dataset_key, run_id, imported_keys, fetched_keys)
    if import_summary is not None:
        fetched["summary"]["import"] = import_summary
    report_failures(fetched["summary"], images)
    return fetched


def run_shards(futures: list, total: int) -> list[str]:
    """Wait for the shards' task runs, showing the rows done in the `derm-fetch-progress`
    artifact; the keys of their manifest rows. A shard that failed after its retries is
    logged and left out: its rows stay unfetched (`not_fetched` in the manifest)."""
    progress_id = create_progress_artifact(
        progress=0.0 if total else 100.0, key="derm-fetch-progress",
        description=f"images fetched: 0 / {total} rows" if total else "nothing to fetch",
    )
    keys: list[str] = []
    done = 0
    crashed: list[str] = []
    for future in as_completed(futures):
        try:
            part = future.result()
            keys.append(part["key"])
            done += part["rows"]
        except Exception as error:  # noqa: BLE001 - a shard that failed after its retries
            crashed.append(repr(error))
        update_progress_artifact(progress_id, progress=100.0 * done / max(total, 1),
                                 description=f"rows done: {done} / {total}")
    if crashed:
        get_run_logger().warning("%d shard(s) failed after retries; their rows stay unfetched: %s",
                                 len(crashed), crashed[:3])
    return keys


def import_images(dataset_key: str, run_id: str, images: str, shard_size: int,
                  parallelism: int, store_workers: int) -> tuple[list[str], dict]:
    """Import the rows `images` holds, one task run per shard with `store_workers` threads;
    (the keys of their manifest rows, the import's summary). A crashed shard's rows are left
    to the URL fetch."""
    logger = get_run_logger()
    plan = plan_import(dataset_key, run_id, images, shard_size, parallelism)
    futures = [import_shard.submit(shard["key"], images, store_workers) for shard in plan["shards"]]
    keys: list[str] = []
    ok = unusable = 0
    for future in as_completed(futures):
        try:
            part = future.result()
            keys.append(part["key"])
            ok += part["ok"]
            unusable += part["rows"] - part["ok"]
        except Exception as error:  # noqa: BLE001 - its rows fall back to their URLs
            logger.warning("an import shard failed after retries (%r); its rows are fetched by URL", error)
    release_import_source(images)
    logger.info("imported %d image(s) from %s; %d member(s) unusable, fetched by URL instead", ok, images, unusable)
    return keys, plan["summary"]


def failure_report(summary: dict, images: str | None) -> str | None:
    """Markdown of the failed rows by reason (None when none failed); it points to the
    archive route when most rows failed without one."""
    if not summary["failed"]:
        return None
    lines = [f"# Fetch: {summary['failed']} of {summary['rows']} rows failed", "", "| reason | rows |", "|---|---|"]
    lines += [f"| {reason} | {count} |" for reason, count in sorted(summary["by_reason"].items(), key=lambda kv: -kv[1])]
    if summary["failed"] * 2 > summary["rows"] and not images:
        lines += ["", "Most image URLs of the dataset are dead. Ask the dataset's maintainers for the images "
                  "archive (the form linked from github.com/mattgroh/fitzpatrick17k), then run with "
                  "`-p images=/path/to/archive.zip` (`make run ARGS=\"-p images=...\"`)."]
    return "\n".join(lines)


def report_failures(summary: dict, images: str | None) -> None:
    """The failed rows by reason in the log and as the `derm-fetch-failures` artifact."""
    report = failure_report(summary, images)
    if report is None:
        return
    if summary["failed"] * 2 > summary["rows"]:
        get_run_logger().warning(report)
    else:
        get_run_logger().info(report)
    create_markdown_artifact(report, key="derm-fetch-failures", description="failed rows by reason")


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def fetch_runner(task_runner: str, dask_address: str | None, dask_shards: int = 8, shards: int | None = None,
                 rows: int | None = None, importing: bool = False):
    """The task runner for the fetch subflow (Prefect's own runners only) and how many shards
    it runs at once. On an existing Dask cluster, `dask_shards` is the caller's estimate.
    `auto` takes processes only where they pay (`parallelism.pool_pays`, with the import's
    costs when the rows come from an image source): starting the pool costs seconds that a
    fetch of fewer rows than `break_even_rows` never wins back. `rows` and `shards` are None
    when unknown (a refetch)."""
    if task_runner == "auto":
        costs = IMPORT_COSTS if importing else FETCH_COSTS
        task_runner = "processes" if pool_pays(rows, shards, usable_cores(), costs) else "threads"
    if task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address), dask_shards
        return DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 4, "processes": True}), 8
    if task_runner == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner

        # one shard per core at a time: a shard keeps its core busy (decode, hash, put)
        cores = usable_cores()
        return ProcessPoolTaskRunner(max_workers=cores), cores
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=SHARD_PARALLELISM), SHARD_PARALLELISM
