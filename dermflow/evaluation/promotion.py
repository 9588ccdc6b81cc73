"""Promotion: whether a registered model replaces its label set's champion, and why.

The one promotion path is `evaluate_challenger` (used by `derm/full` and `derm/retrain` through
`tasks.registry.promote_if_better`). Scores are test weighted F1 and are only compared on the
same test split: when the champion was scored on another split, its model is re-scored on the
challenger's test split first (`rescore_champion`, which needs inference, so promotion lives
here in evaluation and the registry stays plain storage). Where that inference runs is the
caller's choice (`evaluate_challenger(rescore=...)`): the flows pass one that runs
`score_on_split` on a trainer (`derm-rescore`), so no model is loaded in the orchestrator.

Concurrent promotions of one label set are serialized by the registry's create-only promotion
records (`entries.record_champion`): a promotion decided against a champion that has since been
replaced is decided again against the new one, so the better model ends as champion and every
promotion that reports "promoted" is in the history.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

from dermflow.evaluation.predict import evaluate_split, load_model_bundle
from dermflow.layout import model_key, model_score_key, registered_model_key
from dermflow.registry.entries import (
    PROMOTION_METRIC,
    ChampionChanged,
    RegistryError,
    get_champion,
    now_iso,
    record_champion,
    require_registered_model,
)
from dermflow.storage import ObjectStore

# float noise (0.52 - 0.50 = 0.020000000000000018) must decide nothing
_SCORE_TOLERANCE = 1e-9
# how often a promotion decides again after losing a race to a concurrent one
_PROMOTION_ATTEMPTS = 8

# (champion pointer, split manifest key) -> the champion's test score on that split
Rescorer = Callable[[Mapping[str, Any], str], float]


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
    if margin > min_improvement + _SCORE_TOLERANCE:
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
    there is no champion or it was scored on another split (it must then be re-scored on the
    challenger's test split before deciding: `rescore_champion`)."""
    if not champion:
        return None
    if champion.get("split_hash") != split_hash:
        return None
    return champion.get("score")


def rescore_champion(
    store: ObjectStore, champion: Mapping[str, Any], split_key: str,
    cache_dir: str | os.PathLike | None = None,
) -> float:
    """The champion model's test weighted F1 on the test rows of the split manifest `split_key`
    (downloads and runs the model here), with test-time augmentation as the model's own test
    score had it, so that it is compared with the challenger's like for like."""
    bundle = load_model_bundle(store, champion["run_id"], champion["arch"], cache_dir)
    tta = bool(bundle.params.get("tta", False))
    return evaluate_split(bundle, store, split_key, "test", tta=tta)[PROMOTION_METRIC]


def score_on_split(
    store: ObjectStore, run_id: str, architecture: str, split_key: str, split_hash: str,
    cache_dir: str | os.PathLike | None = None,
) -> dict:
    """Re-score a registered model on the test rows of `split_key` and store the figure at
    `layout.model_score_key` (what a trainer's `derm-rescore` run does for a promotion); an
    existing record for that split is returned as is. Returns the record."""
    key = model_score_key(run_id, architecture, split_hash)
    if store.exists(key):
        return store.get_json(key)
    if not store.exists(model_key(run_id, architecture)):
        raise RegistryError(f"no model {run_id}/{architecture} to re-score: {model_key(run_id, architecture)} is missing")
    score = rescore_champion(store, {"run_id": run_id, "arch": architecture}, split_key, cache_dir)
    record = {"run_id": run_id, "architecture": architecture, "split_key": split_key, "split_hash": split_hash,
              "metric": f"test.{PROMOTION_METRIC}", "score": score, "scored_at": now_iso()}
    store.put_json(key, record)
    return record


def promote(
    store: ObjectStore, entry: Mapping[str, Any], reason: str, scores: Mapping[str, Any],
    previous: Mapping[str, Any] | None,
) -> dict:
    """Make a registered model the champion of its label set in place of `previous` (the
    champion the decision was made against, as `get_champion` returned it); record the
    promotion.

    `scores` documents the decision, e.g. `{"challenger": 0.61, "champion": 0.55,
    "split_hash": "..."}`. Returns the new pointer. Raises ChampionChanged when another
    promotion was recorded since `previous` was read (decide again).
    """
    pointer = {
        "label_set_id": entry["label_set_id"],
        "run_id": entry["run_id"],
        "arch": entry["arch"],
        "model_key": entry["model_key"],
        "registry_key": entry.get("registry_key", registered_model_key(entry["run_id"], entry["arch"])),
        "split_hash": scores.get("split_hash", entry.get("split_hash")),
        "score": scores.get("challenger", (entry.get("score") or {}).get("value")),
        "class_names": entry.get("class_names"),
        "promoted_at": now_iso(),
        "reason": reason,
        "scores": dict(scores),
        "previous": (
            {"run_id": previous["run_id"], "arch": previous["arch"], "score": previous.get("score")}
            if previous
            else None
        ),
    }
    return record_champion(store, pointer, replaces=previous)


