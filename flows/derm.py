"""Flow `derm`: the whole path, CSV to report. Deployments differ only in parameters:
`derm/full` (everything), `derm/fetch` (fetch only), `derm/refetch` (retry the failed rows of
the latest manifest), `derm/retrain` (weekly: fetch what is new, reuse what is unchanged,
promote a challenger only if it beats the champion).

The parameters are the flat fields of `dermflow.config.RunConfig`: their defaults, bounds and
descriptions are declared there once. Training runs as `derm-train/default` flow runs started
with `run_deployment`: subflows in the UI, each in its own worker process, concurrent up to the
`gpu` concurrency limit. Cancelling a `derm` run cancels them too (the Prefect server's
cancellation cleanup service cancels the subflow runs of a cancelled parent).
"""

import asyncio
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.deployments import run_deployment
from prefect.runtime import flow_run as current_flow_run

from dermflow.config import (
    RUN_DEFAULTS,
    Architectures,
    BatchSize,
    BudgetMinutes,
    ConfigName,
    Csv,
    DaskAddress,
    DataParallel,
    DropSmallLabels,
    DupThreshold,
    Epochs,
    ExcludeWronglyLabelled,
    HostConcurrency,
    HostRateLimit,
    Images,
    ImageSize,
    LimitPerLabel,
    MaxTrials,
    ModeParam,
    RequireGpu,
    RunConfig,
    Seed,
    ShardSize,
    TaskRunner,
    Tune,
    Tuner,
    TuneWorkers,
    Weights,
    describe_parameters,
)
from dermflow.errors import DermflowError
from dermflow.runs import make_run_id
from flows.fetch import fetch_images, fetch_runner
from tasks.data import ingest_dataset, latest_dataset_key, split_dataset
from tasks.inputs import stage_run_inputs
from tasks.registry import (
    apply_retention,
    mark_run_active,
    mark_run_finished,
    promote_if_better,
    reusable_training,
)
from tasks.report import build_and_store_report
from tasks.runs import (
    data_summary, record_run_config, report_partial_failure, resolve_run_config, training_outcome,
)

TRAIN_DEPLOYMENT = "derm-train/default"
# Attempts of each architecture's training per run of `derm` (the first, and one more after a
# crash or failure); a retry of the `derm` run gets as many again.
TRAIN_ATTEMPTS = 2
D = RUN_DEFAULTS


class PipelineError(DermflowError):
    """A stage cannot go on; the message says why and what to do."""


