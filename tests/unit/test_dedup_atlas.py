"""The near-duplicate threshold, justified on real atlas20 images (skipped without ../shared).

Copies of real images re-encoded at JPEG quality 30, resized to half size, or cropped by 4%
(2% off each side) must group with their originals at `DEFAULT_DUP_THRESHOLD`, while few
pairs of the 2,076 distinct atlas images fall under it. The threshold two bits lower misses
too many crops, which is why the default is not lower. Looked at by eye (2026-11): of the 8
atlas20 pairs within 8 bits, 4 are the same lesion re-shot or re-framed (distances 0, 0, 6,
6); the others are different lesions with the same composition (a small dark lesion centred
on plain skin). At 10 bits there are 22 pairs, mostly such look-alikes.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from dermflow.dataset.dedup import DEFAULT_DUP_THRESHOLD, group_near_duplicates, hamming_distance, phash_to_uint64
from dermflow.ingestion.images import perceptual_hash
from tests.support.altered_copies import jpeg_bytes, threshold_variants

pytestmark = [pytest.mark.unit, pytest.mark.slow]

VARIANT_EVERY = 4  # make variants of every 4th image: ~520 images, 3 variants each


@pytest.fixture(scope="module")
def atlas_hashes(atlas_dir):
    paths = sorted((atlas_dir / "images").glob("*.jpg"))
    originals = [path.read_bytes() for path in paths]
    hashes = [perceptual_hash(data) for data in originals]
    distances: dict[str, list[int]] = {}
    for index in range(0, len(originals), VARIANT_EVERY):
        for kind, data in threshold_variants(originals[index]).items():
            distances.setdefault(kind, []).append(hamming_distance(hashes[index], perceptual_hash(data)))
    return paths, originals, hashes, {kind: np.array(values) for kind, values in distances.items()}


def test_draft_decoding_matches_full_decoding_on_atlas_images(atlas_hashes):
    from PIL import Image

    paths, originals, hashes, _ = atlas_hashes
    # the grayscale draft at >= 128 px (half scale for these ~460 px images) moves a hash by
    # about half a bit on average, at most 4 bits
    moved = [hamming_distance(perceptual_hash(data, draft=False), expected)
             for data, expected in list(zip(originals, hashes))[::10]]
    assert max(moved) <= 4 and np.mean(moved) <= 1.0
    for data in originals[::50]:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        big = jpeg_bytes(image.resize((image.width * 4, image.height * 4), Image.BICUBIC), 90)
        assert hamming_distance(perceptual_hash(big), perceptual_hash(big, draft=False)) <= 4


def test_default_threshold_groups_altered_copies_but_few_distinct_images(atlas_hashes):
    paths, _, hashes, distances = atlas_hashes
    all_distances = np.concatenate(list(distances.values()))
    recall = {kind: float((values <= DEFAULT_DUP_THRESHOLD).mean()) for kind, values in distances.items()}
    overall = float((all_distances <= DEFAULT_DUP_THRESHOLD).mean())
    lower = float((all_distances <= DEFAULT_DUP_THRESHOLD - 2).mean())

    values, _ = phash_to_uint64(hashes)
    pair_distances = np.bitwise_count(values[:, None] ^ values[None, :])[np.triu_indices(len(values), 1)]
    pairs_under = int((pair_distances <= DEFAULT_DUP_THRESHOLD).sum())
    groups = group_near_duplicates(hashes, DEFAULT_DUP_THRESHOLD)
    largest = int(np.bincount(groups).max())
    print(
        f"\natlas20: {len(hashes)} images, {len(pair_distances)} pairs; threshold {DEFAULT_DUP_THRESHOLD}: "
        f"recall {overall:.3f} {recall}; at {DEFAULT_DUP_THRESHOLD - 2}: {lower:.3f}; "
        f"distinct pairs within it: {pairs_under}; largest group: {largest}"
    )
    assert overall >= 0.95
    assert recall["jpeg_q30"] >= 0.99 and recall["half_size"] >= 0.99
    assert lower < 0.95, "a lower threshold would do: revisit DEFAULT_DUP_THRESHOLD"
    # at most 1 in 100,000 pairs of distinct atlas images, and no chains of look-alikes
    assert pairs_under <= len(pair_distances) / 100_000
    assert largest <= 4
