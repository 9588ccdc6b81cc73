"""Two promotions of one label set forced to interleave: both read the old champion before
either records its promotion (a barrier), then they record in a chosen order. Used by the unit
test (in-memory store) and the integration test (real SeaweedFS)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from dermflow.evaluation import promotion
from dermflow.registry.entries import get_champion, get_champion_history, register_model

CLASSES = ["acne", "eczema", "psoriasis"]
CHAMPION_RUN = "20261126-100000-old-champ"
CHALLENGERS = {0.70: "20261126-110000-strong-one", 0.60: "20261126-110000-weaker-one"}


def _register(store, run_id: str, score: float) -> dict:
    return register_model(store, run_id, "cnn", metrics={"test": {"weighted_f1": score}}, params={},
                          data_manifest_hash="m", split_hash="split-a", label_set=CLASSES)


def race_two_challengers(store, monkeypatch, first_writer: float) -> dict:
    """A 0.50 champion, then 0.70 and 0.60 challengers promoted at once; the one scoring
    `first_writer` records first. -> {"decisions": {score: decision}, "champion", "history"}."""
    champion = _register(store, CHAMPION_RUN, 0.50)
    promotion.evaluate_challenger(store, challenger_run=CHAMPION_RUN, challenger_arch="cnn")
    for score, run_id in CHALLENGERS.items():
        _register(store, run_id, score)

    both_read = threading.Barrier(2, timeout=20)
    first_recorded = threading.Event()
    local = threading.local()
    real_get, real_record = promotion.get_champion, promotion.record_champion

    def get_then_wait(store, label_set):
        current = real_get(store, label_set)
        if not getattr(local, "waited", False):  # only the first read of each promotion
            local.waited = True
            both_read.wait()
        return current

    def record_in_order(store, pointer, *args, **kwargs):
        is_first = pointer["run_id"] == CHALLENGERS[first_writer]
        if not is_first:
            assert first_recorded.wait(20), "the first writer never recorded"
        try:
            return real_record(store, pointer, *args, **kwargs)
        finally:
            if is_first:
                first_recorded.set()

    monkeypatch.setattr(promotion, "get_champion", get_then_wait)
    monkeypatch.setattr(promotion, "record_champion", record_in_order)

    def challenge(score: float) -> dict:
        return promotion.evaluate_challenger(store, challenger_run=CHALLENGERS[score], challenger_arch="cnn")

    with ThreadPoolExecutor(2) as pool:
        decisions = dict(zip(CHALLENGERS, pool.map(challenge, CHALLENGERS)))
    label_set = champion["label_set_id"]
    return {"decisions": decisions, "champion": get_champion(store, label_set),
            "history": get_champion_history(store, label_set)}


def assert_no_promotion_lost(outcome: dict, first_writer: float) -> None:
    """The better challenger is champion, every "promoted" is in the history, in order."""
    decisions, history = outcome["decisions"], outcome["history"]
    assert outcome["champion"]["run_id"] == CHALLENGERS[0.70]
    recorded = [entry["run_id"] for entry in history]
    for score, decision in decisions.items():
        assert decision["promoted"] == (CHALLENGERS[score] in recorded), (score, decision["reason"])
    assert recorded[0] == CHAMPION_RUN and recorded[-1] == CHALLENGERS[0.70]
    scores = [entry["score"] for entry in history]
    assert scores == sorted(scores) and len(set(recorded)) == len(recorded)
    if first_writer == 0.70:  # the 0.60 promotion was decided again against 0.70, and lost
        assert not decisions[0.60]["promoted"] and decisions[0.60]["champion_score"] == 0.70
        assert recorded == [CHAMPION_RUN, CHALLENGERS[0.70]]
    else:  # 0.60 won the race; 0.70 was decided again against it, and won
        assert decisions[0.70]["promoted"] and decisions[0.70]["champion_score"] == 0.60
        assert recorded == [CHAMPION_RUN, CHALLENGERS[0.60], CHALLENGERS[0.70]]