@flow(name="derm", log_prints=True)
@describe_parameters(RunConfig)
async def derm(
    mode: ModeParam = D["mode"],
    config: ConfigName = D["config"],
    csv: Csv = D["csv"],
    limit_per_label: LimitPerLabel = D["limit_per_label"],
    images: Images = D["images"],
    image_size: ImageSize = D["image_size"],
    epochs: Epochs = D["epochs"],
    batch_size: BatchSize = D["batch_size"],
    architectures: Architectures = D["architectures"],
    require_gpu: RequireGpu = D["require_gpu"],
    data_parallel: DataParallel = D["data_parallel"],
    weights: Weights = D["weights"],
    seed: Seed = D["seed"],
    tune: Tune = D["tune"],
    tuner: Tuner = D["tuner"],
    max_trials: MaxTrials = D["max_trials"],
    tune_workers: TuneWorkers = D["tune_workers"],
    budget_minutes: BudgetMinutes = D["budget_minutes"],
    host_concurrency: HostConcurrency = D["host_concurrency"],
    host_rate_limit: HostRateLimit = D["host_rate_limit"],
    shard_size: ShardSize = D["shard_size"],
    dup_threshold: DupThreshold = D["dup_threshold"],
    exclude_wrongly_labelled: ExcludeWronglyLabelled = D["exclude_wrongly_labelled"],
    drop_small_labels: DropSmallLabels = D["drop_small_labels"],
    task_runner: TaskRunner = D["task_runner"],
    dask_address: DaskAddress = D["dask_address"],
) -> dict:
    """Ingest the CSV, fetch every image into the bucket, split, (tune,) train each
    architecture as a concurrent subflow, register and promote, and report."""
    given = dict(
        mode=mode, config=config, csv=csv, limit_per_label=limit_per_label, images=images,
        image_size=image_size, epochs=epochs, batch_size=batch_size,
        architectures=list(dict.fromkeys(architectures)), weights=weights, seed=seed,
        require_gpu=require_gpu, data_parallel=data_parallel,
        tune=tune, tuner=tuner, max_trials=max_trials, tune_workers=tune_workers, budget_minutes=budget_minutes,
        host_concurrency=host_concurrency, host_rate_limit=host_rate_limit, shard_size=shard_size,
        dup_threshold=dup_threshold, exclude_wrongly_labelled=exclude_wrongly_labelled,
        drop_small_labels=drop_small_labels, task_runner=task_runner,
        dask_address=dask_address,
    )
    # A retrain (or a run given `config`) takes a saved configuration's parameters.
    parameters = resolve_run_config(given, passed_parameter_names())["parameters"]
    # Local paths mean something on this host only: checked, and uploaded where others read them.
    shards_elsewhere = parameters["task_runner"] == "dask" and bool(parameters["dask_address"])
    parameters.update(stage_run_inputs(
        parameters["csv"], parameters["images"], parameters["weights"], shards_elsewhere=shards_elsewhere))
    return await run_pipeline(RunConfig.from_parameters(**parameters), started=time.time())


def passed_parameter_names() -> list[str] | None:
    """The parameters given explicitly to a deployment's run (the deployment's and the run's
    own); None for a direct call, where every parameter arrives with a value."""
    context = FlowRunContext.get()
    run = context.flow_run if context else None
    return list(run.parameters) if run is not None and run.deployment_id else None


async def run_pipeline(config: RunConfig, started: float) -> dict:
    """A `derm` run: its stages, marked in progress while they run (ended or failed)."""
    run_id = make_run_id(current_flow_run.name or "local")
    train_params = training_parameters(config, started)
    mark_run_active(run_id)  # retention of concurrent runs leaves this one alone until it ends
    try:
        return await run_stages(config, run_id, train_params)
    finally:
        mark_run_finished(run_id)


async def run_stages(config: RunConfig, run_id: str, train_params: dict) -> dict:
    """The stages of a `derm` run, in order."""
    logger = get_run_logger()
    record_run_config(run_id, config.model_dump(mode="json"), resolved=train_params)
    logger.info("run %s: mode=%s", run_id, config.mode)

    dataset, fetched = ingest_and_fetch(config, run_id)
    if config.mode in ("fetch", "refetch"):
        return {"run_id": run_id, "fetch": fetched}
    split = split_fetched(config, fetched)
    hyperparameters, tuning_trials = await tune_if_asked(config, split["split_key"], run_id, train_params)
    outcomes = await train_architectures(config, split, run_id, train_params, hyperparameters)

    decision = promote_if_better(run_id, outcomes, split["split_key"], split["hash"], fetched["hash"],
                                 train_params, config.mode)
    report = build_and_store_report(
        run_id, {**config.parameters(), **train_params, "run_id": run_id},
        data_summary(dataset, fetched, split), outcomes,
        tuning_trials=tuning_trials, retrain_decision=decision,
    )
    apply_retention()
    result = finish(run_id, outcomes, report, decision)
    if result["failed"]:  # completed, but not whole: a warning, an artifact and an alert
        report_partial_failure(run_id, [o for o in outcomes if o["status"] != "ok"], len(outcomes))
    return result


def training_parameters(config: RunConfig, started: float) -> dict:
    """What every architecture's training gets (and what the retrain reuse key is made of)."""
    check_weights(config.training.weights)
    return {"image_size": config.training.image_size, "epochs": config.final_epochs(),
            "batch_size": config.training.batch_size, "weights": config.training.weights,
            "seed": config.seed, "deadline": config.deadline(started)}


