"""Prefect tasks around `dermflow.modeling.tuning`: the search itself, the distributed search's parts, and
the trial table artifact. They pass keys and JSON-able dicts, never arrays or models."""

from __future__ import annotations

import asyncio

from prefect import get_run_logger, task
from prefect.artifacts import acreate_table_artifact
from prefect.concurrency.asyncio import concurrency

from tasks.common import object_store, retry_unless_permanent, settings


@task(name="tune-search", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_permanent)
async def search_in_process(split_key: str, architecture: str, options: dict, gpu_limit: str = "gpu") -> dict:
    """A whole search in this process, holding a `gpu` slot while it trains. A retry (or a
    rerun with the same tuning id) continues from the last synced trial."""
    from dermflow.modeling import tuning

    logger = get_run_logger()
    logger.info("tuning %s on %s: %s", architecture, split_key, options)
    async with concurrency(gpu_limit, occupy=1, lease_duration=settings().gpu_lease_seconds):
        result = await asyncio.to_thread(
            tuning.tune_architecture, object_store(), split_key, architecture, settings=settings(), **options
        )
    logger.info("%s: %d trial(s), best %s", result["tuning_id"], len(result["trials"]), result["best"])
    return result


@task(name="tune-spec")
async def search_spec(split_key: str, architecture: str, options: dict) -> dict:
    """The JSON spec the chief and the workers of a distributed search share."""
    from dermflow.modeling import tuning

    spec = await asyncio.to_thread(
        tuning.make_spec, object_store(), split_key, architecture, settings=settings(), **options
    )
    return tuning.spec_payload(spec, split_key)


@task(name="tune-results")
async def search_results(payload: dict) -> dict:
    """Every trial of a finished (or stopped) search, read back from the bucket."""
    from dermflow.modeling import tuning
    from dermflow.modeling.tuning_results import annotate_choice, best_config, read_trials
    from dermflow.modeling.tuning_sync import ProjectSync

    spec = tuning.SearchSpec.from_dict(payload["spec"])

    def read() -> dict:
        ProjectSync(object_store(), spec.tuning_id, spec.project_dir).pull()
        trials = read_trials(spec.project_dir, spec.architecture)
        why = annotate_choice(trials)
        return {"tuning_id": spec.tuning_id, "trials": trials, "best": best_config(trials), "chosen": why}

    return await asyncio.to_thread(read)


@task(name="tune-worker", retries=0)
def run_tuning_worker(payload: dict, host: str, port: int, tuner_id: str) -> int:
    """One keras-tuner worker: trains the chief's trials until it says stop."""
    from dermflow.modeling import tuning
    from dermflow.modeling.tuning_distributed import run_worker
    from dermflow.modeling.tuning_sync import ProjectSync

    logger = get_run_logger()
    store = object_store()
    spec = tuning.SearchSpec.from_dict(payload["spec"]).on_this_host(settings()).with_local_weights(store, settings())
    arrays = tuning.load_training_arrays(store, payload["split_key"], spec.image_size, settings())
    sync = ProjectSync(store, spec.tuning_id, spec.project_dir)
    ran = run_worker(spec, tuning.trial_data(arrays), host, port, tuner_id, sync)
    logger.info("worker %s ran %d trial(s) of %s", tuner_id, ran, spec.tuning_id)
    return ran


@task(name="tune-table")
async def publish_trial_table(run_id: str, trials: list[dict]) -> str | None:
    """A table artifact with every trial: architecture, id, status, score, hyperparameters."""
    from dermflow.modeling.tuning_results import trial_table

    if not trials:
        return None
    rows = trial_table(trials)
    columns = list(dict.fromkeys(name for row in rows for name in row))
    table = [{name: row.get(name) for name in columns} for row in rows]
    artifact_id = await acreate_table_artifact(
        table, key=f"tuning-{run_id}".lower().replace("_", "-"),
        description=f"Hyperparameter search of run {run_id}: every trial, scored by validation weighted F1",
    )
    return str(artifact_id)
