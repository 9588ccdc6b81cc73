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



def test_the_commands_reach_a_real_server(harness, bucket, monkeypatch, capsys):
    """`dermflow schedule show --json` and `dermflow runs --json` through their own client of the
    API named by the settings (PREFECT_API_URL), against the harness's server."""
    import json

    from prefect.settings import PREFECT_API_URL

    from dermflow.ops import cli
    from dermflow.registry.configs import save_named_config
    from dermflow.settings import get_settings

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    monkeypatch.delenv("PREFECT_API_AUTH_STRING", raising=False)
    get_settings.cache_clear()
    try:
        assert cli.main(["runs", "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == {"prefect_reachable": True, "runs": []}
        save_named_config(bucket, "weekly", {"epochs": 2}, source="test")  # what the other test chose
        code = cli.main(["schedule", "show", "--json"])
        out, err = capsys.readouterr()
    finally:
        get_settings.cache_clear()
    # the retrain is registered when the other test of this module ran first; else a clear error
    if code == 0:
        assert json.loads(out)["deployment"] == "derm/retrain" and json.loads(out)["parameters"]["epochs"] == 2
    else:
        assert code == 1 and "dermflow up" in err
