"""Promotion: whether a registered model replaces its label set's champion, and recording it."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from dermflow.registry.entries import (
    PROMOTION_METRIC,
    RegistryError,
    _now,
    champion_history_key,
    champion_key,
    get_champion,
    get_registered_model,
    list_registered_models,
    registry_entry_key,
)
from dermflow.storage import ObjectStore


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
