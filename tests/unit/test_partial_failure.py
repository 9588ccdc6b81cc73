"""A `derm` run where some architectures failed and others trained (issue 15): it completes,
with a warning, a markdown artifact of the failures and the `dermflow.run.partial-failure`
event that the alert automation posts to the webhook. Stages are stubbed; the flow runs under
`prefect_test_harness`. Also the retrain period the "no retrain completed" alert waits for."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from types import SimpleNamespace

import pytest

from dermflow.runs import PARTIAL_FAILURE_EVENT, partial_failure_markdown, partial_failure_summary

pytestmark = pytest.mark.unit

FAILED = [{"architecture": "vgg16", "status": "failed", "error": "Crashed: out of | memory"}]
OK = [{"architecture": "baseline_cnn", "status": "ok", "run_id": "r"}]


def test_the_summary_and_markdown_name_each_failure_and_its_reason():
    assert partial_failure_summary("run-1", FAILED, 2) == \
        "run run-1: 1 of 2 architecture(s) failed (vgg16: Crashed: out of | memory)"
    markdown = partial_failure_markdown("run-1", FAILED, 2)
    assert "| vgg16 | Crashed: out of \\| memory |" in markdown and "1 of 2" in markdown


def _stub_stages(monkeypatch, outcomes):
    import flows.derm as derm_module

    async def train(config, split, run_id, train_params, hyperparameters):
        return outcomes

    monkeypatch.setattr(derm_module, "record_run_config", lambda *a, **k: None)
    monkeypatch.setattr(derm_module, "ingest_and_fetch", lambda config, run_id: (
        {}, {"summary": {"ok": 1, "rows": 1, "by_reason": {}}, "hash": "f"}))
    monkeypatch.setattr(derm_module, "split_fetched", lambda config, fetched: {"split_key": "k", "hash": "h"})
    monkeypatch.setattr(derm_module, "train_architectures", train)
    monkeypatch.setattr(derm_module, "promote_if_better", lambda *a: None)
    monkeypatch.setattr(derm_module, "build_and_store_report", lambda *a, **k: {"report_key": "k"})
    monkeypatch.setattr(derm_module, "apply_retention", lambda: None)
    monkeypatch.setattr(derm_module, "mark_run_active", lambda run_id: None)
    monkeypatch.setattr(derm_module, "mark_run_finished", lambda run_id: None)
    return derm_module


async def _artifacts_and_events(run_id: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.events.filters import EventFilter, EventNameFilter

    async with get_client() as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"partial-failure-{run_id}"])))
        events = []
        for _ in range(60):  # events are written by the server's event persister, shortly after
            page = await client.read_events(EventFilter(event=EventNameFilter(name=[PARTIAL_FAILURE_EVENT])),
                                            limit=50)  # the API's most (the client's default is 100)
            events = [e for e in page.events if e.payload.get("run_id") == run_id]
            if events:
                break
            await asyncio.sleep(0.5)
    return artifacts, events


def test_a_partly_failed_run_completes_with_an_artifact_and_the_alert_event(harness, monkeypatch):
    derm_module = _stub_stages(monkeypatch, OK + FAILED)
    result = asyncio.run(derm_module.derm(mode="full", architectures=["baseline_cnn", "vgg16"]))
    assert result["failed"] == ["vgg16"]
    artifacts, events = asyncio.run(_artifacts_and_events(result["run_id"]))
    assert len(artifacts) == 1 and "| vgg16 | Crashed: out of \\| memory |" in artifacts[0].data
    assert len(events) == 1, events
    assert events[0].payload["failed"] == [{"architecture": "vgg16", "error": "Crashed: out of | memory"}]
    assert events[0].resource.id == f"dermflow.run.{result['run_id']}"


def test_a_run_where_everything_trained_raises_no_alert(harness, monkeypatch):
    import flows.derm as derm_module

    called = []
    monkeypatch.setattr(derm_module, "report_partial_failure", lambda *a: called.append(a))
    _stub_stages(monkeypatch, OK)
    result = asyncio.run(derm_module.derm(mode="full", architectures=["baseline_cnn"]))
    assert result["failed"] == [] and called == []


def test_the_retrain_period_comes_from_the_deployments_schedule():
    from dermflow.ops.alerts import DEFAULT_PERIOD, retrain_period

    weekly = SimpleNamespace(schedules=[SimpleNamespace(schedule=SimpleNamespace(
        cron="0 3 * * 1", timezone="UTC", interval=None))])
    daily = SimpleNamespace(schedules=[SimpleNamespace(schedule=SimpleNamespace(interval=timedelta(days=1)))])
    assert retrain_period(weekly) == timedelta(days=7)
    assert retrain_period(daily) == timedelta(days=1)
    assert retrain_period(SimpleNamespace(schedules=[])) == DEFAULT_PERIOD
