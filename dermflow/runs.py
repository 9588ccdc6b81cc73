"""Run identity: time-sortable run ids, and the content hash that reuse decisions key on.

The bucket keys a run writes are spelled in `dermflow.layout`, not here."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone

from dermflow.errors import DermflowError
from dermflow.layout import RUNS_PREFIX

RUN_ID_PATTERN = re.compile(r"^\d{8}-\d{6}-[a-z0-9][a-z0-9-]*$")
# A Prefect flow run's name as a run id spells it (what `make_run_id` keeps of it).
RUN_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]*$")
# A run id becomes a bucket prefix and a local directory name: keep it short.
MAX_RUN_ID_CHARS = 128


class InvalidRunId(DermflowError, ValueError):
    """A run id (or run reference) that is not one: it would not name a run, and may try to
    leave the run's folder (`../x`). Permanent."""


def check_run_id(run_id: object) -> str:
    """`run_id` itself when it matches `RUN_ID_PATTERN` (`YYYYMMDD-HHMMSS-<name>`), else
    `InvalidRunId`. Every entry point that takes a run id calls this before the id becomes a
    key or a local path."""
    if isinstance(run_id, str) and len(run_id) <= MAX_RUN_ID_CHARS and RUN_ID_PATTERN.fullmatch(run_id):
        return run_id
    raise InvalidRunId(f"invalid run id {str(run_id)[:MAX_RUN_ID_CHARS]!r}: expected YYYYMMDD-HHMMSS-<name> "
                       "(digits, lower-case letters and '-'), e.g. 20261126-101500-brave-otter")


def check_run_reference(reference: str) -> str:
    """A run reference a user typed: a run id, a run's key prefix (`runs/<run_id>/`), or a flow
    run's name (`brave-otter`); returned stripped, else `InvalidRunId`."""
    text = reference.strip()
    if text.startswith(RUNS_PREFIX):
        text = text[len(RUNS_PREFIX):].rstrip("/")
    if len(text) <= MAX_RUN_ID_CHARS and (RUN_ID_PATTERN.fullmatch(text) or RUN_NAME_PATTERN.fullmatch(text)):
        return reference.strip()
    raise InvalidRunId(f"invalid run {reference[:MAX_RUN_ID_CHARS]!r}: expected a run id "
                       "(YYYYMMDD-HHMMSS-<name>, e.g. 20261126-101500-brave-otter) or a flow run's name "
                       "(lower-case letters, digits and '-')")


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


# The event a `derm` run emits when some architectures failed and others trained; the alert
# automation that `dermflow up` creates listens for it.
PARTIAL_FAILURE_EVENT = "dermflow.run.partial-failure"


def partial_failure_summary(run_id: str, failed: list[dict], total: int) -> str:
    """One line: which architectures of the run failed, and why."""
    reasons = "; ".join(f"{o['architecture']}: {o.get('error') or 'unknown'}" for o in failed)
    return f"run {run_id}: {len(failed)} of {total} architecture(s) failed ({reasons})"


def partial_failure_markdown(run_id: str, failed: list[dict], total: int) -> str:
    """A markdown table of the failed architectures and their reasons (a run artifact)."""
    def cell(text: object) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")[:500]

    rows = "\n".join(f"| {cell(o['architecture'])} | {cell(o.get('error') or 'unknown')} |" for o in failed)
    return (f"# Partial failure: {len(failed)} of {total} architecture(s) failed\n\n"
            f"Run `{run_id}` completed with the other architectures; these did not train:\n\n"
            f"| architecture | reason |\n|---|---|\n{rows}\n")
