"""The fetch manifest: which rows to fetch, one row per outcome, and the reconciled whole.

`plan_shards` cuts the rows whose image is not stored yet into shards for the fetcher;
`manifest_row`/`ok_row` describe one row's outcome (columns `MANIFEST_COLUMNS`, see
docs/DESIGN.md "Fetch manifest"); `reconcile_manifest` builds the complete manifest from this
run's rows, the previous manifest, and objects found in the bucket but in no manifest (verified
by reading them back), so a run killed at any point ends consistent after a rerun;
`summarize_manifest` and `failed_rows` read a manifest back; `read_latest_fetch` finds the
latest fetch's dataset and manifest through its pointer.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from dermflow import layout
from dermflow.config import RUN_DEFAULTS
from dermflow.errors import DermflowError
from dermflow.ingestion.guard import redact_url
from dermflow.ingestion.images import HASH_HEX_DIGITS, ImageFacts, ImageRejected, verify_image
from dermflow.ingestion.ingest import fitzpatrick_range

if TYPE_CHECKING:  # heavy imports stay out of import time
    import pandas as pd

    from dermflow.storage import ObjectStore

logger = logging.getLogger("dermflow.ingestion.manifest")

MANIFEST_COLUMNS = [
    "md5hash", "label", "fitzpatrick_scale", "fitzpatrick_range", "qc", "url", "status", "reason",
    "md5_mismatch", "content_md5", "attempts", "bytes", "width", "height", "phash", "key", "source",
    "archive_reason",
]
# Row fields a shard carries (whatever of these the dataset has).
SHARD_FIELDS = ("md5hash", "url", "label", "fitzpatrick_scale", "fitzpatrick_range", "qc")
# Reasons that a later run may cure (what `derm/refetch` retries); the rest are permanent.
TRANSIENT_REASONS = frozenset({"timeout", "connect_error", "truncated", "http_429", "not_fetched"})


class ManifestError(DermflowError, ValueError):
    """Dataset rows, shard rows or a fetch manifest that cannot be used, or no manifest at all
    (permanent: the input has to change)."""


def _clean(value: Any) -> Any:
    """NaN/None -> "" (CSV blanks); numpy scalars -> Python."""
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            return value.item()
        except (AttributeError, ValueError):
            return value
    return value


# --------------------------------------------------------------------------------------------
# planning


def stored_image_md5s(store: ObjectStore) -> set[str]:
    """md5hashes with an object under `images/` (one paginated listing)."""
    md5s = (layout.md5_of_image_key(key) for key in store.key_names(layout.IMAGES_PREFIX))
    return {md5 for md5 in md5s if md5}


def _interleave_by_host(records: list[dict]) -> list[dict]:
    """Round-robin over hosts so every shard mixes hosts and each host's cap is used in parallel."""
    by_host: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        try:
            host = urlsplit(str(record.get("url") or "")).hostname or ""
        except ValueError:
            host = ""
        by_host[host].append(record)
    queues = list(by_host.values())
    mixed: list[dict] = []
    for index in range(max((len(q) for q in queues), default=0)):
        mixed.extend(queue[index] for queue in queues if index < len(queue))
    return mixed


def plan_shards(rows: pd.DataFrame, stored: set[str], shard_size: int = RUN_DEFAULTS["shard_size"],
                parallel: int = 1) -> list[list[dict]]:
    """Rows whose image is not stored yet, one per md5hash, cut into shards of at most
    `shard_size` rows, of near-equal sizes, as many as a multiple of `parallel` (the shards run
    at once): the last shards finish together instead of a small one running alone on its
    share of a host's concurrency.

    Each row is a dict of `SHARD_FIELDS` (those the frame has) with blanks as "".
    """
    if shard_size < 1:
        raise ManifestError(f"shard_size must be >= 1, got {shard_size}")
    missing = [column for column in ("md5hash", "url") if column not in rows.columns]
    if missing:
        raise ManifestError(f"dataset rows lack column(s) {missing} needed to fetch images")
    columns = [column for column in SHARD_FIELDS if column in rows.columns]
    seen: set[str] = set(stored)
    records: list[dict] = []
    for position, values in enumerate(rows[columns].itertuples(index=False, name=None)):
        record = {column: _clean(value) for column, value in zip(columns, values)}
        md5hash = str(record["md5hash"]).strip().lower()
        if not md5hash:
            raise ManifestError(f"dataset row {position}: empty md5hash")
        record["md5hash"] = md5hash
        record["url"] = str(record["url"]).strip()
        if md5hash in seen:
            continue
        seen.add(md5hash)
        records.append(record)
    return _even_cuts(_interleave_by_host(records), shard_size, parallel)


