"""Run ids are validated at every entry point before they become a bucket key or a local path."""

from __future__ import annotations

import pytest

from dermflow.ops import cli


def test_report_of_a_traversing_run_id_is_a_clear_error_without_touching_the_store(monkeypatch, capsys):
    # An endpoint nothing listens on: reaching the store would be a botocore connection error.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    cli.get_settings.cache_clear()
    try:
        assert cli.main(["report", "../x"]) == 1
    finally:
        cli.get_settings.cache_clear()
    err = capsys.readouterr().err
    assert "invalid run '../x'" in err
    assert "Traceback" not in err and "botocore" not in err.lower()


@pytest.mark.parametrize("reference", ["../x", "runs/../../x", "a/b", "", "X" * 300])
def test_bad_run_references_are_refused(reference):
    from dermflow.runs import InvalidRunId, check_run_reference

    with pytest.raises(InvalidRunId):
        check_run_reference(reference)


@pytest.mark.parametrize("reference", ["20261126-101500-brave-otter", "brave-otter", "runs/20261126-101500-brave-otter/"])
def test_good_run_references_pass(reference):
    from dermflow.runs import check_run_reference

    assert check_run_reference(reference) == reference


@pytest.mark.parametrize("run_id", ["20261126-101500-ok\n", "../20261126-101500-ok", "brave-otter"])
def test_check_run_id_wants_the_whole_pattern(run_id):
    from dermflow.runs import InvalidRunId, check_run_id

    with pytest.raises(InvalidRunId):
        check_run_id(run_id)


def test_train_architecture_refuses_a_run_id_that_leaves_the_cache(tmp_path):
    from dermflow.config import TrainConfig
    from dermflow.modeling.train import train_architecture
    from dermflow.runs import InvalidRunId
    from dermflow.settings import load_settings

    settings = load_settings(cache_dir=tmp_path / "cache")
    with pytest.raises(InvalidRunId):
        train_architecture(None, "manifests/split-x.csv", TrainConfig(weights="none"), "../../escape", settings)
    assert not (tmp_path / "escape").exists()


def test_derm_train_flow_refuses_a_bad_run_id_before_taking_a_slot(monkeypatch):
    import flows.train as train_flow
    from dermflow.runs import InvalidRunId

    def no_slot(*args, **kwargs):
        raise AssertionError("the gpu slot was requested for an invalid run id")

    monkeypatch.setattr(train_flow, "concurrency", no_slot)
    with pytest.raises(InvalidRunId):
        train_flow.derm_train.fn(architecture="baseline_cnn", split_key="manifests/split-x.csv", run_id="../../x")


def test_fetch_and_tune_flows_refuse_a_bad_run_id():
    import asyncio

    from dermflow.runs import InvalidRunId
    from flows.fetch import fetch_images
    from flows.tune import tune_architecture

    with pytest.raises(InvalidRunId):
        fetch_images.fn("private/datasets/x.csv", "../../x")
    with pytest.raises(InvalidRunId):
        asyncio.run(tune_architecture.fn(architecture="baseline_cnn", split_key="manifests/split-x.csv",
                                         run_id="../x"))


def test_a_tuning_id_cannot_leave_the_tuning_directory():
    from dermflow.modeling.tuning import SearchSpec, TuningError

    base = dict(architecture="baseline_cnn", num_classes=3, directory="/tmp/tuning")
    for bad in ("../escape", "a/b", "/abs", ""):
        with pytest.raises(TuningError, match="tuning_id"):
            SearchSpec.from_dict({**base, "tuning_id": bad})
    assert SearchSpec.from_dict({**base, "tuning_id": "baseline_cnn-random-0a1b2c3d4e5f"}).project_dir.parent.name == "tuning"