def check_weights(weights: str) -> None:
    if weights in ("imagenet", "none") or weights.startswith("s3://") or Path(weights).expanduser().is_file():
        return
    raise PipelineError(
        f"weights={weights!r}: expected 'imagenet', 'none', an s3:// URI, or the path of a local weights "
        "file that exists on the worker"
    )


def ingest_and_fetch(config: RunConfig, run_id: str) -> tuple[dict | None, dict]:
    """The dataset rows (None for a refetch) and the fetch result."""
    refetch = config.mode == "refetch"
    dataset = None if refetch else ingest_dataset(config.data.csv, config.data.limit_per_label, config.seed)
    shards = None if refetch else -(-dataset["rows"] // config.fetch.shard_size)
    runner, parallel_shards = fetch_runner(config.fetch.task_runner, config.fetch.dask_address, shards=shards,
                                           rows=None if refetch else dataset["rows"],
                                           importing=bool(config.data.images) and not refetch)
    fetch = fetch_images.with_options(task_runner=runner)
    options = {"shard_size": config.fetch.shard_size, "host_concurrency": config.fetch.host_concurrency,
               "host_rate_limit": config.fetch.host_rate_limit, "shard_parallelism": parallel_shards}
    if refetch:
        fetched = fetch(latest_dataset_key(), run_id, only_failed=True, **options)
    else:
        fetched = fetch(dataset["dataset_key"], run_id, images=config.data.images, **options)
    counts = fetched["summary"]
    get_run_logger().info("fetched %s of %s images; failures by reason: %s",
                          counts["ok"], counts["rows"], counts["by_reason"])
    return dataset, fetched


def split_fetched(config: RunConfig, fetched: dict) -> dict:
    """The split of what was fetched, or a PipelineError that says what to do."""
    from dermflow.dataset.split import SplitError

    counts = fetched["summary"]
    try:
        return split_dataset(fetched["manifest_key"], config.seed, config.split.dup_threshold,
                             config.split.exclude_wrongly_labelled, config.split.drop_small_labels)
    except SplitError as error:
        raise PipelineError(
            f"fetched {counts['ok']} of {counts['rows']} images "
            f"(failures by reason: {counts['by_reason']}); too few to split: {error}. "
            "To go on: run again with -p drop_small_labels=true to leave those labels out; or give "
            "the dataset's images archive with -p images=PATH (most image URLs are dead); or check "
            "that the image hosts are reachable (DERMFLOW_ALLOWED_HOSTS for local servers), then "
            "run derm/refetch."
        ) from error


async def tune_if_asked(config: RunConfig, split_key: str, run_id: str,
                        train_params: dict) -> tuple[dict, list[dict] | None]:
    """{architecture: best TrainConfig override} and every trial, or ({}, None) untuned."""
    if not config.tuning.tune:
        return {}, None
    from flows.tune import tune_architectures

    tuned = await tune_architectures(config.training.architectures, split_key, run_id, train_params,
                                     tuner=config.tuning.tuner, max_trials=config.tuning.max_trials,
                                     workers=config.tuning.tune_workers)
    return tuned["best"], tuned["trials"]


async def train_architectures(config: RunConfig, split: dict, run_id: str, train_params: dict,
                              hyperparameters: dict) -> list[dict]:
    """One outcome per architecture: reused (retrain, nothing changed) or trained now."""
    jobs, outcomes = {}, []
    for architecture in config.training.architectures:
        arch_params = {**train_params, "hyperparameters": hyperparameters.get(architecture)}
        reused = reusable_training(split["hash"], architecture, arch_params) if config.mode == "retrain" else None
        if reused:
            get_run_logger().info("%s: data and parameters unchanged, reusing run %s",
                                  architecture, reused["run_id"])
            outcomes.append(reused)
        else:  # where it trains: not part of the reuse key above
            jobs[architecture] = {**arch_params, "require_gpu": config.training.require_gpu,
                                  "data_parallel": config.training.data_parallel}
    return outcomes + await _train_all(jobs, split["split_key"], run_id, str(current_flow_run.id or run_id))


async def _train_all(jobs: dict[str, dict], split_key: str, run_id: str, parent_id: str) -> list[dict]:
    """One `derm-train` subflow run per architecture (`jobs`: architecture -> parameters), all
    started at once; the `gpu` limit decides how many train at the same time. A failure is
    recorded in its outcome, never raised, so one architecture cannot stop the others.

    With `data_parallel` in the jobs' parameters and more GPUs than architectures, each run sees a block of GPUs (the process worker's `env` job variable
    overrides the trainer's pinned CUDA_VISIBLE_DEVICES) and holds as many `gpu` slots."""
    from dermflow.modeling.devices import device_groups, orchestrator_gpu_count

    parent_runs = int(current_flow_run.run_count or 1)
    groups = device_groups(list(jobs), orchestrator_gpu_count(), any(p.get("data_parallel") for p in jobs.values()))

    async def one(architecture: str, train_params: dict) -> dict:
        parameters = {"architecture": architecture, "split_key": split_key, "run_id": run_id, **train_params}
        extra = {}
        if groups.get(architecture):
            parameters["gpu_slots"] = len(groups[architecture])
            extra["job_variables"] = {"env": {"CUDA_VISIBLE_DEVICES": ",".join(map(str, groups[architecture]))}}
        child = await _train_until_completed(architecture, parameters, run_id, parent_id, parent_runs, **extra)
        state = child.state
        outcome = training_outcome(run_id, architecture, state.name if state else "unknown",
                                   state.message if state else None, bool(state and state.is_completed()))
        # What the registry keys reuse on (see tasks.registry.training_key).
        return {**outcome, "hyperparameters": train_params.get("hyperparameters")}

    return list(await asyncio.gather(*(one(a, p) for a, p in jobs.items())))


async def _train_until_completed(architecture: str, parameters: dict, run_id: str, parent_id: str,
                                 parent_runs: int, **options):
    """The child flow run that trained `architecture`, or its last attempt that did not.

    A child that crashed (its process killed: OOM, a lost node) or failed is started again, up to
    TRAIN_ATTEMPTS times per run of the parent; each attempt resumes from the checkpoints of the
    ones before (same run id and architecture). Attempt k has the idempotency key
    `<parent>-<architecture>-attempt-<k>`, and run n of the parent walks attempts
    1..n*TRAIN_ATTEMPTS: a retried parent (the UI's Retry) reuses a completed child, re-reads the
    ones that ended badly, and starts the new attempts its run adds. (A SIGKILLed flow run is
    Crashed without running its own code again, so the derm-train flow's `retries` could not
    recover it: the parent does.)"""
    child = None
    for attempt in range(1, parent_runs * TRAIN_ATTEMPTS + 1):
        child = await run_deployment(
            TRAIN_DEPLOYMENT,
            parameters=parameters,
            flow_run_name=f"{run_id}-{architecture}" + (f"-attempt-{attempt}" if attempt > 1 else ""),
            idempotency_key=f"{parent_id}-{architecture}-attempt-{attempt}",
            timeout=None,
            as_subflow=True,
            **options,
        )
        state = child.state
        if state is None or state.is_completed() or state.is_cancelled() or state.is_cancelling():
            return child
        get_run_logger().warning("%s: training attempt %d ended %s: %s", architecture, attempt, state.name,
                                 state.message)
    return child


def finish(run_id: str, outcomes: list[dict], report: dict, decision: dict | None) -> dict:
    """The run's result; a PipelineError when no architecture trained."""
    failed = [o for o in outcomes if o["status"] != "ok"]
    if len(failed) == len(outcomes):
        raise PipelineError(f"every architecture failed: {[(o['architecture'], o['error']) for o in failed]}")
    return {"run_id": run_id, "report": report, "decision": decision,
            "failed": [o["architecture"] for o in failed]}
