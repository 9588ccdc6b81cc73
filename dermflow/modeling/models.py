"""The registry of image-classifier architectures and the one builder every trainer uses.

`create_model(name, num_classes, image_size, weights=...)` returns a compiled-free
`keras.Model` that takes uint8-range float images (0-255, shape (size, size, 3)) and returns
softmax probabilities. Augmentation and each backbone's own preprocessing live *inside* the
model, so they run on the accelerator and a saved `.keras` file predicts on raw pixels.
Only Keras 3 APIs (keras.layers, keras.ops) are used, so the models also build and train under
`KERAS_BACKEND=jax`. Importing this module registers the custom layers for
`keras.saving.load_model`.
"""

from __future__ import annotations

import math
import re
import urllib.error
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers, ops

from dermflow.config import TRAIN_DEFAULTS
from dermflow.errors import DermflowError

REGISTERED_PACKAGE = "dermflow"

# ImageNet statistics used by keras.applications.imagenet_utils (RGB order).
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


class WeightsUnavailableError(DermflowError, RuntimeError):
    """Pretrained weights could not be obtained (no internet, missing file). Transient only when
    a download failed on the network; a missing or unreadable local file is permanent."""


def is_network_failure(error: BaseException) -> bool:
    """True when `error` (or what it was raised from) is a network failure a retry may cure:
    a connection error, a timeout, an HTTP 429 or 5xx. Keras' downloader re-raises these as a
    plain Exception, with the original as its context."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, urllib.error.HTTPError):
            return current.code == 429 or current.code >= 500
        if isinstance(current, (urllib.error.URLError, ConnectionError, TimeoutError)):
            return True
        current = current.__cause__ or current.__context__
    return False


@keras.saving.register_keras_serializable(package=REGISTERED_PACKAGE)
class ImagePreprocessing(layers.Layer):
    """`keras.applications.imagenet_utils.preprocess_input` as a serializable layer.

    Modes: "caffe" (RGB->BGR, minus the ImageNet mean in 0-255), "tf" (scale to -1..1),
    "torch" (scale to 0..1, minus mean, over std). Inputs are RGB in 0-255.
    """

    MODES = ("caffe", "tf", "torch")

    def __init__(self, mode: str = "tf", **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"preprocessing mode {mode!r}: expected one of {self.MODES}")
        self.mode = mode

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(IMAGENET_MEAN_RGB, dtype=self.compute_dtype)
            std = ops.convert_to_tensor(IMAGENET_STD_RGB, dtype=self.compute_dtype)
            return (x / 255.0 - mean) / std
        # caffe: channels reversed to BGR, then zero-centred per channel without scaling
        x = ops.flip(x, axis=-1)
        mean = ops.convert_to_tensor(CAFFE_MEAN_BGR, dtype=self.compute_dtype)
        return x - mean

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@dataclass(frozen=True)
class ArchSpec:
    """One registered architecture.

    `backbone`: the keras.applications constructor (None for models built from scratch).
    `preprocessing`: ImagePreprocessing mode, or None when the backbone carries its own.
    `block_regex`: its first group names the backbone block a layer belongs to, for
    unfreezing the top `fine_tune_blocks` blocks.
    """

    name: str
    min_size: int
    default_size: int
    backbone: Callable[..., keras.Model] | None
    preprocessing: str | None
    block_regex: str | None = None
    backbone_options: tuple[tuple[str, object], ...] = ()

    @property
    def pretrained(self) -> bool:
        return self.backbone is not None


def _app(attr: str) -> Callable[..., keras.Model]:
    """A lazily resolved keras.applications constructor (keeps the registry cheap to build)."""

    def build(**kwargs):
        return getattr(keras.applications, attr)(**kwargs)

    build.__name__ = attr
    return build


ARCHITECTURES: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec("baseline_cnn", 32, 128, None, None),
        ArchSpec("vgg16", 32, 224, _app("VGG16"), "caffe", r"^(block\d+)_"),
        ArchSpec("vgg19", 32, 224, _app("VGG19"), "caffe", r"^(block\d+)_"),
        ArchSpec("resnet50v2", 32, 224, _app("ResNet50V2"), "tf", r"^(conv\d+_block\d+)_"),
        ArchSpec("inception_v3", 75, 299, _app("InceptionV3"), "tf", r"^(mixed\d+)"),
        ArchSpec(
            "efficientnetv2_b0", 32, 224, _app("EfficientNetV2B0"), None, r"^(block\d+[a-z])_",
            (("include_preprocessing", True),),
        ),
        ArchSpec(
            "convnext_tiny", 32, 224, _app("ConvNeXtTiny"), None, r"_(stage_\d+_block_\d+)_",
            (("include_preprocessing", True),),
        ),
    )
}


def list_architectures() -> list[str]:
    return list(ARCHITECTURES)


def get_spec(name: str) -> ArchSpec:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"unknown architecture {name!r}; registered: {', '.join(ARCHITECTURES)}"
        ) from None


def effective_image_size(name: str, image_size: int) -> int:
    """`image_size` raised to the architecture's minimum, with a warning when raised."""
    spec = get_spec(name)
    if image_size < spec.min_size:
        warnings.warn(
            f"{name}: image_size {image_size} is below its minimum {spec.min_size}; using {spec.min_size}",
            stacklevel=3,
        )
        return spec.min_size
    return int(image_size)


