"""Near-duplicate and exact-duplicate detection over the dataset's images.

The fetch and import stages store every image's hashes (`dermflow.ingestion.images.perceptual_hash`,
the one recipe: three imagehash pHashes, of the whole image and of its centred 92% and 85%
crops, 48 hex chars) in the manifest column `phash`. `group_near_duplicates` joins images into
connected components of near-duplicate pairs, so that the split can keep every group inside
one split: the Fitzpatrick 17k contains the same lesion photographed twice, re-encoded,
resized or cropped, and a duplicate on both sides of a split inflates test scores.

Two images are near-duplicates when either rule holds:
- whole: their whole-image pHashes are within `threshold` bits (re-encoded, resized, slightly
  cropped copies);
- cropped: one image's whole and 92% hashes are both within `crop_threshold(threshold)` bits
  of the other's 92% and 85% hashes (a copy cropped by about 4% per side). Asking two hashes
  at shifted scales to agree keeps look-alikes apart: any single pair of crop hashes within
  the threshold would merge dozens of distinct atlas images of plain skin.
Manifests written before the crop hashes hold one 16-hex-digit pHash per row: they are read
as the whole-image hash alone, and only the whole rule applies to them.

`DEFAULT_DUP_THRESHOLD` is chosen by `tests/unit/test_dedup_atlas.py` on real atlas
images: re-encoded, resized and slightly cropped copies fall within it, copies cropped by 4%
per side, resized and re-encoded fall within the cropped rule, while few distinct atlas
images do (the same 8 pairs under both rules; 4 of them are the same lesion re-shot).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from dermflow.config import DEFAULT_DUP_THRESHOLD
from dermflow.ingestion.images import HASH_CROPS, HASH_HEX_DIGITS, PHASH_HEX_DIGITS


# Pairs compared per block: rows x all unique hashes; bounds memory at about 8 bytes x this.
_BLOCK_ELEMENTS = 4_000_000
# Edges accumulated before they are collapsed into a spanning forest (bounds memory on
# duplicate-heavy input where almost every pair is within the threshold).
_EDGE_COLLAPSE_AT = 4_000_000


def crop_threshold(threshold: int) -> int:
    """The bits each of the two shifted hashes may differ by under the cropped rule: two
    agreeing hashes are stronger evidence than one, but crops of plain skin look alike, so it
    is 2 below the whole-image threshold (at 8: recall 1.0, no extra atlas20 pair)."""
    return max(threshold - 2, 0)


def parse_hashes(phashes: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, present, cropped): the hashes as an (n, 3) uint64 array (whole, 92%, 85%
    crops), a mask of rows with a hash, and a mask of rows with the crop hashes too.

    Empty strings (and None/NaN) are absent; 16 hex digits (a manifest written before the crop
    hashes) are the whole-image hash alone. Anything else raises `ValueError` naming the
    position and value.
    """
    n_parts = len(HASH_CROPS)
    values = np.zeros((len(phashes), n_parts), dtype=np.uint64)
    present = np.zeros(len(phashes), dtype=bool)
    cropped = np.zeros(len(phashes), dtype=bool)
    for index, text in enumerate(phashes):
        if text is None or (isinstance(text, float) and np.isnan(text)):
            continue
        text = str(text).strip()
        if not text:
            continue
        if len(text) not in (PHASH_HEX_DIGITS, HASH_HEX_DIGITS):
            raise ValueError(f"phash at position {index} is not {HASH_HEX_DIGITS} (or {PHASH_HEX_DIGITS}) "
                             f"hex digits: {text!r}")
        try:
            parts = [int(text[start:start + PHASH_HEX_DIGITS], 16) for start in range(0, len(text), PHASH_HEX_DIGITS)]
        except ValueError as error:
            raise ValueError(f"phash at position {index} is not hexadecimal: {text!r}") from error
        values[index, :len(parts)] = parts
        present[index] = True
        cropped[index] = len(parts) == n_parts
    return values, present, cropped


