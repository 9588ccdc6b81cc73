"""The registry's Prefect tasks without a stack: `.fn()` over the in-memory S3 store.

Covers the training reuse key, reuse of a previous training while its model exists, the
promotion decision of `promote_if_better` (champion pointer at the layout's key, and history),
and retention through its task.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from prefect.logging import disable_run_logger

import tasks.registry as registry_tasks
from dermflow.evaluation import promotion
from dermflow.layout import (
    champion_key,
    checkpoint_key,
    model_key,
    model_score_key,
    registered_model_key,
    training_record_key,
)
from dermflow.registry.entries import RegistryError, get_champion_history, label_set_id
from tasks.registry import promote_if_better, reusable_training, training_key
from tests.support.memory_s3 import memory_store

pytestmark = pytest.mark.unit

CLASSES = ["acne", "eczema", "psoriasis"]
PARAMS = {"image_size": 64, "epochs": 3, "batch_size": 16, "seed": 7, "deadline": "2026-11-26T10:00:00"}


@pytest.fixture
def store(monkeypatch):
    store = memory_store()
    monkeypatch.setattr(registry_tasks, "object_store", lambda: store)
    artifacts: list[str] = []
    monkeypatch.setattr(registry_tasks, "create_markdown_artifact", lambda text, **_: artifacts.append(text))
    store.artifacts = artifacts
    with disable_run_logger():
        yield store


def trained(store, run_id: str, arch: str, score: float) -> dict:
    """A training outcome as `tasks.runs.training_outcome` reports it, with the files training
    leaves (the model bytes are a stand-in)."""
    store.put_bytes(model_key(run_id, arch), b"stand-in model")
    store.put_json(model_key(run_id, arch, "params.json"),
                   {"class_names": CLASSES, "image_size": 64, "architecture": arch})
    return {"architecture": arch, "status": "ok", "run_id": run_id, "test": {"weighted_f1": score},
            "verified_test": None, "model_key": model_key(run_id, arch)}


def promote(run_id: str, outcomes: list[dict], split_hash: str = "split-a", **overrides):
    arguments = {"split_key": f"split-manifest-{split_hash}", "split_hash": split_hash, "manifest_hash": "m1",
                 "train_params": PARAMS, "mode": "full", **overrides}
    return promote_if_better.fn(run_id, outcomes, **arguments)


# --- the training reuse key -------------------------------------------------------------------
def test_same_split_and_params_give_the_same_key_whatever_the_deadline():
    key = training_key("split-a", "cnn", PARAMS)
    assert key == training_key("split-a", "cnn", dict(reversed(list(PARAMS.items()))))
    assert key == training_key("split-a", "cnn", {**PARAMS, "deadline": "2027-01-01T00:00:00"})
    assert len(key) == 16


@pytest.mark.parametrize("change", [{"image_size": 128}, {"epochs": 4}, {"batch_size": 32}, {"seed": 8},
                                    {"hyperparameters": {"lr": 0.001}}])
def test_any_changed_param_gives_another_key(change):
    assert training_key("split-a", "cnn", PARAMS) != training_key("split-a", "cnn", {**PARAMS, **change})


def test_another_split_or_architecture_gives_another_key():
    key = training_key("split-a", "cnn", PARAMS)
    assert key != training_key("split-b", "cnn", PARAMS)
    assert key != training_key("split-a", "resnet50", PARAMS)


def test_a_training_is_reused_only_while_its_model_exists(store):
    assert reusable_training.fn("split-a", "cnn", PARAMS) is None
    record = {"architecture": "cnn", "status": "ok", "run_id": "20261126-100000-calm-fox",
              "test": {"weighted_f1": 0.4}, "model_key": model_key("20261126-100000-calm-fox", "cnn")}
    store.put_json(training_record_key(training_key("split-a", "cnn", PARAMS)), record)
    assert reusable_training.fn("split-a", "cnn", PARAMS) is None  # no model.keras yet
    store.put_bytes(model_key("20261126-100000-calm-fox", "cnn"), b"stand-in model")
    assert reusable_training.fn("split-a", "cnn", PARAMS) == {**record, "reused": True}
    assert reusable_training.fn("split-a", "cnn", {**PARAMS, "epochs": 4}) is None
    store.delete_prefix(model_key("20261126-100000-calm-fox", "cnn"))
    assert reusable_training.fn("split-a", "cnn", PARAMS) is None


def test_promotion_records_what_a_retrain_reuses(store):
    outcome = trained(store, "20261126-100000-calm-fox", "cnn", 0.40)
    promote("20261126-100000-calm-fox", [{**outcome, "hyperparameters": None}])
    reused = reusable_training.fn("split-a", "cnn", {**PARAMS, "hyperparameters": None})
    assert reused["run_id"] == "20261126-100000-calm-fox" and reused["reused"]


# --- the promotion decision -------------------------------------------------------------------
def test_first_model_of_a_label_set_is_promoted_and_written_at_the_layout_keys(store):
    labels = label_set_id(CLASSES)
    decision = promote("20261126-100000-calm-fox", [trained(store, "20261126-100000-calm-fox", "cnn", 0.40)])
    assert decision["promoted"] and decision["champion_run"] is None
    assert "first model" in decision["reason"]
    pointer = store.get_json(champion_key(labels))
    assert (pointer["run_id"], pointer["arch"], pointer["score"]) == ("20261126-100000-calm-fox", "cnn", 0.40)
    assert [h["run_id"] for h in get_champion_history(store, labels)] == ["20261126-100000-calm-fox"]
    assert store.exists(registered_model_key("20261126-100000-calm-fox", "cnn"))
    assert "Promoted" in store.artifacts[-1]


def test_the_best_model_of_a_run_challenges_and_a_weaker_one_keeps_the_champion(store):
    labels = label_set_id(CLASSES)
    promote("20261126-100000-calm-fox", [trained(store, "20261126-100000-calm-fox", "cnn", 0.40)])
    outcomes = [trained(store, "20261126-110000-shy-owl", "cnn", 0.35),
                trained(store, "20261126-110000-shy-owl", "resnet50", 0.38),
                {"architecture": "vgg16", "status": "failed", "error": "Crashed: out of memory"}]
    decision = promote("20261126-110000-shy-owl", outcomes)
    assert not decision["promoted"] and "does not beat" in decision["reason"]
    assert (decision["challenger_arch"], decision["champion_score"]) == ("resnet50", 0.40)
    assert store.get_json(champion_key(labels))["run_id"] == "20261126-100000-calm-fox"
    assert len(get_champion_history(store, labels)) == 1
    assert "Kept champion" in store.artifacts[-1]
    # every trained model is registered, the failed one is not
    assert store.exists(registered_model_key("20261126-110000-shy-owl", "cnn"))
    assert not store.exists(registered_model_key("20261126-110000-shy-owl", "vgg16"))


def test_a_better_challenger_replaces_the_champion_and_extends_the_history(store):
    labels = label_set_id(CLASSES)
    promote("20261126-100000-calm-fox", [trained(store, "20261126-100000-calm-fox", "cnn", 0.40)])
    decision = promote("20261126-120000-bold-elk", [trained(store, "20261126-120000-bold-elk", "cnn", 0.47)])
    assert decision["promoted"] and decision["champion_score"] == 0.40
    pointer = store.get_json(champion_key(labels))
    assert pointer["run_id"] == "20261126-120000-bold-elk"
    assert pointer["previous"]["run_id"] == "20261126-100000-calm-fox"
    history = get_champion_history(store, labels)
    assert [h["run_id"] for h in history] == ["20261126-100000-calm-fox", "20261126-120000-bold-elk"]


@pytest.fixture
def trainer(store, monkeypatch):
    """`run_deployment` as a trainer answers it: the `derm-rescore` flow's task runs here, with
    `promotion.rescore_champion` (which needs a real model) reporting 0.50; `trainer.runs`
    lists the deployments started and `trainer.state` is the state they end in."""
    fake = SimpleNamespace(runs=[], state="Completed")

    def rescore_champion(store, champion, split_key, cache_dir=None):
        return 0.50

    def run_deployment(name, parameters, **options):
        fake.runs.append((name, parameters, options))
        if fake.state == "Completed":
            registry_tasks.score_on_split.fn(**{k: v for k, v in parameters.items() if k != "gpu_limit"})
        return SimpleNamespace(name="rescore", state=SimpleNamespace(
            name=fake.state, message="trainer lost", is_completed=lambda: fake.state == "Completed"))

    monkeypatch.setattr(promotion, "rescore_champion", rescore_champion)
    monkeypatch.setattr(registry_tasks, "run_deployment", run_deployment)
    return fake


def test_a_champion_from_another_split_is_rescored_on_a_trainer(store, trainer):
    """The champion's re-scoring is a `derm-rescore/default` flow run (model work on a trainer,
    never in the orchestrator's process); its stored score decides, and is reused."""
    promote("20261126-100000-calm-fox", [trained(store, "20261126-100000-calm-fox", "cnn", 0.40)])
    assert trainer.runs == []  # the first model of a label set needs no re-scoring
    challenger = trained(store, "20261126-110000-shy-owl", "cnn", 0.45)
    decision = promote("20261126-110000-shy-owl", [challenger], split_hash="split-b")
    [(name, parameters, options)] = trainer.runs
    assert name == "derm-rescore/default" and options["as_subflow"] and options["timeout"] is None
    assert parameters == {"run_id": "20261126-100000-calm-fox", "architecture": "cnn",
                          "split_key": "split-manifest-split-b", "split_hash": "split-b", "gpu_limit": "gpu"}
    assert not decision["promoted"] and decision["champion_rescored"] and decision["champion_score"] == 0.50
    record = store.get_json(model_score_key("20261126-100000-calm-fox", "cnn", "split-b"))
    assert record["score"] == 0.50 and record["split_key"] == "split-manifest-split-b"

    stronger = trained(store, "20261126-120000-bold-elk", "cnn", 0.55)
    decision = promote("20261126-120000-bold-elk", [stronger], split_hash="split-b")
    assert len(trainer.runs) == 1, "the stored score on split-b is reused, not computed again"
    assert decision["promoted"] and "re-scored on split split-b" in decision["reason"]
    assert store.get_json(champion_key(label_set_id(CLASSES)))["split_hash"] == "split-b"


