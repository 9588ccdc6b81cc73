"""Flow `derm`: the whole path, CSV to report. Deployments differ only in parameters:
`derm/full` (everything), `derm/fetch` (fetch only), `derm/refetch` (retry the failed rows of
the latest manifest), `derm/retrain` (weekly: fetch what is new, reuse what is unchanged,
promote a challenger only if it beats the champion).

Training runs as `derm-train/default` flow runs started with `run_deployment`: subflows in
the UI, each in its own worker process, concurrent up to the `gpu` concurrency limit.
Cancelling a `derm` run cancels them too (the Prefect server's cancellation cleanup service
cancels the subflow runs of a cancelled parent).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Annotated

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment
from prefect.runtime import flow_run as current_flow_run
from pydantic import Field

from dermflow.dataset.dedup import DEFAULT_DUP_THRESHOLD
from dermflow.params import (
    DEFAULT_CSV_URL,
    MAX_EPOCHS,
    REPORT_ARCHITECTURES,
    ArchitectureName,
    Mode,
    TaskRunnerName,
    TunerName,
    resolve_epochs,
)
from dermflow.runs import make_run_id
from flows.fetch import fetch_images, fetch_runner
from tasks.data import ingest_dataset, latest_dataset_key, split_dataset
from tasks.registry import apply_retention, promote_if_better, reusable_training
from tasks.report import build_and_store_report
from tasks.runs import data_summary, record_params, training_outcome

TRAIN_DEPLOYMENT = "derm-train/default"


class PipelineError(RuntimeError):
    """A stage cannot go on; the message says why and what to do."""


def _validate_weights(weights: str) -> str:
    if weights in ("imagenet", "none") or Path(weights).expanduser().is_file():
        return weights
    raise PipelineError(
        f"weights={weights!r}: expected 'imagenet', 'none', or the path of a local weights file "
        "that exists on the worker"
    )


async def _train_all(jobs: dict[str, dict], split_key: str, run_id: str, parent_id: str) -> list[dict]:
    """One `derm-train` subflow run per architecture (`jobs`: architecture -> parameters), all
    started at once; the `gpu` limit decides how many train at the same time. A failure is
    recorded in its outcome, never raised, so one architecture cannot stop the others."""

    async def one(architecture: str, train_params: dict) -> dict:
        child = await run_deployment(
            TRAIN_DEPLOYMENT,
            parameters={"architecture": architecture, "split_key": split_key, "run_id": run_id, **train_params},
            flow_run_name=f"{run_id}-{architecture}",
            idempotency_key=f"{parent_id}-{architecture}",  # a retried parent reuses its children
            timeout=None,
            as_subflow=True,
        )
        state = child.state
        outcome = training_outcome(run_id, architecture, state.name if state else "unknown",
                                   state.message if state else None, bool(state and state.is_completed()))
        # What the registry keys reuse on (see tasks.registry.training_key).
        return {**outcome, "hyperparameters": train_params.get("hyperparameters")}

    return list(await asyncio.gather(*(one(a, p) for a, p in jobs.items())))


@flow(name="derm", log_prints=True)
async def derm(
    mode: Mode = "full",
    csv: str = DEFAULT_CSV_URL,
    limit_per_label: Annotated[int, Field(ge=1)] | None = None,
    image_size: Annotated[int, Field(ge=32, le=1024)] = 256,
    epochs: Annotated[int, Field(ge=1, le=MAX_EPOCHS)] | None = None,
    batch_size: Annotated[int, Field(ge=1, le=1024)] = 32,
    architectures: list[ArchitectureName] = REPORT_ARCHITECTURES,
    weights: str = "imagenet",
    seed: int = 42,
    tune: bool = False,
    tuner: TunerName = "random",
    max_trials: Annotated[int, Field(ge=1, le=1000)] = 10,
    tune_workers: Annotated[int, Field(ge=1, le=64)] = 1,
    budget_minutes: Annotated[float, Field(gt=0)] | None = None,
    host_concurrency: Annotated[int, Field(ge=1, le=256)] = 16,
    host_rate_limit: Annotated[float, Field(gt=0)] | None = None,
    shard_size: Annotated[int, Field(ge=1, le=10000)] = 256,
    dup_threshold: Annotated[int, Field(ge=0, le=64)] = DEFAULT_DUP_THRESHOLD,
    exclude_wrongly_labelled: bool = True,
    task_runner: TaskRunnerName = "threads",
    dask_address: str | None = None,
) -> dict:
    logger = get_run_logger()
    started = time.time()
    deadline = started + budget_minutes * 60 if budget_minutes else None
    epochs = resolve_epochs(epochs, budget_minutes)
    run_id = make_run_id(current_flow_run.name or "local")
    params = {k: v for k, v in locals().items() if k not in ("logger", "started")}
    params["architectures"] = list(dict.fromkeys(architectures))
    if not params["architectures"]:
        raise PipelineError("architectures is empty: name at least one, e.g. '[\"baseline_cnn\"]'")
    _validate_weights(weights)
    record_params(run_id, params)
    logger.info("run %s: mode=%s", run_id, mode)

    # --- ingest and fetch ---
    runner, parallel_shards = fetch_runner(task_runner, dask_address)
    fetch = fetch_images.with_options(task_runner=runner)
    dataset = None
    if mode == "refetch":
        fetched = fetch(latest_dataset_key(), run_id, shard_size, host_concurrency, host_rate_limit,
                        only_failed=True, shard_parallelism=parallel_shards)
    else:
        dataset = ingest_dataset(csv, limit_per_label, seed)
        fetched = fetch(dataset["dataset_key"], run_id, shard_size, host_concurrency, host_rate_limit,
                        shard_parallelism=parallel_shards)
    counts = fetched["summary"]
    logger.info("fetched %s of %s images; failures by reason: %s",
                counts["ok"], counts["rows"], counts["by_reason"])
    if mode in ("fetch", "refetch"):
        return {"run_id": run_id, "fetch": fetched}

    # --- split ---
    from dermflow.dataset.split import SplitError

    try:
        split = split_dataset(fetched["manifest_key"], seed, dup_threshold, exclude_wrongly_labelled)
    except SplitError as error:
        raise PipelineError(
            f"fetched {counts['ok']} of {counts['rows']} images "
            f"(failures by reason: {counts['by_reason']}); too few to split: {error}. "
            "Check that the image hosts are reachable (DERMFLOW_ALLOWED_HOSTS for local servers), "
            "then run derm/refetch."
        ) from error

    # --- tune, then train each architecture as its own subflow ---
    train_params = {"image_size": image_size, "epochs": epochs, "batch_size": batch_size,
                    "weights": weights, "seed": seed, "deadline": deadline}
    tuning_trials = None
    if tune:
        from flows.tune import tune_architectures

        tuned = await tune_architectures(params["architectures"], split["split_key"], run_id, train_params,
                                         tuner=tuner, max_trials=max_trials, workers=tune_workers)
        tuning_trials = tuned["trials"]
        hyperparameters = tuned["best"]
    else:
        hyperparameters = {}

    jobs, outcomes = {}, []
    for architecture in params["architectures"]:
        arch_params = {**train_params, "hyperparameters": hyperparameters.get(architecture)}
        reused = reusable_training(split["hash"], architecture, arch_params) if mode == "retrain" else None
        if reused:
            logger.info("%s: data and parameters unchanged, reusing run %s", architecture, reused["run_id"])
            outcomes.append(reused)
        else:
            jobs[architecture] = arch_params
    outcomes += await _train_all(jobs, split["split_key"], run_id, str(current_flow_run.id or run_id))

    # --- registry, promotion, report ---
    decision = promote_if_better(run_id, outcomes, split["split_key"], split["hash"], fetched["hash"],
                                 train_params, mode)
    report = build_and_store_report(
        run_id, params, data_summary(dataset, fetched, split), outcomes,
        tuning_trials=tuning_trials, retrain_decision=decision,
    )
    apply_retention()
    failed = [o for o in outcomes if o["status"] != "ok"]
    if len(failed) == len(outcomes):
        raise PipelineError(f"every architecture failed: {[(o['architecture'], o['error']) for o in failed]}")
    return {"run_id": run_id, "report": report, "decision": decision,
            "failed": [o["architecture"] for o in failed]}
