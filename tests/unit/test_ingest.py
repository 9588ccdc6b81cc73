"""dermflow.ingestion.ingest: reading local CSVs, validation errors that name columns and rows,
derived columns, per-label sampling, fingerprints, and the real dataset CSV."""

from __future__ import annotations

import hashlib
import io

import pandas as pd
import pytest

from dermflow.ingestion.ingest import (
    DatasetError,
    DatasetSourceError,
    dataset_fingerprint,
    fitzpatrick_range,
    load_dataset,
    read_csv_source,
    validate_dataset,
)

pytestmark = pytest.mark.unit

HEADER = "md5hash,fitzpatrick_scale,fitzpatrick_centaur,label,nine_partition_label,three_partition_label,qc,url,url_alphanum"


def md5_of(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def row(index: int, label: str = "psoriasis", scale: str = "3", qc: str = "", url: str | None = None) -> str:
    url = f"https://example.org/{index}.jpg" if url is None else url
    return f"{md5_of(str(index))},{scale},{scale},{label},inflammatory,non-neoplastic,{qc},{url},file{index}.jpg"


def write_csv(tmp_path, lines: list[str], header: str = HEADER):
    path = tmp_path / "dataset.csv"
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


def test_reads_a_valid_csv_with_derived_columns(tmp_path):
    path = write_csv(tmp_path, [row(1), row(2, label="acne", scale="5"), row(3, url="")])
    frame = load_dataset(path)
    assert len(frame) == 3
    assert frame["fitzpatrick_range"].tolist() == ["III-IV", "V-VI", "III-IV"]
    assert frame["no_url"].tolist() == [False, False, True]
    assert frame["md5hash"].tolist() == [md5_of("1"), md5_of("2"), md5_of("3")]
    # values stay text as in the CSV
    assert frame["fitzpatrick_scale"].tolist() == ["3", "5", "3"]


def test_missing_columns_are_named(tmp_path):
    path = write_csv(tmp_path, [f"{md5_of('1')},3"], header="md5hash,fitzpatrick_scale")
    with pytest.raises(DatasetError) as caught:
        load_dataset(path)
    message = str(caught.value)
    assert "label" in message and "url" in message and "missing required column" in message


def test_malformed_md5_names_column_and_lines(tmp_path):
    lines = [row(1), "not-a-hash" + row(2)[32:], row(3), "abc" + row(4)[32:]]
    with pytest.raises(DatasetError) as caught:
        load_dataset(write_csv(tmp_path, lines))
    message = str(caught.value)
    # header is line 1: the bad rows are the 2nd and 4th data rows, lines 3 and 5
    assert "column md5hash" in message
    assert "line(s) 3, 5" in message
    assert "not-a-hash" not in message  # values are not echoed (a CSV from a URL is untrusted)


def test_duplicate_md5_names_the_md5_and_its_lines(tmp_path):
    lines = [row(1), row(2), row(1, label="acne")]
    with pytest.raises(DatasetError) as caught:
        load_dataset(write_csv(tmp_path, lines))
    message = str(caught.value)
    assert "column md5hash" in message
    assert f"{md5_of('1')} (lines 2, 4)" in message


def test_empty_label_names_lines(tmp_path):
    lines = [row(1), row(2, label=""), row(3, label="  ")]
    with pytest.raises(DatasetError) as caught:
        load_dataset(write_csv(tmp_path, lines))
    assert "column label" in str(caught.value)
    assert "line(s) 3, 4" in str(caught.value)


def test_long_lists_of_bad_rows_are_shortened_with_a_count(tmp_path):
    lines = [row(index, label="") for index in range(12)]
    with pytest.raises(DatasetError) as caught:
        load_dataset(write_csv(tmp_path, lines))
    message = str(caught.value)
    assert "12 row(s)" in message and "line(s) 2, 3, 4, 5, 6 and 7 more" in message


def test_all_problems_are_reported_together(tmp_path):
    lines = [row(1), "zz" + row(2)[2:], row(1), row(3, label="")]
    with pytest.raises(DatasetError) as caught:
        load_dataset(write_csv(tmp_path, lines))
    assert len(caught.value.problems) == 3
    assert isinstance(caught.value, ValueError)


def test_header_only_csv_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="no rows"):
        load_dataset(write_csv(tmp_path, []))


@pytest.mark.parametrize(
    ("scale", "expected"),
    [("1", "I-II"), ("2", "I-II"), ("3", "III-IV"), ("4", "III-IV"), ("5", "V-VI"), ("6", "V-VI"),
     ("3.0", "III-IV"), ("-1", "unknown"), ("", "unknown"), ("7", "unknown"), ("0", "unknown"),
     ("2.5", "unknown"), ("3.5", "unknown"), ("dark", "unknown"), (None, "unknown"),
     # values as the fetcher's rows carry them: numbers, not text
     (1, "I-II"), (3.0, "III-IV"), (3.5, "unknown"), (6, "V-VI"), (-1, "unknown")],
)
def test_fitzpatrick_range(scale, expected):
    """The one scale -> range function (ingest, manifest rows, split and predict use it)."""
    assert fitzpatrick_range(scale) == expected