def phash_to_uint64(phashes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(values, present): the whole-image hashes as uint64 and a mask of rows that had a hash
    (see `parse_hashes`)."""
    values, present, _ = parse_hashes(phashes)
    return values[:, 0].copy(), present


def hamming_distance(first: str, second: str) -> int:
    """Bits that differ between the whole-image pHashes (first 16 hex digits) of two hashes."""
    return (int(first[:PHASH_HEX_DIGITS], 16) ^ int(second[:PHASH_HEX_DIGITS], 16)).bit_count()


def crop_distance(first: str, second: str) -> int | None:
    """The cropped rule's distance between two full hashes: over both directions, the smaller of
    the larger bit difference of (whole vs 92%, 92% vs 85%); None when either lacks crop hashes."""
    values, _, cropped = parse_hashes([first, second])
    if not cropped.all():
        return None
    a, b = values
    one = max((int(a[0]) ^ int(b[1])).bit_count(), (int(a[1]) ^ int(b[2])).bit_count())
    other = max((int(b[0]) ^ int(a[1])).bit_count(), (int(b[1]) ^ int(a[2])).bit_count())
    return min(one, other)


def _components(n_nodes: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n_nodes, n_nodes))
    return connected_components(graph, directed=False)[1]


def _collapse(n_nodes: int, rows: list[np.ndarray], cols: list[np.ndarray]) -> tuple[list, list]:
    """Replace an edge list by a star forest with the same connected components."""
    labels = _components(n_nodes, np.concatenate(rows), np.concatenate(cols))
    order = np.arange(n_nodes)
    # the smallest node of each component is its root
    first_node = np.full(labels.max() + 1, n_nodes, dtype=np.int64)
    np.minimum.at(first_node, labels, order)
    roots = first_node[labels]
    linked = roots != order
    return [order[linked]], [roots[linked]]


def near_duplicate_pairs(values: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i < j) of `values` (uint64) within Hamming distance `threshold`.

    Brute force in blocks (XOR + popcount); meant for diagnostics on modest inputs, since
    the number of pairs can grow quadratically.
    """
    rows_out, cols_out = [], []
    n_values = len(values)
    block = max(1, _BLOCK_ELEMENTS // max(n_values, 1))
    for start in range(0, n_values, block):
        stop = min(start + block, n_values)
        distances = np.bitwise_count(values[start:stop, None] ^ values[None, :])
        rows, cols = np.nonzero(distances <= threshold)
        rows += start
        upper = cols > rows
        rows_out.append(rows[upper])
        cols_out.append(cols[upper])
    if not rows_out:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(rows_out), np.concatenate(cols_out)


def _close_pairs(block: np.ndarray, block_cropped: np.ndarray, later: np.ndarray, later_cropped: np.ndarray,
                 threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the near-duplicate pairs between `block` and `later` under either rule."""
    def bits(first: int, second: int, rows=None, cols=None) -> np.ndarray:
        if rows is None:  # all pairs
            return np.bitwise_count(block[:, first, None] ^ later[None, :, second])
        return np.bitwise_count(block[rows, first] ^ later[cols, second])

    candidates = bits(0, 0) <= threshold
    crops = block_cropped.any() and later_cropped.any()
    limit = crop_threshold(threshold)
    if crops:
        # the first hash pair of each direction of the cropped rule: (92% vs whole) when the
        # later image is a crop of the block's, (whole vs 92%) for the reverse
        candidates |= bits(1, 0) <= limit
        candidates |= bits(0, 1) <= limit
    rows, cols = np.nonzero(candidates)
    if not crops or not len(rows):
        return rows, cols
    # few candidates: check the whole rule and both hash pairs of each direction on them alone
    keep = bits(0, 0, rows, cols) <= threshold
    both = block_cropped[rows] & later_cropped[cols]
    keep |= both & (bits(1, 0, rows, cols) <= limit) & (bits(2, 1, rows, cols) <= limit)
    keep |= both & (bits(0, 1, rows, cols) <= limit) & (bits(1, 2, rows, cols) <= limit)
    return rows[keep], cols[keep]


def group_near_duplicates(phashes: Sequence[str], threshold: int = DEFAULT_DUP_THRESHOLD) -> np.ndarray:
    """Group ids (int64, 0..k-1 by first appearance): connected components of near-duplicate
    pairs (the whole and cropped rules of this module's docstring). Empty hashes get their own
    singleton groups.

    Identical hashes are merged first, then the unique hashes are compared all against all
    in blocks (uint64 XOR + `np.bitwise_count`); components come from scipy.
    """
    if not 0 <= threshold < 64:
        raise ValueError(f"threshold must be between 0 and 63 bits, got {threshold}")
    values, present, cropped = parse_hashes(phashes)
    n_rows = len(values)
    if n_rows == 0:
        return np.zeros(0, dtype=np.int64)
    # a whole-only hash (an old manifest) stays apart from a full one with the same whole hash
    keyed = np.concatenate([values, cropped[:, None].astype(np.uint64)], axis=1)[present]
    unique_rows, inverse = np.unique(keyed, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    unique_values, unique_cropped = unique_rows[:, :-1], unique_rows[:, -1].astype(bool)
    n_unique = len(unique_rows)

    unique_labels = np.arange(n_unique)
    if n_unique > 1:
        edge_rows: list[np.ndarray] = []
        edge_cols: list[np.ndarray] = []
        n_edges = 0
        block = max(1, _BLOCK_ELEMENTS // n_unique)
        for start in range(0, n_unique, block):
            stop = min(start + block, n_unique)
            # compare the block only with later hashes: each pair once
            rows, cols = _close_pairs(unique_values[start:stop], unique_cropped[start:stop],
                                      unique_values[start:], unique_cropped[start:], threshold)
            keep = cols > rows  # drop the diagonal and the block's lower triangle
            if keep.any():
                edge_rows.append(rows[keep] + start)
                edge_cols.append(cols[keep] + start)
                n_edges += int(keep.sum())
            if n_edges > _EDGE_COLLAPSE_AT:
                edge_rows, edge_cols = _collapse(n_unique, edge_rows, edge_cols)
                n_edges = len(edge_rows[0])
        if n_edges:
            unique_labels = _components(n_unique, np.concatenate(edge_rows), np.concatenate(edge_cols))

    raw = np.empty(n_rows, dtype=np.int64)
    raw[present] = unique_labels[inverse]
    # rows without a hash: fresh labels past the hashed ones
    raw[~present] = n_unique + np.arange(int((~present).sum()))
    # renumber 0..k-1 in order of first appearance, so ids do not depend on hash values
    _, first_index, dense = np.unique(raw, return_index=True, return_inverse=True)
    order_of_first = np.argsort(np.argsort(first_index))
    return order_of_first[dense].astype(np.int64)


def merge_groupings(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Group ids of the finest grouping coarser than both (union of the two relations)."""
    first = np.asarray(first, dtype=np.int64)
    second = np.asarray(second, dtype=np.int64)
    if len(first) != len(second):
        raise ValueError(f"groupings differ in length: {len(first)} and {len(second)}")
    if len(first) == 0:
        return first
    offset = int(first.max()) + 1
    nodes = int(offset + second.max() + 1)
    labels = _components(nodes, first, second + offset)[first]
    _, first_index, dense = np.unique(labels, return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first_index))[dense].astype(np.int64)


def exact_duplicates(digests: Sequence[str]) -> list[list[int]]:
    """Positions sharing the same non-empty content digest (e.g. MD5 of the image bytes),
    as lists of 2 or more positions, ordered by first position."""
    positions: dict[str, list[int]] = {}
    for index, digest in enumerate(digests):
        text = "" if digest is None else str(digest).strip().lower()
        if text and text != "nan":
            positions.setdefault(text, []).append(index)
    return [members for members in positions.values() if len(members) > 1]


def duplicate_report(
    frame: pd.DataFrame,
    group_ids: Sequence[int] | np.ndarray | None = None,
    label_column: str = "label",
) -> list[dict]:
    """Near-duplicate groups whose members carry different labels.

    `group_ids` defaults to the frame's `dup_group` column. Each entry: `dup_group`,
    `labels` (sorted, distinct), `md5hashes`, and `splits` when the frame has a `split`.
    """
    groups = np.asarray(frame["dup_group"] if group_ids is None else group_ids)
    if len(groups) != len(frame):
        raise ValueError(f"{len(groups)} group ids for {len(frame)} rows")
    work = pd.DataFrame(
        {
            "group": groups,
            "label": frame[label_column].to_numpy(),
            "md5hash": frame["md5hash"].to_numpy() if "md5hash" in frame else np.arange(len(frame)).astype(str),
        }
    )
    if "split" in frame:
        work["split"] = frame["split"].to_numpy()
    n_labels = work.groupby("group")["label"].transform("nunique")
    conflicts = []
    for group, members in work[n_labels > 1].groupby("group", sort=True):
        entry = {
            "dup_group": int(group),
            "labels": sorted(members["label"].unique().tolist()),
            "md5hashes": members["md5hash"].tolist(),
        }
        if "split" in members:
            entry["splits"] = sorted(members["split"].unique().tolist())
        conflicts.append(entry)
    return conflicts
