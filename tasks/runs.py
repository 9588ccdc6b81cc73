"""Prefect tasks around a run: its parameters, training subflows' outcomes, the data summary."""

from __future__ import annotations

from prefect import get_run_logger, task

from dermflow.layout import checkpoint_state_key, model_key, run_params_key
from tasks.common import object_store


@task(name="record-params")
def record_params(run_id: str, params: dict) -> str:
    """`params` at the run's params key, every URL's credentials redacted."""
    from dermflow.ingestion.guard import redact_values

    return object_store().put_json(run_params_key(run_id), redact_values(params))


@task(name="collect-training-outcome")
def training_outcome(run_id: str, architecture: str, state_name: str, state_message: str | None,
                     completed: bool) -> dict:
    """What a training subflow left in the bucket, or why it failed (it never stops the others)."""
    store = object_store()
    key = model_key(run_id, architecture, "metrics.json")
    if completed and store.exists(key):
        metrics = store.get_json(key)
        state_key = checkpoint_state_key(run_id, architecture)
        summary = (store.get_json(state_key).get("summary") or {}) if store.exists(state_key) else {}
        return {"architecture": architecture, "status": "ok", "run_id": run_id,
                "test": metrics.get("test"), "verified_test": metrics.get("verified_test"),
                "model_key": model_key(run_id, architecture), "seconds": summary.get("seconds")}
    reason = state_message or state_name
    get_run_logger().warning("%s failed: %s", architecture, reason)
    return {"architecture": architecture, "status": "failed", "error": f"{state_name}: {reason}"}


def data_summary(dataset: dict | None, fetched: dict, split: dict) -> dict:
    """Rows, fetch outcomes and split summary in one dict for the report and metrics.json."""
    summary = {"rows": (dataset or {}).get("rows"), "labels": (dataset or {}).get("labels"),
               "fetch": fetched.get("summary"), "fetch_manifest": fetched.get("manifest_key"),
               "split_key": split.get("split_key"), "split_reused": split.get("reused")}
    summary.update(split.get("summary") or {})
    return summary


@task(name="record-run-config")
def record_run_config(run_id: str, config: dict, resolved: dict) -> str:
    """The run's resolved configuration (`RunConfig.model_dump()`) and what was derived from it
    (final epochs, deadline), at the run's params key, with every URL's credentials redacted.
    When redaction changed anything, the configuration as given goes to the private object
    `layout.private_run_config_key(run_id)` (never shown) so the run can be replayed."""
    from dermflow import layout
    from dermflow.ingestion.guard import redact_values

    store = object_store()
    stored = {"run_id": run_id, "config": config, "resolved": resolved}
    redacted = redact_values(stored)
    if redacted != stored:
        store.put_json(layout.private_run_config_key(run_id), stored)
    return store.put_json(layout.run_params_key(run_id), redacted)


@task(name="resolve-run-config")
def resolve_run_config(given: dict, passed: list[str] | None) -> dict:
    """The flat parameters this run uses: `given` (the flow's parameters), with the saved
    configuration it takes underneath (`dermflow.registry.configs`: a named one, or in mode
    retrain the champion's run's). Returns `{"parameters", "source"}`; logs which it took."""
    from dermflow.registry.configs import resolve_parameters, saved_config_for

    saved = saved_config_for(object_store(), given["mode"], given.get("config"))
    parameters = resolve_parameters(given, saved["parameters"] if saved else None, passed)
    source = saved["source"] if saved else "the run's own parameters"
    changed = sorted(k for k in parameters if parameters[k] != given.get(k))
    get_run_logger().info("parameters from %s%s", source, f" (taken from it: {', '.join(changed)})" if changed else "")
    return {"parameters": parameters, "source": source}


@task(name="report-partial-failure")
def report_partial_failure(run_id: str, failed: list[dict], total: int) -> str:
    """Make a run where some architectures failed visible: a warning, a markdown artifact of
    the failures, and the `dermflow.run.partial-failure` event that the alert automation of
    `dermflow up` posts to DERMFLOW_ALERT_WEBHOOK. Returns the one-line summary."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.events import emit_event

    from dermflow.runs import PARTIAL_FAILURE_EVENT, partial_failure_markdown, partial_failure_summary

    summary = partial_failure_summary(run_id, failed, total)
    get_run_logger().warning("partial failure: %s", summary)
    create_markdown_artifact(markdown=partial_failure_markdown(run_id, failed, total),
                             key=f"partial-failure-{run_id}"[:100], description=summary[:500])
    emit_event(
        PARTIAL_FAILURE_EVENT,
        resource={"prefect.resource.id": f"dermflow.run.{run_id}", "prefect.resource.name": run_id},
        payload={"run_id": run_id, "total": total, "summary": summary,
                 "failed": [{"architecture": o["architecture"], "error": o.get("error")} for o in failed]},
    )
    return summary
