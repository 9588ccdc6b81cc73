"""Hyperparameter tuning flows (keras-tuner), called by `derm` before the final training.

- `tune_architectures(...)` (what `derm` awaits): one `derm-tune-search` subflow per
  architecture, one after another within the tuning share of the run's deadline; then a table
  artifact of every trial. Returns `{"trials": [...], "best": {architecture: TrainConfig
  override}}`.
- `derm-tune-search` (`tune_architecture`): `workers=1` runs a plain search as one
  `derm-tune-run/default` flow run (own process on the `gpu` queue, holding a `gpu` slot while
  it trains: no model work in the orchestrator's process). `workers>1` runs keras-tuner's chief/worker mode: the
  chief (the oracle's gRPC server, no training, no slot) is a child process of this flow run;
  each worker is a `derm-tune/worker` flow run (own process on the `gpu` queue, holding a
  `gpu` slot while it trains).
- `derm-tune` (`derm_tune_worker`, deployment `derm-tune/worker`): one worker.
- `derm-tune-run` (`derm_tune_run`, deployment `derm-tune-run/default`): a whole search in its
  process, on a trainer.

The search state is synced to `tuning/<tuning_id>/` after every trial; rerunning with the same
`tuning_id` (by default derived from the architecture, split manifest, tuner and search
space) continues where it stopped.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

from prefect import flow, get_run_logger
from prefect.concurrency.sync import concurrency
from prefect.deployments import run_deployment
from prefect.runtime import flow_run as current_flow_run
from pydantic import Field

from dermflow.config import (
    DEFAULT_TUNING_SHARE,
    MAX_EPOCHS,
    TRAIN_DEFAULTS,
    ArchitectureName,
    BatchSize,
    ImageSize,
    MaxTrials,
    Seed,
    TrainConfig,
    TrainEpochs,
    Tuner,
    TuneWorkers,
    TuningPlan,
    Weights,
    describe_parameters,
)
from dermflow.runs import check_run_id
from tasks.common import settings
from tasks.tune import publish_trial_table, run_tuning_worker, search_in_process, search_results, search_spec

WORKER_DEPLOYMENT = "derm-tune/worker"
SEARCH_DEPLOYMENT = "derm-tune-run/default"
T = TRAIN_DEFAULTS
S = TuningPlan()
# How long the chief may outlive its workers (it polls every 20 s for running trials to end).
CHIEF_GRACE_SECONDS = 90


@flow(name="derm-tune", log_prints=True)
@describe_parameters(
    payload="The chief's search spec (JSON), as `tasks.tune.search_spec` made it.",
    oracle_host="Address of the chief's oracle.",
    oracle_port="Port of the chief's oracle.",
    tuner_id="This worker's keras-tuner id (unique within the search).",
    gpu_limit="Name of the global concurrency limit whose slot the worker holds while it trains.",
)
def derm_tune_worker(
    payload: dict,
    oracle_host: str,
    oracle_port: Annotated[int, Field(ge=1, le=65535)],
    tuner_id: str,
    gpu_limit: str = "gpu",
) -> int:
    """A keras-tuner worker of a distributed search; `payload` is the chief's search spec."""
    with concurrency(gpu_limit, occupy=1, lease_duration=settings().gpu_lease_seconds):
        return run_tuning_worker(payload, oracle_host, oracle_port, tuner_id)


@flow(name="derm-tune-run", log_prints=True)
@describe_parameters(
    split_key="Bucket key of the split manifest to search on.",
    architecture="The architecture to search.",
    options="Keyword arguments of dermflow.modeling.tuning.tune_architecture (as derm-tune-search made them).",
    gpu_limit="Name of the global concurrency limit whose slot the search holds while it trains.",
)
async def derm_tune_run(split_key: str, architecture: ArchitectureName, options: dict, gpu_limit: str = "gpu") -> dict:
    """A whole keras-tuner search in this (trainer's) process; its trials go to the bucket."""
    return await search_in_process(split_key, architecture, options, gpu_limit)


