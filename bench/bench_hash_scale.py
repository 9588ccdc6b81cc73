"""What the hash recipe's draft scale costs and what it finds, on atlas20 (issue 18's lever
"decode at the smallest DCT scale that still gives the same near-duplicate groups").

For each minimum draft side (`dermflow.ingestion.images.DRAFT_MIN_SIDE`, 128 in the recipe; on
atlas20's ~460 x 380 px JPEGs 128 is a 1/2-scale decode, 64 a 1/4 and 32 a 1/8), it prints:
- the CPU per image of `perceptual_hash` over all 2,076 images (every scan decoded at 1/8 and 1/4;
  only a progressive JPEG's chroma-only scans are left out, as in the recipe);
- the planted copies of `tests/unit/test_dedup_crops.py` (every 3rd image cropped 4% per side,
  resized to 90%, re-encoded at quality 70): found in their original's group, joined to a group
  their original is not in (a false merge), their largest distance under the cropped rule and how
  many sit at its threshold (no margin left);
- the variants of `tests/unit/test_dedup_atlas.py` (quality 30, half size, 2% per side) within
  `DEFAULT_DUP_THRESHOLD` bits;
- pairs of distinct atlas20 images grouped, and those beyond the recorded pairs;
- how far the whole-image hash moves from a full decode's, and from the recipe's (128).

`--dc-check` also decodes every 3rd progressive JPEG at 1/8 scale from its DC scans alone and
from the whole body, and counts identical results: whether a 1/8 decode could skip the AC scans.

Usage: .venv/bin/python bench/bench_hash_scale.py [--min-sides 128,64,32] [--dc-check]
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from bench.services import ATLAS, atlas_is_absent  # noqa: E402
from dermflow.dataset.dedup import (  # noqa: E402
    DEFAULT_DUP_THRESHOLD,
    crop_distance,
    crop_threshold,
    group_near_duplicates,
    hamming_distance,
)
from dermflow.ingestion import images  # noqa: E402
from tests.support.altered_copies import planted_copy, threshold_variants  # noqa: E402
from tests.unit.test_dedup_crops import KNOWN_PAIRS, PLANT_EVERY, grouped_pairs, planted_findings  # noqa: E402


@contextmanager
def draft_min_side(pixels: int):
    """The hash recipe with another minimum draft side, for the block's duration."""
    saved = images.DRAFT_MIN_SIDE
    images.DRAFT_MIN_SIDE = pixels
    try:
        yield
    finally:
        images.DRAFT_MIN_SIDE = saved


def hash_all(bodies: list[bytes]) -> tuple[list[str], float]:
    """The hashes of `bodies` and the CPU per image in ms."""
    started = time.process_time()
    hashes = [images.perceptual_hash(body) for body in bodies]
    return hashes, (time.process_time() - started) / len(bodies) * 1000


def variant_recall(bodies: list[bytes], hashes: list[str], every: int = 4) -> dict[str, float]:
    distances: dict[str, list[int]] = {}
    for index in range(0, len(bodies), every):
        for kind, data in threshold_variants(bodies[index]).items():
            distances.setdefault(kind, []).append(hamming_distance(hashes[index], images.perceptual_hash(data)))
    recall = {kind: float((np.array(values) <= DEFAULT_DUP_THRESHOLD).mean()) for kind, values in distances.items()}
    recall["overall"] = float((np.concatenate([np.array(v) for v in distances.values()]) <= DEFAULT_DUP_THRESHOLD).mean())
    return recall


def moved_bits(hashes: list[str], reference: list[str]) -> tuple[float, int]:
    moved = [hamming_distance(a, b) for a, b in zip(hashes, reference)]
    return float(np.mean(moved)), max(moved)


