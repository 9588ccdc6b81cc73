"""The one image decoder of dermflow: bytes -> the uint8 square array a model sees.

Training (`dermflow.dataset.arrays`) and inference (`dermflow.evaluation.predict`) both call `load_image_array`,
so a model sees images prepared the same way in both.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dermflow.dataset.dedup import draft_for_hash, phash_of_image


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


# --------------------------------------------------------------------------------------------
# verifying fetched bytes


@dataclass(frozen=True)
class ImageFacts:
    md5: str
    width: int
    height: int
    phash: str  # 16 hex chars
    content_type: str


class ImageRejected(Exception):
    """Bytes that are not a complete, decodable image; `reason` is `not_an_image` or `too_large`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def verify_image(body: bytes) -> ImageFacts:
    """MD5, size and pHash of `body`, after decoding it fully with Pillow (JPEG in draft mode).

    Raises `ImageRejected` for anything Pillow cannot decode to the end (truncated files
    included) and for decompression bombs (Pillow's pixel limit is kept).
    """
    md5 = hashlib.md5(body).hexdigest()
    try:
        with Image.open(io.BytesIO(body)) as image:
            width, height = image.size
            image_format = image.format or ""
            # The one hashing recipe of dermflow.dataset.dedup (draft decode, then pHash), so the
            # near-duplicate threshold validated there holds for the manifest's hashes.
            draft_for_hash(image)
            image.load()
            phash = phash_of_image(image)
    except Image.DecompressionBombError as error:
        raise ImageRejected("too_large", str(error)) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as error:
        raise ImageRejected("not_an_image", str(error)) from error
    content_type = Image.MIME.get(image_format, "application/octet-stream")
    return ImageFacts(md5=md5, width=int(width), height=int(height), phash=phash, content_type=content_type)