def _jit_safe_on_this_backend() -> bool:
    # Keras marks RandomTranslation/RandomRotation `supports_jit = False` because TensorFlow's
    # ImageProjectiveTransform kernel has no XLA lowering; that flag switches jit off for the
    # whole model. Under JAX the same layers are plain jax.numpy (vmap of map_coordinates) and
    # compile fine, and without jit a JAX model runs op by op, orders of magnitude slower.
    return keras.backend.backend() != "tensorflow"


@keras.saving.register_keras_serializable(package=REGISTERED_PACKAGE)
class RandomTranslation(layers.RandomTranslation):
    """`keras.layers.RandomTranslation` that lets the model be jit-compiled on non-TF backends."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.supports_jit = _jit_safe_on_this_backend()


@keras.saving.register_keras_serializable(package=REGISTERED_PACKAGE)
class RandomRotation(layers.RandomRotation):
    """`keras.layers.RandomRotation` that lets the model be jit-compiled on non-TF backends."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.supports_jit = _jit_safe_on_this_backend()


@keras.saving.register_keras_serializable(package=REGISTERED_PACKAGE)
class EdgeMask(layers.Layer):
    """Sets the bottom `fraction` of each image's rows to that image's mean colour, in training
    and inference alike (it is part of the saved model, so `predict`/`evaluate` mask too).

    The image host of many dataset photos stamps its watermark along the bottom edge; a model
    that can see it may learn the host instead of the lesion (issue 17's Grad-CAM examples).
    A flat patch carries neither watermark nor lesion. Inputs are RGB in 0-255."""

    def __init__(self, fraction: float = 0.12, **kwargs):
        super().__init__(**kwargs)
        if not 0 < fraction < 0.5:
            raise ValueError(f"edge mask fraction {fraction!r}: expected a share of the height in (0, 0.5)")
        self.fraction = float(fraction)
        self.keep = None

    def build(self, input_shape):
        height = int(input_shape[1])
        rows = max(1, int(round(height * self.fraction)))
        self.keep = np.concatenate([np.ones(height - rows), np.zeros(rows)]).reshape(1, height, 1, 1)

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        keep = ops.convert_to_tensor(self.keep, dtype=self.compute_dtype)
        mean = ops.mean(x, axis=(1, 2), keepdims=True)
        return x * keep + mean * (1.0 - keep)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "fraction": self.fraction}