async def _search_on_a_trainer(split_key: str, architecture: str, options: dict, run_id: str,
                               gpu_limit: str) -> dict:
    """A `workers=1` search as a `derm-tune-run` flow run on the `gpu` queue; its trials are read
    back from the bucket (as many as it synced, should it fail)."""
    payload = await search_spec(split_key, architecture, options)
    tuning_id = payload["spec"]["tuning_id"]
    child = await run_deployment(
        SEARCH_DEPLOYMENT,
        parameters={"split_key": split_key, "architecture": architecture, "options": options, "gpu_limit": gpu_limit},
        flow_run_name=f"{run_id}-{architecture}-tune",
        idempotency_key=f"{current_flow_run.id or run_id}-{tuning_id}-search",
        timeout=None, as_subflow=True,
    )
    state = child.state
    if state is None or not state.is_completed():
        get_run_logger().warning("tuning run %s ended %s: %s", child.name, state.name if state else "unknown",
                                 state.message if state else "")
    return await search_results(payload)


def _options(train_params: dict, tuner: str, max_trials: int, trial_epochs: int | None,
             deadline: float | None, tuning_id: str | None) -> dict:
    """The keyword arguments of `dermflow.modeling.tuning.tune_architecture`."""
    training = {name: train_params[name] for name in ("epochs", "image_size", "batch_size", "weights", "seed")}
    return {"tuner": tuner, "max_trials": max_trials, "trial_epochs": trial_epochs, "deadline": deadline,
            "tuning_id": tuning_id, **training}


async def _distributed_search(payload: dict, workers: int, run_id: str, oracle_host: str) -> None:
    """Chief as a child process, `workers` worker flow runs; returns when all have ended."""
    from dermflow.modeling.tuning_distributed import free_port, wait_for_port

    logger = get_run_logger()
    spec = payload["spec"]
    port = free_port(oracle_host)
    spec_dir = Path(tempfile.mkdtemp(prefix="dermflow-tune-"))
    spec_path = spec_dir / "spec.json"
    spec_path.write_text(json.dumps(payload))
    chief = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dermflow.modeling.tuning_distributed", "chief", "--spec", str(spec_path),
        "--host", oracle_host, "--port", str(port),
        cwd=str(Path(__file__).resolve().parents[1]), env=dict(os.environ),
    )
    try:
        await asyncio.to_thread(wait_for_port, oracle_host, port, 180.0)
        logger.info("tuning chief of %s serving on %s:%d; starting %d worker(s)", spec["tuning_id"],
                    oracle_host, port, workers)
        parent = str(current_flow_run.id or run_id)

        async def worker(index: int):
            tuner_id = f"worker{index}"
            return await run_deployment(
                WORKER_DEPLOYMENT,
                parameters={"payload": payload, "oracle_host": oracle_host, "oracle_port": port, "tuner_id": tuner_id},
                flow_run_name=f"{run_id}-{spec['architecture']}-tune-{tuner_id}",
                idempotency_key=f"{parent}-{spec['tuning_id']}-{port}-{tuner_id}",
                timeout=None, as_subflow=True,
            )

        children = await asyncio.gather(*(worker(i) for i in range(workers)))
        for child in children:
            logger.info("tuning worker %s: %s", child.name, child.state.name if child.state else "unknown")
        try:
            await asyncio.wait_for(chief.wait(), CHIEF_GRACE_SECONDS)
        except asyncio.TimeoutError:
            logger.warning("tuning chief still running %d s after its workers ended; stopping it",
                           CHIEF_GRACE_SECONDS)
    finally:
        if chief.returncode is None:
            chief.terminate()
            try:
                await asyncio.wait_for(chief.wait(), 30)
            except asyncio.TimeoutError:
                chief.kill()
        spec_path.unlink(missing_ok=True)
        spec_dir.rmdir()


