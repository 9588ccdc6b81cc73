"""The grayscale decode without a progressive JPEG's chroma-only scans (`jpeg_scans.luma_scans`):
the same pixels and hashes, the same verdict on cut bodies, and bodies it is not sure of left whole."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

import dermflow.ingestion.images as images
from dermflow.ingestion.images import ImageRejected, draft_for_hash, perceptual_hash, verify_image
from dermflow.ingestion.jpeg_scans import _Frame, luma_scans

pytestmark = pytest.mark.unit


def photo_like(seed: int = 0, size: tuple[int, int] = (480, 360)) -> Image.Image:
    """Smooth colour gradients plus noise: chroma that is not flat, so chroma scans carry data."""
    rng = np.random.default_rng(seed)
    height, width = size[1], size[0]
    y, x = np.mgrid[0:height, 0:width] / max(size)
    channels = [np.sin(6 * x + seed), np.cos(5 * y - seed), np.sin(4 * (x + y))]
    pixels = np.stack(channels, axis=-1) * 90 + 128 + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=88, **options)
    return buffer.getvalue()


def scan_headers(body: bytes) -> list[bytes]:
    """The SOS headers of a JPEG, in order (parsed by Pillow-independent means: marker walk)."""
    from dermflow.ingestion.jpeg_scans import SOS, _entropy_end, _segment, _skip_fill_bytes

    headers, position = [], 2
    while body[_skip_fill_bytes(body, position) + 1] != 0xD9:
        position = _skip_fill_bytes(body, position)
        marker = body[position + 1]
        end, header = _segment(body, position, marker)
        if marker == SOS:
            headers.append(header)
            end = _entropy_end(body, end)
        position = end
    return headers


def gray_draft_pixels(body: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(body)) as image:
        draft_for_hash(image)
        image.load()
        assert image.mode == "L"
        return np.asarray(image)


def verdict(body: bytes) -> tuple[str, object]:
    """What `verify_image` says of `body`: accepted with its facts, or rejected for a reason."""
    try:
        return "accepted", verify_image(body)
    except ImageRejected as rejected:
        return "rejected", rejected.reason


def verdict_of_whole_body(body: bytes, monkeypatch) -> tuple[str, object]:
    """`verdict` with every scan decoded, as before `luma_scans`."""
    with monkeypatch.context() as patch:
        patch.setattr(images, "luma_scans", lambda data: data)
        return verdict(body)


@pytest.fixture(scope="module")
def progressive() -> bytes:
    return jpeg_bytes(photo_like(), progressive=True)


def test_a_progressive_jpeg_loses_only_its_chroma_scans_and_decodes_to_the_same_gray(progressive, monkeypatch):
    kept = luma_scans(progressive)
    luma_id = scan_headers(progressive)[0][1]
    dropped = [h for h in scan_headers(progressive) if h not in scan_headers(kept)]
    assert dropped and all(h[0] == 1 and h[1] != luma_id for h in dropped)
    assert [h for h in scan_headers(progressive) if h[0] > 1 or h[1] == luma_id] == scan_headers(kept)
    assert len(kept) < len(progressive)
    np.testing.assert_array_equal(gray_draft_pixels(kept), gray_draft_pixels(progressive))
    assert verdict(progressive) == verdict_of_whole_body(progressive, monkeypatch)
    assert verdict(progressive)[0] == "accepted"
    assert perceptual_hash(progressive) == perceptual_hash(kept)


def test_bodies_it_is_not_sure_of_come_back_whole(progressive):
    baseline = jpeg_bytes(photo_like())
    gray = jpeg_bytes(photo_like().convert("L"), progressive=True)
    png = io.BytesIO()
    photo_like().save(png, "PNG")
    for body in (baseline, gray, png.getvalue(), b"", b"\xff\xd8", b"\xff\xd8garbage", progressive + b"\x00"):
        assert luma_scans(body) is body or body == progressive + b"\x00"
    # single-component scans in a frame that is not progressive: every scan is kept
    sequential = progressive.replace(b"\xff\xc2", b"\xff\xc1", 1)
    assert len(scan_headers(sequential)) > 3 and luma_scans(sequential) is sequential
    # bytes after EOI are not part of the image: the body parses up to EOI
    assert luma_scans(progressive + b"\x00") == luma_scans(progressive)


def test_a_body_cut_anywhere_comes_back_whole_and_is_rejected(progressive):
    first_chroma_scan = progressive.index(b"\xff\xda", progressive.index(b"\xff\xda") + 2)
    cuts = sorted({*range(200, len(progressive) - 1, len(progressive) // 23), first_chroma_scan + 20, len(progressive) - 2})
    for cut in cuts:
        body = progressive[:cut]
        assert luma_scans(body) is body, cut
        with pytest.raises(ImageRejected) as caught:
            verify_image(body)
        assert caught.value.reason == "not_an_image"


def replace_app0(body: bytes, segment: bytes) -> bytes:
    assert body[2:4] == b"\xff\xe0"
    app0_end = 4 + int.from_bytes(body[4:6], "big")
    return body[:2] + segment + body[app0_end:]


def test_an_rgb_coded_jpeg_keeps_every_scan(progressive):
    # An Adobe marker with transform 0: libjpeg reads the components as R, G and B, and its
    # grayscale output mixes all three, so no scan may be left out.
    adobe_rgb = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
    body = replace_app0(progressive, adobe_rgb)
    assert luma_scans(body) is body
    adobe_ycbcr = adobe_rgb[:-1] + b"\x01"
    assert len(luma_scans(replace_app0(progressive, adobe_ycbcr))) < len(progressive)
    assert _Frame(component_ids=(82, 71, 66)).is_ycbcr() is False
    assert _Frame(component_ids=(1, 2, 3)).is_ycbcr() is True
    assert _Frame(component_ids=(82, 71, 66), jfif=True).is_ycbcr() is True


def test_a_chroma_scan_libjpeg_would_refuse_is_left_to_libjpeg(progressive):
    luma_id = scan_headers(progressive)[0][1]
    chroma = next(h for h in scan_headers(progressive) if h[0] == 1 and h[1] != luma_id and h[3] > 0)
    at = progressive.index(b"\xff\xda" + (len(chroma) + 2).to_bytes(2, "big") + chroma) + 4
    undefined_table = chroma[:2] + bytes([(chroma[2] & 0xF0) | 3]) + chroma[3:]
    past_63 = chroma[:4] + bytes([64]) + chroma[5:]
    for header in (undefined_table, past_63):
        body = progressive[:at] + header + progressive[at + len(chroma):]
        assert luma_scans(body) is body


@pytest.mark.slow
def test_every_progressive_atlas_jpeg_hashes_the_same_without_its_chroma_scans(atlas_dir, monkeypatch):
    bodies = [path.read_bytes() for path in sorted((atlas_dir / "images").glob("*.jpg"))[::4]]
    shortened = [body for body in bodies if luma_scans(body) is not body]
    assert len(shortened) > 0.8 * len(bodies)  # atlas20's JPEGs are mostly progressive
    for body in shortened:
        assert verdict(body) == verdict_of_whole_body(body, monkeypatch)
        assert verdict(body)[0] == "accepted"


def test_random_damage_gets_the_same_verdict_and_facts_with_and_without_the_chroma_scans(progressive, monkeypatch):
    # Bit flips, overwritten, deleted and inserted bytes and cuts, anywhere in the body: what
    # verify_image says (accepted with these facts, or rejected for this reason) must not
    # depend on leaving out the chroma scans. (3,000 such trials on atlas20 JPEGs also agreed.)
    rng = random.Random(18)
    outcomes = set()
    for _ in range(300):
        body = bytearray(progressive)
        at, kind = rng.randrange(2, len(body) - 2), rng.choice(("flip", "byte", "cut", "delete", "insert"))
        if kind == "flip":
            body[at] ^= 1 << rng.randrange(8)
        elif kind == "byte":
            body[at] = rng.randrange(256)
        elif kind == "cut":
            del body[at:]
        elif kind == "delete":
            del body[at:at + rng.randrange(1, 64)]
        else:
            body[at:at] = rng.randbytes(rng.randrange(1, 16))
        with_scans_left_out = verdict(bytes(body))
        assert verdict_of_whole_body(bytes(body), monkeypatch) == with_scans_left_out, (kind, at)
        outcomes.add(with_scans_left_out[0])
    assert outcomes == {"accepted", "rejected"}