def test_a_failed_rescoring_decides_nothing_and_can_be_retried(store, trainer):
    promote("20261126-100000-calm-fox", [trained(store, "20261126-100000-calm-fox", "cnn", 0.40)])
    trainer.state = "Crashed"
    challenger = trained(store, "20261126-110000-shy-owl", "cnn", 0.95)
    with pytest.raises(RegistryError, match="ended Crashed: trainer lost") as raised:
        promote("20261126-110000-shy-owl", [challenger], split_hash="split-b")
    assert raised.value.transient
    assert store.get_json(champion_key(label_set_id(CLASSES)))["run_id"] == "20261126-100000-calm-fox"
    assert not store.exists(model_score_key("20261126-100000-calm-fox", "cnn", "split-b"))


def test_a_rescoring_uses_the_models_own_test_time_augmentation(monkeypatch):
    """A champion whose test score was taken with flip TTA is re-scored with it, like for like."""
    asked = []
    for params in ({"tta": True}, {}):
        bundle = SimpleNamespace(params=params)
        monkeypatch.setattr(promotion, "load_model_bundle", lambda *a, bundle=bundle: bundle)
        monkeypatch.setattr(promotion, "evaluate_split",
                            lambda bundle, store, key, split, tta: asked.append(tta) or {"weighted_f1": 0.3})
        assert promotion.rescore_champion(None, {"run_id": "r", "arch": "cnn"}, "split-key") == 0.3
    assert asked == [True, False]


