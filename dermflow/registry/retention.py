"""Retention: deleting old runs and old per-epoch checkpoints, never a champion's run."""

from __future__ import annotations

from dermflow.layout import checkpoint_epoch, checkpoints_prefix, registered_run_prefix, run_prefix
from dermflow.registry.entries import get_champion_history, list_champions
from dermflow.registry.runs import list_runs
from dermflow.storage import ObjectStore

# S3's DeleteObjects takes at most 1000 keys per request
_DELETE_BATCH = 1000


def protected_runs(store: ObjectStore) -> set[str]:
    """Runs referenced by any champion pointer or champion history: never deleted."""
    protected: set[str] = set()
    for champion in list_champions(store):
        protected.add(champion["run_id"])
        protected.update(entry["run_id"] for entry in get_champion_history(store, champion["label_set_id"]))
    return protected


def delete_run(store: ObjectStore, run_id: str) -> int:
    """Delete a run's objects and its registry entries; returns the number of objects deleted."""
    return store.delete_prefix(run_prefix(run_id)) + store.delete_prefix(registered_run_prefix(run_id))


def stale_checkpoints(store: ObjectStore, run_id: str, keep_checkpoints: int) -> list[str]:
    """Keys of a run's `epoch-<NNN>.keras` checkpoints beyond the newest `keep_checkpoints` per
    architecture (`state.json` and anything else is never listed)."""
    prefix = checkpoints_prefix(run_id)
    by_arch: dict[str, list[tuple[int, str]]] = {}
    for key in store.iter_keys(prefix):
        arch_and_name = key[len(prefix):].split("/")
        epoch = checkpoint_epoch(key)
        if len(arch_and_name) == 2 and epoch is not None:
            by_arch.setdefault(arch_and_name[0], []).append((epoch, key))
    stale: list[str] = []
    for checkpoints in by_arch.values():
        checkpoints.sort()
        stale += [key for _, key in checkpoints[:-keep_checkpoints]]
    return stale


def delete_keys(store: ObjectStore, keys: list[str]) -> None:
    """Delete exactly these keys, in batches."""
    for start in range(0, len(keys), _DELETE_BATCH):
        batch = keys[start:start + _DELETE_BATCH]
        store.client.delete_objects(Bucket=store.bucket, Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True})


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
    deleted_runs = [run_id for run_id in runs if run_id not in newest and run_id not in protected]
    deleted_objects = sum(delete_run(store, run_id) for run_id in deleted_runs)
    kept = [run_id for run_id in runs if run_id not in deleted_runs]
    deleted_checkpoints = [key for run_id in kept for key in stale_checkpoints(store, run_id, keep_checkpoints)]
    delete_keys(store, deleted_checkpoints)
    return {
        "deleted_runs": deleted_runs,
        "kept_runs": kept,
        "protected_runs": sorted(protected & set(runs)),
        "deleted_checkpoints": deleted_checkpoints,
        "deleted_objects": deleted_objects + len(deleted_checkpoints),
    }