def augmentation_block(seed: int | None = None) -> keras.Sequential:
    """Random flip, contrast, translation and rotation; active only when training."""
    return keras.Sequential(
        [
            layers.RandomFlip("horizontal_and_vertical", seed=seed),
            layers.RandomContrast(0.2, value_range=(0, 255), seed=seed),
            RandomTranslation(0.1, 0.1, fill_mode="reflect", seed=seed),
            RandomRotation(0.1, fill_mode="reflect", seed=seed),
        ],
        name="augmentation",
    )


def classification_head(x, num_classes: int, *, head_width: int = TRAIN_DEFAULTS.head_width,
                        dropout: float = TRAIN_DEFAULTS.dropout):
    """The shared head: global average pooling, (Dense ReLU + Dropout) x 2, softmax.

    The output is float32 even under a mixed-precision policy, so the softmax and the loss
    stay numerically stable.
    """
    x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    for index in (1, 2):
        x = layers.Dense(head_width, activation="relu", name=f"head_dense{index}")(x)
        x = layers.Dropout(dropout, name=f"head_dropout{index}")(x)
    x = layers.Dense(num_classes, name="head_logits")(x)
    return layers.Activation("softmax", dtype="float32", name="probabilities")(x)


def _baseline_features(
    x,
    *,
    width_multiplier: float = 1.0,
    depth: int = 4,
    batch_norm: bool = False,
    base_filters: int = 32,
):
    """The student report's convolutional stack: Conv3x3 ReLU + MaxPool2x2 blocks, 32-64-128-256."""
    if depth < 1:
        raise ValueError(f"baseline_cnn depth must be >= 1, got {depth}")
    x = layers.Rescaling(1.0 / 255, name="rescaling")(x)
    for block in range(depth):
        filters = max(8, int(round(base_filters * (2**block) * width_multiplier)))
        if batch_norm:
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{block + 1}")(x)
            x = layers.BatchNormalization(name=f"conv{block + 1}_bn")(x)
            x = layers.Activation("relu", name=f"conv{block + 1}_relu")(x)
        else:
            x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{block + 1}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{block + 1}")(x)
    return x


def _build_backbone(spec: ArchSpec, image_size: int, weights: str | Path | None) -> keras.Model:
    weights_arg: str | None
    if weights is None or str(weights).lower() == "none":
        weights_arg = None
    elif str(weights) == "imagenet":
        weights_arg = "imagenet"
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(
                f"{spec.name}: weights file {str(path)!r} does not exist; pass weights='imagenet', "
                f"weights='none' or the path of an existing backbone (include_top=False) weights file"
            )
        weights_arg = str(path)
    kwargs = dict(
        include_top=False,
        weights=weights_arg,
        input_shape=(image_size, image_size, 3),
        **dict(spec.backbone_options),
    )
    try:
        return spec.backbone(**kwargs)
    except Exception as error:  # noqa: BLE001 - any download/file failure gets the same way out
        if weights_arg is None:
            raise
        source = "download ImageNet weights" if weights_arg == "imagenet" else f"load weights from {weights_arg!r}"
        raise WeightsUnavailableError(
            f"{spec.name}: could not {source} ({type(error).__name__}: {error}). Ways out: "
            f"weights='none' to train from random initialisation, or weights='/path/to/"
            f"{spec.name}_notop.weights.h5' (a local include_top=False weights file for the backbone; "
            f"Keras caches downloads under ~/.keras/models)",
            transient=weights_arg == "imagenet" and is_network_failure(error),
        ) from error


def backbone_of(model: keras.Model) -> keras.Model | None:
    """The pretrained backbone sub-model inside a model built by `create_model`, if any."""
    try:
        return model.get_layer("backbone")
    except ValueError:
        return None


