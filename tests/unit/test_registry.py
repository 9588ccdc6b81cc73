"""Registry rules that need no bucket: label set ids, promotion decisions, scores."""

import math

import pytest

from dermflow.registry.entries import label_set_id, promotion_score
from dermflow.evaluation.promotion import champion_score_on_split, decide_promotion
from dermflow.registry.runs import flow_run_name

pytestmark = pytest.mark.unit


def test_label_set_id_ignores_order_and_duplicates_but_not_content():
    a = label_set_id(["psoriasis", "acne", "eczema"])
    assert a == label_set_id(["eczema", "psoriasis", "acne", "acne"])
    assert a != label_set_id(["psoriasis", "acne"])
    assert a != label_set_id(["psoriasis", "acne", "eczema "])
    with pytest.raises(ValueError, match="empty"):
        label_set_id([])


def test_first_model_becomes_champion():
    promoted, reason = decide_promotion(None, 0.31)
    assert promoted and "first model" in reason


def test_better_challenger_wins_and_the_reason_names_both_scores():
    promoted, reason = decide_promotion(0.50, 0.55)
    assert promoted
    assert "0.5500" in reason and "0.5000" in reason


@pytest.mark.parametrize("champion, challenger", [(0.50, 0.50), (0.50, 0.49)])
def test_equal_or_worse_challenger_keeps_the_champion(champion, challenger):
    promoted, reason = decide_promotion(champion, challenger)
    assert not promoted and "does not beat" in reason


def test_min_improvement_is_a_strict_margin():
    assert not decide_promotion(0.50, 0.52, min_improvement=0.02)[0]
    assert decide_promotion(0.50, 0.5201, min_improvement=0.02)[0]
    with pytest.raises(ValueError):
        decide_promotion(0.5, 0.6, min_improvement=-0.1)


def test_challenger_without_a_finite_score_never_wins():
    assert not decide_promotion(None, math.nan)[0]
    assert not decide_promotion(0.2, None)[0]


def test_promotion_score_reads_test_weighted_f1():
    assert promotion_score({"test": {"weighted_f1": 0.4}, "verified_test": None}) == 0.4
    assert promotion_score({"weighted_f1": 0.3}) == 0.3
    assert promotion_score({"test": {"weighted_f1": math.nan}}) is None
    assert promotion_score(None) is None


def test_champion_score_only_counts_on_the_same_split():
    champion = {"split_hash": "abc", "score": 0.6}
    assert champion_score_on_split(champion, "abc") == 0.6
    assert champion_score_on_split(champion, "def") is None
    assert champion_score_on_split(None, "abc") is None


def test_flow_run_name_strips_the_timestamp():
    assert flow_run_name("20261126-101500-brave-otter") == "brave-otter"
    assert flow_run_name("custom") == "custom"
