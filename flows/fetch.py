"""Flow `derm-fetch`: fetch every missing image, one task run per shard.

A subflow of `derm`, so the task runner can be chosen per run: threads (default), or a Dask
cluster (`task_runner="dask"`, `dask_address=tcp://scheduler:8786`, or a local cluster).
"""

from __future__ import annotations

import math

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed

from dermflow.config import RUN_DEFAULTS, RunConfig, HostConcurrency, HostRateLimit, ShardSize, describe_parameters
from dermflow.runs import check_run_id
from tasks.data import fetch_shard, plan_fetch, write_fetch_manifest

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
) -> dict:
    """Fetch every image of the dataset not yet in the bucket (or only the failed rows), one
    task run per shard, and write the fetch manifest. `host_concurrency` and `host_rate_limit`
    are per host for the whole fetch: each of the shards running at once gets its share."""
    check_run_id(run_id)  # an API caller's id becomes the manifest history's key
    logger = get_run_logger()
    shards = plan_fetch(dataset_key, shard_size, only_failed=only_failed)
    total = sum(len(shard) for shard in shards)
    progress_id = create_progress_artifact(
        progress=0.0 if total else 100.0, key="derm-fetch-progress",
        description=f"images fetched: 0 / {total} rows" if total else "nothing to fetch",
    )
    per_shard_concurrency = max(1, math.ceil(host_concurrency / shard_parallelism))
    per_shard_rate = host_rate_limit / shard_parallelism if host_rate_limit else None
    futures = [fetch_shard.submit(shard, per_shard_concurrency, per_shard_rate) for shard in shards]
    results: list[dict] = []
    crashed: list[str] = []
    for future in as_completed(futures):
        try:
            results.extend(future.result())
        except Exception as error:  # noqa: BLE001 - a shard that failed after its retries
            crashed.append(repr(error))
        update_progress_artifact(progress_id, progress=100.0 * len(results) / max(total, 1),
                                 description=f"rows done: {len(results)} / {total}")
    if crashed:
        logger.warning("%d shard(s) failed after retries; their rows stay unfetched: %s",
                       len(crashed), crashed[:3])
    return write_fetch_manifest(dataset_key, results, run_id)


def fetch_runner(task_runner: str, dask_address: str | None, dask_shards: int = 8):
    """The task runner for the fetch subflow (Prefect's own runners only) and how many shards
    it runs at once. On an existing Dask cluster, `dask_shards` is the caller's estimate."""
    if task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address), dask_shards
        return DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 4, "processes": True}), 8
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=SHARD_PARALLELISM), SHARD_PARALLELISM