def test_unknown_skin_types_are_kept_not_errors(tmp_path):
    lines = [row(1, scale="-1"), row(2, scale=""), row(3, scale="7"), row(4, scale="brown"), row(5, scale="6")]
    frame = load_dataset(write_csv(tmp_path, lines))
    assert frame["fitzpatrick_range"].tolist() == ["unknown"] * 4 + ["V-VI"]


def test_qc_and_other_optional_columns_may_be_absent(tmp_path):
    lines = [f"{md5_of('1')},2,psoriasis,https://example.org/1.jpg"]
    frame = load_dataset(write_csv(tmp_path, lines, header="md5hash,fitzpatrick_scale,label,url"))
    assert frame.loc[0, "qc"] == ""
    assert frame.loc[0, "fitzpatrick_range"] == "I-II"


def test_md5_is_normalised_to_lowercase(tmp_path):
    frame = load_dataset(write_csv(tmp_path, [row(1).upper().replace("HTTPS://EXAMPLE.ORG", "https://example.org")]))
    assert frame.loc[0, "md5hash"] == md5_of("1")


def test_missing_local_file_is_a_source_error(tmp_path):
    with pytest.raises(DatasetSourceError, match="not found"):
        read_csv_source(tmp_path / "absent.csv")


def synthetic_frame(n_labels: int = 5, per_label: int = 20) -> pd.DataFrame:
    lines = [
        row(label * 1000 + index, label=f"condition {label}", scale=str(1 + index % 6))
        for label in range(n_labels) for index in range(per_label)
    ]
    return validate_dataset(pd.read_csv(io.StringIO("\n".join([HEADER, *lines])), dtype=str, keep_default_na=False))


def test_limit_per_label_is_deterministic_nested_and_seed_dependent(tmp_path):
    frame = synthetic_frame()
    path = tmp_path / "d.csv"
    frame.drop(columns=["fitzpatrick_range", "no_url"]).to_csv(path, index=False)
    small = load_dataset(path, limit_per_label=4, seed=7)
    assert small.groupby("label").size().tolist() == [4] * 5
    again = load_dataset(path, limit_per_label=4, seed=7)
    assert small["md5hash"].tolist() == again["md5hash"].tolist()
    larger = load_dataset(path, limit_per_label=9, seed=7)
    assert set(small["md5hash"]) <= set(larger["md5hash"])
    other_seed = load_dataset(path, limit_per_label=4, seed=8)
    assert set(small["md5hash"]) != set(other_seed["md5hash"])
    # a label with fewer rows than the limit keeps them all
    assert len(load_dataset(path, limit_per_label=50)) == len(frame)


def test_limit_per_label_does_not_depend_on_row_order():
    from dermflow.ingestion.ingest import limit_rows_per_label

    frame = synthetic_frame()
    shuffled = frame.sample(frac=1.0, random_state=3)
    first = set(limit_rows_per_label(frame, 3, seed=1)["md5hash"])
    second = set(limit_rows_per_label(shuffled, 3, seed=1)["md5hash"])
    assert first == second


def test_dataset_fingerprint_is_order_independent_and_content_sensitive():
    frame = synthetic_frame()
    fingerprint = dataset_fingerprint(frame)
    assert len(fingerprint) == 64
    assert dataset_fingerprint(frame.sample(frac=1.0, random_state=1)) == fingerprint
    assert dataset_fingerprint(frame[list(reversed(frame.columns))]) == fingerprint
    changed = frame.copy()
    changed.loc[3, "label"] = "something else"
    assert dataset_fingerprint(changed) != fingerprint
    assert dataset_fingerprint(frame.iloc[1:]) != fingerprint


def test_real_dataset_loads_with_its_documented_shape(full_csv):
    frame = load_dataset(full_csv)
    assert len(frame) == 16_577
    assert frame["label"].nunique() == 114
    assert frame["md5hash"].is_unique
    counts = frame["fitzpatrick_range"].value_counts().to_dict()
    # ../shared/README.md: -1: 565, 1: 2,947, 2: 4,808, 3: 3,308, 4: 2,781, 5: 1,533, 6: 635
    assert counts == {"I-II": 2_947 + 4_808, "III-IV": 3_308 + 2_781, "V-VI": 1_533 + 635, "unknown": 565}
    assert int(frame["no_url"].sum()) == 41
    per_label = frame.groupby("label").size()
    assert per_label.min() == 53 and per_label.max() == 653
    limited = load_dataset(full_csv, limit_per_label=60, seed=0)
    assert limited.groupby("label").size().max() == 60
    assert len(limited) == int(per_label.clip(upper=60).sum())


def test_unparseable_csv_is_a_dataset_error(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text('md5hash,label\n"unterminated,quote\n')
    with pytest.raises(DatasetError, match="not a readable CSV"):
        read_csv_source(path)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DatasetError, match="not a readable CSV"):
        read_csv_source(empty)
