"""Leakage-free train/val/test split of the fetched images.

`split_dataset` takes the fetch manifest (every value a string, as read from CSV), keeps the
rows with `status == "ok"`, and assigns each to `train`, `val`, `test`, `verified_test` or
`excluded`:

- **Grouped.** Near-duplicate groups (`dermflow.dataset.dedup`, pHash within `dup_threshold`, joined
  with exact duplicates of the image bytes) are the unit of assignment: a group never spans
  two splits, so no lesion photographed twice trains and tests at once.
- **Stratified** jointly by `label` x `fitzpatrick_range`. Cells with fewer than
  `MIN_CELL_IMAGES` images are pooled per label (so the label is still stratified).
  Groups are dealt out largest first, each to the split furthest below its target share
  summed over the scopes its images belong to (stratum, label, range, everything), so a
  group mixing labels or ranges counts for each of them; every scope stays within a group
  or two of its targets.
- **Complete.** Every label with at least 3 groups ends up in each of train/val/test
  (the smallest group of an over-served split is moved where one is missing).
- **Deterministic.** The order of groups within a stratum comes from a hash of
  (seed, md5), so the result depends on the seed and the rows' content, not their order.
- **Label quality (`qc`).** "3 Wrongly labelled" rows are `excluded` (when
  `exclude_wrongly_labelled`). "1 Diagnostic" rows form `verified_test`, held out of
  train and val. Their near-duplicates without that verification are `excluded` rather
  than added to `verified_test`, so that set holds only expert-verified labels while
  nothing that looks like one of its images is trained on.

`exclude_reason` says why a row is excluded: `wrongly_labelled`,
`near_duplicate_of_verified`, `too_few_images` (only with `drop_small_labels`).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from dermflow import layout
from dermflow.config import RUN_DEFAULTS
from dermflow.errors import DermflowError
from dermflow.dataset.dedup import (
    DEFAULT_DUP_THRESHOLD,
    duplicate_report,
    exact_duplicates,
    group_near_duplicates,
    merge_groupings,
)
from dermflow.ingestion.ingest import FITZPATRICK_RANGES, fitzpatrick_range

TRAIN_VAL_TEST: tuple[str, ...] = ("train", "val", "test")
SPLITS: tuple[str, ...] = ("train", "val", "test", "verified_test", "excluded")
SPLIT_COLUMNS: tuple[str, ...] = (
    "md5hash",
    "label",
    "fitzpatrick_scale",
    "fitzpatrick_range",
    "qc",
    "split",
    "dup_group",
    "key",
    "exclude_reason",
)
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.70, 0.15, 0.15)
# A label x range cell smaller than this is pooled with the label's other small cells:
# at 15% a cell of 10 expects 1.5 images in val and test, fewer is noise, not strata.
MIN_CELL_IMAGES = 10
# Train, val and test each need one image of a label.
MIN_IMAGES_PER_LABEL = 3
# Bump when the assignment changes, so cached splits (`split_fingerprint`) are not reused.
SPLIT_ALGORITHM_VERSION = 1
# Columns of the manifest the split depends on (the rest, e.g. url or bytes, do not matter).
_FINGERPRINT_COLUMNS = ("md5hash", "label", "fitzpatrick_scale", "fitzpatrick_range", "qc", "phash", "key", "content_md5")
_CONFLICTS_LISTED = 200


class SplitError(DermflowError, ValueError):
    """The manifest cannot be split (missing columns, too few images, bad parameters)."""


def qc_category(qc: object) -> str:
    """`wrongly_labelled`, `diagnostic`, or "" for the dataset's `qc` values."""
    text = str(qc or "").strip().lower()
    if text.startswith("3") or "wrongly" in text:
        return "wrongly_labelled"
    if text.startswith("1") or "diagnostic" in text:
        return "diagnostic"
    return ""