def measure(min_side: int, names: list[str], bodies: list[bytes], copies: list[bytes], recipe: list[str]) -> dict:
    with draft_min_side(min_side):
        hashes, cpu_ms = hash_all(bodies)
        copy_hashes = [images.perceptual_hash(copy) for copy in copies]
        planted = list(range(0, len(bodies), PLANT_EVERY))
        found, merged = planted_findings(hashes, copy_hashes, planted)
        crops = [crop_distance(hashes[index], copy) for index, copy in zip(planted, copy_hashes)]
        recall = variant_recall(bodies, hashes)
        pairs = grouped_pairs(names, group_near_duplicates(hashes, DEFAULT_DUP_THRESHOLD))
        full = [images.perceptual_hash(body, draft=False) for body in bodies[::10]]
    limit = crop_threshold(DEFAULT_DUP_THRESHOLD)
    return {"min_side": min_side, "cpu_ms": cpu_ms, "found": float(found.mean()), "false_merges": int(merged.sum()),
            "recall": recall,
            "crop_max": max(crops), "crop_at_limit": sum(distance >= limit for distance in crops),
            "pairs": len(pairs), "pairs_beyond_recorded": len(pairs - KNOWN_PAIRS),
            "vs_full_decode": moved_bits(hashes[::10], full), "vs_recipe": moved_bits(hashes, recipe)}


def dc_scans_only(body: bytes) -> bytes | None:
    """A progressive JPEG without its AC scans (spectral start > 0); None for any other body."""
    from dermflow.ingestion import jpeg_scans as scans

    frame, kept, position = scans._Frame(), [body[:2]], 2
    while True:
        position = scans._skip_fill_bytes(body, position)
        marker = body[position + 1]
        if marker == scans.EOI:
            return b"".join(kept + [body[position:position + 2]])
        end, header = scans._segment(body, position, marker)
        scans._note_segment(frame, marker, header)
        if marker == scans.SOS:
            if frame.marker != scans.SOF_PROGRESSIVE:
                return None
            end = scans._entropy_end(body, end)
            if header[1 + 2 * header[0]] > 0:  # Ss: an AC scan
                position = end
                continue
        kept.append(body[position:end])
        position = end


def eighth_scale_gray(body: bytes) -> np.ndarray:
    with images.open_image(body) as image:
        width, height = image.size
        image.draft("L", (max(1, width // 8), max(1, height // 8)))
        image.load()
        return np.asarray(image).astype(np.int16)


def dc_check(bodies: list[bytes]) -> None:
    same = differ = 0
    largest = 0
    for body in bodies[::3]:
        dc_only = dc_scans_only(body)
        if dc_only is None:
            continue
        whole, dc = eighth_scale_gray(body), eighth_scale_gray(dc_only)
        if whole.shape == dc.shape and (whole == dc).all():
            same += 1
        else:
            differ += 1
            largest = max(largest, int(np.abs(whole - dc).max()) if whole.shape == dc.shape else 255)
    print(f"1/8-scale gray decode, DC scans only against the whole body: {same} identical, {differ} differ "
          f"(largest pixel difference {largest} levels), of {same + differ} progressive JPEGs")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--min-sides", default="128,64,32")
    parser.add_argument("--dc-check", action="store_true")
    args = parser.parse_args()
    if atlas_is_absent():
        return 2
    paths = sorted((ATLAS / "images").glob("*.jpg"))
    names, bodies = [path.stem[:12] for path in paths], [path.read_bytes() for path in paths]
    copies = [planted_copy(bodies[index]) for index in range(0, len(bodies), PLANT_EVERY)]
    recipe, _ = hash_all(bodies)
    print(f"{len(bodies)} atlas20 images, {len(copies)} planted copies, threshold {DEFAULT_DUP_THRESHOLD} bits")
    print(f"min side  CPU/image  planted found  false merges  cropped rule: max (at >= {crop_threshold(DEFAULT_DUP_THRESHOLD)})  "
          "q30   half  crop2%  overall  pairs (beyond)  vs full decode (mean/max)  vs recipe (mean/max)")
    for min_side in (int(value) for value in args.min_sides.split(",")):
        row = measure(min_side, names, bodies, copies, recipe)
        recall = row["recall"]
        print(f"{min_side:>8}  {row['cpu_ms']:7.2f} ms  {row['found']:13.3f}  {row['false_merges']:12d}  "
              f"{row['crop_max']:>17d} ({row['crop_at_limit']})  "
              f"{recall['jpeg_q30']:.3f} {recall['half_size']:.3f} {recall['crop_4pct']:.3f}  {recall['overall']:7.3f}  "
              f"{row['pairs']:5d} ({row['pairs_beyond_recorded']})  {row['vs_full_decode'][0]:13.2f} / "
              f"{row['vs_full_decode'][1]:<2d}          {row['vs_recipe'][0]:.2f} / {row['vs_recipe'][1]}", flush=True)
    if args.dc_check:
        dc_check(bodies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
