"""The model registry on a real SeaweedFS bucket: promotion, resolution, retention."""

import pytest

from dermflow.evaluation import promotion
from dermflow.evaluation.promotion import evaluate_challenger, promote
from dermflow.registry.entries import (
    RegistryError,
    get_champion,
    get_champion_history,
    label_set_id,
    list_registered_models,
    register_model,
)
from dermflow.registry.retention import apply_retention
from dermflow.registry.runs import resolve_model

pytestmark = pytest.mark.integration

CLASSES = ["acne", "eczema", "psoriasis"]


def put_run_model(store, run_id, arch, score, classes=CLASSES, split_hash="split-a"):
    """A trained model's files as training leaves them (model bytes are a stand-in)."""
    base = f"runs/{run_id}/models/{arch}/"
    store.put_bytes(base + "model.keras", b"stand-in model " + run_id.encode())
    metrics = {"test": {"weighted_f1": score, "accuracy": score}, "verified_test": None}
    params = {"class_names": classes, "image_size": 32, "architecture": arch}
    store.put_json(base + "metrics.json", metrics)
    store.put_json(base + "params.json", params)
    return register_model(
        store, run_id, arch, metrics=metrics, params=params,
        data_manifest_hash="manifest-1", split_hash=split_hash, label_set=classes,
    )


def test_register_writes_a_complete_entry(store):
    entry = put_run_model(store, "20261126-100000-calm-fox", "efficientnetb0", 0.42)
    stored = store.get_json("registry/models/20261126-100000-calm-fox/efficientnetb0.json")
    assert stored == entry
    assert stored["label_set_id"] == label_set_id(CLASSES)
    assert stored["model_key"] == "runs/20261126-100000-calm-fox/models/efficientnetb0/model.keras"
    assert stored["score"]["value"] == 0.42
    assert stored["split_hash"] == "split-a" and stored["data_manifest_hash"] == "manifest-1"
    assert stored["code_version"] and stored["versions"]["keras"]
    assert stored["created_at"]
    assert [e["arch"] for e in list_registered_models(store)] == ["efficientnetb0"]


def challenge(store, entry, **options):
    """The production promotion step for a registered model."""
    return evaluate_challenger(store, challenger_run=entry["run_id"], challenger_arch=entry["arch"], **options)


def test_promotion_rules_first_worse_better(store):
    labels = label_set_id(CLASSES)
    assert get_champion(store, labels) is None

    first = put_run_model(store, "20261126-100000-calm-fox", "cnn", 0.40)
    decision = challenge(store, first)
    assert decision["promoted"] and "first model" in decision["reason"]
    assert get_champion(store, labels)["run_id"] == "20261126-100000-calm-fox"
    again = challenge(store, first)
    assert not again["promoted"] and again["reason"] == "this model is already the champion"

    worse = put_run_model(store, "20261126-110000-shy-owl", "cnn", 0.35)
    decision = challenge(store, worse)
    assert not decision["promoted"] and decision["champion_score"] == 0.40
    assert get_champion(store, labels)["run_id"] == "20261126-100000-calm-fox"

    better = put_run_model(store, "20261126-120000-bold-elk", "resnet50", 0.47)
    decision = challenge(store, better)
    assert decision["promoted"]
    champion = get_champion(store, labels)
    assert (champion["run_id"], champion["arch"]) == ("20261126-120000-bold-elk", "resnet50")
    assert "0.4700" in champion["reason"] and "0.4000" in champion["reason"]
    assert champion["scores"]["champion"] == 0.40 and champion["scores"]["challenger"] == 0.47
    assert champion["previous"]["run_id"] == "20261126-100000-calm-fox"
    history = get_champion_history(store, labels)
    assert [h["run_id"] for h in history] == ["20261126-100000-calm-fox", "20261126-120000-bold-elk"]
    assert all(h["reason"] for h in history)


def test_an_unregistered_challenger_is_refused_with_what_is_registered(store):
    put_run_model(store, "20261126-100000-calm-fox", "cnn", 0.40)
    with pytest.raises(RegistryError, match="20261126-100000-calm-fox/cnn"):
        evaluate_challenger(store, challenger_run="20261126-100000-calm-fox", challenger_arch="vgg16")


def test_scores_on_different_test_splits_are_not_compared(store, monkeypatch):
    """Re-scoring the champion would need a real model: `promotion.rescore_champion` is
    replaced by a stand-in that says how the champion scores on the challenger's split."""
    champion = put_run_model(store, "20261126-100000-calm-fox", "cnn", 0.40, split_hash="split-a")
    challenge(store, champion)
    challenger = put_run_model(store, "20261126-110000-shy-owl", "cnn", 0.45, split_hash="split-b")
    with pytest.raises(RegistryError, match="pass split_key to re-score it"):
        challenge(store, challenger)
    rescored = []
    monkeypatch.setattr(promotion, "rescore_champion",
                        lambda store, champion, split_key, cache_dir=None: rescored.append(split_key) or 0.50)
    # the champion re-scored on split-b is stronger there: no promotion
    decision = challenge(store, challenger, split_key="manifests/split-b.csv")
    assert rescored == ["manifests/split-b.csv"]
    assert not decision["promoted"] and decision["champion_rescored"] and decision["champion_score"] == 0.50
    assert get_champion(store, label_set_id(CLASSES))["run_id"] == "20261126-100000-calm-fox"


