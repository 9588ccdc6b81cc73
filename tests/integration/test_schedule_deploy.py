"""Against a real Prefect server (`prefect_test_harness`) and the real `prefect deploy`: the
retrain's schedule starts off, `prefect deploy` alone resets what the user set (schedule on,
parameters), and `dermflow up`'s registration puts it back (issue 15)."""

from __future__ import annotations

import os
import sys
import subprocess

import pytest
import yaml

from dermflow.ops import schedule
from dermflow.ops.lifecycle import register_deployments
from dermflow.settings import PROJECT_ROOT, load_settings

pytestmark = pytest.mark.integration


def _retrain_only(tmp_path):
    """deployments/prefect.yaml with only derm/retrain (one deployment deploys in seconds)."""
    declared = yaml.safe_load((PROJECT_ROOT / "deployments" / "prefect.yaml").read_text())
    declared["deployments"] = [d for d in declared["deployments"] if d["name"] == "retrain"]
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(declared))
    return path


def test_deploy_resets_the_retrain_schedule_and_up_keeps_it(harness, bucket, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL

    settings = load_settings()
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "DERMFLOW_PROJECT_ROOT": str(PROJECT_ROOT)}
    env.pop("PREFECT_API_AUTH_STRING", None)
    prefect_file = _retrain_only(tmp_path)
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=settings.work_pool, type="process"))
        except Exception:  # noqa: BLE001 - already there from another test of this module's harness
            pass
    register_deployments(settings, env, prefect_file)
    with get_client(sync_client=True) as client:
        assert not schedule.schedule_state(client, bucket)["active"]  # the first `make up`: off
        schedule.set_active(client, True)
        schedule.set_config(client, bucket, "weekly", overrides={"epochs": 2, "image_size": 128})

    deploy = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)]
    subprocess.run(deploy, cwd=PROJECT_ROOT, env=env, check=True, capture_output=True, text=True)
    with get_client(sync_client=True) as client:
        reset = schedule.schedule_state(client, bucket)
    assert not reset["active"] and reset["config"] is None  # what `prefect deploy` alone does

    with get_client(sync_client=True) as client:
        schedule.set_active(client, True)
        schedule.set_config(client, bucket, "weekly", overrides={"epochs": 2, "image_size": 128})
    register_deployments(settings, env, prefect_file)  # what `dermflow up` does
    with get_client(sync_client=True) as client:
        kept = schedule.schedule_state(client, bucket)
        assert kept["active"] and kept["config"] == "weekly"
        assert (kept["parameters"]["epochs"], kept["parameters"]["image_size"]) == (2, 128)
        schedule.set_active(client, False)
    register_deployments(settings, env, prefect_file)
    with get_client(sync_client=True) as client:
        assert not schedule.schedule_state(client, bucket)["active"]
