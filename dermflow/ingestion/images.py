"""What dermflow does with image bytes: decode them for a model, hash them, verify fetched ones.

- `load_image_array`, the one image decoder: bytes -> the uint8 square array a model sees.
  Training (`dermflow.dataset.arrays`) and inference (`dermflow.evaluation.predict`) both call
  it, so a model sees images prepared the same way in both.
- `perceptual_hash` (with `draft_for_hash` and `phash_of_image`), the one hashing recipe (pHashes
  of the whole image and of two centred crops): the fetcher and the importer store it in the
  manifest and `dermflow.dataset.dedup` groups by it.
- `verify_image`: a fetched body is stored only if it decodes to the end (in grayscale, so a
  progressive JPEG's chroma-only scans are left out: `dermflow.ingestion.jpeg_scans`).

Every decode opens the image through `open_image`, which refuses more than `MAX_IMAGE_PIXELS`
pixels from the header, before any pixel is decoded: a small PNG can declare 12000x12000
pixels and cost gigabytes once loaded (a pixel bomb). Pillow's own limit (about 179 Mpx before
an error) is far above it and only warns below that.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dermflow.errors import DermflowError, RejectedError
from dermflow.ingestion.jpeg_scans import luma_scans

# The most pixels any image may have to be decoded: fetch and import verification, the
# training cache, predict, evaluate and saliency. Fitzpatrick 17k images are well under 1 Mpx;
# 40 Mpx (e.g. 7300x5475, a large camera's photo) is ~120 MB as RGB once decoded.
MAX_IMAGE_PIXELS = 40_000_000


class ImageDecodeError(DermflowError, ValueError):
    """Bytes that are not a decodable image (permanent)."""


class NotAnImageError(DermflowError, ValueError):
    """The bytes do not decode as an image (permanent)."""


class ImageTooLargeError(NotAnImageError, ImageDecodeError):
    """The image declares more pixels than `MAX_IMAGE_PIXELS` (or Pillow's decompression-bomb
    limit); refused before it is decoded."""


@contextmanager
def open_image(data: bytes) -> Iterator[Image.Image]:
    """The Pillow image of `data`, opened (header read, nothing decoded) and checked against
    `MAX_IMAGE_PIXELS`. Raises `ImageTooLargeError`; Pillow's errors for undecodable bytes pass."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageTooLargeError(
                    f"image of {width}x{height} = {width * height:,} pixels is over the cap of "
                    f"{MAX_IMAGE_PIXELS:,} pixels (dermflow.ingestion.images.MAX_IMAGE_PIXELS); not decoded")
            yield image
    # Image.open itself raises past ~179 Mpx (and warns past ~89 Mpx: an error where warnings are)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLargeError(f"image too large to decode: {error}") from None


