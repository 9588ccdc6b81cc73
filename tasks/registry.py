"""Prefect tasks for the model registry: reuse of unchanged trainings, and promotion.

`derm/full` and `derm/retrain` promote by the same rule
(`dermflow.evaluation.promotion.evaluate_challenger`): the first model of a label set becomes
its champion; later ones only if they beat the champion's weighted F1 on the same test split.
A champion scored on another split is re-scored on a trainer (`derm-rescore/default`, holding a
`gpu` slot), never in the orchestrator's process.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.deployments import run_deployment
from prefect.runtime import flow_run as current_flow_run

from dermflow.evaluation import promotion
from dermflow.layout import model_key, model_score_key, training_record_key
from dermflow.registry import entries, retention
from dermflow.runs import content_hash
from tasks.common import object_store, retry_unless_permanent, settings

RESCORE_DEPLOYMENT = "derm-rescore/default"


def training_key(split_hash: str, architecture: str, params: dict) -> str:
    """What makes two trainings the same: the split and every parameter but the time budget."""
    stable = {k: v for k, v in params.items() if k != "deadline"}
    return content_hash(split_hash, architecture, stable)[:16]


@task(name="find-reusable-training", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_permanent)
def reusable_training(split_hash: str, architecture: str, params: dict) -> dict | None:
    """A previous run's outcome for the same split and parameters, if its model still exists."""
    store = object_store()
    key = training_record_key(training_key(split_hash, architecture, params))
    if not store.exists(key):
        return None
    record = store.get_json(key)
    if not store.exists(model_key(record["run_id"], architecture)):
        return None
    return {**record, "reused": True}


def register_fresh_models(store, run_id: str, outcomes: list[dict], split_hash: str, manifest_hash: str,
                          train_params: dict) -> None:
    """Register every model this run trained (not reused ones), and record each training's
    outcome under its reuse key so that an unchanged retrain can reuse it."""
    for outcome in outcomes:
        if outcome["status"] != "ok" or outcome.get("reused"):
            continue
        arch = outcome["architecture"]
        params = store.get_json(model_key(run_id, arch, "params.json"))
        entries.register_model(
            store, run_id, arch, metrics={"test": outcome["test"], "verified_test": outcome.get("verified_test")},
            params=params, data_manifest_hash=manifest_hash, split_hash=split_hash,
            label_set=params["class_names"],
        )
        arch_params = {**train_params, "hyperparameters": outcome.get("hyperparameters")}
        store.put_json(training_record_key(training_key(split_hash, arch, arch_params)),
                       {"architecture": arch, "status": "ok", "run_id": run_id, "test": outcome["test"],
                        "verified_test": outcome.get("verified_test"), "model_key": outcome["model_key"]})


def promotion_markdown(mode: str, best: dict, decision: dict) -> str:
    """The promotion decision as a Markdown table for the run's artifact."""
    verdict = "Promoted" if decision["promoted"] else "Kept champion"
    return (
        f"## Promotion decision ({mode})\n\n| | run | architecture | test weighted F1 |\n|---|---|---|---|\n"
        f"| challenger | {best['run_id']} | {best['architecture']} | {decision.get('challenger_score')} |\n"
        f"| champion | {decision.get('champion_run') or '-'} | {decision.get('champion_arch') or '-'} | "
        f"{decision.get('champion_score')} |\n\n**{verdict}**: {decision['reason']}\n"
    )


@task(name="score-on-split", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_permanent)
def score_on_split(run_id: str, architecture: str, split_key: str, split_hash: str) -> dict:
    """Re-score a registered model on the test rows of `split_key`, in this (trainer's) process;
    the record goes to the bucket for the promotion that asked."""
    record = promotion.score_on_split(object_store(), run_id, architecture, split_key, split_hash,
                                      settings().local_cache_dir / "models")
    get_run_logger().info("%s/%s on split %s: %s %.4f", run_id, architecture, split_hash, record["metric"],
                          record["score"])
    return record


