"""`dermflow schedule` against a fake Prefect client: show, set, pause, resume, and keeping what
the user set across `dermflow up` (whose `prefect deploy` recreates schedules and parameters)."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import pytest
from prefect.exceptions import ObjectNotFound

from dermflow import layout
from dermflow.config import RunConfig
from dermflow.ops import schedule
from dermflow.registry.configs import read_named_config
from dermflow.registry.entries import label_set_id, now_iso, record_champion
from tests.support.memory_s3 import memory_store

pytestmark = pytest.mark.unit


class FakeClient:
    """The deployment calls `dermflow.ops.schedule` makes, on one `derm/retrain` deployment."""

    def __init__(self, parameters=None, active=False, paused=False, exists=True):
        self.deployment = SimpleNamespace(id=uuid.uuid4(), paused=paused,
                                          parameters=dict(parameters or {"mode": "retrain", "config": None}))
        self.schedules = [SimpleNamespace(id=uuid.uuid4(), active=active,
                                          schedule=SimpleNamespace(cron="0 3 * * 1", timezone="UTC"))]
        self.exists = exists
        self.automations = []

    def read_automations_by_name(self, name):
        return [a for a in self.automations if a.name == name]

    def pause_automation(self, automation_id):
        [target] = [a for a in self.automations if a.id == automation_id]
        target.enabled = False

    def resume_automation(self, automation_id):
        [target] = [a for a in self.automations if a.id == automation_id]
        target.enabled = True

    def read_deployment_by_name(self, name):
        if not self.exists or name != schedule.RETRAIN:
            raise ObjectNotFound(http_exc=Exception(name))
        return SimpleNamespace(**vars(self.deployment))

    def read_deployment_schedules(self, deployment_id):
        assert deployment_id == self.deployment.id
        return [SimpleNamespace(**vars(s)) for s in self.schedules]

    def update_deployment_schedule(self, deployment_id, schedule_id, active=None):
        [target] = [s for s in self.schedules if s.id == schedule_id]
        target.active = active

    def resume_deployment(self, deployment_id):
        self.deployment.paused = False

    def update_deployment(self, deployment_id, update):
        data = update.model_dump(exclude_unset=True)
        self.deployment.parameters = data.get("parameters", self.deployment.parameters)

    def redeploy(self):
        """What `prefect deploy` does from deployments/prefect.yaml: schedule off, YAML parameters."""
        self.schedules[0].active = False
        self.deployment.parameters = {"mode": "retrain", "config": None}


def _run(store, run_id, **parameters):
    config = RunConfig.from_parameters(**parameters).model_dump(mode="json")
    store.put_json(layout.run_params_key(run_id), {"run_id": run_id, "resolved": {}, "config": config})


def _champion(store, run_id):
    record_champion(store, {"label_set_id": label_set_id(["a", "b"]), "run_id": run_id, "arch": "baseline_cnn",
                            "promoted_at": now_iso()}, None)


def test_show_says_paused_and_the_champions_parameters():
    store, client = memory_store(), FakeClient()
    state = schedule.schedule_state(client, store)
    assert not state["active"] and state["schedules"][0]["cron"] == "0 3 * * 1"
    assert state["source"].startswith("the defaults") and state["parameters"]["image_size"] == 256
    _run(store, "20261102-100000-champ", csv="s3://b/rows.csv", image_size=64)
    _champion(store, "20261102-100000-champ")
    state = schedule.schedule_state(client, store)
    assert "20261102-100000-champ" in state["source"] and state["parameters"]["csv"] == "s3://b/rows.csv"
    assert state["parameters"]["mode"] == "retrain" and "PAUSED" in schedule.render_state(state)


def test_resume_turns_the_schedule_on_and_unpauses_pause_turns_it_off():
    client = FakeClient(paused=True)
    schedule.set_active(client, True)
    assert client.schedules[0].active and not client.deployment.paused
    assert schedule.schedule_state(client, memory_store())["active"]
    schedule.set_active(client, False)
    assert not client.schedules[0].active


def test_the_missing_retrain_alert_follows_the_schedule():
    """A schedule the user never turned on expects no retrain: its missing-retrain alert is off."""
    from dermflow.ops.alerts import FAILED_AUTOMATION, MISSING_AUTOMATION

    client = FakeClient()
    missing = SimpleNamespace(id=uuid.uuid4(), name=MISSING_AUTOMATION, enabled=False)
    failed = SimpleNamespace(id=uuid.uuid4(), name=FAILED_AUTOMATION, enabled=True)
    client.automations = [missing, failed]
    schedule.set_active(client, True)
    assert missing.enabled and failed.enabled
    schedule.set_active(client, False)
    assert not missing.enabled and failed.enabled


def test_set_from_a_run_stores_a_named_configuration_and_shows_it_in_the_deployment():
    store, client = memory_store(), FakeClient()
    _run(store, "20261102-100000-brave-otter", csv="s3://b/mine.csv", image_size=96, epochs=4)
    state = schedule.set_config(client, store, "mine", from_run="brave-otter",
                                overrides=schedule.parse_overrides(["epochs=6", 'architectures=["vgg16"]']))
    stored = read_named_config(store, "mine")
    assert stored["parameters"]["csv"] == "s3://b/mine.csv" and stored["parameters"]["epochs"] == 6
    shown = client.deployment.parameters
    assert shown["config"] == "mine" and shown["mode"] == "retrain"
    assert (shown["image_size"], shown["epochs"], shown["architectures"]) == (96, 6, ["vgg16"])
    assert state["parameters"]["epochs"] == 6 and state["source"] == "config mine"
    # choosing a stored configuration by name keeps its parameters (and changes only what -p says)
    schedule.set_config(client, store, champion=True)
    schedule.set_config(client, store, "mine", overrides={"batch_size": 16})
    assert read_named_config(store, "mine")["parameters"]["csv"] == "s3://b/mine.csv"
    assert (client.deployment.parameters["epochs"], client.deployment.parameters["batch_size"]) == (6, 16)
    with pytest.raises(Exception, match="image_size"):
        schedule.set_config(client, store, "bad", overrides={"image_size": 8})
    with pytest.raises(schedule.ScheduleError, match="own parameters"):
        schedule.set_config(client, store, overrides={"mode": "full"})


def test_set_champion_goes_back_to_the_champions_configuration():
    store, client = memory_store(), FakeClient(parameters={"mode": "retrain", "config": "x", "epochs": 3})
    schedule.set_config(client, store, champion=True)
    assert client.deployment.parameters == {"mode": "retrain", "config": None}


def test_up_keeps_a_resumed_schedule_on_and_the_chosen_parameters():
    store, client = memory_store(), FakeClient()
    schedule.set_active(client, True)
    schedule.set_config(client, store, "weekly", overrides={"image_size": 128})
    chosen = dict(client.deployment.parameters)
    snapshot = schedule.snapshot_retrain(client)
    client.redeploy()
    schedule.restore_retrain(client, snapshot)
    assert client.schedules[0].active and client.deployment.parameters == chosen
    # paused stays paused
    schedule.set_active(client, False)
    snapshot = schedule.snapshot_retrain(client)
    client.redeploy()
    schedule.restore_retrain(client, snapshot)
    assert not client.schedules[0].active
    # the first deploy: nothing to restore, the YAML's schedule (off) holds
    assert schedule.snapshot_retrain(FakeClient(exists=False)) is None


def test_overrides_parse_like_prefect_and_bad_ones_are_refused():
    assert schedule.parse_overrides(["epochs=3", "csv=/x.csv", "images=null", "tune=true"]) == {
        "epochs": 3, "csv": "/x.csv", "images": None, "tune": True}
    with pytest.raises(schedule.ScheduleError, match="KEY=VALUE"):
        schedule.parse_overrides(["epochs"])


def test_the_command_says_in_one_line_when_prefect_does_not_answer(bucket, monkeypatch, capsys):
    from dermflow.ops import cli
    from dermflow.settings import get_settings

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing listens there
    get_settings.cache_clear()
    try:
        assert cli.main(["schedule", "show"]) == 1
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err
    assert "does not answer" in err and "dermflow up" in err
