"""`dermflow runs`: the bucket's runs, newest first, with mode, best architecture, weighted F1
and the champion flag; the Prefect state when the API answers; and `report` by flow run name."""

from __future__ import annotations

import json

import pytest

from dermflow import layout
from dermflow.config import RunConfig
from dermflow.ops import cli, runlist
from dermflow.registry.entries import label_set_id, now_iso, record_champion

pytestmark = pytest.mark.unit


def _run(store, run_id, mode, scores: dict, failed=()):
    config = RunConfig.from_parameters(mode=mode).model_dump(mode="json")
    store.put_json(layout.run_params_key(run_id), {"run_id": run_id, "resolved": {}, "config": config})
    archs = {arch: {"status": "ok", "test": {"weighted_f1": f1, "accuracy": f1}} for arch, f1 in scores.items()}
    archs.update({arch: {"status": "failed", "error": "Crashed", "test": None} for arch in failed})
    store.put_json(layout.run_metrics_key(run_id), {"architectures": archs})
    store.put_bytes(layout.report_key(run_id), b"<html></html>")


@pytest.fixture
def runs_bucket(bucket, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing listens there
    _run(bucket, "20261101-100000-brave-otter", "full", {"baseline_cnn": 0.31, "vgg16": 0.42}, failed=["vgg19"])
    _run(bucket, "20261108-030000-calm-heron", "retrain", {"baseline_cnn": 0.35})
    record_champion(bucket, {"label_set_id": label_set_id(["a", "b"]), "run_id": "20261101-100000-brave-otter",
                             "arch": "vgg16", "promoted_at": now_iso()}, None)
    bucket.put_json(layout.run_active_key("20261109-120000-late-owl"), {"started": 1})
    return bucket


def test_runs_json_lists_the_runs_newest_first_with_scores_and_the_champion(runs_bucket, capsys):
    from dermflow.settings import get_settings

    get_settings.cache_clear()
    assert cli.main(["runs", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["prefect_reachable"] is False
    rows = {row["flow_run_name"]: row for row in listing["runs"]}
    assert [row["run_id"] for row in listing["runs"]] == ["20261109-120000-late-owl", "20261108-030000-calm-heron",
                                                          "20261101-100000-brave-otter"]
    otter = rows["brave-otter"]
    assert (otter["mode"], otter["best_architecture"], otter["weighted_f1"]) == ("full", "vgg16", 0.42)
    assert otter["champion"] == ["vgg16"] and otter["failed_architectures"] == ["vgg19"] and otter["state"] is None
    assert rows["calm-heron"]["mode"] == "retrain" and rows["calm-heron"]["champion"] == []
    assert rows["late-owl"]["in_progress"] and rows["late-owl"]["best_architecture"] is None
    get_settings.cache_clear()


def test_runs_table_shows_the_prefect_state_when_it_answers(runs_bucket, monkeypatch, capsys):
    monkeypatch.setattr(runlist, "flow_run_states", lambda settings, names: {"brave-otter": "Completed"})
    assert cli.main(["runs"]) == 0
    out = capsys.readouterr().out
    otter = next(line for line in out.splitlines() if "brave-otter" in line)
    assert "Completed" in otter and "vgg16" in otter and "0.4200" in otter and otter.rstrip().endswith("vgg16")
    assert "not reachable" not in out


def test_report_accepts_the_flow_run_name_as_predict_does(runs_bucket, capsys):
    assert cli.main(["report", "calm-heron", "--json"]) == 0
    assert "baseline_cnn" in json.loads(capsys.readouterr().out)["architectures"]
    assert cli.main(["report", "no-such-run"]) == 1
    assert "neither a run id nor a flow run name" in capsys.readouterr().err
