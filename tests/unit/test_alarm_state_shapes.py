"""A saved alarm state that is damaged (a truncated or corrupt `buffer.db.alarm_state`, a damaged meta
page) never stops the engine: it starts with fresh state, says so, and works. Pure logic: the engine
with a fake recorder (tests/unit/test_alarms.py's Rig)."""

from __future__ import annotations

import json
import logging

import pytest
from test_alarms import Rig

RULES = [{"channel": "cod.w01018", "above": 50, "hysteresis": 2}]


def a_saved_state() -> str:
    rig = Rig(RULES)
    rig.feed("cod.w01018", 60, at=0)
    assert rig.rec.states() == [("cod.w01018:above", "raised")]
    return rig.saved()


def test_every_truncation_of_a_saved_state_starts_fresh_and_says_so(caplog):
    saved = a_saved_state()
    for cut in range(len(saved)):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="agent.alarms"):
            rig = Rig(RULES, saved=saved[:cut])
        assert "starting with no active alarms" in caplog.text, (cut, caplog.text)
        assert rig.engine.active_ids() == []
        rig.feed("cod.w01018", 60, at=0)
        assert rig.rec.states()[-1] == ("cod.w01018:above", "raised"), cut
        assert json.loads(rig.saved())["v"] == 1, "the damaged state is replaced"


WRONG = [0, 1.5, "x", [1, "a", None], {"a": 1}, None, True]


@pytest.mark.parametrize("field", ["active", "actions", "temperatures", "windows"])
@pytest.mark.parametrize("value", WRONG, ids=[type(v).__name__ for v in WRONG])
def test_a_saved_state_of_the_wrong_shape_never_stops_the_engine(field, value):
    state = json.loads(a_saved_state())
    state[field] = value
    rig = Rig(RULES, saved=json.dumps(state))
    rig.feed("cod.w01018", 60, at=1)
    rig.feed("cod.w01018", 10, at=2)
    assert rig.rec.states()[-1] == ("cod.w01018:above", "cleared")


@pytest.mark.parametrize("field", ["id", "channel", "rule", "since_ms", "value", "threshold"])
@pytest.mark.parametrize("value", WRONG, ids=[type(v).__name__ for v in WRONG])
def test_an_active_alarm_saved_with_a_field_of_the_wrong_type_never_stops_the_engine(field, value):
    state = json.loads(a_saved_state())
    state["active"][0][field] = value
    rig = Rig(RULES, saved=json.dumps(state))
    rig.feed("cod.w01018", 60, at=1)
    rig.feed("cod.w01018", 10, at=2)
    assert rig.rec.states()[-1] == ("cod.w01018:above", "cleared")
    json.loads(rig.saved())
