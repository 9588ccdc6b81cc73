"""Retention: deleting old runs and old per-epoch checkpoints, never a run still in use.

A run is kept when a champion pointer or its history names it, while it is in progress (its
`layout.run_active_key` marker, written at its start and deleted at its end, younger than
`ACTIVE_MARKER_MAX_AGE`: an older marker is a crashed run's), and while fewer than `keep_runs`
runs that produced a model are newer. So fetch-only and failed runs never use up the budget,
and they go once `keep_runs` model-producing runs are newer. Prefixes under `runs/` whose name
is not a run id (`dermflow.runs.RUN_ID_PATTERN`) are not dermflow's runs: never counted,
never deleted.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from dermflow.layout import (
    checkpoint_epoch,
    checkpoints_prefix,
    fetch_work_prefix,
    registered_run_prefix,
    run_active_key,
    run_prefix,
)
from dermflow.registry.entries import get_champion_history, list_champions
from dermflow.registry.runs import list_run_models, list_runs
from dermflow.runs import RUN_ID_PATTERN
from dermflow.storage import ObjectMissing, ObjectStore

# A run's marker older than this belongs to a run that crashed without clearing it: longer
# than any run's time budget in practice, short enough that a crashed run's files do not stay.
ACTIVE_MARKER_MAX_AGE = timedelta(days=3)


def mark_run_active(store: ObjectStore, run_id: str, now: datetime | None = None) -> None:
    """Say that `run_id` is in progress: retention leaves it alone until `mark_run_finished`
    (or until the marker is `ACTIVE_MARKER_MAX_AGE` old)."""
    started = now or datetime.now(timezone.utc)
    store.put_json(run_active_key(run_id), {"run_id": run_id, "started_at": started.isoformat()})


def mark_run_finished(store: ObjectStore, run_id: str) -> None:
    """The run ended (completed or failed): retention may delete it by the usual rules."""
    store.delete_keys([run_active_key(run_id)])


def run_is_active(store: ObjectStore, run_id: str, now: datetime, max_age: timedelta) -> bool:
    """Whether the run's marker exists and is younger than `max_age` (an unreadable marker
    counts as active: deleting a run in use loses data, keeping one a while loses nothing)."""
    key = run_active_key(run_id)
    if not store.exists(key):
        return False
    try:
        started = datetime.fromisoformat(store.get_json(key)["started_at"])
    except ObjectMissing:
        return False  # cleared since it was seen: the run ended
    except (KeyError, TypeError, ValueError):
        return True
    if started.tzinfo is None:
        started = started.replace(tzinfo=timezone.utc)
    return now - started < max_age


def protected_runs(store: ObjectStore) -> set[str]:
    """Runs referenced by any champion pointer or champion history: never deleted."""
    protected: set[str] = set()
    for champion in list_champions(store):
        protected.add(champion["run_id"])
        protected.update(entry["run_id"] for entry in get_champion_history(store, champion["label_set_id"]))
    return protected


def delete_run(store: ObjectStore, run_id: str) -> int:
    """Delete a run's objects, its registry entries and what a fetch it crashed in left
    (`layout.fetch_work_prefix`); returns the number of objects deleted."""
    return (store.delete_prefix(run_prefix(run_id)) + store.delete_prefix(registered_run_prefix(run_id))
            + store.delete_prefix(fetch_work_prefix(run_id)))


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


def runs_to_delete(runs: list[str], with_models: set[str], keep: set[str], keep_runs: int) -> list[str]:
    """Of `runs` (oldest first), those with at least `keep_runs` model-producing runs newer
    than them, but for the runs in `keep`."""
    doomed, newer_with_models = [], 0
    for run_id in reversed(runs):
        if newer_with_models >= keep_runs and run_id not in keep:
            doomed.append(run_id)
        newer_with_models += run_id in with_models
    return sorted(doomed)


def apply_retention(store: ObjectStore, keep_runs: int, keep_checkpoints: int, *,
                    active_max_age: timedelta = ACTIVE_MARKER_MAX_AGE, now: datetime | None = None) -> dict:
    """Delete old runs and old per-epoch checkpoints (the module docstring says which).

    In every kept run that is not in progress, the newest `keep_checkpoints` `epoch-<NNN>.keras`
    per architecture are kept (`state.json` too). A deleted run's registry entries go with it.
    """
    if keep_runs < 1 or keep_checkpoints < 1:
        raise ValueError(f"keep_runs and keep_checkpoints must be >= 1 (got {keep_runs}, {keep_checkpoints})")
    now = now or datetime.now(timezone.utc)
    listed = list_runs(store)
    runs = [run_id for run_id in listed if RUN_ID_PATTERN.match(run_id)]
    protected = protected_runs(store)
    active = {run_id for run_id in runs if run_is_active(store, run_id, now, active_max_age)}
    with_models = {run_id for run_id in runs if list_run_models(store, run_id)}
    deleted_runs = runs_to_delete(runs, with_models, protected | active, keep_runs)
    deleted_objects = sum(delete_run(store, run_id) for run_id in deleted_runs)
    kept = [run_id for run_id in runs if run_id not in deleted_runs]
    deleted_checkpoints = [key for run_id in kept if run_id not in active
                           for key in stale_checkpoints(store, run_id, keep_checkpoints)]
    store.delete_keys(deleted_checkpoints)
    return {
        "deleted_runs": deleted_runs,
        "kept_runs": kept,
        "protected_runs": sorted(protected & set(runs)),
        "active_runs": sorted(active),
        "ignored_prefixes": [run_id for run_id in listed if run_id not in runs],
        "deleted_checkpoints": deleted_checkpoints,
        "deleted_objects": deleted_objects + len(deleted_checkpoints),
    }
