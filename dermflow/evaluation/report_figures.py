"""Which figures a run report draws, from which results (the drawing itself is in
`dermflow.evaluation.figures`), the data summary in one shape (`data_view`), and the watermark
check over the example images' Grad-CAM maps (`watermark_check`)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dermflow.evaluation.report_inputs import ArchResult, ReportInputs
from dermflow.evaluation.report_metrics import CALIBRATION_BINS, TOP_K, calibration_bins
from dermflow.metrics import RANGE_ORDER

logger = logging.getLogger(__name__)

CONFUSION_PAIRS = 6
EXAMPLES_PER_PAIR = 4
CORRECT_EXAMPLES = 8


def _label_order(result: ArchResult, label_groups: Mapping[str, str] | None) -> tuple[np.ndarray, list[str] | None]:
    """Labels by group (when known) then by test frequency, most frequent first."""
    names = list(result.class_names)
    support = np.bincount(result.test.y_true, minlength=len(names))
    if label_groups:
        groups = [str(label_groups.get(n, "other")) for n in names]
        group_support = Counter()
        for g, s in zip(groups, support):
            group_support[g] += int(s)
        order = sorted(range(len(names)), key=lambda i: (-group_support[groups[i]], groups[i], -support[i], names[i]))
        return np.array(order), [groups[i] for i in order]
    order = sorted(range(len(names)), key=lambda i: (-support[i], names[i]))
    return np.array(order), None


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    """n x n counts: rows are true labels, columns predicted ones."""
    return np.bincount(y_true * n + y_pred, minlength=n * n).reshape(n, n)


def _thumbnail(inputs: ReportInputs, md5: str, caption: str, correct: bool):
    from dermflow.evaluation import figures as fig

    image = heatmap = None
    if inputs.load_image is not None and md5:
        try:
            image = fig.decode_thumbnail(inputs.load_image(md5))
        except Exception as error:  # noqa: BLE001 - one unreadable image must not sink the report
            logger.warning("report: no thumbnail for %s: %s", md5, error)
    if image is not None and inputs.saliency is not None:
        try:
            raw = inputs.saliency(md5)
            heatmap = fig.resize_heatmap(raw, image.shape[:2]) if raw is not None else None
        except Exception as error:  # noqa: BLE001 - saliency is an optional overlay
            logger.warning("report: no saliency for %s: %s", md5, error)
    return fig.Thumbnail(image=image, caption=caption, heatmap=heatmap, correct=correct)


def confusion_pairs(result: ArchResult, limit: int = CONFUSION_PAIRS) -> list[dict]:
    """The most frequent (true, predicted) mistakes, with their share of the true label's rows."""
    test = result.test
    y_pred = test.y_pred
    wrong = y_pred != test.y_true
    support = np.bincount(test.y_true, minlength=len(result.class_names))
    pairs = Counter(zip(test.y_true[wrong].tolist(), y_pred[wrong].tolist()))
    out = []
    for (t, p), count in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]:
        out.append({"true": result.class_names[t], "predicted": result.class_names[p], "true_index": t,
                    "predicted_index": p, "count": count, "share_of_true": count / max(1, support[t])})
    return out


def example_rows(result: ArchResult) -> tuple[list[tuple[dict, np.ndarray]], list[tuple[int, int]]]:
    """The test rows the report shows: per frequent confusion its most confident rows, and per
    frequent label its most confident correct row ((label, row))."""
    test = result.test
    y_pred = test.y_pred
    confidence = test.y_prob.max(axis=1)
    confusions = []
    for pair in confusion_pairs(result):
        idx = np.flatnonzero((test.y_true == pair["true_index"]) & (y_pred == pair["predicted_index"]))
        confusions.append((pair, idx[np.argsort(-confidence[idx], kind="stable")][:EXAMPLES_PER_PAIR]))
    correct = []
    for label in np.argsort(-np.bincount(test.y_true, minlength=len(result.class_names)), kind="stable"):
        idx = np.flatnonzero((test.y_true == label) & (y_pred == label))
        if len(idx):
            correct.append((int(label), int(idx[np.argmax(confidence[idx])])))
        if len(correct) == CORRECT_EXAMPLES:
            break
    return confusions, correct


def example_md5hashes(result: ArchResult) -> list[str]:
    """The images of the report's example galleries (those that get a Grad-CAM overlay)."""
    confusions, correct = example_rows(result)
    rows = [int(i) for _, idx in confusions for i in idx] + [i for _, i in correct]
    return list(dict.fromkeys(str(result.test.md5hash[i]) for i in rows))


