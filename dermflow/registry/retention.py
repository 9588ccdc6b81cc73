"""Retention: deleting old runs and old per-epoch checkpoints, never a champion's run."""

from __future__ import annotations

import json

from dermflow.registry.entries import _CHECKPOINT_NAME, CHAMPIONS_PREFIX, REGISTRY_MODELS_PREFIX, RUNS_PREFIX
from dermflow.registry.runs import list_runs
from dermflow.storage import ObjectStore


def protected_runs(store: ObjectStore) -> set[str]:
    """Runs referenced by any champion pointer or champion history: never deleted."""
    protected: set[str] = set()
    for key in store.iter_keys(CHAMPIONS_PREFIX):
        if key.endswith(".history.jsonl"):
            text = store.get_bytes(key).decode("utf-8")
            protected.update(json.loads(line)["run_id"] for line in text.splitlines() if line.strip())
        elif key.endswith(".json"):
            protected.add(store.get_json(key)["run_id"])
    return protected


def apply_retention(store: ObjectStore, keep_runs: int, keep_checkpoints: int) -> dict:
    """Delete old runs and old per-epoch checkpoints; never a champion's run.

    Keeps the newest `keep_runs` runs (plus every run a champion pointer or its history
    names) and, in every kept run, the newest `keep_checkpoints` `epoch-<NNN>.keras` per
    architecture (`state.json` is kept). A deleted run's registry entries go with it.
    """
    if keep_runs < 1 or keep_checkpoints < 1:
        raise ValueError(f"keep_runs and keep_checkpoints must be >= 1 (got {keep_runs}, {keep_checkpoints})")
    runs = list_runs(store)
    protected = protected_runs(store)
    newest = set(runs[-keep_runs:])
    deleted_runs: list[str] = []
    deleted_objects = 0
    for run_id in runs:
        if run_id in newest or run_id in protected:
            continue
        deleted_objects += store.delete_prefix(f"{RUNS_PREFIX}{run_id}/")
        deleted_objects += store.delete_prefix(f"{REGISTRY_MODELS_PREFIX}{run_id}/")
        deleted_runs.append(run_id)
    kept = [run_id for run_id in runs if run_id not in deleted_runs]
    deleted_checkpoints: list[str] = []
    for run_id in kept:
        by_arch: dict[str, list[tuple[int, str]]] = {}
        for key in store.iter_keys(f"{RUNS_PREFIX}{run_id}/checkpoints/"):
            arch_and_name = key[len(f"{RUNS_PREFIX}{run_id}/checkpoints/") :].split("/")
            if len(arch_and_name) != 2:
                continue
            match = _CHECKPOINT_NAME.match(arch_and_name[1])
            if match:
                by_arch.setdefault(arch_and_name[0], []).append((int(match.group(1)), key))
        for checkpoints in by_arch.values():
            checkpoints.sort()
            for _, key in checkpoints[:-keep_checkpoints]:
                store.client.delete_object(Bucket=store.bucket, Key=key)
                deleted_checkpoints.append(key)
    return {
        "deleted_runs": deleted_runs,
        "kept_runs": kept,
        "protected_runs": sorted(protected & set(runs)),
        "deleted_checkpoints": deleted_checkpoints,
        "deleted_objects": deleted_objects + len(deleted_checkpoints),
    }
