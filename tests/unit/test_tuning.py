"""dermflow.modeling.tuning and search_space without services: the search space, the objective, resuming, the deadline."""

from __future__ import annotations

import time

import numpy as np
import pytest

pytestmark = pytest.mark.unit

keras_tuner = pytest.importorskip("keras_tuner")

from dermflow.dataset import arrays as data_lib  # noqa: E402
from dermflow.modeling import search_space, tuners, tuning, tuning_results  # noqa: E402
from dermflow.errors import is_transient  # noqa: E402
from dermflow.metrics import weighted_f1  # noqa: E402
from dermflow.config import TrainConfig  # noqa: E402

SIZE = 32
CLASSES = ["alpha", "beta", "gamma"]


def synthetic_arrays(tmp_path, n_train: int = 36, n_val: int = 23) -> data_lib.SplitArrays:
    """Three classes told apart by their mean colour; 23 val images (not a batch multiple)."""
    rng = np.random.default_rng(0)
    n = n_train + n_val
    labels = np.arange(n) % len(CLASSES)
    images = rng.integers(0, 90, (n, SIZE, SIZE, 3)).astype(np.uint8)
    for channel in range(3):
        images[labels == channel, :, :, channel] += 120
    path = tmp_path / "synthetic.npz"
    np.savez(path, images=images, labels=labels, split=np.array(["train"] * n_train + ["val"] * n_val),
             class_names=np.array(CLASSES))
    return tuning.arrays_from_npz(path)


def spec_for(tmp_path, **overrides) -> tuning.SearchSpec:
    values = dict(architecture="baseline_cnn", num_classes=len(CLASSES), image_size=SIZE, weights="none",
                  tuner="random", max_trials=1, trial_epochs=1, batch_size=8, seed=1, tuning_id="unit",
                  directory=str(tmp_path / "tuning"))
    values.update(overrides)
    return tuning.SearchSpec(**values)


def test_search_space_yields_only_train_config_fields():
    fields = set(TrainConfig.model_fields)
    for architecture in ("baseline_cnn", "vgg16", "efficientnetv2_b0"):
        hp = keras_tuner.HyperParameters()
        config = search_space.sample_config(hp, architecture)
        assert set(config) <= fields, set(config) - fields
        TrainConfig(architecture=architecture, **config)  # accepted as an override
        names = {p.name for p in hp.space}
        assert {"optimizer", "learning_rate", "dropout", "head_width"} <= names
    baseline = search_space.sample_config(keras_tuner.HyperParameters(), "baseline_cnn")
    assert set(baseline["arch_options"]) == {"width_multiplier", "depth", "batch_norm"}
    pretrained = search_space.sample_config(keras_tuner.HyperParameters(), "vgg16")
    assert "fine_tune_blocks" in pretrained and "arch_options" not in pretrained


def test_search_space_stays_near_the_known_good_recipe():
    hp = keras_tuner.HyperParameters()
    search_space.sample_config(hp, "baseline_cnn")
    space = {p.name: p for p in hp.space}
    # Near the known-good recipe (issue 17): the wide ranges spent short budgets on useless points.
    assert set(space["optimizer"].values) == {"adam", "adamw"}
    assert space["learning_rate"].min_value == 3e-4 and space["learning_rate"].max_value == 3e-3
    assert space["learning_rate"].sampling == "log"
    assert space["lr_schedule"].value == "cosine" and space["batch_norm"].value is True
    assert max(space["width_multiplier"].values) <= 1.0


def test_config_from_values_drops_tuner_bookkeeping():
    values = {"optimizer": "sgd", "learning_rate": 0.05, "dropout": 0.1, "head_width": 64, "label_smoothing": 0.0,
              "class_weights": False, "width_multiplier": 0.5, "depth": 3, "batch_norm": False,
              "tuner/epochs": 3, "tuner/trial_id": "0001"}
    config = search_space.config_from_values("baseline_cnn", values)
    assert config["optimizer"] == "sgd" and config["learning_rate"] == 0.05
    assert config["arch_options"] == {"width_multiplier": 0.5, "depth": 3, "batch_norm": False}
    assert not any(key.startswith("tuner/") for key in config)


def test_objective_is_validation_weighted_f1_maximised():
    objective = search_space.objective()
    assert objective.name == "val_weighted_f1" and objective.direction == "max"


def test_default_tuning_id_is_stable_and_specific():
    first = tuning.default_tuning_id("baseline_cnn", "manifests/split-aaa.csv", "random", 128, "none")
    assert first == tuning.default_tuning_id("baseline_cnn", "manifests/split-aaa.csv", "random", 128, "none")
    others = {
        tuning.default_tuning_id("baseline_cnn", "manifests/split-bbb.csv", "random", 128, "none"),
        tuning.default_tuning_id("vgg16", "manifests/split-aaa.csv", "random", 128, "none"),
        tuning.default_tuning_id("baseline_cnn", "manifests/split-aaa.csv", "bayesian", 128, "none"),
    }
    assert first not in others and len(others) == 3
    assert first.startswith("baseline_cnn-random-")