def _champion_score_for(
    champion: Mapping[str, Any] | None, split_hash: str | None, split_key: str | None, rescore: Rescorer,
) -> tuple[float | None, bool]:
    """The champion's score on the challenger's split -> (score, whether it was re-scored)."""
    score = champion_score_on_split(champion, split_hash)
    if champion is None or score is not None:
        return score, False
    if not split_key:
        raise RegistryError(
            f"champion {champion['run_id']}/{champion['arch']} was scored on split "
            f"{champion.get('split_hash')!r}, not {split_hash!r}: pass split_key to re-score it"
        )
    return rescore(champion, split_key), True


def _decision_scores(
    challenger_score: float | None, champion_score: float | None, champion: Mapping[str, Any] | None,
    rescored: bool, split_hash: str | None, min_improvement: float,
) -> dict:
    """What a promotion records about the comparison that decided it."""
    return {
        "metric": f"test.{PROMOTION_METRIC}",
        "challenger": challenger_score,
        "champion": champion_score,
        "champion_model": f"{champion['run_id']}/{champion['arch']}" if champion else None,
        "champion_rescored": rescored,
        "split_hash": split_hash,
        "min_improvement": min_improvement,
    }


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
    rescore: Rescorer | None = None,
) -> dict:
    """The promotion step of a flow: compare a registered model with its label set's champion
    on the same test split, promote it if it wins, and say why.

    The champion's registered score is used when it was scored on `split_hash` (default: the
    challenger's registered split); otherwise the champion model is re-scored on the test rows
    of `split_key` (the challenger's split manifest) by `rescore` (default: `rescore_champion`
    in this process, models cached under `cache_dir`); without `split_key` that raises
    RegistryError, since scores on different test sets cannot be compared. When another
    promotion is recorded between the decision and its record, the decision is made again
    against the new champion. Returns `{"promoted", "reason", "challenger_run",
    "challenger_arch", "challenger_score", "champion_run", "champion_arch", "champion_score",
    "champion_rescored", "champion"}`: the champion fields describe the champion compared
    with, `champion` is the pointer after.
    """
    entry = require_registered_model(store, challenger_run, challenger_arch)
    if challenger_score is None:
        challenger_score = (entry.get("score") or {}).get("value")
    split_hash = split_hash if split_hash is not None else entry.get("split_hash")
    if rescore is None:
        def rescore(champion: Mapping[str, Any], key: str) -> float:
            return rescore_champion(store, champion, key, cache_dir)
    for _ in range(_PROMOTION_ATTEMPTS):
        try:
            return _decide_and_promote(store, entry, challenger_score, split_hash, split_key,
                                       min_improvement, rescore)
        except ChampionChanged:
            continue  # another promotion won the race: decide again against its champion
    raise ChampionChanged(
        f"{challenger_run}/{challenger_arch}: the champion of {entry['label_set_id']} changed "
        f"{_PROMOTION_ATTEMPTS} times while this promotion was decided; run it again"
    )


def _decide_and_promote(
    store: ObjectStore, entry: Mapping[str, Any], challenger_score: float | None,
    split_hash: str | None, split_key: str | None, min_improvement: float, rescore: Rescorer,
) -> dict:
    """One decision against the champion as read now, recorded if it promotes (ChampionChanged
    when another promotion was recorded meanwhile)."""
    challenger_run, challenger_arch = entry["run_id"], entry["arch"]
    champion = get_champion(store, entry["label_set_id"])
    result = {
        "challenger_run": challenger_run,
        "challenger_arch": challenger_arch,
        "challenger_score": challenger_score,
        "champion_run": champion["run_id"] if champion else None,
        "champion_arch": champion["arch"] if champion else None,
    }
    if champion and (champion["run_id"], champion["arch"]) == (challenger_run, challenger_arch):
        return {**result, "champion_score": champion.get("score"), "champion_rescored": False,
                "promoted": False, "reason": "this model is already the champion", "champion": champion}
    champion_score, rescored = _champion_score_for(champion, split_hash, split_key, rescore)
    promoted, reason = decide_promotion(champion_score, challenger_score, min_improvement)
    if rescored:
        reason += f" (champion re-scored on split {split_hash})"
    after = champion
    if promoted:
        scores = _decision_scores(challenger_score, champion_score, champion, rescored, split_hash,
                                  min_improvement)
        after = promote(store, entry, reason, scores, previous=champion)
    return {**result, "champion_score": champion_score, "champion_rescored": rescored,
            "promoted": promoted, "reason": reason, "champion": after}
