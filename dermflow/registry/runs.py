"""Runs in the bucket as the registry sees them: listing runs and their models, and resolving
a run id, a flow run name or the champion to one model to use."""

from __future__ import annotations

import re
from typing import Any

from dermflow.registry.entries import (
    RUNS_PREFIX,
    RegistryError,
    list_champions,
    model_dir_key,
    model_key,
    promotion_score,
    registry_entry_key,
)
from dermflow.storage import ObjectStore, StorageError

# run ids start with a `YYYYMMDD-HHMMSS-` timestamp, then the Prefect flow run's name
_RUN_ID_TIMESTAMP = re.compile(r"^\d{8}-\d{6}-")


def _child_prefixes(store: ObjectStore, prefix: str) -> list[str]:
    """Names of the 'folders' directly under `prefix` (a delimiter listing)."""
    names: list[str] = []
    paginator = store.client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=store.bucket, Prefix=prefix, Delimiter="/"):
        for item in page.get("CommonPrefixes", []) or []:
            names.append(item["Prefix"][len(prefix) :].rstrip("/"))
    # Some S3 servers (SeaweedFS) keep listing a "folder" after its last object is deleted,
    # so a name counts only while something is stored under it.
    return sorted(name for name in names if name and _has_objects(store, f"{prefix}{name}/"))


def _has_objects(store: ObjectStore, prefix: str) -> bool:
    response = store.client.list_objects_v2(Bucket=store.bucket, Prefix=prefix, MaxKeys=1)
    return bool(response.get("Contents"))


def list_runs(store: ObjectStore) -> list[str]:
    """Run ids under `runs/`, oldest first (run ids start with a sortable timestamp)."""
    return _child_prefixes(store, RUNS_PREFIX)


def list_run_models(store: ObjectStore, run_id: str) -> list[str]:
    """Architectures of a run that have a saved model.keras."""
    prefix = f"{RUNS_PREFIX}{run_id}/models/"
    return [arch for arch in _child_prefixes(store, prefix) if store.exists(model_key(run_id, arch))]


def flow_run_name(run_id: str) -> str:
    """`20261126-101500-brave-otter` -> `brave-otter`."""
    return _RUN_ID_TIMESTAMP.sub("", run_id)


def _resolve_run_id(store: ObjectStore, run: str, runs: list[str]) -> str:
    run = run.strip().strip("/")
    if run.startswith(RUNS_PREFIX):
        run = run[len(RUNS_PREFIX) :]
    if run in runs:
        return run
    matches = [run_id for run_id in runs if flow_run_name(run_id) == run or run_id.endswith("-" + run)]
    if matches:
        return matches[-1]  # the newest
    shown = ", ".join(runs[-20:]) or "none"
    raise RegistryError(
        f"no run {run!r} (neither a run id nor a flow run name) in {store.uri(RUNS_PREFIX)}; "
        f"runs: {shown}"
    )


def _read_json_or_none(store: ObjectStore, key: str) -> Any:
    try:
        return store.get_json(key)
    except StorageError:
        return None


def model_score(store: ObjectStore, run_id: str, arch: str) -> float | None:
    """A model's test weighted F1 from its metrics.json (else its registry entry)."""
    metrics = _read_json_or_none(store, f"{model_dir_key(run_id, arch)}metrics.json")
    score = promotion_score(metrics)
    if score is None:
        entry = _read_json_or_none(store, registry_entry_key(run_id, arch))
        score = (entry or {}).get("score", {}).get("value") if entry else None
    return score


def best_architecture(store: ObjectStore, run_id: str) -> str:
    """The run's architecture with the highest test weighted F1 (models without a score rank
    last)."""
    archs = list_run_models(store, run_id)
    if not archs:
        raise RegistryError(f"run {run_id} has no trained model under {store.uri(RUNS_PREFIX + run_id + '/models/')}")
    scored = [(model_score(store, run_id, arch), arch) for arch in archs]
    scored.sort(key=lambda item: (item[0] is not None, item[0] if item[0] is not None else 0.0), reverse=True)
    return scored[0][1]


def resolve_model(
    store: ObjectStore, run: str | None = None, arch: str | None = None
) -> tuple[str, str, str, dict]:
    """Which model to use: -> (run_id, arch, model_key, params).

    `run`: a run id, `runs/<run_id>`, or a Prefect flow run name (the newest run whose id
    ends with it). None: the champion (of the only label set, else the most recently
    promoted). `arch`: None means the champion's architecture, or the run's best by test
    weighted F1. `params` is the model's params.json (class_names, image_size, ...).
    """
    if run is None:
        champions = list_champions(store)
        if not champions:
            runs = list_runs(store)
            raise RegistryError(
                "no champion model is registered yet; pass a run id or flow run name "
                f"(runs: {', '.join(runs[-20:]) or 'none'})"
            )
        champion = champions[0]
        run_id = champion["run_id"]
        if arch is None:
            arch = champion["arch"]
    else:
        run_id = _resolve_run_id(store, run, list_runs(store))
    if arch is None:
        arch = best_architecture(store, run_id)
    key = model_key(run_id, arch)
    if not store.exists(key):
        available = ", ".join(list_run_models(store, run_id)) or "none"
        raise RegistryError(f"run {run_id} has no model for architecture {arch!r}; it has: {available}")
    params_key = f"{model_dir_key(run_id, arch)}params.json"
    params = _read_json_or_none(store, params_key)
    if params is None:
        entry = _read_json_or_none(store, registry_entry_key(run_id, arch)) or {}
        params = dict(entry.get("params") or {})
        if entry.get("class_names") and "class_names" not in params:
            params["class_names"] = entry["class_names"]
    if not params.get("class_names") or not params.get("image_size"):
        raise RegistryError(
            f"{store.uri(params_key)} is missing or lacks class_names/image_size; "
            "cannot use this model"
        )
    return run_id, arch, key, params
