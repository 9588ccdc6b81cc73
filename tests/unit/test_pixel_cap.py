"""Pixel bombs: an image declaring more than MAX_IMAGE_PIXELS is refused from its header, before
it is decoded, everywhere images are decoded; in predict/evaluate it is one image's error."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from dermflow.ingestion.images import (
    MAX_IMAGE_PIXELS,
    ImageRejected,
    ImageTooLargeError,
    load_image_array,
    perceptual_hash,
    verify_image,
)
from tests.support.hostile import pixel_bomb_png

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = pixel_bomb_png(12000, 12000)
    assert len(data) < 1_000_000 and 12000 * 12000 > MAX_IMAGE_PIXELS
    return data


@pytest.fixture(autouse=True)
def _no_pillow_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def small_png(color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 16), color).save(buffer, format="PNG")
    return buffer.getvalue()


class UniformModel:
    def predict_on_batch(self, batch):
        return np.full((len(batch), 3), 1 / 3, dtype=np.float32)


def bundle():
    from dermflow.evaluation.predict import bundle_from_model

    return bundle_from_model(UniformModel(), {"class_names": ["a", "b", "c"], "image_size": 8})


def test_decoders_refuse_a_pixel_bomb_before_decoding(bomb):
    with pytest.raises(ImageTooLargeError, match="12000x12000 = 144,000,000 pixels is over the cap"):
        load_image_array(bomb, 64)
    with pytest.raises(ImageTooLargeError):
        perceptual_hash(bomb)
    with pytest.raises(ImageRejected) as rejected:  # fetch and import verification
        verify_image(bomb)
    assert rejected.value.reason == "too_large"


def test_the_training_cache_refuses_a_pixel_bomb(bomb, tmp_path):
    from dermflow.dataset.arrays import DataError, decode_image

    path = tmp_path / "bomb"
    path.write_bytes(bomb)
    with pytest.raises(DataError, match="over the cap"):
        decode_image(path, 32)


def test_the_report_thumbnail_refuses_a_pixel_bomb(bomb):
    from dermflow.evaluation.figures import decode_thumbnail

    with pytest.raises(ImageTooLargeError):
        decode_thumbnail(bomb)


def test_predict_gives_the_bomb_its_own_error_and_scores_the_others(bomb, tmp_path):
    from dermflow.evaluation.predict import predict_images

    good, bad = tmp_path / "good.png", tmp_path / "bomb.png"
    good.write_bytes(small_png())
    bad.write_bytes(bomb)
    results = predict_images(bundle(), [str(good), str(bad), str(good)], top_k=2)
    assert [len(result["top"]) for result in results] == [2, 0, 2]
    assert results[0]["error"] is None and "over the cap" in results[1]["error"]


def test_evaluate_counts_the_bomb_as_unreadable_and_says_why(bomb, tmp_path):
    from dermflow.evaluation.predict import evaluate_dataset

    images = tmp_path / "images"
    images.mkdir()
    (images / f"{'a' * 32}.png").write_bytes(small_png())
    (images / f"{'b' * 32}.png").write_bytes(bomb)
    csv = tmp_path / "rows.csv"
    csv.write_text(f"md5hash,label,fitzpatrick_scale\n{'a' * 32},a,2\n{'b' * 32},b,3\n")
    result = evaluate_dataset(bundle(), csv, images)
    assert result["evaluated"] == 1 and result["skipped"]["unreadable_image"] == 1
    assert "over the cap" in result["unreadable_errors"]["b" * 32]


def test_saliency_refuses_a_pixel_bomb(bomb, tmp_path):
    from dermflow.evaluation.predict import explain_image

    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    with pytest.raises(ImageTooLargeError):
        explain_image(bundle(), str(path), tmp_path / "out.png")
    assert not (tmp_path / "out.png").exists()
