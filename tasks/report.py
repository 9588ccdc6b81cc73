"""Prefect task that builds the run report and publishes it as artifacts.

It loads each architecture's outcome from the bucket (a reused model from the run that trained
it), builds the report with `dermflow.evaluation.report`, and writes it under the run.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from dermflow import layout
from tasks.common import object_store, retry_unless_permanent, settings


def _load_arch_result(store, run_id: str, outcome: dict):
    """An `ArchResult` from what the training run stored (keys only travel between tasks)."""
    import numpy as np

    from dermflow.evaluation.report import ArchResult, Predictions, predictions_from_npz

    arch = outcome["architecture"]
    if outcome.get("status") != "ok":
        return ArchResult(status="failed", error=outcome.get("error") or "unknown error")
    source_run = outcome.get("run_id", run_id)  # a reused model lives under its own run
    params = store.get_json(layout.model_key(source_run, arch, "params.json"))
    history = store.get_json(layout.model_key(source_run, arch, "history.json"))
    splits = predictions_from_npz(store.get_bytes(layout.model_key(source_run, arch, "predictions.npz")))
    class_names = list(params["class_names"])
    # training writes an empty npz when the test split had no rows
    empty = Predictions(y_true=np.zeros(0, dtype=int), y_prob=np.zeros((0, len(class_names))),
                        fitzpatrick_range=np.zeros(0, dtype=str))
    return ArchResult.from_predictions(class_names, test=splits.get("test", empty),
                                       verified_test=splits.get("verified_test"), history=history,
                                       seconds=outcome.get("seconds"), placement=placement_of(params))


def placement_of(params: dict) -> dict | None:
    """Where a model trained and how fast, from its params.json (None for an older model)."""
    device = params.get("device")
    if not device:
        return None
    throughput = params.get("throughput") or {}
    shown = ", ".join(device.get("data_parallel_devices") or device.get("devices") or [])
    parallel = " (data parallel)" if device.get("data_parallel_devices") else ""
    fallback = " — CPU fallback" if device.get("warnings") else ""
    return {"device": f"{device.get('backend')}: {shown}{parallel}{fallback}", "backend": device.get("backend"),
            "devices": device.get("devices"), "warnings": device.get("warnings") or [],
            "train_images_per_second": throughput.get("train_images_per_second"),
            "inference_images_per_second": throughput.get("inference_images_per_second"),
            "oom_retry": params.get("oom_retry")}


def _best_model_saliency(store, run_id: str, outcomes: list[dict]):
    """md5hash -> Grad-CAM heatmap of the best model (for its predicted class), or None. The
    maps were computed by the model's `derm-train` run on its trainer (this process runs no
    model: it sees no GPU)."""
    ok = [o for o in outcomes if o.get("status") == "ok" and o.get("test")]
    if not ok:
        return None
    from dermflow.evaluation.saliency_store import load_example_saliency

    best = max(ok, key=lambda o: o["test"]["weighted_f1"])
    maps = load_example_saliency(store, best.get("run_id", run_id), best["architecture"])
    if maps is None:
        get_run_logger().warning("no Grad-CAM maps stored for %s: the report shows no overlay", best["architecture"])
        return None
    return maps.get


def _publish_artifacts(store, run_id: str, report) -> None:
    """The summary, the architectures table and a link to the page, in the Prefect UI."""
    report_key = layout.report_key(run_id)
    create_markdown_artifact(report.summary_markdown, key="derm-report-summary",
                             description=f"dermflow run {run_id}")
    if report.table_rows:
        create_table_artifact(report.table_rows, key="derm-architectures",
                              description=f"test metrics per architecture, run {run_id}")
    link = store.presign(report_key) or store.uri(report_key)
    create_link_artifact(link, link_text=f"report {run_id}", key="derm-report",
                         description=store.uri(report_key))


@task(name="build-report", retries=1, retry_condition_fn=retry_unless_permanent)
def build_and_store_report(
    run_id: str,
    params: dict,
    data_summary: dict,
    outcomes: list[dict],
    tuning_trials: list[dict] | None = None,
    retrain_decision: dict | None = None,
) -> dict:
    """Report HTML, figures and metrics.json under `runs/<run_id>/`; Prefect artifacts. Every
    URL in the parameters, the data summary and the outcomes is redacted first (all of them end
    up in the page, metrics.json and the artifacts)."""
    from dermflow.evaluation.report import ReportInputs, build_report, write_report
    from dermflow.ingestion.guard import redact_values

    store = object_store()
    report_key = layout.report_key(run_id)
    params, data_summary, outcomes = redact_values(params), redact_values(data_summary), redact_values(outcomes)
    inputs = ReportInputs(
        run_id=run_id,
        params=params,
        data_summary=data_summary,
        architectures={o["architecture"]: _load_arch_result(store, run_id, o) for o in outcomes},
        tuning_trials=tuning_trials,
        retrain_decision=retrain_decision,
        load_image=lambda md5: store.get_bytes(layout.image_key(md5)),
        saliency=_best_model_saliency(store, run_id, outcomes),
    )
    report = build_report(inputs, report_uri=store.uri(report_key))
    keys = write_report(report, store, run_id)
    _publish_artifacts(store, run_id, report)
    get_run_logger().info("report: %s", store.uri(report_key))
    return {"report_key": report_key, "metrics_key": layout.run_metrics_key(run_id), **keys,
            "best_architecture": report.metrics.get("best_architecture")}
