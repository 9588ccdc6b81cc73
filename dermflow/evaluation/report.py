"""The run report: metrics.json, PNG figures and one self-contained HTML page for a run.

Built only from what the pipeline already has (the data summary, each architecture's test
predictions and training history, tuning trials, the retrain decision), so it never trains.
Every number comes from `dermflow.metrics` (`classification_metrics`, `top_k_accuracy`); the
only extra computed here is the expected calibration error, which that module does not have.

`build_report(inputs)` -> `Report` (html, figures, metrics, summary_markdown, table_rows);
`write_report(report, store, run_id)` uploads it under `runs/<run_id>/`.

`data_summary` is read as `tasks.runs.data_summary` builds it: `rows`, `fetch` (from
`fetch.summarize_manifest`: ok, failed, by_reason, md5_mismatch, bytes), the split summary's
`sizes`, `per_label` {label: {split: n}}, `per_range` {range: {split: n}}, `duplicates`,
`label_quality`. Flat alternatives are accepted too: `fetched_ok`, `failed_by_reason`,
`split_sizes`, `split_by_label` / `split_by_range` ({split: {label or range: n}}). Every key is
optional; what is missing shows as "not recorded".
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dermflow.metrics import RANGE_ORDER, classification_metrics, top_k_accuracy

logger = logging.getLogger(__name__)

LICENCE_TEXT = (
    "Data: the Fitzpatrick 17k dataset (Groh et al., 2021), licensed CC BY-NC-SA 3.0 Unported; "
    "images originally from Atlas Dermatologico and DermaAmin. Non-commercial use only, with "
    "attribution, sharing derivatives under the same licence."
)
DISCLAIMER_TEXT = (
    "These models are research tools. They are not medical devices and must not be used for "
    "clinical diagnosis, triage or treatment decisions."
)
TOP_K = 5
CALIBRATION_BINS = 15
CONFUSION_PAIRS = 6
EXAMPLES_PER_PAIR = 4
CORRECT_EXAMPLES = 8
FIGURE_TITLES = {
    "weighted_f1_by_architecture": "Weighted F1 per architecture",
    "accuracy_by_architecture": "Accuracy per architecture",
    "per_range": "Accuracy and weighted F1 per skin-type range",
    "top_k_accuracy": "Top-k accuracy",
    "calibration": "Reliability diagram",
    "confusion_all_labels": "Confusion matrix, all labels",
    "confusion_top5": "Confusion matrix, five most frequent labels",
    "misclassified_examples": "Misclassified examples",
    "correct_examples": "Correctly classified examples",
    "training_curves": "Training curves",
    "tuning": "Tuning trials",
    "fetch_outcomes": "Fetch outcomes",
    "split_by_range": "Split sizes by range",
}


# --- inputs and outputs ---------------------------------------------------------------------
@dataclass
class Predictions:
    """One split's predictions: class indices, probabilities (n x classes), image ids, ranges.

    `md5hash` may be None (no thumbnails then); `fitzpatrick_range` may be None (no per-range metrics).
    """

    y_true: np.ndarray
    y_prob: np.ndarray
    md5hash: np.ndarray | None = None
    fitzpatrick_range: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.y_true = np.asarray(self.y_true, dtype=int)
        self.y_prob = np.asarray(self.y_prob, dtype=float)
        n = len(self.y_true)
        self.md5hash = np.asarray(self.md5hash if self.md5hash is not None else [""] * n, dtype=str)
        if self.fitzpatrick_range is not None:
            self.fitzpatrick_range = np.asarray(self.fitzpatrick_range, dtype=str)
        for name in ("md5hash", "fitzpatrick_range"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"predictions: {name} has {len(value)} rows; y_true has {n}")
        if self.y_prob.ndim != 2 or self.y_prob.shape[0] != n:
            raise ValueError(f"predictions: y_prob has shape {self.y_prob.shape}; expected ({n}, classes)")

    @property
    def y_pred(self) -> np.ndarray:
        return self.y_prob.argmax(axis=1) if len(self.y_true) else np.zeros(0, dtype=int)


def predictions_from_npz(data: bytes | Mapping[str, np.ndarray]) -> dict[str, Predictions]:
    """`predictions.npz` (bytes or loaded arrays; see DESIGN.md) -> {split: Predictions}."""
    arrays = np.load(io.BytesIO(data), allow_pickle=False) if isinstance(data, (bytes, bytearray)) else data
    missing = {"md5hash", "split", "y_true", "y_prob", "fitzpatrick_range"} - set(arrays.keys())
    if missing:
        raise ValueError(f"predictions.npz lacks arrays: {sorted(missing)}")
    split = np.asarray(arrays["split"]).astype(str)
    return {
        name: Predictions(
            y_true=np.asarray(arrays["y_true"])[split == name],
            y_prob=np.asarray(arrays["y_prob"])[split == name],
            md5hash=np.asarray(arrays["md5hash"])[split == name],
            fitzpatrick_range=np.asarray(arrays["fitzpatrick_range"])[split == name],
        )
        for name in dict.fromkeys(split.tolist())
    }


@dataclass
class ArchResult:
    """One architecture's outcome.

    `status` "ok" needs `class_names` and the test predictions (`y_true`, `y_prob`, `md5hash`,
    `fitzpatrick_range`); the `verified_*` arrays are optional. "failed" needs `error`.
    """

    status: str
    error: str | None = None
    class_names: Sequence[str] = ()
    y_true: np.ndarray | None = None
    y_prob: np.ndarray | None = None
    md5hash: np.ndarray | None = None
    fitzpatrick_range: np.ndarray | None = None
    verified_y_true: np.ndarray | None = None
    verified_y_prob: np.ndarray | None = None
    verified_md5hash: np.ndarray | None = None
    verified_fitzpatrick_range: np.ndarray | None = None
    history: Mapping[str, Sequence[float]] = field(default_factory=dict)
    seconds: float | None = None

    @property
    def test(self) -> Predictions | None:
        if self.y_true is None or self.y_prob is None:
            return None
        return Predictions(self.y_true, self.y_prob, self.md5hash, self.fitzpatrick_range)

    @property
    def verified_test(self) -> Predictions | None:
        if self.verified_y_true is None or self.verified_y_prob is None:
            return None
        return Predictions(self.verified_y_true, self.verified_y_prob, self.verified_md5hash,
                           self.verified_fitzpatrick_range)

    @classmethod
    def from_predictions(cls, class_names: Sequence[str], test: Predictions, verified_test: Predictions | None = None,
                         **fields: Any) -> "ArchResult":
        """An "ok" result from `Predictions` (e.g. from `predictions_from_npz`)."""
        verified: dict[str, Any] = {}
        if verified_test is not None:
            verified = {"verified_y_true": verified_test.y_true, "verified_y_prob": verified_test.y_prob,
                        "verified_md5hash": verified_test.md5hash,
                        "verified_fitzpatrick_range": verified_test.fitzpatrick_range}
        return cls(status="ok", class_names=list(class_names), y_true=test.y_true, y_prob=test.y_prob,
                   md5hash=test.md5hash, fitzpatrick_range=test.fitzpatrick_range, **verified, **fields)


@dataclass
class ReportInputs:
    run_id: str
    params: Mapping[str, Any]
    data_summary: Mapping[str, Any]
    architectures: Mapping[str, ArchResult]
    tuning_trials: Sequence[Mapping[str, Any]] | None = None  # {trial_id, hyperparameters, score}
    retrain_decision: Mapping[str, Any] | None = None  # {champion_score, challenger_score, promoted, reason}
    load_image: Callable[[str], bytes] | None = None  # md5hash -> image bytes (thumbnails)
    saliency: Callable[[str], np.ndarray | None] | None = None  # md5hash -> heatmap in [0, 1]
    label_groups: Mapping[str, str] | None = None  # label -> group (e.g. nine_partition_label)


@dataclass
class Report:
    html: str
    figures: dict[str, bytes]
    metrics: dict
    summary_markdown: str
    table_rows: list[dict]


def report_keys(run_id: str) -> dict[str, str]:
    """Where `write_report` puts the page and the metrics of a run."""
    return {"report": f"runs/{run_id}/report.html", "metrics": f"runs/{run_id}/metrics.json"}


# --- metrics --------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    """NaN/inf -> None, numpy -> Python, so metrics.json is strict JSON."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def calibration_bins(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = CALIBRATION_BINS) -> dict:
    """Equal-width bins of top-1 confidence: accuracy, mean confidence, count; and the ECE."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    confidence = y_prob.max(axis=1) if len(y_true) else np.zeros(0)
    correct = (y_prob.argmax(axis=1) == y_true) if len(y_true) else np.zeros(0, dtype=bool)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(index, weights=correct.astype(float), minlength=n_bins) / count
        mean_confidence = np.bincount(index, weights=confidence, minlength=n_bins) / count
    filled = count > 0
    ece = float(np.sum(count[filled] * np.abs(accuracy[filled] - mean_confidence[filled])) / max(1, len(y_true)))
    return {
        "edges": edges,
        "accuracy": np.nan_to_num(accuracy),
        "confidence": np.nan_to_num(mean_confidence),
        "count": count,
        "ece": ece if len(y_true) else float("nan"),
    }


def _arch_metrics(name: str, result: ArchResult) -> dict:
    entry: dict[str, Any] = {"status": result.status, "error": result.error, "seconds": result.seconds,
                             "test": None, "verified_test": None}
    if result.status != "ok":
        return entry
    if result.test is None or not len(result.class_names):
        raise ValueError(f"architecture {name!r} has status ok but no test predictions or class_names")
    for split in ("test", "verified_test"):
        predictions: Predictions | None = getattr(result, split)
        if predictions is None:
            continue
        try:
            entry[split] = classification_metrics(predictions.y_true, predictions.y_prob, list(result.class_names),
                                                  ranges=predictions.fitzpatrick_range)
        except ValueError as error:
            raise ValueError(f"architecture {name!r}, {split} predictions: {error}") from error
    test = result.test
    entry["test_top_k_accuracy"] = {str(k): top_k_accuracy(test.y_true, test.y_prob, k) for k in range(1, TOP_K + 1)}
    entry["test_ece"] = calibration_bins(test.y_true, test.y_prob)["ece"]
    return entry


def compute_metrics(inputs: ReportInputs) -> dict:
    """The content of `metrics.json` (strict JSON: NaN written as null)."""
    architectures = {name: _arch_metrics(name, result) for name, result in inputs.architectures.items()}
    ok = {n: a for n, a in architectures.items() if a["status"] == "ok" and a["test"] is not None}
    scored = {n: a["test"]["weighted_f1"] for n, a in ok.items() if math.isfinite(a["test"]["weighted_f1"])}
    best = max(scored, key=scored.get) if scored else None
    data = dict(inputs.data_summary)
    return _jsonable({
        "run_id": inputs.run_id,
        "params": dict(inputs.params),
        "data": data,
        "duplicates": data.get("duplicates"),
        "label_quality": data.get("label_quality"),
        "architectures": architectures,
        "best_architecture": best,
        "failed": [{"architecture": n, "reason": a["error"] or "unknown error"}
                   for n, a in architectures.items() if a["status"] != "ok"],
        "retrain_decision": dict(inputs.retrain_decision) if inputs.retrain_decision is not None else None,
        "tuning_trials": [dict(t) for t in inputs.tuning_trials] if inputs.tuning_trials else [],
    })


# --- markdown and table rows for the orchestrator's artifacts -------------------------------
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else "–"
    return str(value)


def table_rows(metrics: Mapping[str, Any]) -> list[dict]:
    """One row per architecture (for a table artifact): status, test metrics, verified-test F1, error."""
    rows = []
    for name, entry in metrics["architectures"].items():
        test = entry.get("test") or {}
        verified = entry.get("verified_test") or {}
        rows.append({
            "architecture": name,
            "status": entry["status"],
            "best": name == metrics.get("best_architecture"),
            "n_test": test.get("n"),
            "accuracy": test.get("accuracy"),
            "weighted_f1": test.get("weighted_f1"),
            "macro_f1": test.get("macro_f1"),
            "top3_accuracy": test.get("top3_accuracy"),
            "top5_accuracy": test.get("top5_accuracy"),
            "range_gap_weighted_f1": test.get("range_gap_weighted_f1"),
            "ece": entry.get("test_ece"),
            "verified_test_weighted_f1": verified.get("weighted_f1"),
            "seconds": entry.get("seconds"),
            "error": entry.get("error") or "",
        })
    return rows


def summary_markdown(metrics: Mapping[str, Any], report_uri: str | None = None) -> str:
    """Architectures' metrics table, the best model, and where the full report lives."""
    lines = [f"## dermflow run `{metrics['run_id']}`", "",
             "| architecture | status | accuracy | weighted F1 | macro F1 | top-5 | range gap (wF1) | verified-test wF1 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in table_rows(metrics):
        name = f"**{row['architecture']}**" if row["best"] else row["architecture"]
        status = row["status"] if row["status"] == "ok" else f"failed: {_md_cell(row['error'])[:120]}"
        lines.append(f"| {name} | {status} | {_fmt(row['accuracy'])} | {_fmt(row['weighted_f1'])} | "
                     f"{_fmt(row['macro_f1'])} | {_fmt(row['top5_accuracy'])} | {_fmt(row['range_gap_weighted_f1'])} | "
                     f"{_fmt(row['verified_test_weighted_f1'])} |")
    best = metrics.get("best_architecture")
    lines.append("")
    if best:
        test = metrics["architectures"][best]["test"]
        lines.append(f"**Best model:** `{best}` (test weighted F1 {_fmt(test['weighted_f1'])}, "
                     f"accuracy {_fmt(test['accuracy'])}, n = {test['n']}).")
        lines.append("")
    else:
        lines.append("**No architecture finished successfully.**")
    decision = metrics.get("retrain_decision")
    if decision:
        verdict = "promoted" if decision.get("promoted") else "not promoted"
        lines.append(f"**Retrain:** challenger {verdict} (challenger {_fmt(decision.get('challenger_score'))} vs "
                     f"champion {_fmt(decision.get('champion_score'))}): {_md_cell(str(decision.get('reason', '')))}")
        lines.append("")
    if report_uri:
        lines.append(f"**Full report:** {report_uri}")
    lines += ["", f"_{DISCLAIMER_TEXT}_"] if lines[-1] else [f"_{DISCLAIMER_TEXT}_"]
    return "\n".join(lines)


def _md_cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


# --- figures --------------------------------------------------------------------------------
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


def _confusion(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
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


def _example_figures(inputs: ReportInputs, result: ArchResult, best: str) -> dict[str, bytes]:
    from dermflow.evaluation import figures as fig  # matplotlib only when figures are drawn

    test = result.test
    names = list(result.class_names)
    y_pred = test.y_pred
    confidence = test.y_prob.max(axis=1)
    rows = []
    for pair in confusion_pairs(result):
        idx = np.flatnonzero((test.y_true == pair["true_index"]) & (y_pred == pair["predicted_index"]))
        idx = idx[np.argsort(-confidence[idx], kind="stable")][:EXAMPLES_PER_PAIR]
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
    correct_rows = []
    for label in np.argsort(-np.bincount(test.y_true, minlength=len(names)), kind="stable"):
        idx = np.flatnonzero((test.y_true == label) & (y_pred == label))
        if len(idx):
            i = idx[np.argmax(confidence[idx])]
            correct_rows.append(_thumbnail(inputs, test.md5hash[i], f"{fig.shorten(names[label], 24)}\n"
                                           f"confidence {confidence[i]:.2f}", True))
        if len(correct_rows) == CORRECT_EXAMPLES:
            break
    if correct_rows:
        half = (len(correct_rows) + 1) // 2
        groups = [("most frequent labels, most confident correct prediction", correct_rows[:half]),
                  ("", correct_rows[half:])]
        out["correct_examples"] = fig.thumbnail_gallery(
            [g for g in groups if g[1]], title=f"{best}: correctly classified examples{overlay}", columns=half)
    return out


def build_figures(inputs: ReportInputs, metrics: Mapping[str, Any]) -> dict[str, bytes]:
    """Every figure of the report, name -> PNG bytes (names as in `FIGURE_TITLES`)."""
    from dermflow.evaluation import figures as fig  # matplotlib only when figures are drawn

    archs = metrics["architectures"]
    colors = fig.colors_for(list(archs))
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
    if best:
        result = inputs.architectures[best]
        test = result.test
        bins = calibration_bins(test.y_true, test.y_prob)
        figures["calibration"] = fig.reliability_diagram(
            bins["edges"], bins["accuracy"], bins["confidence"], bins["count"], bins["ece"],
            f"Reliability diagram: {best} (test, {CALIBRATION_BINS} bins)")
        n = len(result.class_names)
        counts = _confusion(test.y_true, test.y_pred, n)
        order, groups = _label_order(result, inputs.label_groups)
        ordered = counts[np.ix_(order, order)].astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            normalized = ordered / ordered.sum(axis=1, keepdims=True)
        ordering = "grouped, then by test frequency" if groups else "ordered by test frequency"
        figures["confusion_all_labels"] = fig.confusion_heatmap(
            normalized, [result.class_names[i] for i in order], groups=groups,
            title=f"{best}: confusion matrix, all {n} labels ({ordering}; rows normalized)")
        top5 = list(np.argsort(-np.bincount(test.y_true, minlength=n), kind="stable")[:5])
        small = np.zeros((len(top5), len(top5) + 1))
        predicted = test.y_pred
        for r, t in enumerate(top5):
            rows = predicted[test.y_true == t]
            for c, p in enumerate(top5):
                small[r, c] = np.sum(rows == p)
            small[r, -1] = len(rows) - small[r, :-1].sum()
        labels = [result.class_names[i] for i in top5]
        figures["confusion_top5"] = fig.confusion_small(
            small, labels, labels + ["any other label"],
            f"{best}: five most frequent labels (test)")
        figures.update(_example_figures(inputs, result, best))
    histories = {n: r.history for n, r in inputs.architectures.items() if r.status == "ok" and r.history}
    if histories:
        figures["training_curves"] = fig.training_curves(histories, colors)
    trials = list(inputs.tuning_trials or [])
    if trials:
        figures["tuning"] = fig.tuning_chart(trials, _numeric_hyperparameters(trials))
    data = data_view(inputs.data_summary)
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


# --- HTML -----------------------------------------------------------------------------------
CSS = """
:root{--ink:#1d2733;--muted:#5b6775;--line:#d9dee4;--accent:#1f5f99;--bad:#b03a2e;--good:#2e7d4f;--bg:#f6f7f9}
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 "DejaVu Sans",system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--ink);background:var(--bg)}
header{background:#17324d;color:#fff;padding:22px 32px}
header h1{margin:0 0 4px;font-size:26px}
header p{margin:0;color:#c9d6e3}
nav{position:sticky;top:0;z-index:2;background:#fff;border-bottom:1px solid var(--line);padding:8px 32px;font-size:13.5px;
 display:flex;flex-wrap:wrap;gap:4px 14px}
nav a{color:var(--accent);text-decoration:none;white-space:nowrap}
main{max-width:1280px;margin:0 auto;padding:8px 32px 48px}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:18px 24px;margin:18px 0}
h2{margin:0 0 10px;font-size:21px;color:#17324d}
h3{margin:18px 0 8px;font-size:16.5px}
.banner{border-left:6px solid var(--bad);background:#fdf1ef}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{flex:1 1 170px;border:1px solid var(--line);border-radius:8px;padding:10px 14px;background:#fbfcfd}
.card .v{font-size:22px;font-weight:bold}
.card .k{color:var(--muted);font-size:12.5px;text-transform:uppercase;letter-spacing:.03em}
table{border-collapse:collapse;margin:8px 0;font-size:13.5px}
th,td{border-bottom:1px solid var(--line);padding:5px 10px;text-align:left;vertical-align:top}
th{background:#eef2f6}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th::after{content:" \\2195";color:#9aa5b1;font-size:11px}
table.sortable th[aria-sort=ascending]::after{content:" \\25B2";color:var(--accent)}
table.sortable th[aria-sort=descending]::after{content:" \\25BC";color:var(--accent)}
tr.best td{background:#eef7f0;font-weight:bold}
tr.failed td{color:var(--bad)}
.scroll{max-height:560px;overflow:auto;border:1px solid var(--line);border-radius:6px}
.scroll th{position:sticky;top:0}
figure{margin:12px 0}
figure img{max-width:100%;height:auto;border:1px solid var(--line);border-radius:6px;background:#fff}
.frame{overflow:auto;max-height:1100px;border:1px solid var(--line);border-radius:6px}
.frame img{max-width:100%;border:0;cursor:zoom-in}
.frame img.zoomed{max-width:none;cursor:zoom-out}
figcaption{color:var(--muted);font-size:13px;margin-top:4px}
.muted{color:var(--muted)}
.bad{color:var(--bad)}
pre{white-space:pre-wrap;background:#f4f4f4;padding:8px;border-radius:4px;font-size:12.5px;margin:4px 0}
.grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:12px}
footer{color:var(--muted);font-size:13px;text-align:center;padding:20px}
"""

# Sort a table on header click: numbers by data-v (or text), toggling direction. No libraries.
SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function(t){
 t.querySelectorAll('th').forEach(function(th,i){th.addEventListener('click',function(){
  var asc=th.getAttribute('aria-sort')!=='ascending';
  t.querySelectorAll('th').forEach(function(h){h.removeAttribute('aria-sort')});
  th.setAttribute('aria-sort',asc?'ascending':'descending');
  var b=t.tBodies[0],rows=Array.from(b.rows);
  function key(r){var c=r.cells[i],v=c.getAttribute('data-v');return v!==null?parseFloat(v):c.textContent.trim().toLowerCase()}
  rows.sort(function(a,c){var x=key(a),y=key(c);if(x===y)return 0;return (x<y?-1:1)*(asc?1:-1)});
  rows.forEach(function(r){b.appendChild(r)});});});});
document.querySelectorAll('.frame img').forEach(function(i){i.addEventListener('click',function(){i.classList.toggle('zoomed')})});
"""

SECTIONS = (
    ("summary", "Summary"), ("data", "Data"), ("architectures", "Architectures"),
    ("failed", "Failed architectures"), ("per-range", "Skin-type ranges"), ("verified-test", "Verified test"),
    ("top-k", "Top-k"), ("calibration", "Calibration"), ("confusion", "Confusion"),
    ("examples", "Examples"), ("per-class", "Per class"), ("training", "Training"), ("tuning", "Tuning"),
    ("retrain", "Retrain decision"), ("params", "Parameters"), ("licence", "Licence & use"),
)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num_cell(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        return f'<td class="n" data-v="-1">{_e(_fmt(value, digits))}</td>'
    if isinstance(value, int):
        text = f"{value:,}"
    elif 0 < value < 0.001:  # learning rates and the like
        text = f"{value:.3g}"
    else:
        text = f"{value:.{digits}f}"
    return f'<td class="n" data-v="{value}">{text}</td>'


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, sortable: bool = False,
           table_id: str | None = None, row_classes: Sequence[str] | None = None, numeric: Sequence[bool] | None = None) -> str:
    numeric = numeric or [False] * len(headers)
    attrs = (f' id="{table_id}"' if table_id else "") + (' class="sortable"' if sortable else "")
    head = "".join(f'<th{" class=n" if is_num else ""} scope="col">{_e(h)}</th>' for h, is_num in zip(headers, numeric))
    body = []
    for index, row in enumerate(rows):
        cls = f' class="{row_classes[index]}"' if row_classes and row_classes[index] else ""
        cells = "".join(_num_cell(v) if is_num else f"<td>{v if isinstance(v, _Raw) else _e(v)}</td>"
                        for v, is_num in zip(row, numeric))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class _Raw(str):
    """Already-escaped HTML for a table cell."""


def _img(figures: Mapping[str, bytes], name: str, caption: str, *, wide: bool = False) -> str:
    if name not in figures:
        return ""
    data = base64.b64encode(figures[name]).decode("ascii")
    alt = FIGURE_TITLES.get(name, name)
    image = f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}" data-figure="{_e(name)}">'
    if wide:  # big canvas: fits the column; a click shows it at full size, scrolling inside the frame
        image = f'<div class="frame">{image}</div>'
    return f'<figure id="fig-{name}">{image}<figcaption>{_e(caption)}</figcaption></figure>'



def _kv_table(items: Mapping[str, Any]) -> str:
    rows = [[k, _Raw(f"<pre>{_e(json.dumps(v, default=str))}</pre>") if isinstance(v, (dict, list)) else v]
            for k, v in items.items()]
    return _table(["name", "value"], rows)


def _section(section_id: str, body: str) -> str:
    title = dict(SECTIONS)[section_id]
    return f'<section id="{section_id}"><h2>{_e(title)}</h2>{body}</section>'


def _not_recorded(what: str) -> str:
    return f'<p class="muted">{_e(what)}: not recorded for this run.</p>'


def _html_summary(metrics: Mapping) -> str:
    best = metrics.get("best_architecture")
    archs = metrics["architectures"]
    n_ok = sum(a["status"] == "ok" for a in archs.values())
    cards = []
    if best:
        test = archs[best]["test"]
        cards += [("best architecture", best), ("weighted F1 (test)", _fmt(test["weighted_f1"])),
                  ("accuracy (test)", _fmt(test["accuracy"])), ("top-5 accuracy", _fmt(test["top5_accuracy"])),
                  ("test rows", f"{test['n']:,}"),
                  ("range gap (wF1)", _fmt(test.get("range_gap_weighted_f1")))]
    cards.append(("architectures ok / failed", f"{n_ok} / {len(archs) - n_ok}"))
    decision = metrics.get("retrain_decision")
    if decision:
        cards.append(("retrain", "promoted" if decision.get("promoted") else "not promoted"))
    html_cards = "".join(f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div></div>' for k, v in cards)
    intro = ("" if best else '<p class="bad"><b>No architecture finished successfully;</b> see '
             '<a href="#failed">failed architectures</a>.</p>')
    return _section("summary", f'<div class="cards">{html_cards}</div>{intro}'
                    f'<p class="muted">Best architecture = highest weighted F1 on the test split. '
                    f'All metrics are computed on held-out test rows.</p>')


def _html_data(summary: Mapping, figures: Mapping[str, bytes]) -> str:
    data = data_view(summary)
    parts = []
    overview = {"dataset rows": data["rows"], "images fetched": data["fetched_ok"]}
    failed = data["failed_by_reason"]
    if failed is not None:
        overview["fetch failures"] = int(sum(failed.values()))
    if data["md5_mismatch"] is not None:
        overview["fetched images whose MD5 differs from the dataset's"] = data["md5_mismatch"]
    if data["bytes"] is not None:
        overview["image megabytes stored"] = int(round(data["bytes"] / 1e6))
    parts.append(_table(["", "count"], [[k, v if v is not None else "not recorded"] for k, v in overview.items()],
                        numeric=[False, True]))
    if data["dropped_labels"]:
        parts.append(f'<p class="bad">Labels dropped for too few images: {_e(", ".join(map(str, data["dropped_labels"])))}</p>')
    if failed:
        parts.append("<h3>Fetch failures by reason</h3>")
        parts.append(_table(["reason", "rows"], sorted(failed.items(), key=lambda kv: -kv[1]), numeric=[False, True]))
    parts.append(_img(figures, "fetch_outcomes", "Every dataset row's fetch outcome; failed rows are excluded from training and evaluation."))
    split_by_range = data["split_by_range"]
    split_sizes = data["split_sizes"] or {s: int(sum(v.values())) for s, v in split_by_range.items()}
    if split_sizes:
        parts.append("<h3>Split sizes</h3>")
        ranges = [r for r in RANGE_ORDER if any(r in v for v in split_by_range.values())]
        headers = ["split", "rows", *ranges]
        rows = [[s, n, *[split_by_range.get(s, {}).get(r, 0) for r in ranges]] for s, n in split_sizes.items()]
        parts.append(_table(headers, rows, numeric=[False] + [True] * (len(headers) - 1)))
    parts.append(_img(figures, "split_by_range", "Rows per split, stacked by Fitzpatrick skin-type range."))
    split_by_label = data["split_by_label"]
    if split_by_label:
        splits = list(split_by_label)
        labels = sorted({lab for v in split_by_label.values() for lab in v},
                        key=lambda lab: (-sum(split_by_label[s].get(lab, 0) for s in splits), lab))
        rows = [[lab, *[split_by_label[s].get(lab, 0) for s in splits]] for lab in labels]
        parts.append(f"<details><summary>Split sizes per label ({len(labels)} labels; click to open, headers sort)</summary>"
                     f'<div class="scroll">{_table(["label", *splits], rows, sortable=True, table_id="split-by-label", numeric=[False] + [True] * len(splits))}</div></details>')
    quality = []
    duplicates = data["duplicates"]
    names = {"groups": "near-duplicate groups", "images": "images in near-duplicate groups",
             "cross_split": "groups spanning train/val/test splits", "exact": "groups of exact (byte-identical) duplicates",
             "label_conflict_groups": "groups whose members carry different labels",
             "label_conflicts": "groups whose members carry different labels"}
    conflicts = []
    for key, value in duplicates.items():
        if isinstance(value, (list, tuple)):  # the listed conflicting groups themselves
            conflicts = list(value)
            if "label_conflict_groups" not in duplicates:
                quality.append([names.get(key, key), len(value)])
        elif not isinstance(value, Mapping):
            quality.append([names.get(key, key.replace("_", " ")), value])
    for key, value in data["label_quality"].items():
        quality.append([f"label quality: {key.replace('_', ' ')}", value])
    parts.append('<h3 id="duplicates">Duplicates and label quality</h3>')
    parts.append(_table(["check", "count"], quality, numeric=[False, True]) if quality
                 else _not_recorded("Duplicate and label-quality counts"))
    if conflicts:
        rows = [[c.get("dup_group", ""), ", ".join(map(str, c.get("labels", []))),
                 ", ".join(map(str, c.get("splits", []))), len(c.get("md5hashes", []))]
                for c in conflicts if isinstance(c, Mapping)]
        parts.append(f"<details><summary>Near-duplicate groups with conflicting labels ({len(rows)} listed)</summary>"
                     + _table(["group", "labels", "splits", "images"], rows) + "</details>")
    return _section("data", "".join(parts))


ARCH_HEADERS = ["architecture", "status", "test rows", "accuracy", "weighted F1", "macro F1", "top-3", "top-5",
                "range gap (wF1)", "ECE", "verified-test wF1", "train time (s)"]


def _html_architectures(metrics: Mapping, figures: Mapping[str, bytes]) -> str:
    rows, classes = [], []
    for row in table_rows(metrics):
        rows.append([row["architecture"] + (" ★" if row["best"] else ""), row["status"], row["n_test"], row["accuracy"],
                     row["weighted_f1"], row["macro_f1"], row["top3_accuracy"], row["top5_accuracy"],
                     row["range_gap_weighted_f1"], row["ece"], row["verified_test_weighted_f1"],
                     round(row["seconds"]) if isinstance(row["seconds"], (int, float)) else None])
        classes.append("best" if row["best"] else ("failed" if row["status"] != "ok" else ""))
    body = _table(ARCH_HEADERS, rows, sortable=True, table_id="architectures-table", row_classes=classes,
                  numeric=[False, False] + [True] * 10)
    body += ('<p class="muted">★ best by test weighted F1. Range gap = best minus worst weighted F1 over the known '
             'Fitzpatrick ranges. ECE = expected calibration error of the top-1 confidence.</p>')
    body += '<div class="grid2">' + _img(figures, "weighted_f1_by_architecture", "Weighted F1 on the test split.")
    body += _img(figures, "accuracy_by_architecture", "Accuracy on the test split.") + "</div>"
    return _section("architectures", body)


def _html_failed(metrics: Mapping) -> str:
    failed = metrics["failed"]
    if not failed:
        return _section("failed", '<p class="muted">Every architecture finished.</p>')
    rows = [[f["architecture"], _Raw(f"<pre>{_e(f['reason'])}</pre>")] for f in failed]
    return _section("failed", f'<p class="bad">{len(failed)} architecture(s) failed; the others were evaluated '
                    f'as usual.</p>' + _table(["architecture", "why it failed"], rows))


def _html_per_range(metrics: Mapping, figures: Mapping[str, bytes]) -> str:
    archs = {n: a for n, a in metrics["architectures"].items() if a["status"] == "ok" and a["test"]}
    if not archs:
        return _section("per-range", _not_recorded("Per-range metrics"))
    headers = ["architecture", "skin-type range", "test rows", "accuracy", "weighted F1",
               "wF1 − best known range", "architecture's gap (wF1)"]
    rows = []
    for name, a in archs.items():
        per_range = a["test"].get("per_range", {})
        known = [v["weighted_f1"] for r, v in per_range.items() if r != "unknown" and v["weighted_f1"] is not None]
        for r in RANGE_ORDER:
            if r not in per_range:
                continue
            values = per_range[r]
            behind = values["weighted_f1"] - max(known) if (known and r != "unknown") else None
            rows.append([name, r, values.get("n"), values.get("accuracy"), values.get("weighted_f1"), behind,
                         a["test"].get("range_gap_weighted_f1")])
    body = _table(headers, rows, sortable=True, table_id="per-range-table",
                  numeric=[False, False] + [True] * (len(headers) - 2))
    body += ('<p class="muted">Gap = best minus worst weighted F1 among the known ranges (I-II, III-IV, V-VI); '
             '"unknown" rows have no Fitzpatrick label and are shown but not counted in the gap.</p>')
    body += _img(figures, "per_range", "Performance by Fitzpatrick skin-type range on the test split.")
    return _section("per-range", body)


def _html_verified(metrics: Mapping) -> str:
    rows = []
    for name, a in metrics["architectures"].items():
        if a["status"] != "ok" or not a["test"]:
            continue
        v = a.get("verified_test") or {}
        t = a["test"]
        rows.append([name, t["n"], t["accuracy"], t["weighted_f1"], v.get("n"), v.get("accuracy"), v.get("weighted_f1"),
                     (v.get("weighted_f1") - t["weighted_f1"]) if v.get("weighted_f1") is not None and t["weighted_f1"] is not None else None])
    if not rows:
        return _section("verified-test", _not_recorded("Verified-test metrics"))
    body = _table(["architecture", "test n", "test accuracy", "test wF1", "verified n", "verified accuracy",
                   "verified wF1", "verified − test wF1"], rows, numeric=[False] + [True] * 7)
    body += ('<p class="muted">Verified test = the held-out split of rows with a quality-reviewed label (the '
             'dataset\'s <code>qc</code> column); "–" where the run had none.</p>')
    return _section("verified-test", body)


def _most_mistaken_for(result: ArchResult) -> list[str]:
    """Per true label: the wrong label it is most often predicted as, with the share of its rows."""
    test = result.test
    n = len(result.class_names)
    counts = _confusion(test.y_true, test.y_pred, n)
    np.fill_diagonal(counts, 0)
    support = np.bincount(test.y_true, minlength=n)
    out = []
    for label in range(n):
        other = int(counts[label].argmax())
        out.append(f"{result.class_names[other]} ({counts[label, other] / support[label]:.0%})"
                   if counts[label, other] else "")
    return out


def _html_per_class(inputs: ReportInputs, metrics: Mapping) -> str:
    best = metrics.get("best_architecture")
    if not best:
        return _section("per-class", _not_recorded("Per-class metrics"))
    others = [n for n, a in metrics["architectures"].items() if a["status"] == "ok" and a["test"] and n != best]
    other_f1 = {n: {c["label"]: c["f1"] for c in metrics["architectures"][n]["test"]["per_class"]} for n in others}
    mistaken_for = _most_mistaken_for(inputs.architectures[best])
    rows = []
    for c, confused in zip(metrics["architectures"][best]["test"]["per_class"], mistaken_for):
        rows.append([c["label"], c["support"], c["precision"], c["recall"], c["f1"], confused,
                     *[other_f1[n].get(c["label"]) for n in others]])
    headers = ["label", "support", "precision", "recall", "F1", "most often predicted instead",
               *[f"F1 {n}" for n in others]]
    body = (f"<p>{_e(best)} (best) per label on the test split, with the wrong label it most often predicts "
            f"for it (share of the label's test rows); F1 of the other architectures beside it. "
            f"Click a header to sort.</p>")
    body += '<div class="scroll">' + _table(headers, rows, sortable=True, table_id="per-class-table",
                                           numeric=[False, True, True, True, True, False] + [True] * len(others)) + "</div>"
    return _section("per-class", body)


def _html_confusion(inputs: ReportInputs, metrics: Mapping, figures: Mapping[str, bytes]) -> str:
    best = metrics.get("best_architecture")
    if not best:
        return _section("confusion", _not_recorded("Confusion matrices"))
    result = inputs.architectures[best]
    pairs = confusion_pairs(result, limit=15)
    body = _img(figures, "confusion_all_labels", "All labels, each row normalized to its true label's test rows "
                "(the diagonal is per-class recall). Click the matrix to see it at full size and scroll inside the frame; "
                "click again to fit.", wide=True)
    body += _img(figures, "confusion_top5", "The five labels with the most test rows; predictions of any other label "
                 "are pooled in the last column.")
    body += "<h3>Most frequent confusions</h3>" + _table(
        ["true label", "predicted label", "rows", "share of the true label"],
        [[p["true"], p["predicted"], p["count"], p["share_of_true"]] for p in pairs],
        sortable=True, table_id="confusion-pairs", numeric=[False, False, True, True])
    return _section("confusion", body)


def _html_examples(inputs: ReportInputs, figures: Mapping[str, bytes]) -> str:
    if "misclassified_examples" not in figures and "correct_examples" not in figures:
        return _section("examples", _not_recorded("Example predictions"))
    note = "" if inputs.load_image else '<p class="muted">No image loader was given: thumbnails are placeholders.</p>'
    saliency = (" Heatmaps (red = most influential) show where the model looked." if inputs.saliency else "")
    return _section("examples", note + _img(figures, "misclassified_examples",
                    "Red frame = misclassified. One row per frequent confusion." + saliency)
                    + _img(figures, "correct_examples", "Green frame = correct." + saliency))


def _html_tuning(inputs: ReportInputs, figures: Mapping[str, bytes]) -> str:
    trials = list(inputs.tuning_trials or [])
    if not trials:
        return _section("tuning", _not_recorded("Hyperparameter tuning"))
    names: list[str] = []
    for t in trials:
        names += [k for k in t.get("hyperparameters", {}) if k not in names]
    rows = [[t.get("trial_id", i + 1), t.get("score"), *[t.get("hyperparameters", {}).get(k, "") for k in names]]
            for i, t in enumerate(trials)]
    numeric = [False, True] + [all(isinstance(t.get("hyperparameters", {}).get(k), (int, float)) for t in trials) for k in names]
    body = _img(figures, "tuning", "Objective score per trial, and against each numeric hyperparameter.")
    body += '<div class="scroll">' + _table(["trial", "score", *names], rows, sortable=True, table_id="tuning-table",
                                           numeric=numeric) + "</div>"
    return _section("tuning", body)


def _html_retrain(metrics: Mapping) -> str:
    decision = metrics.get("retrain_decision")
    if not decision:
        return _section("retrain", '<p class="muted">Not a retrain run: no champion/challenger comparison.</p>')
    verdict = ('<p class="card"><b>Challenger promoted.</b></p>' if decision.get("promoted")
               else '<p class="card"><b>Challenger not promoted;</b> the champion stays.</p>')
    return _section("retrain", verdict + _kv_table(decision))


def _html_licence() -> str:
    return _section("licence", f"<p><b>Not for clinical use.</b> {_e(DISCLAIMER_TEXT)}</p><p>{_e(LICENCE_TEXT)} "
                    'Licence: <a href="https://creativecommons.org/licenses/by-nc-sa/3.0/">CC BY-NC-SA 3.0</a>. '
                    "Labels and skin types come from the dataset and contain known errors; metrics on "
                    "skin-type ranges with few rows are uncertain.</p>")


def render_html(inputs: ReportInputs, metrics: Mapping, figures: Mapping[str, bytes]) -> str:
    """One self-contained page: inline CSS and JS, figures as data: URIs, no external requests."""
    nav = "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title in SECTIONS)
    sections = [
        _html_summary(metrics),
        _html_data(inputs.data_summary, figures),
        _html_architectures(metrics, figures),
        _html_failed(metrics),
        _html_per_range(metrics, figures),
        _html_verified(metrics),
        _section("top-k", _img(figures, "top_k_accuracy", "Share of test rows whose true label is among the k most "
                               "probable.") or _not_recorded("Top-k accuracy")),
        _section("calibration", _img(figures, "calibration", "Bars: accuracy of rows whose top-1 confidence falls in "
                                     "each bin; the diagonal is perfect calibration; ECE = row-weighted mean |accuracy − "
                                     "confidence|.") or _not_recorded("Calibration")),
        _html_confusion(inputs, metrics, figures),
        _html_examples(inputs, figures),
        _html_per_class(inputs, metrics),
        _section("training", _img(figures, "training_curves", "Per-epoch metrics from training: solid = training "
                                  "data, dashed = validation.") or _not_recorded("Training history")),
        _html_tuning(inputs, figures),
        _html_retrain(metrics),
        _section("params", _kv_table(dict(inputs.params)) if inputs.params else _not_recorded("Parameters")),
        _html_licence(),
    ]
    banner = (f'<section class="banner" id="disclaimer"><b>Research use only.</b> {_e(DISCLAIMER_TEXT)} '
              f'Data: Fitzpatrick 17k, CC BY-NC-SA 3.0 (<a href="#licence">details</a>).</section>')
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>dermflow report {_e(inputs.run_id)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>dermflow run report</h1><p>run <code>{_e(inputs.run_id)}</code> · "
        f"{len(metrics['architectures'])} architecture(s) · Fitzpatrick 17k skin-condition classification</p></header>"
        f"<nav>{nav}</nav><main>{banner}{''.join(sections)}</main>"
        f"<footer>{_e(LICENCE_TEXT)}</footer><script>{SORT_JS}</script></body></html>\n"
    )


# --- entry points ---------------------------------------------------------------------------
def build_report(inputs: ReportInputs, *, report_uri: str | None = None) -> Report:
    """Metrics, figures, the HTML page, and the markdown/table artifacts of one run."""
    metrics = compute_metrics(inputs)
    figures = build_figures(inputs, metrics)
    return Report(
        html=render_html(inputs, metrics, figures),
        figures=figures,
        metrics=metrics,
        summary_markdown=summary_markdown(metrics, report_uri),
        table_rows=table_rows(metrics),
    )


def write_report(report: Report, store, run_id: str) -> dict[str, str]:
    """Upload the page, metrics.json and each figure under `runs/<run_id>/`.

    Returns {"report": uri, "metrics": uri, "figures/<name>": uri, ...}.
    """
    if not run_id or "/" in run_id:
        raise ValueError(f"run_id must be a non-empty name without '/'; got {run_id!r}")
    keys = report_keys(run_id)
    uris = {
        "report": store.put_bytes(keys["report"], report.html.encode("utf-8"), "text/html; charset=utf-8"),
        "metrics": store.put_bytes(keys["metrics"], json.dumps(report.metrics, indent=2, allow_nan=False).encode(),
                                   "application/json"),
    }
    for name, png in report.figures.items():
        uris[f"figures/{name}"] = store.put_bytes(f"runs/{run_id}/figures/{name}.png", png, "image/png")
    return uris
