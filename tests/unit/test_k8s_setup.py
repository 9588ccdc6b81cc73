"""`dermflow k8s setup` against a temporary Prefect server: the Kubernetes pool with the
project's base job template, the `gpu` queue limited to the GPUs (no pod requested beyond
them), the `gpu` global limit of the same size; rerunning it resizes instead of failing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _read(pool: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        work_pool = client.read_work_pool(pool)
        queues = {q.name: q.concurrency_limit for q in client.read_work_queues(work_pool_name=pool)}
        limit = client.read_global_concurrency_limit_by_name("gpu").limit
    return work_pool, queues, limit


def test_setup_creates_and_then_resizes_the_pool_queues_and_limit(harness, capsys):
    from dermflow.ops.cli import main

    pool = "dermflow-k8s-test"
    template = ROOT / "deployments" / "k8s" / "base-job-template.json"
    assert main(["k8s", "setup", "--gpus", "3", "--pool", pool, "--base-job-template", str(template)]) == 0
    assert json.loads(capsys.readouterr().out)["queues"] == {"default": None, "gpu": 3}
    work_pool, queues, limit = _read(pool)
    assert work_pool.type == "kubernetes"
    assert work_pool.base_job_template == json.loads(template.read_text())
    assert queues["gpu"] == 3 and queues["default"] is None and limit == 3

    assert main(["k8s", "setup", "--gpus", "5", "--pool", pool, "--base-job-template", str(template)]) == 0
    _, queues, limit = _read(pool)
    assert queues["gpu"] == 5 and limit == 5


def test_setup_refuses_zero_gpus_and_a_missing_template(harness, tmp_path, capsys):
    from dermflow.ops.cli import main

    assert main(["k8s", "setup", "--gpus", "0", "--pool", "p0"]) == 1
    assert "--gpus must be at least 1" in capsys.readouterr().err
    assert main(["k8s", "setup", "--gpus", "1", "--pool", "p1", "--base-job-template", str(tmp_path / "x.json")]) == 1
    assert "no base job template" in capsys.readouterr().err
