"""Read and validate the Fitzpatrick 17k CSV: the first stage of every pipeline run.

`load_dataset` reads the CSV from an http(s) URL, a local path or an `s3://bucket/key` URI,
checks it (`DatasetError` names the column and the rows of every problem found), adds
`fitzpatrick_range` and `no_url`, and can sample at most N rows per label for quick runs.
`dataset_fingerprint` is a content hash used as a cache/reuse key by later stages.

Every column is kept as the CSV's text (`dtype=str`, blanks stay ""), so frames written back
to CSV and read again compare equal.

The CSV is parsed strictly (`parse_csv`): every row must have as many fields as the header (a
file cut mid-line leaves a short last row), no field may exceed `MAX_FIELD_CHARS`, and the
whole file `MAX_CSV_BYTES`. Errors name lines and columns, never the file's content: a CSV
given as a URL is untrusted, and its text must not come back to whoever can read the error.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from dermflow.errors import DermflowError
from dermflow.ingestion.guard import redact_text, redact_url
from dermflow.ingestion.http import MAX_CSV_BYTES

if TYPE_CHECKING:
    from dermflow.storage import ObjectStore

REQUIRED_COLUMNS: tuple[str, ...] = ("md5hash", "fitzpatrick_scale", "label", "url")
OPTIONAL_COLUMNS: tuple[str, ...] = (
    "fitzpatrick_centaur",
    "nine_partition_label",
    "three_partition_label",
    "qc",
    "url_alphanum",
)
CSV_COLUMNS: tuple[str, ...] = (
    "md5hash",
    "fitzpatrick_scale",
    "fitzpatrick_centaur",
    "label",
    "nine_partition_label",
    "three_partition_label",
    "qc",
    "url",
    "url_alphanum",
)
FITZPATRICK_RANGES: tuple[str, ...] = ("I-II", "III-IV", "V-VI", "unknown")
UNKNOWN_RANGE = "unknown"
_RANGE_OF_SCALE = {1: "I-II", 2: "I-II", 3: "III-IV", 4: "III-IV", 5: "V-VI", 6: "V-VI"}

# How many offending rows an error message lists before "... and N more".
_ROWS_SHOWN = 5
HTTP_TIMEOUT_SECONDS = 30.0
# The longest field a dataset CSV may hold: URLs run to a few hundred characters, labels to ~40.
MAX_FIELD_CHARS = 8192


class DatasetError(DermflowError, ValueError):
    """The dataset CSV is malformed (permanent). `problems` holds one message per problem found."""

    def __init__(self, problems: Sequence[str], source: str | None = None):
        self.problems = list(problems)
        self.source = redact_url(source) if source else source
        where = f" in {self.source}" if source else ""
        super().__init__(f"invalid dataset{where}: " + "; ".join(self.problems))

    def __reduce__(self):  # rebuilt from its fields, not its message (Prefect pickles failures)
        return (type(self), (self.problems, self.source))


class DatasetSourceError(DermflowError, RuntimeError):
    """The dataset CSV could not be read from its source. Transient when the network or the
    store failed; permanent for a missing file or object, or a source that is not one."""


# --------------------------------------------------------------------------- reading
def read_source_bytes(source: str | Path, store: ObjectStore | None = None) -> bytes:
    """The raw bytes of `source`: an http(s) URL, an `s3://bucket/key` URI or a local path.

    `s3://` URIs are read through `store` (built from settings when None); a URI naming
    another bucket than the store's is read with the store's client all the same.
    """
    text = str(source)
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in ("http", "https"):
        return _read_http(text)
    if scheme == "s3":
        return _read_s3(text, store)
    if scheme:
        raise DatasetSourceError(f"dataset CSV {redact_url(text)}: scheme {scheme!r} is not supported "
                                 "(use http(s)://, s3:// or a local path)")
    return _read_local(Path(text).expanduser())


def _too_large(source: str, size: int) -> DatasetSourceError:
    return DatasetSourceError(f"dataset CSV {source} has {size:,} bytes, over the cap of {MAX_CSV_BYTES:,} "
                              "(dermflow.ingestion.http.MAX_CSV_BYTES)")


def _read_local(path: Path) -> bytes:
    try:
        if path.stat().st_size > MAX_CSV_BYTES:
            raise _too_large(str(path), path.stat().st_size)
        return path.read_bytes()
    except FileNotFoundError as error:
        raise DatasetSourceError(f"dataset CSV not found: {path}") from error
    except OSError as error:
        raise DatasetSourceError(f"cannot read dataset CSV {path}: {error}") from error


def _read_http(url: str) -> bytes:
    """The CSV at `url`, read through the guarded reader (`dermflow.ingestion.http`)."""
    from dermflow.ingestion.http import ReadPolicy, URLReadError, read_url

    policy = ReadPolicy(max_bytes=MAX_CSV_BYTES, read_timeout=HTTP_TIMEOUT_SECONDS)
    try:
        return read_url(url, policy=policy)
    except URLReadError as error:
        where = redact_url(url)
        if error.status is not None:
            message = f"dataset CSV at {where} answered HTTP {error.status}"
        elif error.reason in ("connect_error", "timeout"):
            message = f"cannot reach dataset CSV at {where}: {error.reason}"
        else:
            message = f"cannot read dataset CSV: {error}"
        raise DatasetSourceError(message, transient=error.transient) from error


def _read_s3(uri: str, store: ObjectStore | None) -> bytes:
    """The object at `uri`; a refusal (missing, forbidden) is permanent, anything else transient
    (`storage.s3_error` decides)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from dermflow.storage import ObjectStore, parse_s3_uri, s3_error

    bucket, key = parse_s3_uri(uri)
    if not key:
        raise DatasetSourceError(f"{redact_url(uri)} names a bucket but no object key")
    store = store or ObjectStore.from_settings()
    try:
        response = store.client.get_object(Bucket=bucket, Key=key)
        if int(response.get("ContentLength") or 0) > MAX_CSV_BYTES:
            response["Body"].close()
            raise _too_large(redact_url(uri), int(response["ContentLength"]))
        data = response["Body"].read(MAX_CSV_BYTES + 1)
        if len(data) > MAX_CSV_BYTES:
            raise _too_large(redact_url(uri), len(data))
        return data
    except DatasetSourceError:
        raise
    except Exception as error:  # noqa: BLE001 - a body read can fail with urllib3's own errors: transient
        transient = s3_error(error, uri).transient if isinstance(error, (ClientError, BotoCoreError)) else True
        raise DatasetSourceError(f"cannot read dataset CSV {redact_url(uri)}: {redact_text(str(error))}",
                                 transient=transient) from error


