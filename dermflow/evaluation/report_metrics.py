"""The numbers of a run report: `metrics.json` (from `dermflow.metrics`, plus the expected
calibration error) and the markdown summary and table rows of the orchestrator's artifacts."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from dermflow.evaluation.report_inputs import ArchResult, Predictions, ReportInputError, ReportInputs
from dermflow.metrics import classification_metrics, top_k_accuracy

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
                             "placement": dict(result.placement) if result.placement else None,
                             "test": None, "verified_test": None}
    if result.status != "ok":
        return entry
    if result.test is None or not len(result.class_names):
        raise ReportInputError(f"architecture {name!r} has status ok but no test predictions or class_names")
    for split in ("test", "verified_test"):
        predictions: Predictions | None = getattr(result, split)
        if predictions is None:
            continue
        try:
            entry[split] = classification_metrics(predictions.y_true, predictions.y_prob, list(result.class_names),
                                                  ranges=predictions.fitzpatrick_range)
        except ValueError as error:
            raise ReportInputError(f"architecture {name!r}, {split} predictions: {error}") from error
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
def format_value(value: Any, digits: int = 3) -> str:
    """A number for people: floats to `digits` places, missing or non-finite as a dash."""
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
            "device": (entry.get("placement") or {}).get("device"),
            "train_images_per_second": (entry.get("placement") or {}).get("train_images_per_second"),
            "inference_images_per_second": (entry.get("placement") or {}).get("inference_images_per_second"),
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
        lines.append(f"| {name} | {status} | {format_value(row['accuracy'])} | {format_value(row['weighted_f1'])} | "
                     f"{format_value(row['macro_f1'])} | {format_value(row['top5_accuracy'])} | {format_value(row['range_gap_weighted_f1'])} | "
                     f"{format_value(row['verified_test_weighted_f1'])} |")
    best = metrics.get("best_architecture")
    lines.append("")
    if best:
        test = metrics["architectures"][best]["test"]
        lines.append(f"**Best model:** `{best}` (test weighted F1 {format_value(test['weighted_f1'])}, "
                     f"accuracy {format_value(test['accuracy'])}, n = {test['n']}).")
        lines.append("")
    else:
        lines.append("**No architecture finished successfully.**")
    if metrics.get("watermark_check"):
        lines += [f"**Watermark check:** {watermark_sentence(metrics['watermark_check'])}", ""]
    decision = metrics.get("retrain_decision")
    if decision:
        verdict = "promoted" if decision.get("promoted") else "not promoted"
        lines.append(f"**Retrain:** challenger {verdict} (challenger {format_value(decision.get('challenger_score'))} vs "
                     f"champion {format_value(decision.get('champion_score'))}): {_md_cell(str(decision.get('reason', '')))}")
        lines.append("")
    if report_uri:
        lines.append(f"**Full report:** {report_uri}")
    lines += ["", f"_{DISCLAIMER_TEXT}_"] if lines[-1] else [f"_{DISCLAIMER_TEXT}_"]
    return "\n".join(lines)


def watermark_sentence(check: Mapping[str, Any]) -> str:
    """The watermark check in words (`report_figures.watermark_check`), for the page and the artifact."""
    where = (f"{check['strip_share']:.0%} of {check['architecture']}'s Grad-CAM heat over its "
             f"{check['images']} example images lies in the bottom {check['strip']:.0%} of the image, "
             f"where the image host's watermark sits: {check['ratio_to_area']:.2f}x that strip's share of the area")
    if check["leans_on_strip"]:
        return (f"{where}. The model may lean on the watermark rather than the lesion; look at the examples' "
                "heatmaps, and consider training with the strip masked (edge_mask).")
    return f"{where}, so the heat does not gather on the watermark."


def _md_cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")
