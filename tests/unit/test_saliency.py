"""Grad-CAM on hand-built models whose decision is known: the class "bright patch" is decided
by a bright square, so its saliency must peak where the square is, wherever it is."""

import io

import numpy as np
import pytest
from PIL import Image

from dermflow.evaluation.saliency import SaliencyError, find_feature_layer, grad_cam, overlay_heatmap

pytestmark = pytest.mark.unit

SIZE = 32
PATCH = 8


def _set_patch_detector_weights(conv, dense) -> None:
    """Filter 0 fires on bright pixels, filter 1 on dark ones. Class 0 ('bright patch') wins
    when a bright patch is present; class 1 ('dark') is supported by the dark background."""
    kernel = np.zeros((3, 3, 3, 2), dtype=np.float32)
    kernel[..., 0] = 1.0 / 27
    kernel[..., 1] = -1.0 / 27
    conv.set_weights([kernel, np.array([-0.5, 0.5], dtype=np.float32)])
    dense.set_weights([np.array([[150.0, 0.0], [0.0, 2.0]], dtype=np.float32), np.array([-1.0, 0.0], np.float32)])


def patch_model(nested: bool):
    import keras

    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1.0 / 255)(inputs)
    conv = keras.layers.Conv2D(2, 3, padding="same", activation="relu", name="features")
    if nested:
        backbone_in = keras.Input((SIZE, SIZE, 3))
        backbone = keras.Model(backbone_in, conv(backbone_in), name="backbone")
        x = backbone(x)
    else:
        x = conv(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    dense = keras.layers.Dense(2, activation="softmax", name="head")
    model = keras.Model(inputs, dense(x))
    _set_patch_detector_weights(conv, dense)
    return model


def image_with_patch(top: int, left: int, size: int = SIZE, patch: int = PATCH) -> np.ndarray:
    rng = np.random.default_rng(top * 100 + left)
    image = rng.integers(0, 40, size=(size, size, 3)).astype(np.uint8)  # dark noisy background
    image[top : top + patch, left : left + patch] = 250
    return image


def peak(heatmap: np.ndarray) -> tuple[int, int]:
    return tuple(int(v) for v in np.unravel_index(np.argmax(heatmap), heatmap.shape))


def inside(point, top, left, patch=PATCH, margin=1) -> bool:
    return top - margin <= point[0] < top + patch + margin and left - margin <= point[1] < left + patch + margin


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested-backbone"])
def test_peak_follows_the_informative_patch(nested):
    model = patch_model(nested)
    assert find_feature_layer(model).name == "features"
    heatmaps = {}
    for top, left in [(2, 3), (20, 22), (4, 21)]:
        image = image_with_patch(top, left)
        assert model.predict_on_batch(image[None].astype(np.float32)).argmax() == 0
        heatmap = grad_cam(model, image)  # the predicted class, 'bright patch'
        assert heatmap.shape == (SIZE, SIZE) and heatmap.dtype == np.float32
        assert np.isfinite(heatmap).all() and heatmap.min() >= 0 and heatmap.max() == pytest.approx(1.0)
        assert inside(peak(heatmap), top, left), (top, left, peak(heatmap))
        outside = np.ones_like(heatmap, dtype=bool)
        outside[max(0, top - 2) : top + PATCH + 2, max(0, left - 2) : left + PATCH + 2] = False
        assert heatmap[outside].mean() < 0.1
        heatmaps[(top, left)] = heatmap
    assert peak(heatmaps[(2, 3)]) != peak(heatmaps[(20, 22)])


def test_heatmap_has_the_input_size_and_model_is_left_unchanged():
    model = patch_model(nested=True)
    big = np.asarray(Image.fromarray(image_with_patch(20, 2)).resize((96, 64)))  # 64 high, 96 wide
    before = model.predict_on_batch(image_with_patch(20, 2)[None].astype(np.float32))
    heatmap = grad_cam(model, big, class_index=0)
    assert heatmap.shape == (64, 96) and np.isfinite(heatmap).all()
    # the patch is in the lower-left of the resized image
    row, col = peak(heatmap)
    assert row >= 32 and col < 48
    after = model.predict_on_batch(image_with_patch(20, 2)[None].astype(np.float32))
    np.testing.assert_allclose(before, after, rtol=1e-6)
    assert after.sum() == pytest.approx(1.0, abs=1e-5)  # the softmax is back
    assert "call" not in model.get_layer("backbone").get_layer("features").__dict__


def test_class_without_support_gives_zeros_and_bad_arguments_fail_clearly():
    model = patch_model(nested=False)
    image = image_with_patch(5, 5)
    dark = grad_cam(model, image, class_index=1)
    assert np.isfinite(dark).all()
    # 'dark' is supported by the background, never by the bright patch
    assert dark[5 + 2 : 5 + PATCH - 2, 5 + 2 : 5 + PATCH - 2].max() < 0.05
    with pytest.raises(SaliencyError, match="out of range"):
        grad_cam(model, image, class_index=7)
    with pytest.raises(SaliencyError, match="no layer named"):
        grad_cam(model, image, layer_name="nope")
    with pytest.raises(SaliencyError, match="must be"):
        grad_cam(model, image[..., 0])


def test_keras_applications_backbone_nested_as_a_layer():
    import keras

    backbone = keras.applications.MobileNetV3Small(
        input_shape=(64, 64, 3), include_top=False, weights=None, include_preprocessing=True
    )
    inputs = keras.Input((64, 64, 3))
    x = keras.layers.GlobalAveragePooling2D()(backbone(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    layer = find_feature_layer(model)
    assert layer.name in {l.name for l in backbone.layers}
    heatmap = grad_cam(model, image_with_patch(10, 10, size=64))
    assert heatmap.shape == (64, 64) and np.isfinite(heatmap).all()
    assert 0.0 <= heatmap.min() and heatmap.max() <= 1.0


def test_overlay_is_a_png_of_the_image_size():
    image = image_with_patch(0, 0)
    heatmap = np.zeros((8, 8), dtype=np.float32)
    heatmap[:2, :2] = 1.0
    png = overlay_heatmap(image, heatmap)
    decoded = Image.open(io.BytesIO(png))
    assert decoded.format == "PNG" and decoded.size == (SIZE, SIZE)
    pixels = np.asarray(decoded.convert("RGB")).astype(int)
    # hot corner tinted red by 'jet', cold corner tinted blue
    assert pixels[31, 31, 2] > pixels[31, 31, 0]
    assert pixels[1, 1, 0] > pixels[31, 31, 0]
    with pytest.raises(ValueError):
        overlay_heatmap(image, np.zeros((2, 2, 2)))


# --- the watermark check: pure arithmetic on heatmaps ---------------------------------------------
def test_strip_share_is_the_bottom_rows_share_of_the_mass():
    from dermflow.evaluation.saliency import strip_rows, strip_share

    heat = np.zeros((50, 40))
    heat[-6:, :] = 1.0  # all mass in the bottom 6 rows = the 12 % strip of 50 rows
    assert strip_rows(50) == 6 and strip_share(heat) == pytest.approx(1.0)
    assert strip_share(np.ones((50, 40))) == pytest.approx(6 / 50)  # spread like the image: the area share
    assert strip_share(np.zeros((50, 40))) is None
    assert strip_rows(3) == 1  # always at least one row
    with pytest.raises(SaliencyError, match="strip"):
        strip_rows(50, strip=0.0)
    with pytest.raises(SaliencyError, match="heatmap"):
        strip_share(np.ones((4, 4, 3)))


def test_strip_saliency_flags_heat_that_gathers_on_the_strip():
    from dermflow.evaluation.saliency import LEANS_ON_STRIP_RATIO, strip_saliency

    y = np.arange(50)[:, None] * np.ones((1, 40))
    on_lesion = np.exp(-((y - 25) ** 2) / 50.0)  # a centred blob: nearly nothing in the strip
    on_strip = np.where(y >= 44, 1.0, 0.02)  # the heat sits along the bottom edge
    calm = strip_saliency([on_lesion, on_lesion, np.zeros((50, 40))])
    assert calm["images"] == 2 and calm["ratio_to_area"] < 0.1 and not calm["leans_on_strip"]
    flagged = strip_saliency([on_strip, on_lesion])
    assert flagged["ratio_to_area"] >= LEANS_ON_STRIP_RATIO and flagged["leans_on_strip"]
    assert flagged["area_share"] == pytest.approx(6 / 50) and flagged["strip"] == pytest.approx(0.12)
    assert strip_saliency([]) is None and strip_saliency([np.zeros((5, 5))]) is None
