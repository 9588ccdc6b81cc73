"""Run identity: time-sortable run ids, and the content hash that reuse decisions key on.

The bucket keys a run writes are spelled in `dermflow.layout`, not here."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone

RUN_ID_PATTERN = re.compile(r"^\d{8}-\d{6}-[a-z0-9][a-z0-9-]*$")


def make_run_id(flow_run_name: str, when: datetime | None = None) -> str:
    """Time-sortable id holding the Prefect flow run's name, e.g. `20261126-101500-brave-otter`."""
    when = when or datetime.now(timezone.utc)
    slug = re.sub(r"[^a-z0-9]+", "-", flow_run_name.lower()).strip("-") or "run"
    return f"{when:%Y%m%d-%H%M%S}-{slug}"


def content_hash(*objects) -> str:
    """A stable hash of JSON-able objects (dict keys sorted): the key for reuse decisions."""
    digest = hashlib.sha256()
    for obj in objects:
        digest.update(json.dumps(obj, sort_keys=True, default=str).encode())
    return digest.hexdigest()
