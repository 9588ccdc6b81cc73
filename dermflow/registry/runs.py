"""Runs in the bucket as the registry sees them: listing runs and their models, and resolving
a run id, a flow run name or the champion to one model to use."""

from __future__ import annotations

import re
from typing import Any

from dermflow.layout import RUNS_PREFIX, model_key, models_prefix, registered_model_key, run_id_of_key
from dermflow.registry.entries import RegistryError, list_champions, promotion_score
from dermflow.storage import ObjectMissing, ObjectStore

# run ids start with a `YYYYMMDD-HHMMSS-` timestamp, then the Prefect flow run's name
_RUN_ID_TIMESTAMP = re.compile(r"^\d{8}-\d{6}-")


def _child_prefixes(store: ObjectStore, prefix: str) -> list[str]:
    """Names of the 'folders' directly under `prefix` that hold something: SeaweedFS keeps
    listing a "folder" after its last object is deleted."""
    return sorted(name for name in store.folder_names(prefix) if store.has_keys(f"{prefix}{name}/"))


def list_runs(store: ObjectStore) -> list[str]:
    """Run ids in the bucket, oldest first (run ids start with a sortable timestamp)."""
    return _child_prefixes(store, RUNS_PREFIX)


def list_run_models(store: ObjectStore, run_id: str) -> list[str]:
    """Architectures of a run that have a saved model.keras."""
    return [arch for arch in _child_prefixes(store, models_prefix(run_id)) if store.exists(model_key(run_id, arch))]


def flow_run_name(run_id: str) -> str:
    """`20261126-101500-brave-otter` -> `brave-otter`."""
    return _RUN_ID_TIMESTAMP.sub("", run_id)


def resolve_run_id(store: ObjectStore, run: str) -> str:
    """A run id from a run id, a run's key prefix, or a Prefect flow run name (the newest run
    whose id ends with it); RegistryError listing the runs when none matches."""
    runs = list_runs(store)
    run = run.strip()
    run = run_id_of_key(run) or run.strip("/")  # a run's prefix names the run
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
    except ObjectMissing:
        return None


def model_score(store: ObjectStore, run_id: str, arch: str) -> float | None:
    """A model's test weighted F1 from its metrics.json (else its registry entry)."""
    metrics = _read_json_or_none(store, model_key(run_id, arch, "metrics.json"))
    score = promotion_score(metrics)
    if score is None:
        entry = _read_json_or_none(store, registered_model_key(run_id, arch))
        score = (entry or {}).get("score", {}).get("value") if entry else None
    return score


def best_architecture(store: ObjectStore, run_id: str) -> str:
    """The run's architecture with the highest test weighted F1 (models without a score rank
    last)."""
    archs = list_run_models(store, run_id)
    if not archs:
        raise RegistryError(f"run {run_id} has no trained model under {store.uri(models_prefix(run_id))}")
    scored = [(model_score(store, run_id, arch), arch) for arch in archs]
    scored.sort(key=lambda item: (item[0] is not None, item[0] if item[0] is not None else 0.0), reverse=True)
    return scored[0][1]


def newest_champion(store: ObjectStore) -> dict:
    """The champion pointer promoted last (of any label set); RegistryError if there is none."""
    champions = list_champions(store)
    if not champions:
        runs = list_runs(store)
        raise RegistryError(
            "no champion model is registered yet; pass a run id or flow run name "
            f"(runs: {', '.join(runs[-20:]) or 'none'})"
        )
    return champions[0]


def model_params(store: ObjectStore, run_id: str, arch: str) -> dict:
    """A model's params.json (else the params of its registry entry); RegistryError when
    neither says the class names and image size the model needs."""
    params_key = model_key(run_id, arch, "params.json")
    params = _read_json_or_none(store, params_key)
    if params is None:
        entry = _read_json_or_none(store, registered_model_key(run_id, arch)) or {}
        params = dict(entry.get("params") or {})
        if entry.get("class_names") and "class_names" not in params:
            params["class_names"] = entry["class_names"]
    if not params.get("class_names") or not params.get("image_size"):
        raise RegistryError(
            f"{store.uri(params_key)} is missing or lacks class_names/image_size; "
            "cannot use this model"
        )
    return params


def resolve_model(
    store: ObjectStore, run: str | None = None, arch: str | None = None
) -> tuple[str, str, str, dict]:
    """Which model to use: -> (run_id, arch, model_key, params).

    `run`: a run id, a run's key prefix, or a Prefect flow run name (the newest run whose id
    ends with it). None: the champion (of the only label set, else the most recently
    promoted). `arch`: None means the champion's architecture, or the run's best by test
    weighted F1. `params` is the model's params.json (class_names, image_size, ...).
    """
    if run is None:
        champion = newest_champion(store)
        run_id, arch = champion["run_id"], arch or champion["arch"]
    else:
        run_id = resolve_run_id(store, run)
    if arch is None:
        arch = best_architecture(store, run_id)
    key = model_key(run_id, arch)
    if not store.exists(key):
        available = ", ".join(list_run_models(store, run_id)) or "none"
        raise RegistryError(f"run {run_id} has no model for architecture {arch!r}; it has: {available}")
    return run_id, arch, key, model_params(store, run_id, arch)
