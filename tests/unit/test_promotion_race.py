"""Concurrent promotions of one label set (issue 14, finding 11): two challengers that read
the same champion before either records its promotion. Without serialization both said
"promoted", the weaker one could end as champion and the history lost an entry."""

from __future__ import annotations

import pytest

from dermflow.evaluation import promotion
from dermflow.registry.entries import ChampionChanged, get_champion, record_champion
from tests.support.memory_s3 import memory_store
from tests.support.promotion_race import assert_no_promotion_lost, race_two_challengers

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("first_writer", [0.70, 0.60])
def test_two_challengers_promoted_at_once_leave_the_better_one_and_the_whole_history(monkeypatch, first_writer):
    outcome = race_two_challengers(memory_store(), monkeypatch, first_writer)
    assert_no_promotion_lost(outcome, first_writer)


def test_a_promotion_against_a_replaced_champion_is_refused():
    store = memory_store()
    pointer = {"label_set_id": "ls-1-x", "run_id": "20261126-100000-a", "arch": "cnn", "score": 0.5}
    first = record_champion(store, pointer, replaces=None)
    record_champion(store, {**pointer, "run_id": "20261126-110000-b", "score": 0.6}, replaces=first)
    with pytest.raises(ChampionChanged):  # decided against `first`, which is no longer champion
        record_champion(store, {**pointer, "run_id": "20261126-120000-c", "score": 0.7}, replaces=first)
    assert get_champion(store, "ls-1-x")["run_id"] == "20261126-110000-b"


def test_a_promotion_that_keeps_losing_races_gives_up_with_a_clear_error(monkeypatch):
    store = memory_store()
    from tests.support.promotion_race import CHALLENGERS, _register

    _register(store, CHALLENGERS[0.70], 0.70)

    def always_changed(store, pointer, replaces=None):
        raise ChampionChanged("another promotion won")

    monkeypatch.setattr(promotion, "record_champion", always_changed)
    with pytest.raises(ChampionChanged, match="changed 8 times"):
        promotion.evaluate_challenger(store, challenger_run=CHALLENGERS[0.70], challenger_arch="cnn")