def test_resolve_by_run_id_flow_run_name_and_champion(store):
    put_run_model(store, "20261125-090000-brave-otter", "cnn", 0.30)
    put_run_model(store, "20261126-101500-brave-otter", "cnn", 0.33)
    put_run_model(store, "20261126-101500-brave-otter", "efficientnetb0", 0.51)
    champion_entry = put_run_model(store, "20261126-120000-bold-elk", "resnet50", 0.44)
    put_run_model(store, "20261126-120000-bold-elk", "cnn", 0.49)
    promote(store, champion_entry, "test", {"challenger": 0.44}, get_champion(store, champion_entry["label_set_id"]))

    # run id: the best architecture by test weighted F1
    run_id, arch, key, params = resolve_model(store, "20261126-101500-brave-otter")
    assert (run_id, arch) == ("20261126-101500-brave-otter", "efficientnetb0")
    assert key == "runs/20261126-101500-brave-otter/models/efficientnetb0/model.keras"
    assert params["class_names"] == CLASSES and params["image_size"] == 32
    # a runs/ prefix is accepted; an explicit arch wins
    assert resolve_model(store, "runs/20261126-101500-brave-otter/", "cnn")[:2] == (
        "20261126-101500-brave-otter", "cnn")
    # flow run name: the newest run of that name
    assert resolve_model(store, "brave-otter")[0] == "20261126-101500-brave-otter"
    # default: the champion, with the champion's architecture (not the run's best)
    assert resolve_model(store)[:2] == ("20261126-120000-bold-elk", "resnet50")
    assert resolve_model(store, None, "cnn")[:2] == ("20261126-120000-bold-elk", "cnn")


def test_default_is_the_newest_champion_across_label_sets(store):
    older = put_run_model(store, "20261126-100000-calm-fox", "cnn", 0.40)
    newer = put_run_model(store, "20261126-110000-shy-owl", "cnn", 0.20, classes=["a", "b"])
    promote(store, older, "first", {}, get_champion(store, older["label_set_id"]))
    promote(store, newer, "first", {}, get_champion(store, newer["label_set_id"]))
    assert resolve_model(store)[0] == "20261126-110000-shy-owl"


def test_resolve_errors_list_what_exists(store):
    with pytest.raises(RegistryError, match="no champion"):
        resolve_model(store)
    put_run_model(store, "20261126-100000-calm-fox", "cnn", 0.40)
    with pytest.raises(RegistryError, match="20261126-100000-calm-fox"):
        resolve_model(store, "sleepy-cat")
    with pytest.raises(RegistryError, match="it has: cnn"):
        resolve_model(store, "calm-fox", "vgg16")


def test_retention_keeps_newest_runs_champions_and_recent_checkpoints(store):
    runs = [f"2026112{day}-100000-run-{day}" for day in range(1, 7)]
    entries = {run: put_run_model(store, run, "cnn", 0.1 * i) for i, run in enumerate(runs, 1)}
    for run in runs:
        for epoch in range(1, 5):
            store.put_bytes(f"runs/{run}/checkpoints/cnn/epoch-{epoch:03d}.keras", b"ckpt")
        store.put_json(f"runs/{run}/checkpoints/cnn/state.json", {"epoch": 4})
    # runs[0] was champion once (history only), runs[1] is the champion now
    promote(store, entries[runs[0]], "first", {}, get_champion(store, entries[runs[0]]["label_set_id"]))
    promote(store, entries[runs[1]], "better", {}, get_champion(store, entries[runs[1]]["label_set_id"]))

    result = apply_retention(store, keep_runs=2, keep_checkpoints=2)

    assert sorted(result["deleted_runs"]) == runs[2:4]
    remaining = {key.split("/")[1] for key in store.list_keys("runs/")}
    assert remaining == {runs[0], runs[1], runs[4], runs[5]}
    assert store.list_keys(f"registry/models/{runs[2]}/") == []
    assert store.exists(f"registry/models/{runs[0]}/cnn.json")
    for run in remaining:
        assert sorted(store.list_keys(f"runs/{run}/checkpoints/cnn/")) == [
            f"runs/{run}/checkpoints/cnn/epoch-003.keras",
            f"runs/{run}/checkpoints/cnn/epoch-004.keras",
            f"runs/{run}/checkpoints/cnn/state.json",
        ]
        assert store.exists(f"runs/{run}/models/cnn/model.keras")
    assert resolve_model(store)[0] == runs[1]
    # idempotent
    again = apply_retention(store, keep_runs=2, keep_checkpoints=2)
    assert again["deleted_runs"] == [] and again["deleted_checkpoints"] == []


@pytest.mark.parametrize("first_writer", [0.70, 0.60])
def test_concurrent_promotions_on_seaweedfs_keep_the_better_one_and_the_whole_history(store, monkeypatch,
                                                                                      first_writer):
    """Finding 11 of issue 14 on the real server: SeaweedFS's create-only write lets exactly
    one of two racing promotions record; the other decides again."""
    from tests.support.promotion_race import assert_no_promotion_lost, race_two_challengers

    assert_no_promotion_lost(race_two_challengers(store, monkeypatch, first_writer), first_writer)


def test_seaweedfs_lets_exactly_one_of_many_concurrent_creators_win(store):
    """`ObjectStore.create_json` (S3 If-None-Match: *) is what serializes promotions: of eight
    writers released at once, exactly one creates the object, every time."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from dermflow.layout import promotion_record_key

    for attempt in range(10):
        release = threading.Barrier(8, timeout=20)

        def create(writer: int, key=promotion_record_key("race", attempt)) -> bool:
            release.wait()
            return store.create_json(key, {"writer": writer})

        with ThreadPoolExecutor(8) as pool:
            assert sum(pool.map(create, range(8))) == 1
