"""Classification metrics shared by training, evaluation, the report and `dermflow evaluate`.

One function, `classification_metrics`, so every place that prints a number computes it the
same way (scikit-learn underneath).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

RANGE_ORDER = ("I-II", "III-IV", "V-VI", "unknown")


def top_k_accuracy(y_true: np.ndarray, y_prob: np.ndarray, k: int) -> float:
    """Share of rows whose true class is among the k most probable (k capped at the class count)."""
    if len(y_true) == 0:
        return float("nan")
    k = min(k, y_prob.shape[1])
    top = np.argpartition(-y_prob, kth=k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(top == np.asarray(y_true)[:, None], axis=1)))


def weighted_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    return float(f1_score(y_true, y_pred, average="weighted", zero_division=0))


def classification_metrics(
    y_true: Sequence[int],
    y_prob: np.ndarray,
    class_names: Sequence[str],
    ranges: Sequence[str] | None = None,
) -> dict:
    """accuracy, weighted/macro F1, top-3/5 accuracy, per skin-type range and per class.

    `y_true` are class indices into `class_names`; `y_prob` is (n, len(class_names)).
    """
    y_true = np.asarray(y_true, dtype=int)
    y_prob = np.asarray(y_prob, dtype=float)
    if y_prob.ndim != 2 or y_prob.shape != (len(y_true), len(class_names)):
        raise ValueError(
            f"y_prob has shape {y_prob.shape}; expected ({len(y_true)}, {len(class_names)})"
        )
    y_pred = y_prob.argmax(axis=1) if len(y_true) else np.zeros(0, dtype=int)
    all_classes = np.arange(len(class_names))
    result: dict = {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)) if len(y_true) else float("nan"),
        "weighted_f1": weighted_f1(y_true, y_pred) if len(y_true) else float("nan"),
        "macro_f1": float(
            f1_score(y_true, y_pred, average="macro", labels=np.unique(y_true), zero_division=0)
        )
        if len(y_true)
        else float("nan"),
        "top3_accuracy": top_k_accuracy(y_true, y_prob, 3),
        "top5_accuracy": top_k_accuracy(y_true, y_prob, 5),
    }
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=all_classes, zero_division=0
    )
    result["per_class"] = [
        {
            "label": name,
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    ]
    if ranges is not None:
        ranges = np.asarray(ranges, dtype=object)
        per_range = {}
        for name in RANGE_ORDER:
            mask = ranges == name
            if not mask.any():
                continue
            per_range[name] = {
                "n": int(mask.sum()),
                "accuracy": float(accuracy_score(y_true[mask], y_pred[mask])),
                "weighted_f1": weighted_f1(y_true[mask], y_pred[mask]),
            }
        result["per_range"] = per_range
        known = [v["weighted_f1"] for k, v in per_range.items() if k != "unknown"]
        result["range_gap_weighted_f1"] = float(max(known) - min(known)) if len(known) >= 2 else None
    return result
