"""Altered copies of real images, the near-duplicates the hash recipe must find: the crop, resize
and re-encode of issue 18 (`planted_copy`), and the re-encoded, half-size and 2%-per-side crops
that justified the threshold (`threshold_variants`). Used by the dedup tests and the hash-scale
benchmark."""

from __future__ import annotations

import io


def planted_copy(data: bytes) -> bytes:
    """Cropped by 4% per side, resized to 90%, re-encoded at JPEG quality 70."""
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = image.size
    dx, dy = round(width * 0.04), round(height * 0.04)
    image = image.crop((dx, dy, width - dx, height - dy))
    image = image.resize((round(image.width * 0.9), round(image.height * 0.9)), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=70)
    return buffer.getvalue()


def jpeg_bytes(image, quality: int = 85) -> bytes:
    """A Pillow image encoded as JPEG."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def threshold_variants(data: bytes) -> dict[str, bytes]:
    """Re-encoded at JPEG quality 30, resized to half size, and cropped by 2% per side."""
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = image.size
    dx, dy = round(width * 0.02), round(height * 0.02)
    return {
        "jpeg_q30": jpeg_bytes(image, 30),
        "half_size": jpeg_bytes(image.resize((width // 2, height // 2), Image.LANCZOS)),
        "crop_4pct": jpeg_bytes(image.crop((dx, dy, width - dx, height - dy))),
    }
