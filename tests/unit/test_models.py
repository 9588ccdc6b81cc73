"""The architecture registry: every model builds and trains a step, preprocessing equals
keras.applications', sizes, weights errors, freezing, and save/load round trips."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.unit

keras = pytest.importorskip("keras")

from dermflow.modeling import models  # noqa: E402


# the three largest graphs take ~10 s each on a shared CPU: in the slow tier
HEAVY = {"inception_v3", "efficientnetv2_b0", "convnext_tiny"}


@pytest.mark.parametrize(
    "name",
    [pytest.param(name, marks=pytest.mark.slow) if name in HEAVY else name for name in models.list_architectures()],
)
def test_every_architecture_builds_and_trains_one_step(name):
    spec = models.ARCHITECTURES[name]
    model = models.create_model(name, 3, spec.min_size, weights="none", head_width=16, seed=1)
    model.compile(optimizer="adam", loss="categorical_crossentropy", run_eagerly=True)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (2, spec.min_size, spec.min_size, 3)).astype("float32")
    y = keras.utils.to_categorical([0, 2], 3)
    before = [w.copy() for w in model.get_layer("head_logits").get_weights()]
    loss = float(model.train_on_batch(x, y))
    probs = model.predict_on_batch(x)
    assert np.isfinite(loss)
    assert probs.shape == (2, 3) and np.all(np.isfinite(probs))
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert model.output.dtype == "float32"
    after = model.get_layer("head_logits").get_weights()
    assert any(not np.allclose(b, a) for b, a in zip(before, after)), "a training step must move the head"


def test_registry_lists_the_contract_architectures():
    assert models.list_architectures() == [
        "baseline_cnn", "vgg16", "vgg19", "resnet50v2", "inception_v3", "efficientnetv2_b0", "convnext_tiny",
    ]
    with pytest.raises(ValueError, match="unknown architecture 'resnet18'"):
        models.create_model("resnet18", 3, 64, weights="none")
    # the config's Literal (the UI's dropdown, validated before any work) names the same set
    from typing import get_args

    from dermflow import config

    assert set(get_args(config.ArchitectureName)) == set(models.list_architectures())
    assert set(config.REPORT_ARCHITECTURES) <= set(models.list_architectures())


def test_image_size_below_the_minimum_is_raised_with_a_warning():
    with pytest.warns(UserWarning, match="inception_v3: image_size 40 is below its minimum 75"):
        model = models.create_model("inception_v3", 2, 40, weights="none", augment=False)
    assert model.input_shape == (None, 75, 75, 3)
    assert models.effective_image_size("vgg16", 64) == 64


def test_baseline_cnn_is_the_student_architecture_and_takes_tuner_options():
    model = models.create_model("baseline_cnn", 5, 64)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [c.filters for c in convs] == [32, 64, 128, 256]
    assert all(c.kernel_size == (3, 3) and c.activation is keras.activations.relu for c in convs)
    assert [layer.units for layer in model.layers if isinstance(layer, keras.layers.Dense)] == [256, 256, 5]
    assert [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)] == [0.25, 0.25]
    augmentation = model.get_layer("augmentation")
    kinds = {type(layer).__name__ for layer in augmentation.layers}
    assert kinds == {"RandomFlip", "RandomContrast", "RandomTranslation", "RandomRotation"}

    wide = models.create_model("baseline_cnn", 5, 64, width_multiplier=0.5, depth=3, batch_norm=True)
    assert [c.filters for c in wide.layers if isinstance(c, keras.layers.Conv2D)] == [16, 32, 64]
    assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in wide.layers)
    with pytest.raises(ValueError, match="vgg16 takes no architecture options"):
        models.create_model("vgg16", 5, 32, weights="none", depth=3)


@pytest.mark.parametrize(
    ("mode", "module"),
    [("caffe", "vgg16"), ("caffe", "vgg19"), ("tf", "resnet_v2"), ("tf", "inception_v3"), ("torch", "densenet")],
)
def test_preprocessing_layer_matches_keras_applications(mode, module):
    rng = np.random.default_rng(3)
    images = rng.uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    expected = getattr(keras.applications, module).preprocess_input(images.copy())
    actual = keras.ops.convert_to_numpy(models.ImagePreprocessing(mode)(images))
    np.testing.assert_allclose(actual, np.asarray(expected), rtol=1e-5, atol=1e-4)


def test_registered_preprocessing_modes_match_their_applications():
    assert models.ARCHITECTURES["vgg16"].preprocessing == "caffe"
    assert models.ARCHITECTURES["resnet50v2"].preprocessing == "tf"
    assert models.ARCHITECTURES["inception_v3"].preprocessing == "tf"
    # these two normalise inside the backbone; their preprocess_input is the identity
    for name, module in (("efficientnetv2_b0", "efficientnet_v2"), ("convnext_tiny", "convnext")):
        assert models.ARCHITECTURES[name].preprocessing is None
        x = np.full((1, 4, 4, 3), 200.0, dtype="float32")
        assert np.array_equal(getattr(keras.applications, module).preprocess_input(x), x)


def test_imagenet_download_failure_names_the_ways_out(monkeypatch, tmp_path):
    # An empty Keras cache and an unreachable proxy: the download fails fast, online or not.
    import keras.src.backend.config as keras_config

    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path / "keras-home"))
    for variable in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with pytest.raises(models.WeightsUnavailableError) as caught:
        models.create_model("vgg16", 3, 32, weights="imagenet")
    message = str(caught.value)
    assert "weights='none'" in message and "local include_top=False weights file" in message
    assert caught.value.transient  # a network failure: a retry may get the weights


def test_weights_errors_are_permanent_unless_the_network_failed(tmp_path):
    import urllib.error

    from dermflow.errors import DermflowError, is_transient

    with pytest.raises(models.WeightsUnavailableError) as missing:
        models.create_model("resnet50v2", 3, 32, weights=str(tmp_path / "nope.h5"))
    assert isinstance(missing.value, DermflowError) and not is_transient(missing.value)
    garbage = tmp_path / "garbage.weights.h5"
    garbage.write_bytes(b"not an hdf5 file")
    with pytest.raises(models.WeightsUnavailableError) as unreadable:
        models.create_model("vgg16", 3, 32, weights=str(garbage))
    assert not is_transient(unreadable.value)

    def raised_from(cause: BaseException) -> Exception:
        try:
            try:
                raise cause
            except Exception:
                raise Exception("URL fetch failure")  # as keras.utils.get_file re-raises
        except Exception as error:  # noqa: BLE001
            return error

    assert models.is_network_failure(raised_from(urllib.error.URLError("connection refused")))
    assert models.is_network_failure(raised_from(TimeoutError()))
    assert models.is_network_failure(raised_from(urllib.error.HTTPError("u", 503, "busy", {}, None)))
    assert not models.is_network_failure(raised_from(urllib.error.HTTPError("u", 404, "gone", {}, None)))
    assert not models.is_network_failure(ValueError("shape mismatch"))


def test_missing_local_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(models.WeightsUnavailableError, match="does not exist"):
        models.create_model("resnet50v2", 3, 32, weights=str(tmp_path / "nope.h5"))


def test_local_weights_file_is_loaded_into_the_backbone(tmp_path):
    source = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "vgg16_notop.weights.h5"
    source.save_weights(path)
    model = models.create_model("vgg16", 3, 32, weights=str(path))
    np.testing.assert_array_equal(
        model.get_layer("backbone").get_layer("block5_conv3").get_weights()[0],
        source.get_layer("block5_conv3").get_weights()[0],
    )


def test_freezing_keeps_batch_norm_in_inference_mode():
    model = models.create_model("resnet50v2", 3, 32, weights="none")
    backbone = models.backbone_of(model)
    models.freeze_backbone(model)
    assert not backbone.trainable_weights
    assert model.get_layer("head_dense1").trainable
    unfrozen = models.unfreeze_top(model, fraction=0.2)
    trainable = [layer for layer in backbone.layers if layer.trainable and layer.weights]
    assert unfrozen == len(trainable) > 0
    assert all(not isinstance(layer, keras.layers.BatchNormalization) for layer in trainable)
    assert not backbone.get_layer("conv1_conv").trainable  # the bottom stays frozen
    assert backbone.get_layer("conv5_block3_3_conv").trainable

    models.unfreeze_top(model, blocks=1)
    names = {layer.name for layer in backbone.layers if layer.trainable and layer.weights}
    assert "conv5_block3_3_conv" in names and "conv5_block2_3_conv" not in names
    assert not any(isinstance(backbone.get_layer(n), keras.layers.BatchNormalization) for n in names)


def test_saved_model_loads_with_plain_keras_and_predicts_the_same(tmp_path):
    model = models.create_model("vgg16", 4, 32, weights="none")
    x = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.get_layer("preprocessing"), models.ImagePreprocessing)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_the_edge_mask_flattens_the_bottom_rows_to_the_image_mean_only():
    x = np.random.default_rng(0).uniform(0, 255, (2, 20, 10, 3)).astype("float32")
    masked = keras.ops.convert_to_numpy(models.EdgeMask(0.1)(x))
    np.testing.assert_allclose(masked[:, :18], x[:, :18])  # round(20 * 0.1) = 2 rows masked
    np.testing.assert_allclose(masked[:, 18:], np.broadcast_to(x.mean(axis=(1, 2), keepdims=True), (2, 2, 10, 3)),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="edge mask fraction 0.5"):
        models.EdgeMask(0.5)


def test_a_masked_model_cannot_see_the_watermark_strip_and_keeps_its_mask_when_saved(tmp_path):
    """What the model predicts does not depend on what is drawn in the masked strip, only on
    the image's mean colour (here kept equal): in the saved model too, as `predict` loads it."""
    model = models.create_model("baseline_cnn", 3, 32, weights="none", edge_mask=0.125, augment=False, seed=1)
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    stamped = x.copy()
    strip = stamped[:, 28:]
    stamped[:, 28:] = strip[:, :, ::-1]  # a different picture in the strip, the same pixels (and mean)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.get_layer("edge_mask"), models.EdgeMask)
    for m in (model, loaded):
        np.testing.assert_allclose(m.predict(stamped, verbose=0), m.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    unmasked = models.create_model("baseline_cnn", 3, 32, weights="none", augment=False, seed=1)
    assert "edge_mask" not in [layer.name for layer in unmasked.layers]
    assert not np.allclose(unmasked.predict(stamped, verbose=0), unmasked.predict(x, verbose=0), atol=1e-6)