def _even_cuts(records: list[dict], shard_size: int, parallel: int) -> list[list[dict]]:
    """`records` in the fewest near-equal runs of at most `shard_size`, a multiple of `parallel` of them."""
    if not records:
        return []
    count = -(-len(records) // shard_size)
    count = min(-(-count // max(parallel, 1)) * max(parallel, 1), len(records))
    size, longer = divmod(len(records), count)
    cuts, start = [], 0
    for index in range(count):
        end = start + size + (index < longer)
        cuts.append(records[start:end])
        start = end
    return cuts


# --------------------------------------------------------------------------------------------
# manifest rows


def manifest_row(row: dict, **outcome: Any) -> dict:
    """A manifest row for a dataset/shard row and an outcome (status, reason, ...)."""
    scale = _clean(row.get("fitzpatrick_scale", ""))
    fitz_range = _clean(row.get("fitzpatrick_range", "")) or fitzpatrick_range(scale)
    result = {
        "md5hash": str(row.get("md5hash", "")).strip().lower(),
        "label": _clean(row.get("label", "")),
        "fitzpatrick_scale": scale,
        "fitzpatrick_range": fitz_range,
        "qc": _clean(row.get("qc", "")),
        "url": redact_url(str(_clean(row.get("url", "")))),
        "status": "failed",
        "reason": "",
        "md5_mismatch": False,
        "content_md5": "",
        "attempts": 0,
        "bytes": 0,
        "width": 0,
        "height": 0,
        "phash": "",
        "key": "",
        "source": "url",  # archive | url | already stored
        "archive_reason": "",  # why the image source's member was not used (the row fell back to its URL)
    }
    result.update(outcome)
    return result


def ok_row(row: dict, facts: ImageFacts, size: int, attempts: int) -> dict:
    return manifest_row(
        row, status="ok", reason="", md5_mismatch=facts.md5 != str(row["md5hash"]).lower(), content_md5=facts.md5,
        attempts=attempts,
        bytes=size, width=facts.width, height=facts.height, phash=facts.phash, key=layout.image_key(row["md5hash"]),
    )


# --------------------------------------------------------------------------------------------
# manifests


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(_clean(value)) if value is not None else False


def _as_int(value: Any) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return 0


def _normalized(row: dict) -> dict:
    """A manifest row with its types restored (a manifest read back from CSV is all strings)."""
    result = {column: _clean(row.get(column, "")) for column in MANIFEST_COLUMNS}
    result["md5_mismatch"] = _as_bool(result["md5_mismatch"])
    for column in ("attempts", "bytes", "width", "height"):
        result[column] = _as_int(result[column])
    for column in ("md5hash", "label", "fitzpatrick_range", "qc", "url", "status", "reason", "content_md5", "phash",
                   "key", "source", "archive_reason"):
        result[column] = "" if result[column] is None else str(result[column])
    return result


def _verify_stored(store: ObjectStore, row: dict) -> dict:
    """Read an object back and describe it; delete it if it is not a decodable image."""
    key = layout.image_key(row["md5hash"])
    body = store.get_bytes(key)
    try:
        facts = verify_image(body)
    except ImageRejected as error:
        logger.warning("%s in the bucket is not a valid image (%s): deleted", key, error.reason)
        store.delete_prefix(key)  # keys are images/<32 hex>: this prefix is exactly one object
        return manifest_row(row, reason=error.reason, bytes=len(body))
    return ok_row(row, facts, len(body), attempts=0) | {"source": "already stored"}


def _rows_by_md5(previous: pd.DataFrame | None, new_rows: Iterable[dict]) -> tuple[dict[str, dict], dict[str, dict]]:
    """(this run's rows, the previous manifest's rows), each by md5hash, types restored."""
    new_by_md5 = {str(row["md5hash"]).lower(): _normalized(row) for row in new_rows}
    previous_by_md5: dict[str, dict] = {}
    if previous is not None and len(previous):
        missing = [column for column in ("md5hash", "status") if column not in previous.columns]
        if missing:
            raise ManifestError(f"previous manifest lacks column(s) {missing}")
        for record in previous.to_dict("records"):
            previous_by_md5[str(record["md5hash"]).lower()] = _normalized(record)
    return new_by_md5, previous_by_md5


def _most_trusted_row(record: dict, new: dict | None, old: dict | None, stored: set[str]) -> dict | None:
    """The row to keep for a dataset record, in order of trust (see `reconcile_manifest`); None
    when its object is stored but no manifest vouches for it (it must be read back)."""
    md5hash = record["md5hash"]
    if new is not None and new["status"] == "ok":  # this run put it
        return new
    # An ok row hashed by an older recipe (a 16-digit pHash, before the crop hashes) is not
    # trusted: its object is read back below and hashed by the current recipe, once.
    if old is not None and old["status"] == "ok" and md5hash in stored and len(old["phash"]) == HASH_HEX_DIGITS:
        return {**old, "source": "already stored"}
    if md5hash in stored:
        return None
    if new is not None:
        return new
    if old is not None and old["status"] != "ok" and old["reason"] != "not_fetched":
        return old
    if not str(record.get("url") or "").strip():
        return manifest_row(record, reason="no_url")
    return manifest_row(record, reason="not_fetched")


def _verify_unvouched(store: ObjectStore, records: dict[str, dict], workers: int) -> dict[str, dict]:
    """Read back and verify stored objects that no manifest describes; their rows by md5hash."""
    if not records:
        return {}
    logger.info("verifying %d stored object(s) that no manifest describes", len(records))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return dict(zip(records, pool.map(lambda record: _verify_stored(store, record), records.values())))


def _manifest_frame(dataset_records: list[dict], chosen: dict[str, dict]) -> pd.DataFrame:
    """One manifest row per dataset record, in dataset order, with the manifest's dtypes."""
    import pandas as pd

    output = []
    for record in dataset_records:
        row = dict(chosen[record["md5hash"]])
        # Descriptive columns always come from the dataset (the manifest may predate a relabel).
        described = manifest_row(record)
        for column in ("label", "fitzpatrick_scale", "fitzpatrick_range", "qc", "url"):
            row[column] = described[column]
        output.append(_normalized(row))
    frame = pd.DataFrame(output, columns=MANIFEST_COLUMNS)
    for column in ("attempts", "bytes", "width", "height"):
        frame[column] = frame[column].astype("int64")
    frame["md5_mismatch"] = frame["md5_mismatch"].astype(bool)
    return frame


def reconcile_manifest(
    dataset: pd.DataFrame,
    store: ObjectStore,
    previous: pd.DataFrame | None,
    new_rows: Iterable[dict],
    *,
    verify_workers: int = 16,
) -> pd.DataFrame:
    """The complete fetch manifest: one row per dataset row, in dataset order.

    For each row, in order of trust: this run's `ok` row; the previous manifest's `ok` row if
    its object is still stored; an object in the bucket that no manifest describes (a run was
    killed after the put) is read back and verified (md5, pHash, size); this run's failed row;
    the previous failed row; else `failed` with reason `no_url` or `not_fetched`.
    """
    if "md5hash" not in dataset.columns:
        raise ManifestError("dataset lacks column 'md5hash'")
    stored = stored_image_md5s(store)
    new_by_md5, previous_by_md5 = _rows_by_md5(previous, new_rows)
    dataset_records = [{k: _clean(v) for k, v in record.items()} for record in dataset.to_dict("records")]
    chosen: dict[str, dict] = {}
    unvouched: dict[str, dict] = {}
    for record in dataset_records:
        record["md5hash"] = md5hash = str(record["md5hash"]).strip().lower()
        if md5hash in chosen or md5hash in unvouched:
            continue
        row = _most_trusted_row(record, new_by_md5.get(md5hash), previous_by_md5.get(md5hash), stored)
        if row is None:
            unvouched[md5hash] = record
        else:
            chosen[md5hash] = row
    chosen.update(_verify_unvouched(store, unvouched, verify_workers))
    return _manifest_frame(dataset_records, chosen)


def summarize_manifest(manifest: pd.DataFrame) -> dict:
    """Counts by status and reason, md5 mismatches and bytes: `rows == ok + failed`."""
    statuses = manifest["status"].astype(str)
    failed = manifest[statuses != "ok"]
    return {
        "rows": int(len(manifest)),
        "ok": int((statuses == "ok").sum()),
        "failed": int(len(failed)),
        "by_status": {str(k): int(v) for k, v in statuses.value_counts().sort_index().items()},
        "by_reason": {str(k): int(v) for k, v in failed["reason"].astype(str).value_counts().sort_index().items()},
        "by_source": ({str(k): int(v) for k, v in manifest["source"].astype(str).value_counts().sort_index().items()}
                      if "source" in manifest.columns else {}),
        "md5_mismatch": int(manifest["md5_mismatch"].map(_as_bool).sum()) if len(manifest) else 0,
        "bytes": int(manifest["bytes"].map(_as_int).sum()) if len(manifest) else 0,
    }


def failed_rows(manifest: pd.DataFrame, dataset: pd.DataFrame | None = None, *, include_permanent: bool = True) -> pd.DataFrame:
    """Failed manifest rows worth fetching again (never `no_url`/`bad_scheme`).

    The manifest's URLs are redacted, so pass `dataset` to get the dataset's rows (real URLs)
    for those md5hashes, ready for `plan_shards`. `include_permanent=False` keeps only
    failures a later run may cure (`TRANSIENT_REASONS` and 5xx).
    """
    statuses = manifest["status"].astype(str)
    reasons = manifest["reason"].astype(str)
    mask = (statuses != "ok") & ~reasons.isin(["no_url", "bad_scheme"])
    if not include_permanent:
        mask &= reasons.isin(TRANSIENT_REASONS) | reasons.str.match(r"^http_5\d\d$")
    failed = manifest[mask]
    if dataset is None:
        return failed.reset_index(drop=True)
    wanted = set(failed["md5hash"].astype(str).str.lower())
    return dataset[dataset["md5hash"].astype(str).str.lower().isin(wanted)].reset_index(drop=True)




def read_latest_fetch(store: ObjectStore) -> tuple[dict, pd.DataFrame] | None:
    """The latest fetch's pointer (`layout.FETCH_STATE_KEY`: `dataset_key`, `manifest_key`,
    `run_id`) and the manifest it names; None before the first fetch.

    A fetch writes its manifest (its history copy, then the `layout.FETCH_MANIFEST_KEY` copy)
    and the pointer last, so the pointer always names a complete manifest of its own dataset:
    a fetch killed between the writes leaves the previous fetch's pair, still consistent. The
    latest copy is therefore never read here (it may be newer than the pointer); only a
    pointer from before pointers named their manifest falls back to it.
    """
    if not store.exists(layout.FETCH_STATE_KEY):
        return None
    state = store.get_json(layout.FETCH_STATE_KEY)
    manifest_key = state.get("manifest_key") or layout.FETCH_MANIFEST_KEY
    return state, store.get_dataframe_csv(manifest_key)


def write_latest_fetch(store: ObjectStore, dataset: pd.DataFrame, dataset_key: str, results: Iterable[dict],
                       run_id: str) -> tuple[str, pd.DataFrame]:
    """Reconcile this fetch's (or import's) `results` with the previous manifest and the bucket,
    and make it the latest: its history copy, the latest copy, then the pointer, last (see
    `read_latest_fetch`). Returns the history key and the manifest."""
    latest = read_latest_fetch(store)
    manifest = reconcile_manifest(dataset, store, latest[1] if latest else None, list(results))
    history_key = layout.fetch_manifest_history_key(run_id)
    store.put_dataframe_csv(history_key, manifest)
    store.put_dataframe_csv(layout.FETCH_MANIFEST_KEY, manifest)
    store.put_json(layout.FETCH_STATE_KEY, {"dataset_key": dataset_key, "manifest_key": history_key, "run_id": run_id})
    return history_key, manifest
