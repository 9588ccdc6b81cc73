"""Flow `derm-fetch`: fetch every missing image, one task run per shard.

A subflow of `derm`, so the task runner can be chosen per run: threads (default), or a Dask
cluster (`task_runner="dask"`, `dask_address=tcp://scheduler:8786`, or a local cluster).
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed

from tasks.data import fetch_shard, plan_fetch, write_fetch_manifest


@flow(name="derm-fetch")
def fetch_images(
    dataset_key: str,
    run_id: str,
    shard_size: int = 256,
    host_concurrency: int = 16,
    host_rate_limit: float | None = None,
    only_failed: bool = False,
) -> dict:
    logger = get_run_logger()
    shards = plan_fetch(dataset_key, shard_size, only_failed=only_failed)
    total = sum(len(shard) for shard in shards)
    progress_id = create_progress_artifact(
        progress=0.0 if total else 100.0, key="derm-fetch-progress",
        description=f"images fetched: 0 / {total} rows" if total else "nothing to fetch",
    )
    futures = [fetch_shard.submit(shard, host_concurrency, host_rate_limit) for shard in shards]
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


def fetch_runner(task_runner: str, dask_address: str | None):
    """The task runner for the fetch subflow (Prefect's own runners only)."""
    if task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=dask_address) if dask_address else DaskTaskRunner(
            cluster_kwargs={"n_workers": 2, "threads_per_worker": 4, "processes": True}
        )
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=4)
