"""The model registry in the bucket: registered models, champion pointers, model resolution
and retention.

Layout (see docs/DESIGN.md):
```
registry/models/<run_id>/<arch>.json              one entry per trained model
registry/champions/<label_set_id>.json            the champion of a label set
registry/champions/<label_set_id>.history.jsonl   every promotion, oldest first
```
A label set is the set of class names a model predicts; models are only comparable within
one, so there is one champion per label set. Light module: no TensorFlow import.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from dermflow.settings import PROJECT_ROOT
from dermflow.storage import ObjectStore, StorageError

REGISTRY_MODELS_PREFIX = "registry/models/"
CHAMPIONS_PREFIX = "registry/champions/"
RUNS_PREFIX = "runs/"
PROMOTION_METRIC = "weighted_f1"

# `epoch-<NNN>.keras` under runs/<run_id>/checkpoints/<arch>/
_CHECKPOINT_NAME = re.compile(r"^epoch-(\d+)\.keras$")
# run ids start with a `YYYYMMDD-HHMMSS-` timestamp, then the Prefect flow run's name
_RUN_ID_TIMESTAMP = re.compile(r"^\d{8}-\d{6}-")


class RegistryError(LookupError):
    """A run, architecture, model or champion asked for does not exist (the message lists
    what does)."""


# --- keys ---------------------------------------------------------------------------------
def model_dir_key(run_id: str, arch: str) -> str:
    return f"{RUNS_PREFIX}{run_id}/models/{arch}/"


def model_key(run_id: str, arch: str) -> str:
    return f"{model_dir_key(run_id, arch)}model.keras"


def registry_entry_key(run_id: str, arch: str) -> str:
    return f"{REGISTRY_MODELS_PREFIX}{run_id}/{arch}.json"


def champion_key(label_set: str) -> str:
    return f"{CHAMPIONS_PREFIX}{label_set}.json"


def champion_history_key(label_set: str) -> str:
    return f"{CHAMPIONS_PREFIX}{label_set}.history.jsonl"


# --- identities and versions -----------------------------------------------------------------
def label_set_id(class_names: Iterable[str]) -> str:
    """A stable id of a set of class names: order and duplicates do not matter."""
    names = sorted({str(name) for name in class_names})
    if not names:
        raise ValueError("label_set_id: class_names is empty")
    digest = hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()
    return f"ls-{len(names)}-{digest[:12]}"


def code_version() -> str:
    """`DERMFLOW_CODE_VERSION` if set (container builds), else the git commit of the project
    (with `-dirty` when tracked files changed), else the installed package version."""
    if os.environ.get("DERMFLOW_CODE_VERSION"):
        return os.environ["DERMFLOW_CODE_VERSION"]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5
        )
        if commit.returncode == 0 and commit.stdout.strip():
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5,
            )
            suffix = "-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else ""
            return f"git:{commit.stdout.strip()}{suffix}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"dermflow=={metadata.version('dermflow')}"
    except metadata.PackageNotFoundError:
        return "unknown"


def library_versions() -> dict[str, str | None]:
    """Installed keras / tensorflow versions, read from package metadata (no TF import)."""

    def first_installed(*names: str) -> str | None:
        for name in names:
            try:
                return metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
        return None

    return {
        "keras": first_installed("keras"),
        "tensorflow": first_installed("tensorflow", "tensorflow-cpu"),
    }


def _now() -> str:
    # microseconds: promotions within one second must still order correctly
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def promotion_score(metrics: Mapping[str, Any] | None) -> float | None:
    """The promotion score, test weighted F1, from a model's metrics.json
    (`{"test": {...}, "verified_test": ...}`) or from a bare classification_metrics dict."""
    if not metrics:
        return None
    block = metrics.get("test", metrics) if isinstance(metrics.get("test"), Mapping) else metrics
    value = block.get(PROMOTION_METRIC) if isinstance(block, Mapping) else None
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


# --- registration ----------------------------------------------------------------------------
def register_model(
    store: ObjectStore,
    run_id: str,
    arch: str,
    *,
    metrics: Mapping[str, Any],
    params: Mapping[str, Any],
    data_manifest_hash: str | None,
    split_hash: str | None,
    label_set: Sequence[str],
) -> dict:
    """Write `registry/models/<run_id>/<arch>.json` and return the entry.

    `metrics` is the model's metrics.json (`{"test": ..., "verified_test": ...}`), `params`
    the resolved parameters, `label_set` the model's class names in output order.
    """
    if not run_id or "/" in run_id:
        raise ValueError(f"register_model: bad run_id {run_id!r}")
    if not arch or "/" in arch:
        raise ValueError(f"register_model: bad arch {arch!r}")
    entry = {
        "run_id": run_id,
        "arch": arch,
        "label_set_id": label_set_id(label_set),
        "class_names": list(label_set),
        "model_key": model_key(run_id, arch),
        "model_uri": store.uri(model_key(run_id, arch)),
        "registry_key": registry_entry_key(run_id, arch),
        "score": {"metric": f"test.{PROMOTION_METRIC}", "value": promotion_score(metrics)},
        "metrics": dict(metrics),
        "params": dict(params),
        "data_manifest_hash": data_manifest_hash,
        "split_hash": split_hash,
        "code_version": code_version(),
        "versions": library_versions(),
        "created_at": _now(),
    }
    store.put_json(entry["registry_key"], entry)
    return entry


def get_registered_model(store: ObjectStore, run_id: str, arch: str) -> dict | None:
    key = registry_entry_key(run_id, arch)
    return store.get_json(key) if store.exists(key) else None


def list_registered_models(store: ObjectStore, run_id: str | None = None) -> list[dict]:
    """Registry entries, oldest run first (optionally of one run)."""
    prefix = f"{REGISTRY_MODELS_PREFIX}{run_id}/" if run_id else REGISTRY_MODELS_PREFIX
    return [store.get_json(key) for key in sorted(store.iter_keys(prefix)) if key.endswith(".json")]


# --- champions -------------------------------------------------------------------------------
def get_champion(store: ObjectStore, label_set: str) -> dict | None:
    """The champion pointer of a label set id, or None when it has none yet."""
    key = champion_key(label_set)
    return store.get_json(key) if store.exists(key) else None


def list_champions(store: ObjectStore) -> list[dict]:
    """All champion pointers, the most recently promoted first."""
    pointers = [
        store.get_json(key)
        for key in store.iter_keys(CHAMPIONS_PREFIX)
        if key.endswith(".json") and not key.endswith(".history.json")
    ]
    return sorted(pointers, key=lambda p: p.get("promoted_at", ""), reverse=True)


def get_champion_history(store: ObjectStore, label_set: str) -> list[dict]:
    key = champion_history_key(label_set)
    if not store.exists(key):
        return []
    text = store.get_bytes(key).decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def decide_promotion(
    champion_score: float | None, challenger_score: float, min_improvement: float = 0.0
) -> tuple[bool, str]:
    """Whether a challenger replaces the champion, and why.

    Scores are test weighted F1 on the same test split. No champion: the challenger wins.
    Otherwise it must beat the champion by more than `min_improvement`.
    """
    if min_improvement < 0:
        raise ValueError(f"min_improvement must be >= 0, got {min_improvement}")
    if challenger_score is None or not math.isfinite(float(challenger_score)):
        return False, f"challenger has no finite {PROMOTION_METRIC} ({challenger_score!r})"
    challenger_score = float(challenger_score)
    if champion_score is None or not math.isfinite(float(champion_score)):
        return True, f"first model for this label set ({PROMOTION_METRIC} {challenger_score:.4f})"
    champion_score = float(champion_score)
    margin = challenger_score - champion_score
    # a tolerance so that float noise (0.52 - 0.50 = 0.020000000000000018) decides nothing
    if margin > min_improvement + 1e-9:
        return True, (
            f"{PROMOTION_METRIC} {challenger_score:.4f} beats the champion's {champion_score:.4f} "
            f"by {margin:+.4f} (required > {min_improvement:.4f})"
        )
    return False, (
        f"{PROMOTION_METRIC} {challenger_score:.4f} does not beat the champion's "
        f"{champion_score:.4f} (margin {margin:+.4f}, required > {min_improvement:.4f})"
    )


def champion_score_on_split(champion: Mapping[str, Any] | None, split_hash: str | None) -> float | None:
    """The champion's registered test score when it was scored on `split_hash`; None when
    there is no champion or it was scored on another split (the caller must then re-score the
    champion on the challenger's test split before deciding, e.g. with
    `dermflow.evaluation.predict.evaluate_split`)."""
    if not champion:
        return None
    if champion.get("split_hash") != split_hash:
        return None
    return champion.get("score")


def promote(
    store: ObjectStore, entry: Mapping[str, Any], reason: str, scores: Mapping[str, Any]
) -> dict:
    """Make a registered model the champion of its label set; record the promotion.

    `scores` documents the decision, e.g. `{"challenger": 0.61, "champion": 0.55,
    "split_hash": "..."}`. Returns the new pointer.
    """
    label_set = entry["label_set_id"]
    previous = get_champion(store, label_set)
    pointer = {
        "label_set_id": label_set,
        "run_id": entry["run_id"],
        "arch": entry["arch"],
        "model_key": entry["model_key"],
        "registry_key": entry.get("registry_key", registry_entry_key(entry["run_id"], entry["arch"])),
        "split_hash": scores.get("split_hash", entry.get("split_hash")),
        "score": scores.get("challenger", (entry.get("score") or {}).get("value")),
        "class_names": entry.get("class_names"),
        "promoted_at": _now(),
        "reason": reason,
        "scores": dict(scores),
        "previous": (
            {"run_id": previous["run_id"], "arch": previous["arch"], "score": previous.get("score")}
            if previous
            else None
        ),
    }
    # S3 has no append: read, add a line, write back. Promotions are rare and serialized by
    # the flow, so the read-modify-write race does not arise in practice.
    history_key = champion_history_key(label_set)
    history = store.get_bytes(history_key).decode("utf-8") if store.exists(history_key) else ""
    if history and not history.endswith("\n"):
        history += "\n"
    history += json.dumps(pointer, default=str) + "\n"
    store.put_bytes(history_key, history.encode("utf-8"), "application/x-ndjson")
    store.put_json(champion_key(label_set), pointer)
    return pointer


def challenge_champion(
    store: ObjectStore,
    entry: Mapping[str, Any],
    *,
    champion_score: float | None = None,
    min_improvement: float = 0.0,
) -> dict:
    """Compare a registered model with its label set's champion and promote it if it wins.

    `champion_score` is the champion's test weighted F1 on the challenger's test split; when
    omitted it is taken from the pointer if the champion was scored on the same split. If the
    champion exists but was scored on another split and no score is given, this raises:
    comparing scores across different test sets would be meaningless.
    Returns `{"promoted", "reason", "scores", "champion"}` (`champion` = pointer after).
    """
    champion = get_champion(store, entry["label_set_id"])
    if champion is not None and champion_score is None:
        champion_score = champion_score_on_split(champion, entry.get("split_hash"))
        if champion_score is None:
            raise RegistryError(
                f"champion {champion['run_id']}/{champion['arch']} of {entry['label_set_id']} was "
                f"scored on split {champion.get('split_hash')!r}, the challenger on "
                f"{entry.get('split_hash')!r}: re-score the champion on the challenger's test "
                "split and pass champion_score"
            )
    challenger_score = (entry.get("score") or {}).get("value")
    promoted, reason = decide_promotion(champion_score, challenger_score, min_improvement)
    scores = {
        "metric": f"test.{PROMOTION_METRIC}",
        "challenger": challenger_score,
        "champion": champion_score,
        "champion_model": f"{champion['run_id']}/{champion['arch']}" if champion else None,
        "split_hash": entry.get("split_hash"),
        "min_improvement": min_improvement,
    }
    if promoted:
        champion = promote(store, entry, reason, scores)
    return {"promoted": promoted, "reason": reason, "scores": scores, "champion": champion}


def evaluate_challenger(
    store: ObjectStore,
    *,
    challenger_run: str,
    challenger_arch: str,
    challenger_score: float | None = None,
    split_key: str | None = None,
    split_hash: str | None = None,
    min_improvement: float = 0.0,
    cache_dir: str | os.PathLike | None = None,
) -> dict:
    """The promotion step of a flow: compare a registered model with its label set's champion
    on the same test split, promote it if it wins, and say why.

    The champion's registered score is used when it was scored on `split_hash`; otherwise the
    champion model is downloaded and re-scored on the test rows of `split_key` (the
    challenger's split manifest). Returns `{"promoted", "reason", "challenger_run",
    "challenger_arch", "challenger_score", "champion_run", "champion_arch", "champion_score",
    "champion_rescored", "champion"}` where the champion fields describe the champion the
    challenger was compared with and `champion` is the pointer after the decision.
    """
    entry = get_registered_model(store, challenger_run, challenger_arch)
    if entry is None:
        registered = [f"{e['run_id']}/{e['arch']}" for e in list_registered_models(store)][-20:]
        raise RegistryError(
            f"{challenger_run}/{challenger_arch} is not registered (register_model first); "
            f"registered: {', '.join(registered) or 'none'}"
        )
    if challenger_score is None:
        challenger_score = (entry.get("score") or {}).get("value")
    split_hash = split_hash if split_hash is not None else entry.get("split_hash")
    champion = get_champion(store, entry["label_set_id"])
    result = {
        "challenger_run": challenger_run,
        "challenger_arch": challenger_arch,
        "challenger_score": challenger_score,
        "champion_run": champion["run_id"] if champion else None,
        "champion_arch": champion["arch"] if champion else None,
        "champion_score": None,
        "champion_rescored": False,
    }
    if champion and (champion["run_id"], champion["arch"]) == (challenger_run, challenger_arch):
        return {**result, "champion_score": champion.get("score"), "promoted": False,
                "reason": "this model is already the champion", "champion": champion}
    champion_score = champion_score_on_split(champion, split_hash)
    if champion is not None and champion_score is None:
        if not split_key:
            raise RegistryError(
                f"champion {champion['run_id']}/{champion['arch']} was scored on split "
                f"{champion.get('split_hash')!r}, not {split_hash!r}: pass split_key to re-score it"
            )
        from dermflow.evaluation.predict import evaluate_split, load_model_bundle

        bundle = load_model_bundle(store, champion["run_id"], champion["arch"], cache_dir)
        champion_score = evaluate_split(bundle, store, split_key, "test")[PROMOTION_METRIC]
        result["champion_rescored"] = True
    result["champion_score"] = champion_score
    promoted, reason = decide_promotion(champion_score, challenger_score, min_improvement)
    if result["champion_rescored"]:
        reason += f" (champion re-scored on split {split_hash})"
    if promoted:
        scores = {
            "metric": f"test.{PROMOTION_METRIC}",
            "challenger": challenger_score,
            "champion": champion_score,
            "champion_model": f"{champion['run_id']}/{champion['arch']}" if champion else None,
            "champion_rescored": result["champion_rescored"],
            "split_hash": split_hash,
            "min_improvement": min_improvement,
        }
        champion = promote(store, entry, reason, scores)
    return {**result, "promoted": promoted, "reason": reason, "champion": champion}


# --- runs and resolution ---------------------------------------------------------------------
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


# --- retention -------------------------------------------------------------------------------
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
