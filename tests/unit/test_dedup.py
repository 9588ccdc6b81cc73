"""dermflow.dataset.dedup: the perceptual hash, near-duplicate grouping (against a brute-force
reference, at threshold boundaries, and at the dataset's scale), exact duplicates, reports."""

from __future__ import annotations

import io
import time

import numpy as np
import pandas as pd
import pytest

import dermflow.dataset.dedup as dedup
from dermflow.dataset.dedup import (
    duplicate_report,
    exact_duplicates,
    group_near_duplicates,
    hamming_distance,
    merge_groupings,
)
from dermflow.ingestion.images import (
    HASH_CROPS,
    HASH_HEX_DIGITS,
    ImageTooLargeError,
    NotAnImageError,
    perceptual_hash,
)

pytestmark = pytest.mark.unit

N_DATASET = 16_577


def to_hex(values) -> list[str]:
    return [f"{int(value):016x}" for value in values]


def reference_groups(hashes: list[str], threshold: int) -> list[frozenset[int]]:
    """Union-find over all pairs, the obvious way."""
    parent = list(range(len(hashes)))

    def find(node):
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for i in range(len(hashes)):
        for j in range(i + 1, len(hashes)):
            if hashes[i] and hashes[j] and hamming_distance(hashes[i], hashes[j]) <= threshold:
                parent[find(i)] = find(j)
    members: dict[int, set[int]] = {}
    for index in range(len(hashes)):
        members.setdefault(find(index), set()).add(index)
    return sorted(frozenset(group) for group in members.values())


def as_partition(group_ids) -> list[frozenset[int]]:
    members: dict[int, set[int]] = {}
    for index, group in enumerate(group_ids):
        members.setdefault(int(group), set()).add(index)
    return sorted(frozenset(group) for group in members.values())


def flip_bits(value: int, n_bits: int, rng) -> int:
    for bit in rng.choice(64, size=n_bits, replace=False):
        value ^= 1 << int(bit)
    return value