def watermark_check(inputs: ReportInputs, best: str | None) -> dict | None:
    """Whether the best model's Grad-CAM heat gathers in the watermark's bottom strip, over the
    images of its example galleries (`saliency.strip_saliency`); None without maps."""
    from dermflow.evaluation.saliency import strip_saliency

    if not best or inputs.saliency is None or inputs.architectures[best].test is None:
        return None
    maps = []
    for md5 in example_md5hashes(inputs.architectures[best]):
        try:
            heatmap = inputs.saliency(md5)
        except Exception as error:  # noqa: BLE001 - a missing map leaves the others to judge by
            logger.warning("report: no saliency for %s: %s", md5, error)
            continue
        if heatmap is not None:
            maps.append(heatmap)
    check = strip_saliency(maps)
    return {"architecture": best, **check} if check else None


def _example_figures(inputs: ReportInputs, result: ArchResult, best: str) -> dict[str, bytes]:
    from dermflow.evaluation import figures as fig  # matplotlib only when figures are drawn

    test = result.test
    names = list(result.class_names)
    y_pred = test.y_pred
    confidence = test.y_prob.max(axis=1)
    rows = []
    confusions, correct = example_rows(result)
    for pair, idx in confusions:
        thumbs = [_thumbnail(inputs, test.md5hash[i], f"true: {fig.shorten(names[test.y_true[i]], 24)}\n"
                             f"pred: {fig.shorten(names[y_pred[i]], 24)}\nconfidence {confidence[i]:.2f}", False)
                  for i in idx]
        rows.append((f"{fig.shorten(pair['true'], 30)} → {fig.shorten(pair['predicted'], 30)}  "
                     f"({pair['count']} rows)", thumbs))
    out = {}
    overlay = " with saliency overlay" if inputs.saliency is not None else ""
    if rows:
        out["misclassified_examples"] = fig.thumbnail_gallery(
            rows, title=f"{best}: most frequent confusions{overlay}\n(true → predicted; most confident first)",
            columns=EXAMPLES_PER_PAIR)
    # correct: the most confident correct row of each of the most frequent labels
    correct_rows = [_thumbnail(inputs, test.md5hash[i], f"{fig.shorten(names[label], 24)}\n"
                               f"confidence {confidence[i]:.2f}", True) for label, i in correct]
    if correct_rows:
        half = (len(correct_rows) + 1) // 2
        groups = [("most frequent labels, most confident correct prediction", correct_rows[:half]),
                  ("", correct_rows[half:])]
        out["correct_examples"] = fig.thumbnail_gallery(
            [g for g in groups if g[1]], title=f"{best}: correctly classified examples{overlay}", columns=half)
    return out


def build_figures(inputs: ReportInputs, metrics: Mapping[str, Any]) -> dict[str, bytes]:
    """Every figure of the report, name -> PNG bytes (names as in `report_html.FIGURE_TITLES`)."""
    from dermflow.evaluation import figures as fig  # matplotlib only when figures are drawn

    colors = fig.colors_for(list(metrics["architectures"]))
    figures = _comparison_figures(metrics, colors)
    best = metrics.get("best_architecture")
    if best:
        figures.update(_best_model_figures(inputs, inputs.architectures[best], best))
        figures.update(_example_figures(inputs, inputs.architectures[best], best))
    histories = {n: r.history for n, r in inputs.architectures.items() if r.status == "ok" and r.history}
    if histories:
        figures["training_curves"] = fig.training_curves(histories, colors)
    trials = list(inputs.tuning_trials or [])
    if trials:
        figures["tuning"] = fig.tuning_chart(trials, _numeric_hyperparameters(trials))
    figures.update(_data_figures(inputs.data_summary))
    return figures


def _comparison_figures(metrics: Mapping[str, Any], colors: Mapping[str, tuple]) -> dict[str, bytes]:
    """The architectures side by side: weighted F1 and accuracy, per range, top-k."""
    from dermflow.evaluation import figures as fig

    archs = metrics["architectures"]
    ok = [n for n, a in archs.items() if a["status"] == "ok" and a["test"]]
    best = metrics.get("best_architecture")
    figures: dict[str, bytes] = {}
    if archs:
        for key, title in (("weighted_f1", "Weighted F1 per architecture (test)"),
                           ("accuracy", "Accuracy per architecture (test)")):
            values = {n: (a["test"] or {}).get(key) if a["status"] == "ok" else None for n, a in archs.items()}
            figures[f"{key}_by_architecture"] = fig.metric_bars(values, title=title, ylabel=title.split(" per ")[0],
                                                                colors=colors, best=best)
    if ok:
        figures["per_range"] = fig.per_range_chart(
            {n: archs[n]["test"].get("per_range", {}) for n in ok},
            {n: archs[n]["test"].get("range_gap_weighted_f1") for n in ok}, colors, RANGE_ORDER)
        figures["top_k_accuracy"] = fig.top_k_chart(
            {n: [archs[n]["test_top_k_accuracy"][str(k)] for k in range(1, TOP_K + 1)] for n in ok}, colors)
    return figures


