"""Run ids sort by time and carry the flow run's name; content hashes are stable."""

from datetime import datetime, timezone

import pytest

from dermflow.layout import model_key
from dermflow.runs import RUN_ID_PATTERN, content_hash, make_run_id

pytestmark = pytest.mark.unit


def test_run_id_is_time_sortable_and_named():
    early = make_run_id("brave-otter", datetime(2026, 11, 26, 10, 15, tzinfo=timezone.utc))
    late = make_run_id("Able Ant", datetime(2026, 11, 26, 10, 16, tzinfo=timezone.utc))
    assert early == "20261126-101500-brave-otter"
    assert late == "20261126-101600-able-ant"
    assert sorted([late, early]) == [early, late]
    assert RUN_ID_PATTERN.match(early) and RUN_ID_PATTERN.match(late)
    assert model_key(early, "vgg16") == "runs/20261126-101500-brave-otter/models/vgg16/model.keras"


def test_content_hash_ignores_key_order_and_sees_values():
    assert content_hash({"a": 1, "b": 2}) == content_hash({"b": 2, "a": 1})
    assert content_hash({"a": 1}) != content_hash({"a": 2})