def load_image_array(image_bytes: bytes, image_size: int) -> np.ndarray:
    """Decode image bytes -> uint8 array (image_size, image_size, 3).

    JPEGs decoded in draft mode at >= 2x the target size, EXIF orientation applied, converted
    to RGB (alpha composited on white), the centred square crop of the shorter side, resized
    bilinearly (Pillow, antialiased when shrinking). Training and inference both call this.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    try:
        with open_image(image_bytes) as opened:
            # JPEG draft mode decodes at a reduced scale (still >= 2x the target on the short
            # side): several times faster for large photos, deterministic, quality kept by the
            # antialiased resize below.
            opened.draft("RGB", (image_size * 2, image_size * 2))
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except ImageTooLargeError:
        raise
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
# the perceptual hash

PHASH_HEX_DIGITS = 16  # one pHash: 64 bits
# The hash recipe: a pHash of the whole image and of its centred crops keeping these fractions
# of each side. A copy cropped by 4% per side is the original's 92% crop, and its own 92% crop
# is about the original's 85% crop, so `dermflow.dataset.dedup` matches such copies by the
# shifted hashes (validated on atlas20 in tests/unit/test_dedup_atlas.py).
HASH_CROPS = (1.0, 0.92, 0.85)
HASH_HEX_DIGITS = PHASH_HEX_DIGITS * len(HASH_CROPS)
# JPEGs are decoded in grayscale at a reduced scale (DCT scaling) no smaller than this on their
# short side: pHash looks at 32x32 pixels. On atlas20, 128 px moves a hash by 0.5 bits on average
# (at most 4) from a full decode and gives the same near-duplicate pairs, at a fraction of the CPU.
DRAFT_MIN_SIDE = 128
_PHASH_SIDE = 32  # pHash: the 8x8 lowest frequencies of the DCT of a 32x32 grayscale image


def _dct_rows() -> np.ndarray:
    """The first 8 rows of the (unnormalized, scipy.fftpack type II) DCT matrix of size 32."""
    n = np.arange(_PHASH_SIDE)
    k = np.arange(8)
    return 2.0 * np.cos(np.pi * k[:, None] * (2 * n[None, :] + 1) / (2 * _PHASH_SIDE))


_DCT8 = _dct_rows()


def draft_for_hash(image) -> None:
    """Ask Pillow to decode a JPEG in grayscale at reduced scale (DCT scaling), no smaller than
    `DRAFT_MIN_SIDE` on the short side: every MCU is still decoded, so truncation is caught."""
    if image.format == "JPEG":
        width, height = image.size
        scale = max(1.0, min(width, height) / DRAFT_MIN_SIDE)
        # draft keeps the image at least as large as the requested size
        image.draft("L", (int(width / scale), int(height / scale)))


def _phash_bits(gray: Image.Image, box: tuple[float, float, float, float]) -> int:
    """imagehash's pHash of the `box` region of a grayscale image, as a 64-bit integer: the same
    resize (Lanczos to 32x32) and DCT, computed as two small matrix products."""
    pixels = np.asarray(gray.resize((_PHASH_SIDE, _PHASH_SIDE), Image.Resampling.LANCZOS, box=box), dtype=np.float64)
    low = _DCT8 @ pixels @ _DCT8.T
    bits = (low > np.median(low)).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def phash_of_image(image) -> str:
    """The hash recipe of a decoded Pillow image: `HASH_HEX_DIGITS` lowercase hex chars, one
    16-digit pHash per `HASH_CROPS` entry (the first is imagehash's pHash of the whole image)."""
    gray = image if image.mode == "L" else image.convert("L")
    width, height = gray.size
    parts = []
    for keep in HASH_CROPS:
        dx, dy = width * (1 - keep) / 2, height * (1 - keep) / 2
        parts.append(f"{_phash_bits(gray, (dx, dy, width - dx, height - dy)):016x}")
    return "".join(parts)


def perceptual_hash(image_bytes: bytes, draft: bool = True) -> str:
    """The hash recipe of an encoded image (`phash_of_image`): `HASH_HEX_DIGITS` hex chars.

    With `draft`, JPEGs are decoded in grayscale at a reduced scale (`draft_for_hash`), which
    changes a hash by a few bits (tested on atlas20). The fetcher and the importer hash the same way.
    Raises `NotAnImageError` when the bytes do not decode (`ImageTooLargeError` when the
    image has more than `MAX_IMAGE_PIXELS` pixels).
    """
    try:
        # The grayscale draft never uses a progressive JPEG's chroma-only scans (`luma_scans`)
        with open_image(luma_scans(image_bytes) if draft else image_bytes) as image:
            if draft:
                draft_for_hash(image)
            image.load()
            return phash_of_image(image)
    except ImageTooLargeError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise NotAnImageError(f"cannot decode image ({len(image_bytes)} bytes): {error}") from error


# --------------------------------------------------------------------------------------------
# verifying fetched bytes


@dataclass(frozen=True)
class ImageFacts:
    md5: str
    width: int
    height: int
    phash: str  # HASH_HEX_DIGITS hex chars (phash_of_image)
    content_type: str


class ImageRejected(RejectedError):
    """Bytes that are not a complete, decodable image (permanent); `reason` is `not_an_image`
    or `too_large`."""


def verify_image(body: bytes) -> ImageFacts:
    """MD5, size and pHash of `body`, after decoding it fully with Pillow (JPEG in grayscale
    draft mode, without a progressive JPEG's chroma-only scans, which that decode never uses).

    Raises `ImageRejected` for anything Pillow cannot decode to the end (truncated files
    included), and `too_large` for more than `MAX_IMAGE_PIXELS` pixels (checked before decoding).
    """
    md5 = hashlib.md5(body).hexdigest()
    try:
        # Decoded in grayscale (below), which never uses a progressive JPEG's chroma-only scans:
        # `luma_scans` leaves them out, and still hands over a body cut anywhere whole.
        with open_image(luma_scans(body)) as image:
            width, height = image.size
            image_format = image.format or ""
            # The one hashing recipe (draft decode, then pHash), so the near-duplicate threshold
            # validated in dermflow.dataset.dedup holds for the manifest's hashes.
            draft_for_hash(image)
            image.load()
            phash = phash_of_image(image)
    except ImageTooLargeError as error:
        raise ImageRejected("too_large", str(error)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as error:
        raise ImageRejected("not_an_image", str(error)) from error
    content_type = Image.MIME.get(image_format, "application/octet-stream")
    return ImageFacts(md5=md5, width=int(width), height=int(height), phash=phash, content_type=content_type)