def test_tuning_deadline_takes_a_share_of_the_time_left():
    assert tuning.tuning_deadline(None) is None
    assert tuning.tuning_deadline(1000.0, 0.6, now=0.0) == pytest.approx(600.0)
    assert tuning.tuning_deadline(50.0, 0.6, now=100.0) == pytest.approx(100.0)  # already past
    with pytest.raises(tuning.TuningError, match="share"):
        tuning.tuning_deadline(1000.0, 1.5, now=0.0)


def test_bad_spec_is_refused(tmp_path):
    with pytest.raises(ValueError, match="tuner\n  Input should be 'random'"):
        spec_for(tmp_path, tuner="grid")
    with pytest.raises(ValueError, match="architecture\n  Input should be 'baseline_cnn'"):
        spec_for(tmp_path, architecture="resnet9000")
    with pytest.raises(ValueError, match="tuning_id\n  String should have at least 1 character"):
        spec_for(tmp_path, tuning_id="")
    payload = tuning.spec_payload(spec_for(tmp_path))
    assert tuning.SearchSpec.from_dict(payload["spec"]) == spec_for(tmp_path)
    with pytest.raises(tuning.TuningError, match="(?s)bad search spec: .*trials\n  Extra inputs") as caught:
        tuning.SearchSpec.from_dict({**payload["spec"], "trials": 3})
    assert not is_transient(caught.value)


def test_search_defaults_come_from_the_config():
    from dermflow import config

    spec = tuning.SearchSpec(architecture="vgg16", num_classes=3, tuning_id="t", directory="d")
    assert (spec.image_size, spec.batch_size, spec.weights) == (
        config.TRAIN_DEFAULTS.image_size, config.TRAIN_DEFAULTS.batch_size, config.TRAIN_DEFAULTS.weights)
    assert (spec.tuner, spec.max_trials, spec.seed) == (
        config.SearchOptions().tuner, config.SearchOptions().max_trials, config.TRAIN_DEFAULTS.seed)
    assert tuning.DEFAULT_TUNING_SHARE is config.DEFAULT_TUNING_SHARE


def test_build_uses_the_sampled_architecture_options():
    hypermodel = tuning.DermHyperModel("baseline_cnn", len(CLASSES), SIZE, "none")
    hp = keras_tuner.HyperParameters()
    hp.values.update({"depth": 3, "batch_norm": True, "width_multiplier": 0.5, "head_width": 64,
                      "optimizer": "sgd"})
    model = hypermodel.build(hp)
    convs = [layer for layer in model.layers if layer.name.startswith("conv") and layer.name[4:].isdigit()]
    assert [layer.filters for layer in convs] == [16, 32, 64]
    assert any(layer.name == "conv1_bn" for layer in model.layers)
    assert model.get_layer("head_dense1").units == 64
    assert type(model.optimizer).__name__ == "SGD"
    assert model.output_shape == (None, len(CLASSES))


def test_trial_score_is_weighted_f1_over_the_whole_val_split(tmp_path):
    arrays = synthetic_arrays(tmp_path)
    data = tuning.trial_data(arrays)
    spec = spec_for(tmp_path)
    result = tuning.search(spec, data)
    assert len(result["trials"]) == 1 and result["trials"][0]["status"] == "COMPLETED"
    # Rebuild the trial's model, load its best-epoch checkpoint and score it with scikit-learn.
    tuner = tuning.make_tuner(spec, data)
    model = tuner.load_model(tuner.oracle.get_trial(result["trials"][0]["trial_id"]))
    probs = model.predict(data_lib.make_dataset(arrays, data.val_indices, 64, shuffle=False), verbose=0)
    expected = weighted_f1(arrays.labels[data.val_indices], np.asarray(probs).argmax(axis=1))
    assert result["trials"][0]["score"] == pytest.approx(expected)
    assert result["best"] == result["trials"][0]["hyperparameters"]


def test_a_stopped_search_resumes_to_the_same_trial_count(tmp_path):
    data = tuning.trial_data(synthetic_arrays(tmp_path))
    first = tuning.search(spec_for(tmp_path, max_trials=1), data)
    assert [t["trial_id"] for t in first["trials"]] == ["0"]
    # The first trial runs the space's defaults (a known-good recipe).
    defaults = search_space.sample_config(keras_tuner.HyperParameters(), "baseline_cnn")
    assert first["trials"][0]["hyperparameters"] == defaults
    resumed = tuning.search(spec_for(tmp_path, max_trials=2), data)
    assert [t["trial_id"] for t in resumed["trials"]] == ["0", "1"]
    assert resumed["trials"][0]["score"] == first["trials"][0]["score"]  # not run again
    again = tuning.search(spec_for(tmp_path, max_trials=2), data)
    assert len(again["trials"]) == 2  # nothing left to do