def _seeded_key(seed: int, text: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=8).digest(), "big")


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    values = np.asarray(list(fractions), dtype=float)
    if values.shape != (3,) or (values <= 0).any() or abs(values.sum() - 1.0) > 1e-6:
        raise SplitError(f"fractions must be three positive numbers summing to 1 (train, val, test), got {list(fractions)}")
    return values


def _prepare(manifest: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The `ok` rows, normalised, sorted by md5hash; and how many rows were not ok."""
    missing = [column for column in ("md5hash", "label") if column not in manifest.columns]
    if missing:
        raise SplitError(f"manifest lacks column(s) {', '.join(missing)} (found: {', '.join(map(str, manifest.columns))})")
    frame = manifest.copy()
    for column in frame.columns:
        frame[column] = frame[column].fillna("").astype(str).str.strip()
    if "status" in frame.columns:
        ok = frame["status"] == "ok"
        frame = frame[ok]
        not_ok = int((~ok).sum())
    else:
        not_ok = 0
    if frame.empty:
        raise SplitError(
            f"no images to split: 0 of {len(manifest)} manifest rows have status 'ok'; "
            f"need at least {MIN_IMAGES_PER_LABEL} per label"
        )
    for column in ("fitzpatrick_scale", "qc", "phash", "key"):
        if column not in frame.columns:
            frame[column] = ""
    repeated = frame["md5hash"][frame["md5hash"].duplicated()].unique()
    if len(repeated):
        raise SplitError(f"column md5hash: {len(repeated)} value(s) on more than one ok row, e.g. {list(repeated[:5])}")
    empty_label = frame["label"] == ""
    if empty_label.any():
        raise SplitError(f"column label: {int(empty_label.sum())} ok row(s) have no label, e.g. md5 {list(frame['md5hash'][empty_label][:5])}")
    computed = frame["fitzpatrick_scale"].map(fitzpatrick_range)
    if "fitzpatrick_range" in frame.columns:
        given = frame["fitzpatrick_range"]
        frame["fitzpatrick_range"] = given.where(given.isin(FITZPATRICK_RANGES), computed)
    else:
        frame["fitzpatrick_range"] = computed
    frame["key"] = frame["key"].where(frame["key"] != "", frame["md5hash"].map(layout.image_key))
    return frame.sort_values("md5hash", kind="mergesort").reset_index(drop=True), not_ok


def _duplicate_groups(frame: pd.DataFrame, dup_threshold: int) -> tuple[np.ndarray, int]:
    """Merged near- and exact-duplicate group ids, and the number of exact-duplicate groups."""
    near = group_near_duplicates(frame["phash"].tolist(), dup_threshold)
    digests = frame["content_md5"] if "content_md5" in frame.columns else frame["md5hash"]
    exact = exact_duplicates(digests.tolist())
    if not exact:
        return near, 0
    exact_ids = np.arange(len(frame), dtype=np.int64)
    for members in exact:
        exact_ids[members] = members[0]
    return merge_groupings(near, exact_ids), len(exact)


def _strata(pool: pd.DataFrame) -> pd.Series:
    """label|range, with cells under MIN_CELL_IMAGES pooled as label|pooled."""
    cell = pool["label"] + "|" + pool["fitzpatrick_range"]
    small = cell.map(cell.value_counts()) < MIN_CELL_IMAGES
    return cell.where(~small, pool["label"] + "|pooled")


def _allocate(pool: pd.DataFrame, fractions: np.ndarray, seed: int) -> dict[int, str]:
    """Assign every duplicate group of `pool` to train/val/test (see the module docstring).

    Groups are taken largest first (ties in a seeded order). Each row belongs to four
    scopes: its stratum, its label, its range, and the whole pool. In every scope the split
    should hold `fraction x rows seen so far`; a group goes to the split whose shortfall,
    summed over its rows' scopes, is largest. Every scope so stays within a group or two
    of its target shares all along, whatever mix of labels and ranges a group holds.
    """
    strata = _strata(pool).to_numpy()
    labels = pool["label"].to_numpy()
    ranges = pool["fitzpatrick_range"].to_numpy()
    scope_index: dict[str, int] = {"all": 0}

    def scope(name: str) -> int:
        return scope_index.setdefault(name, len(scope_index))

    members: dict[int, list[int]] = {}
    first_md5: dict[int, str] = {}
    for row, (group, md5) in enumerate(zip(pool["dup_group"].to_numpy(), pool["md5hash"].to_numpy())):
        members.setdefault(int(group), []).append(row)
        first_md5[int(group)] = min(first_md5.get(int(group), md5), md5)
    row_scopes = [
        (0, scope("s:" + stratum), scope("l:" + label), scope("r:" + fitz))
        for stratum, label, fitz in zip(strata, labels, ranges)
    ]
    order = sorted(members, key=lambda group: (-len(members[group]), _seeded_key(seed, first_md5[group])))

    fraction_list = [float(f) for f in fractions]
    seen = [0.0] * len(scope_index)
    held = [[0.0, 0.0, 0.0] for _ in scope_index]
    jitter = np.random.default_rng(seed).random((len(order), 3)) * 1e-6  # random tie-breaks
    assignment: dict[int, str] = {}
    for position, group in enumerate(order):
        counts: dict[int, int] = {}
        for row in members[group]:
            for index in row_scopes[row]:
                counts[index] = counts.get(index, 0) + 1
        scores = [
            sum(count * (fraction * (seen[index] + count) - held[index][split]) for index, count in counts.items())
            + jitter[position, split]
            for split, fraction in enumerate(fraction_list)
        ]
        choice = int(np.argmax(scores))
        for index, count in counts.items():
            seen[index] += count
            held[index][choice] += count
        assignment[group] = TRAIN_VAL_TEST[choice]
    return assignment


def _repair_missing_labels(pool: pd.DataFrame, seed: int) -> int:
    """Move groups so that every label with >= 3 groups is in train, val and test.

    Works on `pool["split"]` in place; returns the number of groups moved."""
    moves = 0
    group_labels = pool.groupby("dup_group")["label"].agg(frozenset)
    group_size = pool.groupby("dup_group").size()
    groups_per_label = pool.drop_duplicates(["dup_group", "label"]).groupby("label").size()
    for label in sorted(groups_per_label.index[groups_per_label >= 3]):
        for _ in range(3):
            present = pool[pool["label"] == label].drop_duplicates("dup_group")
            counts = present["split"].value_counts().reindex(TRAIN_VAL_TEST, fill_value=0)
            missing = [split for split in TRAIN_VAL_TEST if counts[split] == 0]
            if not missing:
                break
            donor = counts.idxmax()
            if counts[donor] < 2:
                break
            # labels that would vanish from the donor split if this group left it
            donor_counts = pool[pool["split"] == donor].drop_duplicates(["dup_group", "label"])["label"].value_counts()
            candidates = sorted(
                present.loc[present["split"] == donor, "dup_group"],
                key=lambda group: (group_size[group], _seeded_key(seed, str(group))),
            )
            for group in candidates:
                if all(donor_counts.get(other, 0) > 1 for other in group_labels[group]):
                    pool.loc[pool["dup_group"] == group, "split"] = missing[0]
                    moves += 1
                    break
            else:
                break
    return moves


def _hold_out_by_label_quality(frame: pd.DataFrame, exclude_wrongly_labelled: bool) -> None:
    """In place: wrongly labelled rows `excluded`, diagnostic rows `verified_test`, and their
    unverified near-duplicates `excluded` (see the module docstring)."""
    quality = frame["qc"].map(qc_category)
    if exclude_wrongly_labelled:
        wrong = quality == "wrongly_labelled"
        frame.loc[wrong, ["split", "exclude_reason"]] = ["excluded", "wrongly_labelled"]
    verified = (quality == "diagnostic") & (frame["split"] == "")
    frame.loc[verified, "split"] = "verified_test"
    verified_groups = frame.loc[verified, "dup_group"].unique()
    shadow = frame["dup_group"].isin(verified_groups) & (frame["split"] == "")
    frame.loc[shadow, ["split", "exclude_reason"]] = ["excluded", "near_duplicate_of_verified"]


def _drop_small_labels(frame: pd.DataFrame, manifest: pd.DataFrame, min_images_per_label: int,
                       drop_small_labels: bool) -> list[str]:
    """In place: labels with fewer than `min_images_per_label` unassigned rows are excluded
    (`drop_small_labels`) or refused with a `SplitError` naming them; the dropped labels."""
    in_pool = frame["split"] == ""
    all_labels = manifest["label"].fillna("").astype(str).str.strip()
    per_label = frame.loc[in_pool, "label"].value_counts().reindex(sorted(set(all_labels) - {""}), fill_value=0)
    small = per_label[per_label < min_images_per_label]
    if not len(small):
        return []
    if not drop_small_labels:
        listed = ", ".join(f"{label!r}: {count}" for label, count in small.head(10).items())
        more = f" and {len(small) - 10} more" if len(small) > 10 else ""
        raise SplitError(
            f"too few images to split: {int(in_pool.sum())} images for train/val/test "
            f"({len(frame)} ok of {len(manifest)} rows); each label needs at least "
            f"{min_images_per_label}, but {len(small)} label(s) have fewer: {listed}{more}"
        )
    dropped_labels = sorted(small.index)
    drop = in_pool & frame["label"].isin(dropped_labels)
    frame.loc[drop, ["split", "exclude_reason"]] = ["excluded", "too_few_images"]
    if not (frame["split"] == "").any():
        raise SplitError(f"too few images to split: no label has {min_images_per_label} images among {len(frame)} ok rows")
    return dropped_labels


def _assign_train_val_test(frame: pd.DataFrame, fractions: np.ndarray, seed: int) -> int:
    """In place: the unassigned rows' groups dealt to train/val/test, then repaired so every
    label is in each; the number of groups the repair moved."""
    pool = frame[frame["split"] == ""].copy()
    assignment = _allocate(pool, fractions, seed)
    pool["split"] = pool["dup_group"].map(assignment)
    repairs = _repair_missing_labels(pool, seed)
    frame.loc[pool.index, "split"] = pool["split"]
    return repairs


def split_dataset(
    manifest: pd.DataFrame,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    dup_threshold: int = DEFAULT_DUP_THRESHOLD,
    exclude_wrongly_labelled: bool = RUN_DEFAULTS["exclude_wrongly_labelled"],
    drop_small_labels: bool = RUN_DEFAULTS["drop_small_labels"],
    min_images_per_label: int = MIN_IMAGES_PER_LABEL,
) -> tuple[pd.DataFrame, dict]:
    """Split the ok rows of a fetch manifest; returns (split manifest, summary).

    The split manifest has `SPLIT_COLUMNS`, one row per ok manifest row, sorted by md5hash.
    Labels with fewer than `min_images_per_label` images left for train/val/test raise
    `SplitError`, or with `drop_small_labels` are excluded (`exclude_reason=too_few_images`).
    """
    fraction_values = _check_fractions(fractions)
    if min_images_per_label < MIN_IMAGES_PER_LABEL:
        raise SplitError(f"min_images_per_label must be at least {MIN_IMAGES_PER_LABEL}, got {min_images_per_label}")
    frame, not_ok = _prepare(manifest)
    group_ids, exact_groups = _duplicate_groups(frame, dup_threshold)
    frame["dup_group"] = group_ids
    frame["split"] = ""
    frame["exclude_reason"] = ""
    _hold_out_by_label_quality(frame, exclude_wrongly_labelled)
    dropped_labels = _drop_small_labels(frame, manifest, min_images_per_label, drop_small_labels)
    repairs = _assign_train_val_test(frame, fraction_values, seed)

    out = frame[list(SPLIT_COLUMNS)].copy()
    summary = split_summary(out, exact_groups=exact_groups)
    summary.update(
        {
            "params": {
                "seed": seed,
                "fractions": [float(f) for f in fraction_values],
                "dup_threshold": dup_threshold,
                "exclude_wrongly_labelled": exclude_wrongly_labelled,
                "drop_small_labels": drop_small_labels,
                "min_images_per_label": min_images_per_label,
                "algorithm_version": SPLIT_ALGORITHM_VERSION,
            },
            "rows_in_manifest": int(len(manifest)),
            "rows_not_ok": not_ok,
            "dropped_labels": dropped_labels,
            "label_repairs": repairs,
        }
    )
    return out, summary


def split_summary(split_manifest: pd.DataFrame, exact_groups: int = 0) -> dict:
    """Sizes, per-label and per-range counts, duplicate and label-quality figures."""
    frame = split_manifest
    sizes = frame["split"].value_counts().reindex(SPLITS, fill_value=0)
    main = frame[frame["split"].isin(TRAIN_VAL_TEST)]
    shares = (sizes[list(TRAIN_VAL_TEST)] / max(len(main), 1)).round(4)
    per_label = pd.crosstab(frame["label"], frame["split"]).reindex(columns=SPLITS, fill_value=0)
    per_range = pd.crosstab(frame["fitzpatrick_range"], frame["split"]).reindex(columns=SPLITS, fill_value=0)

    group_size = frame.groupby("dup_group")["md5hash"].transform("size")
    multi = frame[group_size > 1]
    placed = multi[multi["split"] != "excluded"]
    cross_split = int((placed.groupby("dup_group")["split"].nunique() > 1).sum())
    conflicts = duplicate_report(multi)
    return {
        "n_images": int(len(frame)),
        "sizes": {split: int(sizes[split]) for split in SPLITS},
        "fractions": {split: float(shares[split]) for split in TRAIN_VAL_TEST},
        "per_label": {label: {s: int(v) for s, v in row.items()} for label, row in per_label.iterrows()},
        "per_range": {rng: {s: int(v) for s, v in row.items()} for rng, row in per_range.iterrows()},
        "duplicates": {
            "groups": int(multi["dup_group"].nunique()),
            "images": int(len(multi)),
            "cross_split": cross_split,
            "exact": int(exact_groups),
            "label_conflict_groups": len(conflicts),
            "label_conflicts": conflicts[:_CONFLICTS_LISTED],
        },
        "label_quality": {
            "wrongly_labelled_excluded": int((frame["exclude_reason"] == "wrongly_labelled").sum()),
            "diagnostic_verified_test": int(sizes["verified_test"]),
            "near_duplicate_of_verified_excluded": int((frame["exclude_reason"] == "near_duplicate_of_verified").sum()),
            "too_few_images_excluded": int((frame["exclude_reason"] == "too_few_images").sum()),
        },
    }


def split_fingerprint(manifest: pd.DataFrame, params: Mapping[str, object]) -> str:
    """SHA-256 (hex) of what the split depends on: the ok rows' relevant columns (any row or
    column order), the parameters, and `SPLIT_ALGORITHM_VERSION`."""
    frame = manifest.copy()
    if "status" in frame.columns:
        frame = frame[frame["status"].fillna("").astype(str).str.strip() == "ok"]
    columns = [column for column in _FINGERPRINT_COLUMNS if column in frame.columns]
    canonical = frame[columns].fillna("").astype(str).apply(lambda column: column.str.strip())
    canonical = canonical.sort_values(columns, kind="mergesort")
    buffer = io.StringIO()
    canonical.to_csv(buffer, index=False, lineterminator="\n")
    normalised = {str(key): value for key, value in params.items()}
    if "fractions" in normalised:
        normalised["fractions"] = [float(f) for f in normalised["fractions"]]  # type: ignore[union-attr]
    header = json.dumps({"algorithm_version": SPLIT_ALGORITHM_VERSION, "params": normalised}, sort_keys=True, default=str)
    return hashlib.sha256(header.encode() + b"\n" + buffer.getvalue().encode()).hexdigest()