def clustered_hashes_with_bases(n_rows: int, n_bases: int, max_flips: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Hashes made by flipping up to `max_flips` bits of random bases; and each one's base."""
    rng = np.random.default_rng(seed)
    bases = [int(v) for v in rng.integers(0, 2**63, n_bases, dtype=np.int64)]
    chosen = rng.integers(n_bases, size=n_rows)
    hashes = to_hex(flip_bits(bases[base], int(rng.integers(0, max_flips + 1)), rng) for base in chosen)
    return hashes, chosen


def clustered_hashes(n_rows: int, n_bases: int, max_flips: int, seed: int) -> list[str]:
    return clustered_hashes_with_bases(n_rows, n_bases, max_flips, seed)[0]


# --------------------------------------------------------------------------- hashing
def textured_image(size: int = 512, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    low = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(low).resize((size, size * 3 // 4), Image.BICUBIC)
    return image


def encode(image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_perceptual_hash_is_imagehash_phash():
    import imagehash
    from PIL import Image

    image = textured_image(seed=1)
    png = encode(image, "PNG")
    expected = str(imagehash.phash(Image.open(io.BytesIO(png))))
    hashes = perceptual_hash(png)
    assert len(hashes) == HASH_HEX_DIGITS == 48 and hashes[:16] == expected
    # the crop hashes are imagehash's pHash of the centred crops (up to sub-pixel box edges)
    for part, keep in enumerate(HASH_CROPS[1:], start=1):
        dx, dy = round(image.width * (1 - keep) / 2), round(image.height * (1 - keep) / 2)
        crop = str(imagehash.phash(image.crop((dx, dy, image.width - dx, image.height - dy))))
        assert hamming_distance(hashes[16 * part:16 * part + 16], crop) <= 4


def test_draft_decode_stays_within_two_bits_of_full_decode():
    for seed in range(8):
        jpeg = encode(textured_image(size=1600, seed=seed), quality=90)
        assert hamming_distance(perceptual_hash(jpeg), perceptual_hash(jpeg, draft=False)) <= 2


def test_decompression_bombs_are_too_large(monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow raises past twice this
    with pytest.raises(ImageTooLargeError):
        perceptual_hash(encode(textured_image(size=200), quality=80))


def test_non_images_raise_not_an_image_error():
    with pytest.raises(NotAnImageError, match="cannot decode image"):
        perceptual_hash(b"<html>not found</html>")
    truncated = encode(textured_image(seed=2), quality=90)[:300]
    with pytest.raises(NotAnImageError):
        perceptual_hash(truncated)


# --------------------------------------------------------------------------- grouping
def test_threshold_is_inclusive_and_grouping_is_transitive():
    base = 0x0123456789ABCDEF
    at_three = base ^ 0b111
    chained = at_three ^ (0b111 << 20)  # 6 bits from base, 3 from at_three
    far = base ^ ((1 << 64) - 1)
    hashes = to_hex([base, at_three, chained, far])
    assert group_near_duplicates(hashes, 3).tolist() == [0, 0, 0, 1]
    assert group_near_duplicates(hashes, 2).tolist() == [0, 1, 2, 3]
    assert group_near_duplicates(hashes, 0).tolist() == [0, 1, 2, 3]
    assert group_near_duplicates(hashes + [hashes[0]], 0).tolist() == [0, 1, 2, 3, 0]


def test_ids_are_dense_in_order_of_first_appearance():
    hashes = to_hex([5, 1 << 40, 4, 1 << 40, 0xFFFF_FFFF_0000_0000])
    groups = group_near_duplicates(hashes, 1)
    assert groups.tolist() == [0, 1, 0, 1, 2]
    assert groups.dtype == np.int64


def test_empty_hashes_are_singletons():
    hashes = ["", "00000000000000ff", None, "00000000000000ff", float("nan"), " "]
    assert group_near_duplicates(hashes, 8).tolist() == [0, 1, 2, 1, 3, 4]
    assert group_near_duplicates([], 8).tolist() == []


def test_malformed_hash_names_its_position():
    with pytest.raises(ValueError, match="position 1"):
        group_near_duplicates(["00000000000000ff", "xyz"], 8)
    with pytest.raises(ValueError, match="position 0 is not hexadecimal"):
        group_near_duplicates(["zzzzzzzzzzzzzzzz"], 8)
    with pytest.raises(ValueError, match="threshold"):
        group_near_duplicates(["00000000000000ff"], 64)


@pytest.mark.parametrize("threshold", [0, 4, 8, 12])
def test_matches_brute_force_reference(threshold):
    hashes = clustered_hashes(400, n_bases=60, max_flips=7, seed=threshold)
    hashes[::37] = [""] * len(hashes[::37])
    assert as_partition(group_near_duplicates(hashes, threshold)) == reference_groups(hashes, threshold)


def test_near_duplicate_pairs_lists_each_close_pair_once(monkeypatch):
    hashes = clustered_hashes(200, n_bases=30, max_flips=5, seed=5)
    values, _ = dedup.phash_to_uint64(hashes)
    monkeypatch.setattr(dedup, "_BLOCK_ELEMENTS", 2000)  # several blocks
    rows, cols = dedup.near_duplicate_pairs(values, 6)
    expected = {(i, j) for i in range(200) for j in range(i + 1, 200) if hamming_distance(hashes[i], hashes[j]) <= 6}
    assert set(zip(rows.tolist(), cols.tolist())) == expected and len(rows) == len(expected) > 0


def test_edge_collapsing_and_small_blocks_keep_components(monkeypatch):
    hashes = clustered_hashes(300, n_bases=5, max_flips=6, seed=3)
    expected = reference_groups(hashes, 8)
    monkeypatch.setattr(dedup, "_BLOCK_ELEMENTS", 1000)
    monkeypatch.setattr(dedup, "_EDGE_COLLAPSE_AT", 50)
    assert as_partition(group_near_duplicates(hashes, 8)) == expected


def test_groups_dataset_scale_random_hashes_in_seconds():
    rng = np.random.default_rng(0)
    hashes = to_hex(rng.integers(0, 2**63, N_DATASET, dtype=np.int64).astype(np.uint64) << np.uint64(1))
    started = time.perf_counter()
    groups = group_near_duplicates(hashes, dedup.DEFAULT_DUP_THRESHOLD)
    elapsed = time.perf_counter() - started
    assert len(groups) == N_DATASET
    # uniform random 64-bit hashes are essentially never within 8 bits of one another
    assert groups.max() + 1 >= N_DATASET - 2
    assert elapsed < 10, f"grouping {N_DATASET} hashes took {elapsed:.1f}s"


def test_groups_duplicate_heavy_input_in_seconds():
    hashes, bases = clustered_hashes_with_bases(N_DATASET, n_bases=500, max_flips=3, seed=1)
    started = time.perf_counter()
    groups = group_near_duplicates(hashes, dedup.DEFAULT_DUP_THRESHOLD)
    elapsed = time.perf_counter() - started
    # members of one cluster are at most 6 bits apart; random bases are ~32 bits apart,
    # so the groups are exactly the clusters
    assert as_partition(groups) == as_partition(bases)
    assert elapsed < 10, f"grouping {N_DATASET} duplicate-heavy hashes took {elapsed:.1f}s"


# --------------------------------------------------------------------------- exact + merge + report
def test_exact_duplicates():
    digests = ["a" * 32, "b" * 32, "A" * 32, "", "b" * 32, None, "c" * 32]
    assert exact_duplicates(digests) == [[0, 2], [1, 4]]
    assert exact_duplicates(["", ""]) == []


def test_merge_groupings_is_the_union_of_both_relations():
    first = np.array([0, 0, 1, 2, 3])
    second = np.array([0, 1, 1, 2, 2])
    assert merge_groupings(first, second).tolist() == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError):
        merge_groupings(first, second[:3])


def test_duplicate_report_lists_groups_with_different_labels():
    frame = pd.DataFrame(
        {
            "md5hash": ["m0", "m1", "m2", "m3", "m4"],
            "label": ["acne", "acne", "acne", "psoriasis", "eczema"],
            "dup_group": [0, 0, 1, 1, 2],
            "split": ["train", "train", "test", "test", "val"],
        }
    )
    assert duplicate_report(frame) == [
        {"dup_group": 1, "labels": ["acne", "psoriasis"], "md5hashes": ["m2", "m3"], "splits": ["test"]}
    ]
    assert duplicate_report(frame, group_ids=[0, 0, 0, 0, 0])[0]["labels"] == ["acne", "eczema", "psoriasis"]
