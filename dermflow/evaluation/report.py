"""The run report: metrics.json, PNG figures and one self-contained HTML page for a run.

Built only from what the pipeline already has (the data summary, each architecture's test
predictions and training history, tuning trials, the retrain decision), so it never trains.
Every number comes from `dermflow.metrics` (`classification_metrics`, `top_k_accuracy`); the
only extras computed here are the expected calibration error, which that module does not have,
and the watermark check: the share of the best model's Grad-CAM heat in the bottom strip where
the image host's watermark sits, over its example images.

`build_report(inputs)` -> `Report` (html, figures, metrics, summary_markdown, table_rows);
`write_report(report, store, run_id)` uploads it under `runs/<run_id>/`.

The parts: `report_inputs` (what a report is built from), `report_metrics` (metrics.json, the
markdown and table artifacts), `report_figures` (which figures, from which results) and
`report_html` (the page).

`data_summary` is read as `tasks.runs.data_summary` builds it: `rows`, `fetch` (from
`fetch.summarize_manifest`: ok, failed, by_reason, md5_mismatch, bytes), the split summary's
`sizes`, `per_label` {label: {split: n}}, `per_range` {range: {split: n}}, `duplicates`,
`label_quality`. Flat alternatives are accepted too: `fetched_ok`, `failed_by_reason`,
`split_sizes`, `split_by_label` / `split_by_range` ({split: {label or range: n}}). Every key is
optional; what is missing shows as "not recorded".
"""

from __future__ import annotations

import json

from dermflow import layout
from dermflow.evaluation.report_figures import build_figures, watermark_check
from dermflow.evaluation.report_html import render_html
from dermflow.evaluation.report_inputs import (
    ArchResult, Predictions, Report, ReportInputError, ReportInputs, predictions_from_npz,
)
from dermflow.evaluation.report_metrics import calibration_bins, compute_metrics, summary_markdown, table_rows

__all__ = [
    "ArchResult", "Predictions", "Report", "ReportInputError", "ReportInputs", "build_report", "calibration_bins",
    "compute_metrics", "predictions_from_npz", "summary_markdown", "table_rows", "write_report",
]


def build_report(inputs: ReportInputs, *, report_uri: str | None = None) -> Report:
    """Metrics, figures, the HTML page, and the markdown/table artifacts of one run."""
    metrics = compute_metrics(inputs)
    metrics["watermark_check"] = watermark_check(inputs, metrics["best_architecture"])
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
        raise ReportInputError(f"run_id must be a non-empty name without '/'; got {run_id!r}")
    uris = {
        "report": store.put_bytes(layout.report_key(run_id), report.html.encode("utf-8"), "text/html; charset=utf-8"),
        "metrics": store.put_bytes(layout.run_metrics_key(run_id),
                                   json.dumps(report.metrics, indent=2, allow_nan=False).encode(), "application/json"),
    }
    for name, png in report.figures.items():
        uris[f"figures/{name}"] = store.put_bytes(layout.figure_key(run_id, name), png, "image/png")
    return uris