def rescore_on_a_trainer(store, split_hash: str, gpu_limit: str = "gpu"):
    """A `promotion.Rescorer` that runs the champion's re-scoring as a `derm-rescore/default`
    flow run (a subflow of this run in the UI, on the `gpu` queue) and reads its record back.
    A record already stored for that split (an earlier promotion, a retried run) is reused."""

    def rescore(champion: dict, split_key: str) -> float:
        key = model_score_key(champion["run_id"], champion["arch"], split_hash)
        if not store.exists(key):
            child = run_deployment(
                RESCORE_DEPLOYMENT,
                parameters={"run_id": champion["run_id"], "architecture": champion["arch"],
                            "split_key": split_key, "split_hash": split_hash, "gpu_limit": gpu_limit},
                flow_run_name=f"rescore-{champion['run_id']}-{champion['arch']}",
                idempotency_key=f"{current_flow_run.id}-rescore-{champion['run_id']}-{champion['arch']}-{split_hash}",
                timeout=None, as_subflow=True, _sync=True,
            )
            state = child.state
            if state is None or not state.is_completed() or not store.exists(key):
                raise entries.RegistryError(
                    f"re-scoring champion {champion['run_id']}/{champion['arch']} on split {split_hash} "
                    f"ended {state.name if state else 'unknown'}: {state.message if state else ''}",
                    transient=True)
        return store.get_json(key)["score"]

    return rescore


@task(name="register-and-promote")
def promote_if_better(run_id: str, outcomes: list[dict], split_key: str, split_hash: str,
                      manifest_hash: str, train_params: dict, mode: str) -> dict | None:
    """Register every new model, then promote this run's best if it beats the champion."""
    store = object_store()
    logger = get_run_logger()
    register_fresh_models(store, run_id, outcomes, split_hash, manifest_hash, train_params)
    candidates = [o for o in outcomes if o["status"] == "ok"]
    if not candidates:
        return None
    best = max(candidates, key=lambda o: o["test"]["weighted_f1"])
    decision = promotion.evaluate_challenger(
        store, challenger_run=best["run_id"], challenger_arch=best["architecture"],
        challenger_score=best["test"]["weighted_f1"], split_key=split_key, split_hash=split_hash,
        rescore=rescore_on_a_trainer(store, split_hash),
    )
    if decision["promoted"]:
        logger.info("promoted %s/%s: %s", best["run_id"], best["architecture"], decision["reason"])
    else:
        logger.info("champion kept: %s", decision["reason"])
    create_markdown_artifact(promotion_markdown(mode, best, decision), key="derm-promotion",
                             description=f"run {run_id}")
    return decision


@task(name="mark-run-active", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_permanent)
def mark_run_active(run_id: str) -> None:
    """Retention leaves this run alone until `mark_run_finished` (or the marker is stale)."""
    retention.mark_run_active(object_store(), run_id)


@task(name="mark-run-finished", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_permanent)
def mark_run_finished(run_id: str) -> None:
    """The run ended, completed or failed: retention may delete it by the usual rules."""
    retention.mark_run_finished(object_store(), run_id)


@task(name="apply-retention", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_permanent)
def apply_retention() -> dict:
    """Delete runs beyond `DERMFLOW_KEEP_RUNS` runs with models, and old checkpoints; champions'
    runs and runs in progress are kept."""
    current = settings()
    result = retention.apply_retention(object_store(), current.keep_runs, current.keep_checkpoints)
    get_run_logger().info(
        "retention: %d run(s) deleted, %d checkpoint(s) deleted, %d protected, %d in progress, %d ignored",
        len(result["deleted_runs"]), len(result["deleted_checkpoints"]), len(result["protected_runs"]),
        len(result["active_runs"]), len(result["ignored_prefixes"]))
    return {k: v for k, v in result.items() if k != "kept_runs"}