def _best_model_figures(inputs: ReportInputs, result: ArchResult, best: str) -> dict[str, bytes]:
    """The best architecture's reliability diagram and confusion matrices (all labels; top five)."""
    from dermflow.evaluation import figures as fig

    test = result.test
    bins = calibration_bins(test.y_true, test.y_prob)
    figures = {"calibration": fig.reliability_diagram(
        bins["edges"], bins["accuracy"], bins["confidence"], bins["count"], bins["ece"],
        f"Reliability diagram: {best} (test, {CALIBRATION_BINS} bins)")}
    n = len(result.class_names)
    counts = confusion_counts(test.y_true, test.y_pred, n)
    order, groups = _label_order(result, inputs.label_groups)
    ordered = counts[np.ix_(order, order)].astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalized = ordered / ordered.sum(axis=1, keepdims=True)
    ordering = "grouped, then by test frequency" if groups else "ordered by test frequency"
    figures["confusion_all_labels"] = fig.confusion_heatmap(
        normalized, [result.class_names[i] for i in order], groups=groups,
        title=f"{best}: confusion matrix, all {n} labels ({ordering}; rows normalized)")
    top5 = list(np.argsort(-np.bincount(test.y_true, minlength=n), kind="stable")[:5])
    labels = [result.class_names[i] for i in top5]
    figures["confusion_top5"] = fig.confusion_small(
        _top_labels_confusion(test.y_true, test.y_pred, top5), labels, labels + ["any other label"],
        f"{best}: five most frequent labels (test)")
    return figures


def _top_labels_confusion(y_true: np.ndarray, y_pred: np.ndarray, top: Sequence[int]) -> np.ndarray:
    """Counts among the `top` labels, with one last column for predictions of any other label."""
    small = np.zeros((len(top), len(top) + 1))
    for r, t in enumerate(top):
        rows = y_pred[y_true == t]
        for c, p in enumerate(top):
            small[r, c] = np.sum(rows == p)
        small[r, -1] = len(rows) - small[r, :-1].sum()
    return small


def _data_figures(data_summary: Mapping[str, Any]) -> dict[str, bytes]:
    """Fetch outcomes and split sizes by range, when the data summary has them."""
    from dermflow.evaluation import figures as fig

    data = data_view(data_summary)
    figures: dict[str, bytes] = {}
    if data["failed_by_reason"] is not None and data["fetched_ok"] is not None:
        figures["fetch_outcomes"] = fig.fetch_outcomes_chart(int(data["fetched_ok"]), dict(data["failed_by_reason"]))
    if data.get("split_by_range"):
        figures["split_by_range"] = fig.split_by_range_chart(dict(data["split_by_range"]), RANGE_ORDER)
    return figures


def _transpose(nested: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for outer, inner in (nested or {}).items():
        for key, value in inner.items():
            out.setdefault(key, {})[outer] = value
    return out


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def data_view(data: Mapping[str, Any]) -> dict[str, Any]:
    """The data summary in one shape, whichever of the accepted key sets it came with."""
    fetch = data.get("fetch") or {}
    return {
        "rows": _first(data.get("rows"), fetch.get("rows")),
        "fetched_ok": _first(data.get("fetched_ok"), fetch.get("ok")),
        "failed_by_reason": _first(data.get("failed_by_reason"), fetch.get("by_reason")),
        "md5_mismatch": fetch.get("md5_mismatch"),
        "bytes": fetch.get("bytes"),
        "split_sizes": _first(data.get("split_sizes"), data.get("sizes")),
        "split_by_range": data.get("split_by_range") or _transpose(data.get("per_range")),
        "split_by_label": data.get("split_by_label") or _transpose(data.get("per_label")),
        "duplicates": data.get("duplicates") or {},
        "label_quality": data.get("label_quality") or {},
        "dropped_labels": data.get("dropped_labels") or [],
        "label_repairs": data.get("label_repairs"),
    }


def _numeric_hyperparameters(trials: Sequence[Mapping]) -> list[str]:
    """Hyperparameters that are numbers in every trial and vary between trials."""
    names: list[str] = []
    for trial in trials:
        for key in trial.get("hyperparameters", {}):
            if key not in names:
                names.append(key)

    def numeric(v: Any) -> bool:
        return isinstance(v, (int, float, np.number)) and not isinstance(v, bool)

    return [k for k in names
            if all(numeric(t.get("hyperparameters", {}).get(k)) for t in trials)
            and len({t["hyperparameters"][k] for t in trials}) > 1]
