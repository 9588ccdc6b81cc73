"""dermflow.dataset.split: proportions, joint label x range stratification, duplicate groups kept in
one split, determinism, label completeness, qc handling, errors, fingerprints; on synthetic
manifests and on the real 16,577-row CSV (as if every image had been fetched)."""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pandas as pd
import pytest

from dermflow.ingestion.ingest import load_dataset
from dermflow.dataset.split import SPLIT_COLUMNS, SplitError, split_dataset, split_fingerprint

pytestmark = pytest.mark.unit

TARGETS = {"train": 0.70, "val": 0.15, "test": 0.15}
MAIN = list(TARGETS)
# Tolerances stated for the real dataset (labels have 53..653 images).
OVERALL_TOLERANCE = 0.015  # share of each split overall
RANGE_TOLERANCE = 0.015  # share of each split within each Fitzpatrick range
LABEL_TOLERANCE = 0.04  # share of each split within each label
CELL_TOLERANCE = 0.08  # within each label x range cell of at least 20 images


def random_phashes(n_rows: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"{int(v):016x}" for v in rng.integers(0, 2**63, n_rows, dtype=np.int64)]


def manifest_from_dataset(frame: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """A fetch manifest in which every row was fetched, as strings like a CSV read."""
    manifest = frame[["md5hash", "label", "fitzpatrick_scale", "fitzpatrick_range", "qc", "url"]].copy()
    manifest["status"] = "ok"
    manifest["reason"] = ""
    manifest["md5_mismatch"] = "false"
    manifest["phash"] = random_phashes(len(manifest), seed)
    manifest["key"] = "images/" + manifest["md5hash"]
    return manifest.astype(str)


def synthetic_manifest(n_labels: int = 12, per_label: int = 80, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for label in range(n_labels):
        for index in range(per_label):
            scale = str(rng.choice(["1", "2", "3", "4", "5", "6", "-1"], p=[.18, .28, .2, .17, .09, .04, .04]))
            rows.append(
                {
                    "md5hash": hashlib.md5(f"{seed}-{label}-{index}".encode()).hexdigest(),
                    "label": f"condition {label:02d}",
                    "fitzpatrick_scale": scale,
                    "qc": "",
                    "status": "ok",
                }
            )
    manifest = pd.DataFrame(rows)
    manifest["phash"] = random_phashes(len(manifest), seed + 1)
    return manifest


def shares(frame: pd.DataFrame, by: str) -> pd.DataFrame:
    main = frame[frame["split"].isin(MAIN)]
    return pd.crosstab(main[by], main["split"], normalize="index").reindex(columns=MAIN, fill_value=0.0)


def max_deviation(table: pd.DataFrame) -> float:
    return max(float((table[split] - target).abs().max()) for split, target in TARGETS.items())


# --------------------------------------------------------------------------- the real CSV
@pytest.fixture(scope="module")
def real_manifest(full_csv):
    return manifest_from_dataset(load_dataset(full_csv))


@pytest.fixture(scope="module")
def real_split(real_manifest):
    started = time.perf_counter()
    result = split_dataset(real_manifest, seed=0)
    return result, time.perf_counter() - started


def test_real_split_sizes_speed_and_integrity(real_manifest, real_split):
    (split, summary), elapsed = real_split
    assert elapsed < 10, f"splitting 16,577 rows took {elapsed:.1f}s"
    assert list(split.columns) == list(SPLIT_COLUMNS)
    assert len(split) == len(real_manifest) == 16_577
    assert split["md5hash"].is_unique and set(split["md5hash"]) == set(real_manifest["md5hash"])
    for name, target in TARGETS.items():
        assert abs(summary["fractions"][name] - target) <= OVERALL_TOLERANCE
    qc = real_manifest.set_index("md5hash")["qc"].reindex(split["md5hash"]).to_numpy()
    assert summary["sizes"]["verified_test"] == int((qc == "1 Diagnostic").sum()) > 0
    assert summary["sizes"]["excluded"] == int((qc == "3 Wrongly labelled").sum()) > 0
    assert sum(summary["sizes"].values()) == len(split)
    assert summary["duplicates"]["cross_split"] == 0
    json.dumps(summary)  # stored as manifests/split-<hash12>.json


def test_real_split_is_stratified_by_label_and_range(real_split):
    (split, _), _ = real_split
    assert max_deviation(shares(split, "fitzpatrick_range")) <= RANGE_TOLERANCE
    assert max_deviation(shares(split, "label")) <= LABEL_TOLERANCE
    main = split[split["split"].isin(MAIN)]
    cell = main["label"] + "|" + main["fitzpatrick_range"]
    big_cells = cell.value_counts()[lambda counts: counts >= 20].index
    cells = pd.crosstab(cell, main["split"], normalize="index").loc[big_cells]
    assert len(big_cells) > 200
    assert max_deviation(cells) <= CELL_TOLERANCE
    presence = pd.crosstab(main["label"], main["split"]).reindex(columns=MAIN, fill_value=0)
    assert len(presence) == 114 and (presence > 0).all().all()


def test_real_split_is_deterministic_and_seed_dependent(real_manifest, real_split):
    (split, _), _ = real_split
    shuffled = real_manifest.sample(frac=1.0, random_state=5)
    again, _ = split_dataset(shuffled, seed=0)
    assert again["split"].tolist() == split["split"].tolist()
    other, _ = split_dataset(real_manifest, seed=1)
    moved = (other["split"] != split["split"]).mean()
    assert moved > 0.2
    assert max_deviation(shares(other, "label")) <= LABEL_TOLERANCE


def test_real_csv_with_planted_duplicates_keeps_groups_whole(real_manifest):
    manifest = real_manifest.copy()
    rng = np.random.default_rng(11)
    # 1,500 groups of 2-5 rows of the same label share a base hash (up to 2 bits flipped)
    n_planted = 0
    for label, rows in manifest.groupby("label").groups.items():
        rows = list(rows)
        rng.shuffle(rows)
        position = 0
        while position < len(rows) * 0.6:
            size = int(rng.integers(2, 6))
            members = rows[position : position + size]
            base = int(rng.integers(0, 2**63))
            for member in members:
                flipped = base
                for bit in rng.choice(64, size=int(rng.integers(0, 3)), replace=False):
                    flipped ^= 1 << int(bit)
                manifest.loc[member, "phash"] = f"{flipped:016x}"
            n_planted += len(members)
            position += size
    split, summary = split_dataset(manifest, seed=3)
    assert summary["duplicates"]["images"] >= n_planted * 0.99
    assert summary["duplicates"]["cross_split"] == 0
    placed = split[split["split"] != "excluded"]
    assert (placed.groupby("dup_group")["split"].nunique() == 1).all()
    for name, target in TARGETS.items():
        assert abs(summary["fractions"][name] - target) <= OVERALL_TOLERANCE
    assert max_deviation(shares(split, "label")) <= LABEL_TOLERANCE
    assert max_deviation(shares(split, "fitzpatrick_range")) <= RANGE_TOLERANCE


# --------------------------------------------------------------------------- synthetic manifests
def test_planted_duplicate_groups_never_cross_splits():
    manifest = synthetic_manifest(n_labels=10, per_label=100, seed=2)
    rng = np.random.default_rng(4)
    # chains: every 3rd row joins a group of 2-8 rows, some mixing two labels
    order = rng.permutation(len(manifest))
    position = 0
    while position < len(order) // 2:
        size = int(rng.integers(2, 9))
        members = order[position : position + size]
        base = int(rng.integers(0, 2**63))
        manifest.loc[members, "phash"] = [f"{base ^ (1 << int(rng.integers(64))):016x}" for _ in members]
        position += size
    split, summary = split_dataset(manifest, seed=0)
    groups = split.groupby("dup_group")["split"].nunique()
    assert (groups == 1).all()
    assert summary["duplicates"]["cross_split"] == 0
    assert summary["duplicates"]["groups"] > 50
    assert summary["duplicates"]["label_conflict_groups"] > 0
    conflict = summary["duplicates"]["label_conflicts"][0]
    assert len(conflict["labels"]) > 1 and len(conflict["splits"]) == 1
    for name, target in TARGETS.items():
        assert abs(summary["fractions"][name] - target) <= 0.02
    # groups of up to 8 rows, most mixing labels, among 100 rows per label
    assert max_deviation(shares(split, "label")) <= LABEL_TOLERANCE


def test_exact_duplicates_from_content_md5_are_grouped():
    manifest = synthetic_manifest(n_labels=3, per_label=20)
    manifest["phash"] = random_phashes(len(manifest), 9)
    manifest["content_md5"] = manifest["md5hash"]
    manifest.loc[[0, 5, 30], "content_md5"] = "f" * 32
    split, summary = split_dataset(manifest)
    by_md5 = split.set_index("md5hash")
    members = by_md5.loc[manifest.loc[[0, 5, 30], "md5hash"]]
    assert members["dup_group"].nunique() == 1 and members["split"].nunique() == 1
    assert summary["duplicates"]["exact"] == 1


def test_only_ok_rows_are_split():
    manifest = synthetic_manifest(n_labels=4, per_label=30)
    manifest.loc[::4, "status"] = "failed"
    manifest.loc[::4, "phash"] = ""
    split, summary = split_dataset(manifest)
    assert len(split) == int((manifest["status"] == "ok").sum())
    assert summary["rows_not_ok"] == int((manifest["status"] != "ok").sum())
    assert set(split["md5hash"]) == set(manifest.loc[manifest["status"] == "ok", "md5hash"])
    assert (split["key"] == "images/" + split["md5hash"]).all()


def test_labels_with_three_images_reach_every_split():
    manifest = synthetic_manifest(n_labels=6, per_label=40)
    tiny = synthetic_manifest(n_labels=1, per_label=3, seed=7).assign(label="rare condition")
    manifest = pd.concat([manifest, tiny], ignore_index=True)
    for seed in range(5):
        split, _ = split_dataset(manifest, seed=seed)
        rare = split[split["label"] == "rare condition"]
        assert sorted(rare["split"]) == ["test", "train", "val"]


def test_qc_rows_wrongly_labelled_excluded_and_diagnostic_verified():
    manifest = synthetic_manifest(n_labels=4, per_label=40)
    manifest.loc[[0, 1, 41], "qc"] = "3 Wrongly labelled"
    manifest.loc[[2, 3, 50, 90], "qc"] = "1 Diagnostic"
    manifest.loc[[4], "qc"] = "2 Characteristic"
    # row 5 is a near-duplicate of verified row 2: it must not train
    manifest.loc[5, "phash"] = manifest.loc[2, "phash"]
    split, summary = split_dataset(manifest)
    by_md5 = split.set_index("md5hash")["split"]
    reason = split.set_index("md5hash")["exclude_reason"]
    md5 = manifest["md5hash"]
    assert set(by_md5[md5[[0, 1, 41]]]) == {"excluded"}
    assert set(reason[md5[[0, 1, 41]]]) == {"wrongly_labelled"}
    assert set(by_md5[md5[[2, 3, 50, 90]]]) == {"verified_test"}
    assert by_md5[md5[5]] == "excluded" and reason[md5[5]] == "near_duplicate_of_verified"
    assert by_md5[md5[4]] in MAIN
    assert summary["label_quality"] == {
        "wrongly_labelled_excluded": 3,
        "diagnostic_verified_test": 4,
        "near_duplicate_of_verified_excluded": 1,
        "too_few_images_excluded": 0,
    }
    assert summary["duplicates"]["cross_split"] == 0

    kept, summary = split_dataset(manifest, exclude_wrongly_labelled=False)
    assert set(kept.set_index("md5hash")["split"][md5[[0, 1, 41]]]) <= set(MAIN)
    assert summary["label_quality"]["wrongly_labelled_excluded"] == 0


def test_too_few_images_is_a_split_error_naming_counts():
    manifest = synthetic_manifest(n_labels=3, per_label=20)
    extra = synthetic_manifest(n_labels=1, per_label=2, seed=5).assign(label="scarce")
    manifest = pd.concat([manifest, extra], ignore_index=True)
    with pytest.raises(SplitError) as caught:
        split_dataset(manifest)
    message = str(caught.value)
    assert "'scarce': 2" in message and "at least 3" in message and "62 images" in message

    split, summary = split_dataset(manifest, drop_small_labels=True)
    assert summary["dropped_labels"] == ["scarce"]
    assert set(split.loc[split["label"] == "scarce", "exclude_reason"]) == {"too_few_images"}


def test_a_label_with_no_fetched_images_is_an_error():
    manifest = synthetic_manifest(n_labels=3, per_label=20)
    manifest.loc[manifest["label"] == "condition 01", "status"] = "failed"
    with pytest.raises(SplitError, match="'condition 01': 0"):
        split_dataset(manifest)
    manifest["status"] = "failed"
    with pytest.raises(SplitError, match="0 of 60 manifest rows have status 'ok'"):
        split_dataset(manifest)


def test_bad_parameters_and_columns_are_errors():
    manifest = synthetic_manifest(n_labels=3, per_label=20)
    with pytest.raises(SplitError, match="fractions"):
        split_dataset(manifest, fractions=(0.8, 0.15, 0.15))
    with pytest.raises(SplitError, match="label"):
        split_dataset(manifest.drop(columns=["label"]))
    doubled = pd.concat([manifest, manifest.iloc[:2]], ignore_index=True)
    with pytest.raises(SplitError, match="md5hash"):
        split_dataset(doubled)


def test_range_is_derived_from_scale_when_absent():
    manifest = synthetic_manifest(n_labels=3, per_label=30)
    split, summary = split_dataset(manifest)
    expected = manifest.set_index("md5hash")["fitzpatrick_scale"].map(
        {"1": "I-II", "2": "I-II", "3": "III-IV", "4": "III-IV", "5": "V-VI", "6": "V-VI", "-1": "unknown"}
    )
    assert (split.set_index("md5hash")["fitzpatrick_range"] == expected.reindex(split["md5hash"])).all()
    assert set(summary["per_range"]) <= {"I-II", "III-IV", "V-VI", "unknown"}


def test_split_fingerprint_tracks_what_the_split_depends_on():
    manifest = synthetic_manifest(n_labels=3, per_label=20)
    manifest["url"] = "https://example.org/x.jpg"
    params = {"seed": 0, "fractions": (0.7, 0.15, 0.15), "dup_threshold": 8, "exclude_wrongly_labelled": True}
    fingerprint = split_fingerprint(manifest, params)
    assert len(fingerprint) == 64
    assert split_fingerprint(manifest.sample(frac=1.0, random_state=2), dict(params, fractions=[0.7, 0.15, 0.15])) == fingerprint
    assert split_fingerprint(manifest.assign(url="https://mirror.example/x.jpg"), params) == fingerprint
    assert split_fingerprint(manifest, dict(params, seed=1)) != fingerprint
    assert split_fingerprint(manifest, dict(params, dup_threshold=6)) != fingerprint
    changed = manifest.copy()
    changed.loc[0, "phash"] = "0" * 16
    assert split_fingerprint(changed, params) != fingerprint
    failed = manifest.copy()
    failed.loc[0, "status"] = "failed"
    assert split_fingerprint(failed, params) != fingerprint
