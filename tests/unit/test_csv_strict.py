"""The dataset CSV is parsed strictly: a file cut mid-line, a row with a wrong field count and
an oversized field are errors naming the line; errors never quote the file's content."""

from __future__ import annotations

import time

import pytest

from dermflow.ingestion.ingest import MAX_FIELD_CHARS, DatasetError, load_dataset, parse_csv, read_csv_source

pytestmark = pytest.mark.unit

HEADER = "md5hash,fitzpatrick_scale,label,url"


def row(i: int, label: str = "psoriasis") -> str:
    return f"{i:032x},2,{label},https://example.org/{i}.jpg"


def write(tmp_path, text: str):
    path = tmp_path / "dataset.csv"
    path.write_text(text)
    return path


def test_a_csv_cut_mid_line_is_rejected_naming_the_line(tmp_path):
    text = "\n".join([HEADER, row(1), row(2), row(3)]) + "\n"
    cut = text[: text.rindex(",psoriasis") + 4]  # ...,pso  (the last row lost its URL)
    with pytest.raises(DatasetError, match=r"1 row\(s\) do not have the header's 4 fields .* at line\(s\) 4"):
        load_dataset(write(tmp_path, cut))


def test_rows_with_too_many_or_too_few_fields_are_named(tmp_path):
    lines = [HEADER, row(1), row(2) + ",extra", row(3), "0" * 32 + ",2", row(5)]
    with pytest.raises(DatasetError, match=r"2 row\(s\) do not have .* at line\(s\) 3, 5"):
        read_csv_source(write(tmp_path, "\n".join(lines) + "\n"))


def test_a_50_mb_label_field_is_rejected_quickly(tmp_path):
    huge = "x" * (50 * 2**20)
    path = write(tmp_path, "\n".join([HEADER, row(1), row(2, label=huge), row(3)]) + "\n")
    started = time.monotonic()
    with pytest.raises(DatasetError, match="line 3") as caught:
        read_csv_source(path)
    assert time.monotonic() - started < 10
    assert "xxxxxxxxxx" not in str(caught.value)


def test_a_field_over_the_cap_is_rejected(tmp_path):
    long_label = "y" * (MAX_FIELD_CHARS + 1)
    with pytest.raises(DatasetError, match=rf"field over {MAX_FIELD_CHARS} characters at line\(s\) 3"):
        parse_csv("\n".join([HEADER, row(1), row(2, label=long_label)]).encode(), "x.csv")
    assert len(parse_csv("\n".join([HEADER, row(1, label="z" * MAX_FIELD_CHARS)]).encode())) == 1


def test_quoted_fields_blank_lines_and_a_missing_final_newline_are_fine():
    data = (HEADER + "\n" + row(1) + "\n\n" + f'{2:032x},3,"eczema, chronic","https://example.org/2.jpg"').encode()
    frame = parse_csv(data)
    assert list(frame["label"]) == ["psoriasis", "eczema, chronic"]


def test_errors_name_no_content_and_redact_the_source():
    secret_header = b"root:x:0:0:SECRET-FIRST-LINE\n"
    with pytest.raises(DatasetError) as caught:
        from dermflow.ingestion.ingest import validate_dataset

        validate_dataset(parse_csv(secret_header + b"a\n"), source="https://user:pw@example.org/d.csv?sig=s3cr3t")
    message = str(caught.value)
    assert "SECRET-FIRST-LINE" not in message and "root:x" not in message
    assert "pw@" not in message and "s3cr3t" not in message and "missing required column" in message


def test_the_real_csv_cut_mid_row_is_rejected(full_csv, tmp_path):
    data = full_csv.read_bytes()
    cut = data[: data.index(b"\n", len(data) // 2) + 40]  # 40 bytes into a row
    path = tmp_path / "cut.csv"
    path.write_bytes(cut)
    with pytest.raises(DatasetError, match="do not have the header's"):
        load_dataset(path)
