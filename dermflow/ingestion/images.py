"""The one image decoder of dermflow: bytes -> the uint8 square array a model sees.

Training (`dermflow.dataset.arrays`) and inference (`dermflow.evaluation.predict`) both call `load_image_array`,
so a model sees images prepared the same way in both.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageDecodeError(ValueError):
    """Bytes that are not a decodable image."""


def load_image_array(image_bytes: bytes, image_size: int) -> np.ndarray:
    """Decode image bytes -> uint8 array (image_size, image_size, 3).

    JPEGs decoded in draft mode at >= 2x the target size, EXIF orientation applied, converted
    to RGB (alpha composited on white), the centred square crop of the shorter side, resized
    bilinearly (Pillow, antialiased when shrinking). Training and inference both call this.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    try:
        with Image.open(io.BytesIO(image_bytes)) as opened:
            # JPEG draft mode decodes at a reduced scale (still >= 2x the target on the short
            # side): several times faster for large photos, deterministic, quality kept by the
            # antialiased resize below.
            opened.draft("RGB", (image_size * 2, image_size * 2))
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageDecodeError(f"not a decodable image ({len(image_bytes)} bytes): {error}") from error
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("RGB")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    resized = image.resize(
        (image_size, image_size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side)
    )
    return np.asarray(resized, dtype=np.uint8)
