"""The hash recipe finds cropped copies of real atlas20 images (skipped without ../shared).

Planted copies as in issue 18: cropped by 4% per side, resized to 90%, re-encoded at JPEG
quality 70 (new bytes, so a new md5). At least 95% of them must land in their original's
near-duplicate group, and the recipe must not group distinct atlas images beyond the pairs
the whole-image rule already groups (the 8 pairs listed in `tests/unit/test_dedup_atlas.py`).
"""

from __future__ import annotations

import numpy as np
import pytest

from dermflow.dataset.dedup import DEFAULT_DUP_THRESHOLD, crop_distance, group_near_duplicates, hamming_distance
from dermflow.ingestion.images import perceptual_hash
from tests.support.altered_copies import planted_copy

pytestmark = [pytest.mark.unit, pytest.mark.slow]

PLANT_EVERY = 3  # a copy of every 3rd image: 692 copies
# The 8 pairs of distinct atlas20 files (md5 prefixes) within the default threshold, found by
# the whole-image hash before the crop hashes existed (see test_dedup_atlas.py's notes).
RECORDED_PAIRS = {
    frozenset(pair) for pair in [
        ("0e2a24d28767", "5041af68a1e0"), ("140a248b9e5e", "ea2d3af76bbd"), ("23760f03d46e", "86e3dc47bdf4"),
        ("68b77d8d30d9", "e1557fa18120"), ("879efd7e157c", "b1ba947f24bb"), ("8dffbb994ef1", "9aece647a2b4"),
        ("bb79039b52e9", "ea2d3af76bbd"), ("de2fe2ef59ea", "ee71a2faae11"),
    ]
}
# with the third pair that one group of three makes (both pair with ea2d3af76bbd)
KNOWN_PAIRS = RECORDED_PAIRS | {frozenset(("bb79039b52e9", "140a248b9e5e"))}


def planted_findings(hashes: list[str], copies: list[str], planted: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per planted copy (the copy of `hashes[planted[i]]` is `copies[i]`): whether it landed in its
    original's group, and whether it joined another original than those its original is grouped
    with (a false merge). Also used by `bench/bench_hash_scale.py`."""
    groups = group_near_duplicates(hashes + copies, DEFAULT_DUP_THRESHOLD)
    original_groups, copy_groups = groups[:len(hashes)], groups[len(hashes):]
    found = copy_groups == original_groups[planted]
    merged = np.array([
        not set(np.nonzero(original_groups == copy_group)[0]) <= set(np.nonzero(original_groups == original_groups[index])[0])
        for copy_group, index in zip(copy_groups, planted)])
    return found, merged


@pytest.fixture(scope="module")
def atlas(atlas_dir):
    paths = sorted((atlas_dir / "images").glob("*.jpg"))
    originals = [path.read_bytes() for path in paths]
    hashes = [perceptual_hash(data) for data in originals]
    planted = list(range(0, len(originals), PLANT_EVERY))
    copies = [perceptual_hash(planted_copy(originals[index])) for index in planted]
    return [path.stem[:12] for path in paths], hashes, planted, copies


def grouped_pairs(names: list[str], groups: np.ndarray) -> set[frozenset[str]]:
    pairs = set()
    for group in np.unique(groups):
        members = [names[index] for index in np.nonzero(groups == group)[0]]
        pairs |= {frozenset((a, b)) for i, a in enumerate(members) for b in members[i + 1:]}
    return pairs


def test_planted_cropped_copies_join_their_originals(atlas):
    names, hashes, planted, copies = atlas
    found, merged = planted_findings(hashes, copies, planted)
    whole_only = np.array([hamming_distance(hashes[i], c) <= DEFAULT_DUP_THRESHOLD for i, c in zip(planted, copies)])
    crops = np.array([crop_distance(hashes[i], c) for i, c in zip(planted, copies)])
    print(f"\n{len(copies)} planted copies: found {found.mean():.3f} (whole-image rule alone {whole_only.mean():.3f}); "
          f"cropped-rule distance median {np.median(crops):.0f}, max {crops.max()}")
    assert found.mean() >= 0.95
    assert whole_only.mean() < 0.6, "the copies are easy for the whole-image hash: the test proves nothing"
    # a copy joins no other original than those its original is already grouped with
    assert not merged.any(), f"false merges of planted copies of {[names[i] for i in np.array(planted)[merged]]}"


def test_crop_hashes_group_no_distinct_atlas_images_beyond_the_recorded_pairs(atlas):
    names, hashes, _, _ = atlas
    pairs = grouped_pairs(names, group_near_duplicates(hashes, DEFAULT_DUP_THRESHOLD))
    whole_only = grouped_pairs(names, group_near_duplicates([h[:16] for h in hashes], DEFAULT_DUP_THRESHOLD))
    print(f"\natlas20: {len(pairs)} grouped pairs with the crop hashes, {len(whole_only)} by the whole-image hash alone")
    assert pairs <= KNOWN_PAIRS
    assert whole_only <= pairs


def test_old_single_hashes_still_group_by_the_whole_image_rule(atlas):
    names, hashes, planted, copies = atlas
    # a manifest written before the crop hashes (16 hex digits) mixed with new rows
    mixed = [h[:16] for h in hashes] + copies
    groups = group_near_duplicates(mixed, DEFAULT_DUP_THRESHOLD)
    for position, (index, copy) in enumerate(zip(planted, copies)):
        if hamming_distance(hashes[index], copy) <= DEFAULT_DUP_THRESHOLD:
            assert groups[index] == groups[len(hashes) + position]