def test_scoring_a_model_that_is_gone_names_it(store):
    with pytest.raises(RegistryError, match="no model 20261126-100000-calm-fox/cnn to re-score"):
        registry_tasks.score_on_split.fn("20261126-100000-calm-fox", "cnn", "split-manifest-b", "split-b")


def test_a_run_without_a_trained_model_decides_nothing(store):
    assert promote("20261126-100000-calm-fox", [{"architecture": "cnn", "status": "failed", "error": "x"}]) is None
    assert not store.exists(champion_key(label_set_id(CLASSES)))


# --- retention --------------------------------------------------------------------------------
def test_retention_task_uses_the_settings_and_keeps_the_champions_run(store, monkeypatch):
    monkeypatch.setattr(registry_tasks, "settings", lambda: SimpleNamespace(keep_runs=1, keep_checkpoints=1))
    runs = ["20261121-100000-run-a", "20261122-100000-run-b", "20261123-100000-run-c"]
    promote(runs[0], [trained(store, runs[0], "cnn", 0.40)])
    for run_id in runs[1:]:
        trained(store, run_id, "cnn", 0.10)
    for epoch in (1, 2):
        store.put_bytes(checkpoint_key(runs[2], "cnn", epoch), b"checkpoint")
    result = registry_tasks.apply_retention.fn()
    assert result["deleted_runs"] == [runs[1]] and result["protected_runs"] == [runs[0]]
    assert result["deleted_checkpoints"] == [checkpoint_key(runs[2], "cnn", 1)]
    assert "kept_runs" not in result
    assert not store.exists(model_key(runs[1], "cnn")) and store.exists(model_key(runs[0], "cnn"))