def test_no_trial_starts_past_the_deadline(tmp_path):
    data = tuning.trial_data(synthetic_arrays(tmp_path))
    result = tuning.search(spec_for(tmp_path, max_trials=3, deadline=time.time() - 1), data)
    assert result["trials"] == [] and result["best"] is None


def test_trial_table_flattens_hyperparameters():
    trials = [{"architecture": "baseline_cnn", "trial_id": "0", "status": "COMPLETED", "score": 0.123456,
               "hyperparameters": {"learning_rate": 0.00123456789, "arch_options": {"depth": 4}}}]
    assert tuning_results.trial_table(trials) == [{"architecture": "baseline_cnn", "trial": "0", "status": "COMPLETED",
                                           "cut_off": False, "default": False, "chosen": False,
                                           "val_weighted_f1": 0.1235, "learning_rate": 0.001235,
                                           "arch_options.depth": 4}]
    # Trials ran but none finished: the final training takes the space's defaults.
    defaults = search_space.config_from_values("baseline_cnn", {})
    assert tuning_results.best_config([{**trials[0], "status": "FAILED"}]) == defaults
    assert tuning_results.best_config([]) is None


def trial(trial_id: str, score: float, **marks) -> dict:
    return {"architecture": "baseline_cnn", "trial_id": trial_id, "status": "COMPLETED", "score": score,
            "hyperparameters": {"learning_rate": float(trial_id)}, **marks}


def test_a_trial_cut_off_by_the_deadline_is_never_chosen_and_defaults_win_ties():
    trials = [trial("0", 0.30, default=True), trial("1", 0.50, cut_off=True), trial("2", 0.25)]
    chosen, why = tuning_results.choose_trial(trials)
    assert chosen["trial_id"] == "0" and why == "the defaults scored best"
    assert tuning_results.annotate_choice(trials) == "the defaults scored best"
    assert [t["chosen"] for t in trials] == [True, False, False]
    rows = tuning_results.trial_table(trials)
    assert [r["cut_off"] for r in rows] == [False, True, False] and rows[0]["default"] and rows[0]["chosen"]
    better = [trial("0", 0.30, default=True), trial("1", 0.31)]
    assert tuning_results.choose_trial(better)[0]["trial_id"] == "1"
    tie = [trial("1", 0.30), trial("0", 0.30, default=True)]
    assert tuning_results.choose_trial(tie) == (tie[1], "no trial beat the defaults")
    assert tuning_results.choose_trial([trial("1", 0.5, cut_off=True)])[0] is None


def test_a_search_cut_off_by_its_deadline_marks_the_trial(tmp_path):
    data = tuning.trial_data(synthetic_arrays(tmp_path))
    # No per-trial slot: the tuning deadline, 20 s away, is what ends the 1,000-epoch trial.
    spec = spec_for(tmp_path, trial_epochs=1_000, deadline=time.time() + 20)
    result = tuning.search(spec, data)
    assert len(result["trials"]) == 1 and result["trials"][0]["cut_off"] is True
    assert result["trials"][0]["default"] is True
    assert "no trial finished" in result["chosen"]
    assert result["best"] == search_space.config_from_values("baseline_cnn", {})
    assert tuning_results.trial_table(result["trials"])[0]["cut_off"] is True


@pytest.mark.parametrize("kind", ["random", "bayesian", "hyperband"])
def test_every_tuner_tries_the_defaults_first(tmp_path, kind):
    tuner = tuning.make_tuner(spec_for(tmp_path, tuner=kind, max_trials=3, trial_epochs=3))
    first = tuner.oracle.create_trial("tuner0")
    values = {k: v for k, v in first.hyperparameters.values.items() if not k.startswith("tuner/")}
    assert values == tuners.default_values(tuner.oracle.hyperparameters)
    assert search_space.config_from_values("baseline_cnn", values) == search_space.config_from_values("baseline_cnn", {})


def test_trial_slots_cut_the_tuning_window_in_at_most_three():
    assert tuning.trial_slot_seconds(None, 10) is None
    assert tuning.trial_slot_seconds(1_300.0, 10, now=1_000.0) == pytest.approx(100.0)
    assert tuning.trial_slot_seconds(1_300.0, 2, now=1_000.0) == pytest.approx(150.0)
    model = tuning.DermHyperModel("baseline_cnn", 3, SIZE, "none", deadline=1_250.0, trial_seconds=100.0)
    assert model.trial_deadline(1_000.0) == (1_100.0, False)  # its own slot
    assert model.trial_deadline(1_200.0) == (1_250.0, True)  # the tuning deadline comes first


def test_a_chief_that_never_listens_is_a_transient_tuning_error():
    from dermflow.modeling import tuning_distributed

    port = tuning_distributed.free_port()
    with pytest.raises(tuning.TuningError, match="did not listen") as caught:
        tuning_distributed.wait_for_port("127.0.0.1", port, timeout=0.5)
    assert is_transient(caught.value)
