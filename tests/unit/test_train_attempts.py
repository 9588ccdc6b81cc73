"""`derm` recovers a training that crashed or failed (issue 14, finding 16b), without a server.

`run_deployment` is replaced by a fake that keeps child runs by idempotency key, as the Prefect
server does: the same key returns the same run in its final state.
"""

import asyncio
from types import SimpleNamespace

import pytest
from prefect.states import Completed, Crashed, Failed

import flows.derm as derm

pytestmark = pytest.mark.unit


class FakeServer:
    """Child runs by idempotency key; `outcomes` are the states new runs end in, in order."""

    def __init__(self, outcomes):
        self.outcomes = list(outcomes)
        self.runs: dict[str, SimpleNamespace] = {}
        self.calls: list[str] = []

    async def run_deployment(self, name, parameters, flow_run_name, idempotency_key, timeout, as_subflow):
        assert name == derm.TRAIN_DEPLOYMENT and parameters["architecture"] == "baseline_cnn"
        self.calls.append(idempotency_key)
        if idempotency_key not in self.runs:
            self.runs[idempotency_key] = SimpleNamespace(name=flow_run_name, state=self.outcomes.pop(0))
        return self.runs[idempotency_key]


def _train(monkeypatch, server: FakeServer, run_count: int) -> list[dict]:
    monkeypatch.setattr(derm, "run_deployment", server.run_deployment)
    monkeypatch.setattr(derm, "current_flow_run", SimpleNamespace(run_count=run_count, id="parent", name="p"))
    monkeypatch.setattr(derm, "get_run_logger", lambda: SimpleNamespace(warning=lambda *a, **k: None))
    monkeypatch.setattr(derm, "training_outcome", lambda run_id, arch, name, message, completed: {
        "architecture": arch, "status": "ok" if completed else "failed", "error": None if completed else name})
    jobs = {"baseline_cnn": {"epochs": 3}}
    return asyncio.run(derm._train_all(jobs, "manifests/split.csv", "20260101-000000-x", "parent"))


def test_a_crashed_training_is_started_again_and_completes(monkeypatch):
    server = FakeServer([Crashed(message="SIGKILL"), Completed()])
    [outcome] = _train(monkeypatch, server, run_count=1)
    assert outcome["status"] == "ok"
    assert len(set(server.calls)) == 2  # a new attempt, not the crashed run again


def test_attempts_are_bounded_per_run_of_the_parent(monkeypatch):
    server = FakeServer([Crashed(), Failed()] * 3)
    [outcome] = _train(monkeypatch, server, run_count=1)
    assert outcome["status"] == "failed"
    assert len(server.runs) == derm.TRAIN_ATTEMPTS


def test_a_retried_parent_starts_new_attempts_for_a_crashed_child(monkeypatch):
    server = FakeServer([Crashed(), Crashed(), Completed()])
    [first] = _train(monkeypatch, server, run_count=1)
    assert first["status"] == "failed"
    [second] = _train(monkeypatch, server, run_count=2)  # the UI's Retry: same parent id, run count 2
    assert second["status"] == "ok"
    assert len(server.runs) == 3


def test_a_retried_parent_reuses_a_completed_child(monkeypatch):
    server = FakeServer([Completed()])
    _train(monkeypatch, server, run_count=1)
    [again] = _train(monkeypatch, server, run_count=2)
    assert again["status"] == "ok"
    assert len(server.runs) == 1 and server.calls == [server.calls[0]] * 2