def read_csv_source(source: str | Path, store: ObjectStore | None = None) -> pd.DataFrame:
    """The CSV at `source` as a frame of strings (blanks are "", never NaN), parsed strictly
    (`parse_csv`). Not validated."""
    return parse_csv(read_source_bytes(source, store), str(source))


def parse_csv(data: bytes, source: str | None = None) -> pd.DataFrame:
    """UTF-8 CSV bytes -> a frame of strings; `DatasetError` naming the lines of every row whose
    field count differs from the header's (a file cut mid-line), of fields over
    `MAX_FIELD_CHARS`, or where the CSV cannot be parsed. Blank lines are skipped."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DatasetError([f"not a readable CSV: not UTF-8 text (byte {error.start})"], source) from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[list[str]] = []
    wrong_count: list[int] = []
    too_long: list[int] = []
    try:
        header = next(reader, None)
        if not header:
            raise DatasetError(["not a readable CSV: no header line"], source)
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                wrong_count.append(reader.line_num)
            elif max(map(len, row)) > MAX_FIELD_CHARS:
                too_long.append(reader.line_num)
            else:
                rows.append(row)
    except csv.Error as error:  # an unterminated quote, a field over the csv module's own limit
        raise DatasetError([f"not a readable CSV at line {reader.line_num}: {error}"], source) from None
    problems = []
    if max(map(len, header)) > MAX_FIELD_CHARS:
        problems.append(f"the header line has a field over {MAX_FIELD_CHARS} characters")
    elif len(set(header)) != len(header):
        problems.append("the header line names a column more than once")
    if wrong_count:
        problems.append(f"{len(wrong_count)} row(s) do not have the header's {len(header)} fields (a file cut "
                        f"short, or a stray separator) at line(s) {_line_list(wrong_count)}")
    if too_long:
        problems.append(f"{len(too_long)} row(s) have a field over {MAX_FIELD_CHARS} characters "
                        f"at line(s) {_line_list(too_long)}")
    if problems:
        raise DatasetError(problems, source)
    return pd.DataFrame(rows, columns=header, dtype=str)


# --------------------------------------------------------------------------- validation
def fitzpatrick_range(scale: object) -> str:
    """`I-II`, `III-IV`, `V-VI`, or `unknown` for anything that is not an integer 1..6."""
    try:
        number = float(str(scale).strip())
    except ValueError:
        return UNKNOWN_RANGE
    if not number.is_integer():
        return UNKNOWN_RANGE
    return _RANGE_OF_SCALE.get(int(number), UNKNOWN_RANGE)


def _line_list(line_numbers: Sequence[int]) -> str:
    shown = ", ".join(str(number) for number in line_numbers[:_ROWS_SHOWN])
    more = len(line_numbers) - _ROWS_SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


def _normalised(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy with every column text, the optional columns present, key columns stripped."""
    frame = frame.copy().reset_index(drop=True)
    for column in frame.columns:
        frame[column] = frame[column].fillna("").astype(str)
    for column in OPTIONAL_COLUMNS:
        if column not in frame.columns:
            frame[column] = ""
    frame["md5hash"] = frame["md5hash"].str.strip().str.lower()
    frame["label"] = frame["label"].str.strip()
    frame["url"] = frame["url"].str.strip()
    frame["qc"] = frame["qc"].str.strip()
    return frame