def create_model(
    name: str,
    num_classes: int,
    image_size: int,
    weights: str | Path | None = TRAIN_DEFAULTS.weights,
    *,
    head_width: int = TRAIN_DEFAULTS.head_width,
    dropout: float = TRAIN_DEFAULTS.dropout,
    augment: bool = TRAIN_DEFAULTS.augment,
    seed: int | None = None,
    edge_mask: float = TRAIN_DEFAULTS.edge_mask,
    **arch_options,
) -> keras.Model:
    """Build architecture `name` for `num_classes` classes on (image_size, image_size, 3) inputs.

    `weights`: "imagenet", "none" (or None) or a path to a local backbone weights file;
    ignored by `baseline_cnn`. `arch_options` are architecture specific: `baseline_cnn`
    takes `width_multiplier`, `depth`, `batch_norm`, `base_filters`. `edge_mask` > 0 masks that
    share of the bottom rows first (`EdgeMask`). The pretrained backbone is the nested layer
    named "backbone".
    """
    spec = get_spec(name)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    image_size = effective_image_size(name, image_size)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = EdgeMask(edge_mask, name="edge_mask")(inputs) if edge_mask else inputs
    x = augmentation_block(seed)(x) if augment else x
    if spec.backbone is None:
        x = _baseline_features(x, **arch_options)
    else:
        if arch_options:
            raise ValueError(f"{name} takes no architecture options; got {sorted(arch_options)}")
        if spec.preprocessing:
            x = ImagePreprocessing(spec.preprocessing, name="preprocessing")(x)
        backbone = _build_backbone(spec, image_size, weights)
        backbone.name = "backbone"
        x = backbone(x)
    outputs = classification_head(x, num_classes, head_width=head_width, dropout=dropout)
    return keras.Model(inputs, outputs, name=name)


def _is_batch_norm(layer) -> bool:
    return isinstance(layer, layers.BatchNormalization)


def freeze_backbone(model: keras.Model) -> None:
    """Warm-up phase: the whole backbone frozen (its BatchNormalization in inference mode)."""
    backbone = backbone_of(model)
    if backbone is not None:
        backbone.trainable = False


def unfreeze_top(
    model: keras.Model,
    *,
    fraction: float = TRAIN_DEFAULTS.fine_tune_fraction,
    blocks: int | None = None,
) -> int:
    """Fine-tuning phase: unfreeze the top of the backbone, keep BatchNormalization frozen.

    With `blocks`, the layers of the last `blocks` backbone blocks (per the architecture's
    block pattern) are unfrozen; otherwise the top `fraction` of the backbone's layers.
    BatchNormalization layers stay frozen (inference mode, moving statistics kept) because
    small fine-tuning batches would wreck the ImageNet statistics. Returns the number of
    weight-carrying layers made trainable.
    """
    backbone = backbone_of(model)
    if backbone is None:
        model.trainable = True
        return len([layer for layer in model.layers if layer.weights])
    spec = ARCHITECTURES.get(model.name)
    backbone_layers = [layer for layer in backbone.layers if not isinstance(layer, layers.InputLayer)]
    selected: list = []
    if blocks is not None and spec is not None and spec.block_regex:
        pattern = re.compile(spec.block_regex)
        current = "stem"
        owner: list[str] = []
        for layer in backbone_layers:
            match = pattern.search(layer.name)
            if match:
                current = match.group(1)
            owner.append(current)
        ordered = list(dict.fromkeys(owner))
        top_blocks = set(ordered[-blocks:]) if blocks > 0 else set()
        selected = [layer for layer, block in zip(backbone_layers, owner) if block in top_blocks]
    else:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fine_tune_fraction must be within [0, 1], got {fraction}")
        count = math.ceil(fraction * len(backbone_layers))
        selected = backbone_layers[len(backbone_layers) - count :] if count else []
    backbone.trainable = True
    chosen = {id(layer) for layer in selected}
    unfrozen = 0
    for layer in backbone_layers:
        layer.trainable = id(layer) in chosen and not _is_batch_norm(layer)
        if layer.trainable and layer.weights:
            unfrozen += 1
    return unfrozen
