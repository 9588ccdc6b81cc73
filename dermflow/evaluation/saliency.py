"""Grad-CAM saliency maps: where in an image a classifier's decision came from.

`grad_cam` works on any Keras 3 model run with the TensorFlow backend, including models that
nest a `keras.applications` backbone as a single layer: it captures the chosen feature
layer's output during an ordinary forward pass instead of rebuilding the graph, so the
model's structure does not matter. `overlay_heatmap` renders the map over the image as PNG.
`strip_saliency` is the watermark check: how much of a set of maps' heat lies in the bottom
strip where the image host stamps its watermark, against that strip's share of the area.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from PIL import Image

from dermflow.errors import DermflowError


class SaliencyError(DermflowError, ValueError):
    """No usable feature layer, or gradients could not be computed."""


def iter_leaf_layers(model: Any) -> Iterator[Any]:
    """The model's layers in order, descending into nested models (a backbone used as a
    layer): the nested model itself is not yielded, its layers are."""
    for layer in getattr(model, "layers", []):
        if getattr(layer, "layers", None):
            yield from iter_leaf_layers(layer)
        else:
            yield layer


def _output_rank(layer: Any) -> int | None:
    try:
        output = layer.output
    except (AttributeError, ValueError, RuntimeError):
        return None
    shape = getattr(output, "shape", None)
    return len(shape) if shape is not None else None


def find_feature_layer(model: Any, layer_name: str | None = None) -> Any:
    """`layer_name` (searched in nested models too), else the last layer with a 4D
    (batch, h, w, channels) output that is not an input layer."""
    leaves = list(iter_leaf_layers(model))
    if layer_name is not None:
        for layer in leaves:
            if layer.name == layer_name:
                return layer
        raise SaliencyError(
            f"no layer named {layer_name!r}; 4D layers: "
            f"{[layer.name for layer in leaves if _output_rank(layer) == 4]}"
        )
    for layer in reversed(leaves):
        if type(layer).__name__ == "InputLayer":
            continue
        if _output_rank(layer) == 4:
            return layer
    raise SaliencyError(f"model {getattr(model, 'name', model)!r} has no layer with a 4D output")


def _model_input_size(model: Any) -> tuple[int | None, int | None]:
    try:
        shape = model.input_shape
    except (AttributeError, ValueError, RuntimeError):
        return None, None
    if isinstance(shape, list):
        shape = shape[0]
    return (shape[1], shape[2]) if shape is not None and len(shape) == 4 else (None, None)


def _resize_float(array: np.ndarray, height: int, width: int) -> np.ndarray:
    if array.shape[:2] == (height, width):
        return array.astype(np.float32)
    if array.ndim == 2:
        return np.asarray(
            Image.fromarray(np.ascontiguousarray(array, dtype=np.float32)).resize((width, height), Image.Resampling.BILINEAR),
            dtype=np.float32,
        )
    channels = [_resize_float(array[..., c], height, width) for c in range(array.shape[-1])]
    return np.stack(channels, axis=-1)


def _final_softmax_layer(model: Any) -> Any | None:
    """The model's last layer when it applies softmax (its activation is swapped for the
    identity during Grad-CAM: gradients of saturated probabilities vanish, logits do not)."""
    leaves = list(iter_leaf_layers(model))
    if not leaves:
        return None
    activation = getattr(leaves[-1], "activation", None)
    return leaves[-1] if getattr(activation, "__name__", "") == "softmax" else None


@contextmanager
def _capturing_features(feature_layer: Any, softmax_layer: Any, on_features: Callable[[Any], None]):
    """While active, `feature_layer` hands each output to `on_features`, and the final softmax
    (if any) is linear: Grad-CAM differentiates the class logit, not its probability.
    Both are restored on exit."""
    import keras

    original_call = feature_layer.call
    had_own_call = "call" in feature_layer.__dict__
    original_activation = softmax_layer.activation if softmax_layer is not None else None

    def capturing_call(*args, **kwargs):
        outputs = original_call(*args, **kwargs)
        on_features(outputs)
        return outputs

    # object.__setattr__: bypass Keras' attribute tracking; restored in `finally`.
    object.__setattr__(feature_layer, "call", capturing_call)
    if softmax_layer is not None:
        object.__setattr__(softmax_layer, "activation", keras.activations.linear)
    try:
        yield
    finally:
        if had_own_call:
            object.__setattr__(feature_layer, "call", original_call)
        else:
            object.__delattr__(feature_layer, "call")
        if softmax_layer is not None:
            object.__setattr__(softmax_layer, "activation", original_activation)


def _class_score(outputs: Any, class_index: int | None) -> tuple[Any, int]:
    """The logit to explain (of `class_index`, default the predicted class) -> (score, index)."""
    import tensorflow as tf

    if isinstance(outputs, (list, tuple)):
        outputs = outputs[0]
    n_classes = int(outputs.shape[-1])
    if class_index is None:
        class_index = int(tf.argmax(outputs[0]))
    if not 0 <= class_index < n_classes:
        raise SaliencyError(f"class_index {class_index} is out of range for {n_classes} classes")
    return outputs[:, class_index], class_index


def _weighted_heatmap(features: Any, gradients: Any, height: int, width: int) -> np.ndarray:
    """Feature maps weighted by their mean gradient, rectified, normalised to [0, 1] and
    resized to (height, width); all zeros when nothing supports the class."""
    import tensorflow as tf

    channel_weights = tf.reduce_mean(tf.cast(gradients, tf.float32), axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(tf.cast(features, tf.float32) * channel_weights, axis=-1))[0].numpy()
    cam = np.nan_to_num(cam, nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(cam.max()) if cam.size else 0.0
    cam = cam / peak if peak > 0 else np.zeros_like(cam)
    heatmap = _resize_float(cam, height, width)
    return np.clip(np.nan_to_num(heatmap, nan=0.0), 0.0, 1.0).astype(np.float32)


def grad_cam(
    model: Any,
    image: np.ndarray,
    class_index: int | None = None,
    layer_name: str | None = None,
) -> np.ndarray:
    """Grad-CAM heatmap (H, W) in [0, 1] for one image (H, W, 3), uint8 or float 0-255.

    `class_index`: the class to explain (default: the predicted one). `layer_name`: the
    feature layer (default: the last 4D layer, found inside nested backbones too). The image
    is resized to the model's input size for the forward pass and the map back to (H, W).
    All zeros when no region supports the class.
    """
    import tensorflow as tf

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise SaliencyError(f"image must be (H, W, 3); got shape {image.shape}")
    height, width = image.shape[:2]
    input_h, input_w = _model_input_size(model)
    model_image = _resize_float(image.astype(np.float32), input_h or height, input_w or width)
    batch = tf.convert_to_tensor(model_image[None, ...], dtype=tf.float32)
    feature_layer = find_feature_layer(model, layer_name)
    captured: dict[str, Any] = {}

    with tf.GradientTape() as tape:

        def keep_features(features: Any) -> None:
            tape.watch(features)
            captured["features"] = features

        with _capturing_features(feature_layer, _final_softmax_layer(model), keep_features):
            outputs = model(batch, training=False)
        score, class_index = _class_score(outputs, class_index)

    features = captured.get("features")
    if features is None:
        raise SaliencyError(f"layer {feature_layer.name!r} was not called in the forward pass")
    gradients = tape.gradient(score, features)
    if gradients is None:
        raise SaliencyError(f"the score of class {class_index} does not depend on layer {feature_layer.name!r}")
    return _weighted_heatmap(features, gradients, height, width)


def overlay_heatmap(
    image_uint8: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.45, colormap: str = "jet"
) -> bytes:
    """PNG bytes of the image with the heatmap blended over it in a matplotlib colormap."""
    from matplotlib import colormaps

    image = np.asarray(image_uint8)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise SaliencyError(f"image must be (H, W, 3); got shape {image.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise SaliencyError(f"alpha must be in [0, 1], got {alpha}")
    heat = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0)
    if heat.ndim != 2:
        raise SaliencyError(f"heatmap must be (H, W); got shape {heat.shape}")
    heat = _resize_float(heat, image.shape[0], image.shape[1])
    colors = colormaps[colormap](heat)[..., :3] * 255.0
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colors
    buffer = io.BytesIO()
    Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# --- the watermark check ----------------------------------------------------------------------
# The image host stamps its "SFS" watermark along the bottom edge of many Fitzpatrick 17k
# photos: a model that learned the host rather than the lesion puts its Grad-CAM heat there.
WATERMARK_STRIP = 0.12  # share of the height at the bottom edge that the watermark falls in
LEANS_ON_STRIP_RATIO = 1.5  # strip heat at this multiple of its area share (or more) is flagged


def strip_rows(height: int, strip: float = WATERMARK_STRIP) -> int:
    """How many bottom rows of an image `height` rows tall the strip covers (at least one)."""
    if not 0.0 < strip < 1.0:
        raise SaliencyError(f"strip must be in (0, 1), got {strip}")
    return max(1, int(round(height * strip)))


def strip_share(heatmap: np.ndarray, strip: float = WATERMARK_STRIP) -> float | None:
    """The share of a heatmap's mass inside its bottom strip; None for an all-zero map."""
    heat = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float64)), 0.0, None)
    if heat.ndim != 2:
        raise SaliencyError(f"heatmap must be (H, W); got shape {heat.shape}")
    total = float(heat.sum())
    if total <= 0:
        return None
    return float(heat[-strip_rows(heat.shape[0], strip):, :].sum()) / total


def strip_saliency(heatmaps: Iterable[np.ndarray], strip: float = WATERMARK_STRIP) -> dict | None:
    """Mean Grad-CAM share in the bottom strip over `heatmaps`, against the strip's share of the
    area: a ratio near 1 is heat spread like the image; at `LEANS_ON_STRIP_RATIO` or more the
    heat gathers on the watermark's strip. None when no map has any mass."""
    shares, areas = [], []
    for heatmap in heatmaps:
        share = strip_share(heatmap, strip)
        if share is not None:
            shares.append(share)
            areas.append(strip_rows(np.shape(heatmap)[0], strip) / np.shape(heatmap)[0])
    if not shares:
        return None
    share, area = float(np.mean(shares)), float(np.mean(areas))
    ratio = share / area
    return {"strip": strip, "images": len(shares), "strip_share": share, "area_share": area,
            "ratio_to_area": ratio, "leans_on_strip": ratio >= LEANS_ON_STRIP_RATIO}