def _row_problems(frame: pd.DataFrame) -> list[str]:
    """One message per problem of a normalised frame: malformed or duplicate md5hash, empty label."""
    line_numbers = frame.index.to_numpy() + 2
    problems: list[str] = []
    malformed = ~frame["md5hash"].str.fullmatch(r"[0-9a-f]{32}")
    if malformed.any():  # values are not quoted: they may come from an untrusted URL
        problems.append(
            f"column md5hash: {int(malformed.sum())} value(s) are not 32 hex digits "
            f"at line(s) {_line_list(line_numbers[malformed.to_numpy()])}"
        )
    duplicated = frame["md5hash"].duplicated(keep=False) & ~malformed
    if duplicated.any():
        hashes = list(dict.fromkeys(frame.loc[duplicated, "md5hash"]))
        shown = ", ".join(
            f"{md5} (lines {_line_list(line_numbers[(frame['md5hash'] == md5).to_numpy()])})"
            for md5 in hashes[:_ROWS_SHOWN]
        )
        more = f" and {len(hashes) - _ROWS_SHOWN} more" if len(hashes) > _ROWS_SHOWN else ""
        problems.append(f"column md5hash: {len(hashes)} value(s) appear on more than one row: {shown}{more}")
    empty_label = frame["label"] == ""
    if empty_label.any():
        problems.append(
            f"column label: {int(empty_label.sum())} row(s) have an empty label "
            f"at line(s) {_line_list(line_numbers[empty_label.to_numpy()])}"
        )
    return problems


def validate_dataset(frame: pd.DataFrame, source: str | None = None) -> pd.DataFrame:
    """Check a raw dataset frame and return a normalised copy with the derived columns.

    Raises `DatasetError` listing every problem: missing required columns, malformed or
    duplicate `md5hash`, empty `label`. Rows are named by CSV line number (the header is
    line 1, so the first data row is line 2) and, for duplicates, by md5.
    Unknown `fitzpatrick_scale` values (-1, blank, 7, text) are not errors: they map to the
    `unknown` range. Rows without a URL are kept with `no_url=True`.
    """
    missing = [column for column in REQUIRED_COLUMNS if column not in frame.columns]
    if missing:
        raise DatasetError(
            # the header's own text is not quoted: it may come from an untrusted URL
            [f"missing required column(s) {', '.join(missing)} (the header has {len(frame.columns)} "
             f"column(s); the required ones are {', '.join(REQUIRED_COLUMNS)})"],
            source,
        )
    if len(frame) == 0:
        raise DatasetError(["the CSV has a header but no rows"], source)
    frame = _normalised(frame)
    problems = _row_problems(frame)
    if problems:
        raise DatasetError(problems, source)
    frame["fitzpatrick_range"] = frame["fitzpatrick_scale"].map(fitzpatrick_range)
    frame["no_url"] = frame["url"] == ""
    ordered = [c for c in CSV_COLUMNS if c in frame.columns]
    extra = [c for c in frame.columns if c not in ordered and c not in ("fitzpatrick_range", "no_url")]
    return frame[ordered + extra + ["fitzpatrick_range", "no_url"]]


# --------------------------------------------------------------------------- sampling
def _seeded_rank_key(md5hashes: pd.Series, seed: int) -> pd.Series:
    """A pseudo-random but reproducible sort key per row that depends only on (seed, md5)."""
    return md5hashes.map(lambda md5: hashlib.blake2b(f"{seed}:{md5}".encode(), digest_size=8).hexdigest())


def limit_rows_per_label(frame: pd.DataFrame, limit_per_label: int, seed: int = 0) -> pd.DataFrame:
    """At most `limit_per_label` rows of each label, chosen reproducibly for `seed`.

    The choice of a row depends only on (seed, md5hash), not on row order or on the other
    labels, and a larger limit keeps every row a smaller limit chose. Row order is kept.
    """
    if limit_per_label < 1:
        raise ValueError(f"limit_per_label must be at least 1, got {limit_per_label}")
    keys = _seeded_rank_key(frame["md5hash"], seed)
    rank = keys.groupby(frame["label"]).rank(method="first")
    return frame[rank <= limit_per_label]


def load_dataset(
    source: str | Path,
    store: ObjectStore | None = None,
    limit_per_label: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Read, validate and optionally subsample the dataset CSV (see `validate_dataset`)."""
    frame = validate_dataset(read_csv_source(source, store), source=str(source))
    if limit_per_label is not None:
        frame = limit_rows_per_label(frame, limit_per_label, seed).reset_index(drop=True)
    return frame


def dataset_fingerprint(frame: pd.DataFrame) -> str:
    """SHA-256 (hex) of the frame's content, independent of row and column order."""
    columns = sorted(map(str, frame.columns))
    canonical = frame[columns].astype(str).sort_values(columns, kind="mergesort")
    buffer = io.StringIO()
    canonical.to_csv(buffer, index=False, lineterminator="\n")
    return hashlib.sha256(buffer.getvalue().encode()).hexdigest()
