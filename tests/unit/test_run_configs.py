"""Saved run configurations (issue 15): a retrain takes the configuration of the run that
produced the current champion, or a named one; parameters given explicitly win."""

from __future__ import annotations

import asyncio
import csv
import hashlib
from pathlib import Path

import pytest

from dermflow import layout
from dermflow.config import RUN_DEFAULTS, RunConfig
from dermflow.registry.configs import (
    ConfigError,
    list_named_configs,
    read_named_config,
    resolve_parameters,
    run_parameters,
    save_named_config,
    saved_config_for,
)
from dermflow.registry.entries import label_set_id, now_iso, record_champion

pytestmark = pytest.mark.unit

COLUMNS = ["md5hash", "fitzpatrick_scale", "fitzpatrick_centaur", "label", "nine_partition_label",
           "three_partition_label", "qc", "url", "url_alphanum"]


def _csv_without_urls(path: Path, rows: int = 6) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for index in range(rows):
            writer.writerow({"md5hash": hashlib.md5(str(index).encode()).hexdigest(), "fitzpatrick_scale": 1,
                             "fitzpatrick_centaur": 1, "label": f"condition {index % 2}", "nine_partition_label": "x",
                             "three_partition_label": "y", "qc": "", "url": "", "url_alphanum": ""})
    return path


def _store_run(store, run_id: str, **parameters) -> None:
    config = RunConfig.from_parameters(**parameters)
    store.put_json(layout.run_params_key(run_id), {"run_id": run_id, "config": config.model_dump(mode="json"),
                                                   "resolved": {}})


def _make_champion(store, run_id: str) -> None:
    classes = ["condition 0", "condition 1"]
    record_champion(store, {"label_set_id": label_set_id(classes), "run_id": run_id, "arch": "baseline_cnn",
                            "promoted_at": now_iso()}, None)


def test_a_retrain_takes_the_champions_run_configuration(bucket):
    _store_run(bucket, "20261101-100000-old-run", csv="s3://b/old.csv", image_size=96)
    _store_run(bucket, "20261102-100000-champ", mode="full", csv="s3://b/rows.csv", image_size=64, epochs=3,
               architectures=["baseline_cnn", "vgg16"], limit_per_label=20)
    _make_champion(bucket, "20261102-100000-champ")

    saved = saved_config_for(bucket, "retrain", None)
    assert saved["run_id"] == "20261102-100000-champ"
    assert "mode" not in saved["parameters"] and "config" not in saved["parameters"]
    given = dict(RUN_DEFAULTS, mode="retrain")
    resolved = resolve_parameters(given, saved["parameters"])
    assert resolved["mode"] == "retrain" and resolved["csv"] == "s3://b/rows.csv"
    assert (resolved["image_size"], resolved["epochs"], resolved["limit_per_label"]) == (64, 3, 20)
    assert resolved["architectures"] == ["baseline_cnn", "vgg16"]
    # other modes keep their own parameters unless they name a configuration
    assert saved_config_for(bucket, "full", None) is None


def test_explicit_parameters_win_over_the_saved_configuration():
    saved = {"csv": "s3://b/rows.csv", "image_size": 64, "epochs": 3}
    given = dict(RUN_DEFAULTS, mode="retrain", image_size=128)
    # a direct call: a value other than the default counts as given
    resolved = resolve_parameters(given, saved)
    assert (resolved["image_size"], resolved["csv"], resolved["epochs"]) == (128, "s3://b/rows.csv", 3)
    # a deployment's run: exactly the names passed win, even at their default value
    given = dict(RUN_DEFAULTS, mode="retrain", epochs=None)
    resolved = resolve_parameters(given, saved, passed=["mode", "epochs"])
    assert (resolved["epochs"], resolved["image_size"]) == (None, 64)
    assert resolve_parameters(given, None) == given


def test_before_any_champion_a_retrain_keeps_its_own_parameters(bucket):
    assert saved_config_for(bucket, "retrain", None) is None


def test_a_run_given_urls_with_credentials_replays_them_from_its_private_copy(bucket):
    run_id = "20261102-100000-secret"
    _store_run(bucket, run_id, csv="https://x/rows.csv?token=%5BREDACTED%5D")
    private = RunConfig.from_parameters(csv="https://x/rows.csv?token=abc").model_dump(mode="json")
    bucket.put_json(layout.private_run_config_key(run_id), {"run_id": run_id, "config": private, "resolved": {}})
    assert run_parameters(bucket, run_id)["csv"] == "https://x/rows.csv?token=abc"


def test_named_configurations_are_stored_listed_and_validated(bucket):
    save_named_config(bucket, "weekly-small", {"image_size": 64, "mode": "full", "epochs": 2}, source="test")
    assert list_named_configs(bucket) == ["weekly-small"]
    record = read_named_config(bucket, "weekly-small")
    assert record["parameters"]["image_size"] == 64 and "mode" not in record["parameters"]
    assert saved_config_for(bucket, "full", "weekly-small")["parameters"]["epochs"] == 2
    with pytest.raises(ConfigError, match="saved: weekly-small"):
        read_named_config(bucket, "nope")
    with pytest.raises(ConfigError, match="image_size"):
        save_named_config(bucket, "bad", {"image_size": 8}, source="test")
    with pytest.raises(ValueError, match="invalid configuration name"):
        save_named_config(bucket, "../x", {}, source="test")


def test_a_retrain_flow_run_uses_the_champions_run_configuration(harness, bucket, tmp_path):
    """The whole flow: a retrain given no parameters records (and uses) the champion's run's
    CSV and sizes; the CSV has no image URLs, so the run stops at the split, after recording."""
    from flows.derm import PipelineError, derm

    rows = str(_csv_without_urls(tmp_path / "rows.csv"))
    _store_run(bucket, "20261102-100000-champ", csv=rows, image_size=64, epochs=2, limit_per_label=5)
    _make_champion(bucket, "20261102-100000-champ")
    with pytest.raises(PipelineError, match="too few to split"):
        asyncio.run(derm(mode="retrain", batch_size=8))
    [run_id] = [r for r in _run_ids(bucket) if r != "20261102-100000-champ"]
    used = RunConfig.model_validate(bucket.get_json(layout.run_params_key(run_id))["config"])
    # the champion's local CSV, staged into the bucket for the other hosts (dermflow.inputs)
    bucket_name, staged_key = used.data.csv.removeprefix("s3://").split("/", 1)
    assert used.data.csv.endswith("/rows.csv") and bucket.get_bytes(staged_key) == Path(rows).read_bytes()
    assert used.mode == "retrain" and used.data.limit_per_label == 5
    assert (used.training.image_size, used.training.epochs, used.training.batch_size) == (64, 2, 8)


def _run_ids(store) -> list[str]:
    from dermflow.registry.runs import list_runs

    return list_runs(store)