@flow(name="derm-tune-search", log_prints=True)
@describe_parameters(
    TrainConfig, TuningPlan,
    split_key="Bucket key of the split manifest to search on.",
    run_id="The derm run this search belongs to.",
    epochs="Epochs of the final training the search prepares (trials get a share of them).",
    trial_epochs="Epochs per trial; empty: a sixth of `epochs`, between 2 and 10.",
    deadline="Unix time by which this search stops (after its running trial); empty: none.",
    tuning_id="Id of the search in the bucket; empty: derived from the architecture, split, tuner and space.",
    workers="Workers of a distributed search; 1: in this process.",
    oracle_host=("Address the chief binds and the workers connect to; empty: the setting "
                 "DERMFLOW_TUNING_ORACLE_HOST (default 127.0.0.1)."),
    gpu_limit="Name of the global concurrency limit whose slot each training holds.",
)
async def tune_architecture(
    architecture: ArchitectureName,
    split_key: str,
    run_id: str,
    image_size: ImageSize = T.image_size,
    epochs: TrainEpochs = T.epochs,
    batch_size: BatchSize = T.batch_size,
    weights: Weights = T.weights,
    seed: Seed = T.seed,
    tuner: Tuner = S.tuner,
    max_trials: MaxTrials = S.max_trials,
    trial_epochs: Annotated[int, Field(ge=1, le=MAX_EPOCHS)] | None = None,
    deadline: float | None = None,
    tuning_id: str | None = None,
    workers: TuneWorkers = S.tune_workers,
    oracle_host: str | None = None,
    gpu_limit: str = "gpu",
) -> dict:
    """Search one architecture; `deadline` (unix time) is this search's own deadline.

    Returns `{"tuning_id", "trials", "best"}` (`best`: TrainConfig override or None).
    """
    check_run_id(run_id)  # an API caller's id names the workers' runs
    logger = get_run_logger()
    train_params = {"image_size": image_size, "epochs": epochs, "batch_size": batch_size, "weights": weights,
                    "seed": seed}
    options = _options(train_params, tuner, max_trials, trial_epochs, deadline, tuning_id)
    if workers == 1:
        result = await _search_on_a_trainer(split_key, architecture, options, run_id, gpu_limit)
        logger.info("%s: %d trial(s), best %s", result["tuning_id"], len(result["trials"]), result["best"])
        return result
    payload = await search_spec(split_key, architecture, options)
    host = oracle_host or settings().tuning_oracle_host
    await _distributed_search(payload, workers, run_id, host)
    result = await search_results(payload)
    logger.info("%s: %d trial(s), best %s", result["tuning_id"], len(result["trials"]), result["best"])
    return result


async def tune_architectures(
    architectures: list[str],
    split_key: str,
    run_id: str,
    train_params: dict,
    *,
    tuner: str = S.tuner,
    max_trials: int = S.max_trials,
    workers: int = S.tune_workers,
    trial_epochs: int | None = None,
    tuning_share: float = DEFAULT_TUNING_SHARE,
    tuning_id: str | None = None,
) -> dict:
    """Tune each architecture in turn (a `derm-tune-search` subflow each) and publish the trials.

    `train_params`: image_size, epochs, batch_size, weights, seed, deadline (unix time of the
    whole run, or None). Tuning gets `tuning_share` of the time left before it, split evenly
    between the architectures; the final training gets the rest. An architecture whose search
    failed or finished no trial gets no entry in `best` (it trains with the defaults).
    """
    logger = get_run_logger()
    started = time.time()
    deadline = train_params.get("deadline")
    tuning_end = started + max(0.0, deadline - started) * tuning_share if deadline else None
    trials: list[dict] = []
    best: dict[str, dict] = {}
    for index, architecture in enumerate(architectures):
        arch_deadline = None
        if tuning_end is not None:
            now = time.time()
            arch_deadline = now + max(0.0, tuning_end - now) / (len(architectures) - index)
        arch_tuning_id = f"{tuning_id}-{architecture}" if tuning_id and len(architectures) > 1 else tuning_id
        try:
            result = await tune_architecture(
                architecture=architecture, split_key=split_key, run_id=run_id,
                image_size=train_params["image_size"], epochs=train_params["epochs"],
                batch_size=train_params["batch_size"], weights=train_params["weights"],
                seed=train_params["seed"], tuner=tuner, max_trials=max_trials, trial_epochs=trial_epochs,
                deadline=arch_deadline, tuning_id=arch_tuning_id, workers=workers,
            )
        except Exception as error:  # noqa: BLE001 - one failed search must not stop the run
            logger.warning("tuning %s failed (%s: %s); it trains with the default hyperparameters",
                           architecture, type(error).__name__, error)
            continue
        trials += [{k: t.get(k) for k in ("architecture", "trial_id", "hyperparameters", "score", "status",
                                          "default", "cut_off", "chosen")}
                   for t in result["trials"]]
        if result.get("chosen"):
            logger.info("%s: the final training takes %s", architecture, result["chosen"])
        if result["best"]:
            best[architecture] = result["best"]
    await publish_trial_table(run_id, trials)
    return {"trials": trials, "best": best}
