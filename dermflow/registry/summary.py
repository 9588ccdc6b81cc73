"""One line per run, as the bucket tells it (`dermflow runs`): its mode, whether it is still in
progress, its best architecture and weighted F1, and whether it holds a champion. Storage only:
a run's Prefect state is added by `dermflow.ops.runlist`."""

from __future__ import annotations

from typing import Any

from dermflow.layout import run_active_key, run_metrics_key, run_params_key
from dermflow.registry.entries import list_champions, list_registered_models, promotion_score
from dermflow.registry.runs import flow_run_name, list_runs
from dermflow.storage import ObjectMissing, ObjectStore


def _json_or_none(store: ObjectStore, key: str) -> Any:
    try:
        return store.get_json(key) if store.exists(key) else None
    except ObjectMissing:
        return None


def _scores(store: ObjectStore, run_id: str) -> tuple[dict[str, float | None], list[str]]:
    """{architecture: test weighted F1} of the run's trained models, and its failed ones: from
    its metrics.json, else (a run that ended before its report) its registry entries."""
    metrics = _json_or_none(store, run_metrics_key(run_id)) or {}
    archs = metrics.get("architectures") or {}
    if archs:
        scores = {name: promotion_score(entry.get("test"))
                  for name, entry in archs.items() if entry.get("status") == "ok"}
        return scores, sorted(name for name, entry in archs.items() if entry.get("status") != "ok")
    entries = list_registered_models(store, run_id)
    return {entry["arch"]: (entry.get("score") or {}).get("value") for entry in entries}, []


def run_summary(store: ObjectStore, run_id: str, champions: dict[str, list[str]]) -> dict:
    """`champions`: {run id: [architectures that are a champion]}."""
    params = _json_or_none(store, run_params_key(run_id)) or {}
    scores, failed = _scores(store, run_id)
    scored = [(score, arch) for arch, score in scores.items() if score is not None]
    best_score, best_arch = max(scored) if scored else (None, next(iter(scores), None))
    return {"run_id": run_id, "flow_run_name": flow_run_name(run_id),
            "mode": (params.get("config") or {}).get("mode"),
            "in_progress": store.exists(run_active_key(run_id)),
            "best_architecture": best_arch, "weighted_f1": best_score,
            "architectures": sorted(scores), "failed_architectures": failed,
            "champion": champions.get(run_id, [])}


def run_summaries(store: ObjectStore, limit: int | None = 20) -> list[dict]:
    """The newest `limit` runs (all with None), newest first."""
    champions: dict[str, list[str]] = {}
    for pointer in list_champions(store):
        champions.setdefault(pointer["run_id"], []).append(pointer["arch"])
    run_ids = list_runs(store)[::-1]
    return [run_summary(store, run_id, champions) for run_id in (run_ids[:limit] if limit else run_ids)]
