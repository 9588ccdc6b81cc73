"""The registry's entries in the bucket: registered models, champion pointers and their
history, and the identities they carry (label sets, code and library versions, scores).

One entry per trained model (`layout.registered_model_key`); per label set, one record per
promotion (`layout.promotion_record_key`), created once each: the last is the champion, all of
them the history (a copy of the champion at `layout.champion_key`). A label set is the set of
class names a model predicts; models are only comparable within one, so there is one champion
per label set. Deciding a
promotion is not done here (`dermflow.evaluation.promotion`): this module is storage only.
Light module: no TensorFlow import.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from dermflow.errors import DermflowError
from dermflow.layout import (
    CHAMPION_SUFFIX,
    CHAMPIONS_PREFIX,
    PROMOTIONS_PREFIX,
    REGISTERED_MODELS_PREFIX,
    champion_history_key,
    champion_key,
    is_champion_key,
    model_key,
    promotion_record_key,
    promotions_prefix,
    registered_model_key,
    registered_run_prefix,
)
from dermflow.settings import PROJECT_ROOT
from dermflow.storage import ObjectStore

PROMOTION_METRIC = "weighted_f1"


class RegistryError(DermflowError, LookupError):
    """A run, architecture, model or champion asked for does not exist (the message lists
    what does)."""


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


def now_iso() -> str:
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
    """Write the entry at `layout.registered_model_key(run_id, arch)` and return it.

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
        "registry_key": registered_model_key(run_id, arch),
        "score": {"metric": f"test.{PROMOTION_METRIC}", "value": promotion_score(metrics)},
        "metrics": dict(metrics),
        "params": dict(params),
        "data_manifest_hash": data_manifest_hash,
        "split_hash": split_hash,
        "code_version": code_version(),
        "versions": library_versions(),
        "created_at": now_iso(),
    }
    store.put_json(entry["registry_key"], entry)
    return entry


def get_registered_model(store: ObjectStore, run_id: str, arch: str) -> dict | None:
    key = registered_model_key(run_id, arch)
    return store.get_json(key) if store.exists(key) else None


def require_registered_model(store: ObjectStore, run_id: str, arch: str) -> dict:
    """The registry entry of `run_id/arch`; RegistryError (listing what is registered) if none."""
    entry = get_registered_model(store, run_id, arch)
    if entry is None:
        registered = [f"{e['run_id']}/{e['arch']}" for e in list_registered_models(store)][-20:]
        raise RegistryError(
            f"{run_id}/{arch} is not registered (register_model first); "
            f"registered: {', '.join(registered) or 'none'}"
        )
    return entry


def list_registered_models(store: ObjectStore, run_id: str | None = None) -> list[dict]:
    """Registry entries, oldest run first (optionally of one run)."""
    prefix = registered_run_prefix(run_id) if run_id else REGISTERED_MODELS_PREFIX
    return [store.get_json(key) for key in sorted(store.iter_keys(prefix)) if key.endswith(".json")]


# --- champions -------------------------------------------------------------------------------
# A promotion is a record created once at `layout.promotion_record_key(label_set, n)` with S3's
# create-only write (`ObjectStore.create_json`): of two promotions that read the same champion
# (record n-1), exactly one creates record n; the other gets ChampionChanged and decides again
# against the new champion. The last record is the champion; the records are the history, so
# nothing is read-modified-written. (`If-Match` on the pointer would also serialize on AWS S3,
# but the embedded SeaweedFS lets two such writes through; its create-only check holds.)
# The pointer at `layout.champion_key` is a copy for readers, written after the record; buckets
# written before the records existed keep their pointer and `.history.jsonl` as the start.
class ChampionChanged(DermflowError):
    """Another promotion of the label set was recorded since its champion was read: decide
    again against the new champion."""

    transient = True


def _promotion_keys(store: ObjectStore, label_set: str) -> list[str]:
    prefix = promotions_prefix(label_set)
    return sorted(key for key in store.iter_keys(prefix) if key.endswith(".json"))


def _legacy_champion(store: ObjectStore, label_set: str) -> dict | None:
    key = champion_key(label_set)
    return store.get_json(key) if store.exists(key) else None


def get_champion(store: ObjectStore, label_set: str) -> dict | None:
    """The champion pointer of a label set id (its last promotion record, with its
    `sequence`), or None when it has none yet."""
    keys = _promotion_keys(store, label_set)
    if keys:
        return store.get_json(keys[-1])
    legacy = _legacy_champion(store, label_set)
    return {**legacy, "sequence": 0} if legacy else None


def _label_sets(store: ObjectStore) -> set[str]:
    """Label sets with a champion: from the promotion records and the (legacy) pointers."""
    names = {key[len(PROMOTIONS_PREFIX):].split("/", 1)[0] for key in store.iter_keys(PROMOTIONS_PREFIX)}
    names |= {key[len(CHAMPIONS_PREFIX):-len(CHAMPION_SUFFIX)]
              for key in store.iter_keys(CHAMPIONS_PREFIX) if is_champion_key(key)}
    return {name for name in names if name}


def list_champions(store: ObjectStore) -> list[dict]:
    """All champion pointers, the most recently promoted first."""
    pointers = [get_champion(store, label_set) for label_set in _label_sets(store)]
    return sorted((p for p in pointers if p), key=lambda p: p.get("promoted_at", ""), reverse=True)


def get_champion_history(store: ObjectStore, label_set: str) -> list[dict]:
    """Every promotion of a label set, oldest first."""
    key = champion_history_key(label_set)
    legacy = store.get_bytes(key).decode("utf-8") if store.exists(key) else ""
    history = [json.loads(line) for line in legacy.splitlines() if line.strip()]
    return history + [store.get_json(key) for key in _promotion_keys(store, label_set)]


def record_champion(store: ObjectStore, pointer: Mapping[str, Any], replaces: Mapping[str, Any] | None) -> dict:
    """Record `pointer` as the champion of its label set, replacing `replaces` (the champion
    the decision was made against, as `get_champion` returned it; None for the first).

    Raises ChampionChanged when another promotion was recorded since `replaces` was read."""
    label_set = pointer["label_set_id"]
    sequence = (replaces or {}).get("sequence", 0) + 1
    record = {**pointer, "sequence": sequence}
    if not store.create_json(promotion_record_key(label_set, sequence), record):
        raise ChampionChanged(
            f"label set {label_set}: another model was promoted while this promotion was decided "
            f"(record {sequence} exists)"
        )
    store.put_json(champion_key(label_set), record)
    return record
