"""The fetch benchmark's account of a flow run's wall time adds up, and each stretch is measured
between the runs it names."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from bench.flow_timeline import Span, describe, stretches

pytestmark = pytest.mark.unit

T0 = datetime(2026, 12, 4, 22, 0, tzinfo=timezone.utc)


def span(name: str, start: float, end: float) -> Span:
    return Span(name, T0 + timedelta(seconds=start), T0 + timedelta(seconds=end))


def test_stretches_of_a_fetch_run():
    parent = span("derm", 0.0, 17.0)
    subflow = span("derm-fetch", 3.5, 15.5)
    parent_tasks = [span("resolve-run-config-1", 0.1, 0.2), span("ingest-csv-1", 0.9, 1.3),
                    span("mark-run-finished-1", 16.8, 16.9)]
    subflow_tasks = [span("plan-fetch-1", 3.6, 3.8), span("fetch-shard-a", 3.8, 8.0), span("fetch-shard-b", 4.0, 14.5),
                     span("write-fetch-manifest-1", 14.6, 15.0)]
    result = stretches(parent, subflow, parent_tasks, subflow_tasks)
    assert result == {"before_subflow": 1.3, "subflow_wait": 2.2, "subflow_work": 11.5, "shards": 10.7,
                      "shard_count": 2, "subflow_exit": 0.5, "after_subflow": 1.5, "total": 17.0}
    parts = ("before_subflow", "subflow_wait", "subflow_work", "subflow_exit", "after_subflow")
    assert sum(result[name] for name in parts) == pytest.approx(result["total"])
    line = describe(result, 2076)
    assert "waiting for the subflow run 2.20 s" in line and "194.0 images/s" in line


def test_import_shards_count_and_a_subflow_first_thing_waits_from_the_parent_start():
    parent, subflow = span("derm", 0.0, 10.0), span("derm-fetch", 2.0, 9.0)
    subflow_tasks = [span("import-shard-1", 2.5, 8.0), span("write-fetch-manifest-1", 8.0, 8.5)]
    result = stretches(parent, subflow, [], subflow_tasks)
    assert result["before_subflow"] == 0.0 and result["subflow_wait"] == 2.0
    assert result["shards"] == 5.5 and result["shard_count"] == 1


def test_a_subflow_without_shards_is_an_error():
    with pytest.raises(ValueError, match="no task runs"):
        stretches(span("derm", 0, 5), span("derm-fetch", 1, 4), [], [span("plan-fetch-1", 1, 2)])
