"""The alarm engine's logic (agent.alarms), driven by hand: a fake recorder that keeps the events and
meta values the engine submits, an injectable monotonic clock and wall clock, and a fake Modbus writer
for actions. No threads (except the one test of the action worker), no database, no broker."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import pytest
import yaml
from harness import wait_for

from agent.alarms import ACTION_RETRY_FIRST_S, AlarmEngine, load_presets, resolve_preset
from agent.config import PRESETS, Config, parse_config
from agent.model import Reading, iso_utc_ms

T0_MS = 1_790_000_000_000  # wall-clock origin of the tests (2026-09-21)


def ts(t: float) -> str:
    """The event `ts` of test time t (seconds after T0_MS)."""
    return iso_utc_ms(T0_MS + int(t * 1000))


DEVICES: dict[str, Any] = {
    "cod": {"driver": "simulated", "interval": 10,
            "channels": {"w01018": {"unit": "mg/L"}, "w21003": {"unit": "mg/L"}, "w01010": {"unit": "degC"}}},
    "dust": {"driver": "simulated", "interval": 10,
             "channels": {"a34002": {"unit": "ug/m3"}, "a34004": {"unit": "ug/m3"}, "a34001": {"unit": "mg/m3"}}},
    "bg": {"driver": "simulated", "interval": 10, "channels": {"a34002": {"unit": "ug/m3"}}},
    "fog": {"bus": "lan", "slave": 1, "registers": [{"channel": "running", "address": 0}]},
}


def make_config(alarms: list[dict], devices: dict[str, Any] | None = None) -> Config:
    data = {
        "station": {"id": "ST01", "type": "other"},
        "storage": {"path": "./buffer.db"},
        "mqtt": {"url": "mqtt://127.0.0.1:1883"},
        "buses": {"lan": {"type": "tcp", "host": "127.0.0.1"}, "rs485": {"type": "serial", "port": "/dev/ttyUSB0"}},
        "devices": DEVICES if devices is None else devices,
        "alarms": alarms,
    }
    return parse_config(yaml.safe_dump(data, sort_keys=False))


class FakeRecorder:
    """What the engine needs of agent.recorder.Recorder: submit_event and set_meta."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, dict]] = []
        self.meta: dict[str, str] = {}
        self.beside: dict[str, str] = {}  # what the recorder would keep beside the buffer file

    def submit_event(self, stream: str, ts_ms: int, body: dict) -> None:
        self.events.append((stream, ts_ms, json.loads(json.dumps(body))))

    def set_meta(self, key: str, value: str, *, keep_beside: bool = False) -> None:
        self.meta[key] = value
        if keep_beside:
            self.beside[key] = value

    def bodies(self) -> list[dict]:
        return [body for _, _, body in self.events]

    def states(self) -> list[tuple[str, str]]:
        return [(b["id"], b["state"]) for b in self.bodies()]


class FakeWriter:
    """A Modbus write API stand-in: records every call; fails the first `fail` calls."""

    def __init__(self, rig: Rig | None = None, fail: int = 0) -> None:
        self.calls: list[tuple[float, str, str, int, int | bool]] = []
        self.fail = fail
        self.rig = rig

    def __call__(self, device_id: str, kind: str, address: int, value: int | bool) -> None:
        self.calls.append((self.rig.t if self.rig else 0.0, device_id, kind, address, value))
        if self.fail > 0:
            self.fail -= 1
            raise OSError("no answer from slave 1")

    def values(self) -> list[int | bool]:
        return [c[4] for c in self.calls]


class Rig:
    """An engine with a hand-driven clock: `t` is seconds since the engine started (both clocks)."""

    def __init__(self, alarms: list[dict], saved: str | None = None, writer: Any = None, start: float = 0.0,
                 saved_windows: str | None = None, devices: dict[str, Any] | None = None):
        self.t = start
        self.rec = FakeRecorder()
        self.writer = writer
        if isinstance(writer, FakeWriter):
            writer.rig = self
        self.engine = AlarmEngine(make_config(alarms, devices), self.rec, saved, writer, clock=lambda: 5000.0 + self.t,
                                  wall_ms=self.wall_ms, inline_actions=True, saved_windows=saved_windows)

    def wall_ms(self) -> int:
        return T0_MS + int(self.t * 1000)

    def feed(self, channel: str, value: float | None, at: float | None = None, flag: str = "N",
             unit: str | None = None) -> None:
        if at is not None:
            self.t = at
        device, code = channel.split(".")
        self.engine.observe([Reading(device, code, self.wall_ms(), value, unit, flag)])
        self.engine.tick()

    def tick(self, at: float) -> None:
        self.t = at
        self.engine.tick()

    def saved(self) -> str:
        return self.rec.meta["alarm_state"]

    def saved_windows(self) -> str | None:
        return self.rec.meta.get("alarm_windows")


# --------------------------------------------------------------------------------------------------
# above / below, hysteresis, delay


def test_crossing_inside_the_hysteresis_band_raises_once_and_clears_once():
    rig = Rig([{"channel": "cod.w01018", "above": 50, "hysteresis": 2}])
    for i, v in enumerate([49, 51, 49, 51, 48.5, 50.5, 48.0, 47.9, 49, 49.9, 47, 50]):
        rig.feed("cod.w01018", v, at=i * 10)
    assert rig.rec.states() == [("cod.w01018:above", "raised"), ("cod.w01018:above", "cleared")]
    raised, cleared = rig.rec.bodies()
    assert raised == {"id": "cod.w01018:above", "channel": "cod.w01018", "rule": "above", "state": "raised",
                      "value": 51, "threshold": 50, "ts": ts(10)}
    assert cleared["value"] == 47.9 and cleared["threshold"] == 50, "cleared below 50 - 2, carrying the limit"
    assert [ts for _, ts, _ in rig.rec.events] == [T0_MS + 10_000, T0_MS + 70_000]
    assert all(stream == "alarms" for stream, _, _ in rig.rec.events)


def test_event_values_are_said_as_the_readings_are_published_without_float_noise():
    # Values computed by scaling carry float noise (0.1 * 3 = 0.30000000000000004) that the data
    # message (15 significant digits) does not show; the alarm events and `status` say the same value.
    rig = Rig([{"channel": "cod.w01018", "above": 0.25, "hysteresis": 0.1}])
    rig.feed("cod.w01018", 0.1 * 3, at=0)
    assert [a["value"] for a in rig.engine.active()] == [0.3]
    rig.feed("cod.w01018", 0.1 * 3 - 0.2, at=10)
    raised, cleared = rig.rec.bodies()
    assert (json.dumps(raised["value"]), json.dumps(cleared["value"])) == ("0.3", "0.1")


@pytest.mark.parametrize(("rule", "beyond", "edge", "past"), [
    ({"above": 0.8, "hysteresis": 0.1}, 0.9, 0.7, 0.69),  # 0.8 - 0.1 = 0.7000000000000001 in binary floats
    ({"below": 0.7, "hysteresis": 0.1}, 0.6, 0.8, 0.81),  # 0.7 + 0.1 = 0.7999999999999999
])
def test_a_value_exactly_at_the_edge_of_the_hysteresis_band_does_not_clear(rule, beyond, edge, past):
    # SPEC §2: an above alarm clears when the value stays *below* X - hysteresis; a value of exactly
    # X - hysteresis, as the technician wrote both numbers, is not below it.
    rig = Rig([{"channel": "cod.w21003", **rule}])
    rig.feed("cod.w21003", beyond, at=0)
    rig.feed("cod.w21003", edge, at=10)
    assert [state for _, state in rig.rec.states()] == ["raised"]
    rig.feed("cod.w21003", past, at=20)
    assert [state for _, state in rig.rec.states()] == ["raised", "cleared"]


def test_below_mirrors_above_and_a_rule_with_both_gives_two_alarms():
    rig = Rig([{"channel": "cod.w01018", "above": 9, "below": 6, "hysteresis": 0.5}])
    for i, v in enumerate([7, 5.9, 6.2, 6.6, 9.1, 8.6, 8.4]):
        rig.feed("cod.w01018", v, at=i)
    assert rig.rec.states() == [("cod.w01018:below", "raised"), ("cod.w01018:below", "cleared"),
                                ("cod.w01018:above", "raised"), ("cod.w01018:above", "cleared")]
    assert [b["threshold"] for b in rig.rec.bodies()] == [6, 6, 9, 9]
    assert [b["rule"] for b in rig.rec.bodies()] == ["below", "below", "above", "above"]


def test_a_spike_shorter_than_delay_raises_nothing():
    rig = Rig([{"channel": "cod.w01018", "above": 50, "delay": 120}])
    rig.feed("cod.w01018", 55, at=0)
    rig.feed("cod.w01018", 58, at=60)
    rig.feed("cod.w01018", 45, at=100)  # back within: the delay starts again
    rig.feed("cod.w01018", 55, at=130)
    rig.feed("cod.w01018", 55, at=200)
    rig.tick(400)  # time alone raises nothing: a value must confirm it
    assert rig.rec.events == []
    rig.feed("cod.w01018", 56, at=401)
    assert rig.rec.states() == [("cod.w01018:above", "raised")]


def test_clear_delay_defaults_to_delay_and_can_be_set():
    rig = Rig([{"channel": "cod.w01018", "above": 50, "delay": 30},
               {"channel": "cod.w21003", "above": 5, "delay": 30, "clear_delay": 0}])
    for ch, hi in (("cod.w01018", 60), ("cod.w21003", 6)):
        rig.feed(ch, hi, at=0)
        rig.feed(ch, hi, at=30)
    assert len(rig.rec.events) == 2
    rig.feed("cod.w01018", 10, at=40)
    rig.feed("cod.w21003", 1, at=40)
    assert rig.rec.states()[2:] == [("cod.w21003:above", "cleared")]
    rig.feed("cod.w01018", 10, at=69)
    assert len(rig.rec.events) == 3
    rig.feed("cod.w01018", 10, at=70)
    assert rig.rec.states()[3:] == [("cod.w01018:above", "cleared")]


def test_the_delay_counts_from_when_the_values_were_taken_not_from_when_they_were_committed():
    # Values polled every 60 s reach the engine after the bus and the group commit, some sooner than
    # others, and a poll starts a few milliseconds after its turn: the third value of a 120 s delay raises,
    # even when the first one was taken 8 ms late and committed later after its poll than the third.
    rig = Rig([{"channel": "cod.w01018", "above": 50, "delay": 120, "hysteresis": 2}])

    def feed(value: float, taken: float, committed: float) -> None:
        rig.t = committed
        rig.engine.observe([Reading("cod", "w01018", T0_MS + int(taken * 1000), value, "mg/L", "N")])

    feed(55, taken=0.008, committed=0.150)  # this poll started 8 ms after its turn, and its commit was slow
    feed(55, taken=60, committed=60.020)
    feed(55, taken=120, committed=120.020)
    assert rig.rec.states() == [("cod.w01018:above", "raised")]
    assert rig.rec.bodies()[0]["ts"] == ts(120)
    feed(40, taken=180.008, committed=180.150)
    feed(40, taken=240, committed=240.020)
    feed(40, taken=300, committed=300.020)
    assert rig.rec.states()[1:] == [("cod.w01018:above", "cleared")]
    assert rig.rec.bodies()[1]["ts"] == ts(300)


def test_a_reading_dated_far_from_the_agents_clock_moves_a_delay_by_a_few_seconds_at_most():
    # An hj212 analyzer dates its values by its own clock (here 10 minutes slow, then set right): the
    # delay is still counted on the agent's monotonic clock, not on the analyzer's timestamps.
    rig = Rig([{"channel": "cod.w01018", "above": 50, "delay": 120}])
    for t in (0, 60):
        rig.t = t
        rig.engine.observe([Reading("cod", "w01018", T0_MS + int((t - 600) * 1000), 55, "mg/L", "N")])
    rig.t = 100
    rig.engine.observe([Reading("cod", "w01018", T0_MS + 100_000, 55, "mg/L", "N")])  # its clock set right
    assert rig.rec.events == [], "100 s beyond the limit, whatever the analyzer's clock says"
    rig.t = 120
    rig.engine.observe([Reading("cod", "w01018", T0_MS + int((120 - 600) * 1000), 55, "mg/L", "N")])
    assert rig.rec.states() == [("cod.w01018:above", "raised")]


def test_null_readings_neither_advance_nor_reset_the_delay():
    rig = Rig([{"channel": "cod.w01018", "above": 50, "delay": 60}])
    rig.feed("cod.w01018", 55, at=0)
    rig.feed("cod.w01018", None, at=30, flag="B")  # does not reset
    rig.feed("cod.w01018", None, at=61, flag="B")  # does not complete the delay either
    rig.feed("cod.w01018", 70, at=62, flag="C")  # a calibration value is not a measurement
    assert rig.rec.events == []
    rig.feed("cod.w01018", 55, at=63)  # counted from t=0, not from the nulls
    assert rig.rec.states() == [("cod.w01018:above", "raised")]
    assert rig.rec.bodies()[0]["value"] == 55


# --------------------------------------------------------------------------------------------------
# window, background


def test_window_uses_the_rolling_mean_not_single_values():
    rig = Rig([{"channel": "dust.a34002", "above": 80, "window": 95}])  # dust polls every 10 s
    rig.feed("dust.a34002", 150, at=0)  # above 80, but one value is no 95-second mean
    assert rig.rec.events == []
    for t in range(10, 110, 10):
        rig.feed("dust.a34002", 60, at=t)  # at t=70 (enough readings) the mean is (150 + 7 x 60) / 8 = 71
    rig.feed("dust.a34002", 150, at=110)  # one value above 80: the mean of t=20..110 is 69
    assert rig.rec.events == []
    for t in range(120, 160, 10):
        rig.feed("dust.a34002", 100, at=t)  # means 73 (t=120), 77 (t=130), 81 (t=140)
    raised = rig.rec.bodies()
    assert [b["state"] for b in raised] == ["raised"]
    assert raised[0]["value"] == pytest.approx((60 * 6 + 150 + 100 * 3) / 10, abs=1e-6)
    assert raised[0]["ts"] == ts(140)


def test_a_dropout_inside_the_window_counts_as_a_gap_not_as_covered_time():
    """A 900 s window polled every 10 s: 30 values of 100 (5 minutes), then 10 minutes of failed polls
    (null, flag B), then one value of 100. The window's readings span 890 s, but they cover 310 s of it:
    that is no 15-minute mean (it was taken for one and raised the alarm on 5 minutes of data). The mean
    is compared again once the readings after the dropout cover 75 % of the window with the ones left."""
    rig = Rig([{"channel": "dust.a34002", "above": 80, "window": 900}])
    for t in range(0, 300, 10):
        rig.feed("dust.a34002", 100, at=t)
    for t in range(300, 890, 10):
        rig.feed("dust.a34002", None, at=t, flag="B")
    rig.feed("dust.a34002", 100, at=890)
    assert rig.rec.events == [], "5 minutes of values in a 15-minute window are no 15-minute mean"
    t = 890
    while not rig.rec.events:
        t += 10
        rig.feed("dust.a34002", 100, at=t)
        assert t < 2000
    # Raised once the values in the window (t - 900, t] cover 675 s: those of 0..290 leave as t passes 900.
    readings = [x for x in range(0, 300, 10) if x > t - 900] + list(range(890, t + 1, 10))
    assert len(readings) * 10 >= 675 > (len(readings) - 1) * 10, (t, len(readings))
    assert rig.rec.states() == [("dust.a34002:above", "raised")]


def test_a_window_its_device_keeps_too_sparse_is_said_in_the_log_not_left_silent(caplog):
    """A device missing half its polls for good (a bus that cannot keep its intervals, a flaky sensor) never
    covers 75 % of the window: the rule is not compared, as the aggregates flag such a period. That must not
    be silent (a fog-cannon rule that used to fire would stop with no word): one warning per rule and
    channel, naming the coverage; not while the window simply fills after a start."""
    rig = Rig([{"channel": "dust.a34002", "above": 80, "window": 900}])
    with caplog.at_level(logging.WARNING, logger="agent.alarms"):
        for t in range(0, 900, 10):  # the first window filling, every poll good: no word
            rig.feed("dust.a34002", 100, at=t)
        assert not [r for r in caplog.records if "window" in r.getMessage()]
        rig.rec.events.clear()
    rig = Rig([{"channel": "dust.a34002", "above": 80, "window": 900}])
    with caplog.at_level(logging.WARNING, logger="agent.alarms"):
        for t in range(0, 2700, 10):
            if t % 20:
                rig.feed("dust.a34002", None, at=t, flag="B")
            else:
                rig.feed("dust.a34002", 100, at=t)
    assert rig.rec.events == [], "values over half the window are no window mean"
    said = [r.getMessage() for r in caplog.records if "window" in r.getMessage()]
    assert len(said) == 1, said
    assert "alarms.0 on dust.a34002" in said[0] and "75 % needed" in said[0], said
    share = int(re.search(r"cover (\d+) % of it", said[0]).group(1))  # when first said: the span just long enough
    assert 30 <= share <= 50, said


def test_a_dropout_in_the_background_window_counts_as_a_gap():
    """The background's window is read the same way: 5 minutes of its values in a 15-minute window
    (a dropout between) are no background mean; the site's mean is then not compared."""
    rig = Rig([{"channel": "dust.a34002", "above": 80, "window": 900, "background": "bg.a34002"}])
    for t in range(0, 890, 10):
        rig.feed("dust.a34002", 150, at=t)
        if t < 300:
            rig.feed("bg.a34002", 10, at=t)
        else:
            rig.feed("bg.a34002", None, at=t, flag="B")
    rig.feed("bg.a34002", 10, at=890)
    rig.feed("dust.a34002", 150, at=890)
    assert rig.rec.events == [], "no background mean of 15 minutes: nothing subtracted, nothing compared"


def test_values_near_the_double_max_in_a_window_break_neither_the_batch_nor_the_window():
    """A float64 register (or an HJ 212 `-Rtd`) may hold 1e308, a finite number: two of them in a window
    overflow its sum. That window has no mean while they are in it; the other readings of the batch are
    still evaluated, and the window works again once they have left it (audit Q)."""
    rig = Rig([{"channel": "dust.a34002", "above": 80, "window": 95}, {"channel": "cod.w01018", "above": 50}])
    for t in range(0, 100, 10):
        rig.t = t
        rig.engine.observe([Reading("dust", "a34002", rig.wall_ms(), 1e308, None, "N"),
                            Reading("cod", "w01018", rig.wall_ms(), 60 if t == 90 else 20, None, "N")])
    assert rig.rec.states() == [("cod.w01018:above", "raised")], "the batch's other reading was evaluated"
    for t in range(100, 200, 10):
        rig.feed("dust.a34002", 100, at=t)  # the huge values leave the window one by one
    assert rig.rec.states()[-1] == ("dust.a34002:above", "raised")
    for t in range(200, 400, 10):
        rig.feed("dust.a34002", 20, at=t)
    assert rig.rec.states()[-1] == ("dust.a34002:above", "cleared")
    assert rig.rec.bodies()[-1]["value"] < 80, "the mean of ordinary values again"


def test_background_channel_is_subtracted():
    rig = Rig([{"channel": "dust.a34002", "preset": "dust-15min", "background": "bg.a34002"}])
    for t in range(0, 700, 10):
        rig.feed("bg.a34002", 60, at=t)
        rig.feed("dust.a34002", 120, at=t)
    assert rig.rec.events == [], "120 - 60 = 60, below 80"
    for t in range(700, 2000, 10):
        rig.feed("bg.a34002", 20, at=t)
        rig.feed("dust.a34002", 120, at=t)
        if rig.rec.events:
            break
    body = rig.rec.bodies()[0]
    assert body["id"] == "dust.a34002:dust-15min" and body["rule"] == "above" and body["threshold"] == 80
    assert 80 < body["value"] < 81, "raised as soon as the 15-minute means differ by more than 80"


def test_a_dead_background_station_is_not_subtracted_for_ever():
    """The background instrument dies (null/B from then on): its last value, or the mean of a window that
    no longer got readings, was subtracted for as long as it stayed dead. A background that was low when
    it died then raised the site's alarm (and switched its fog cannon on) when dust blew over the whole
    area an hour later (site 100 - background 10 = 90 > 80, where the background read 70 by then); one
    that was high hid a real exceedance. A background value counts for two of its device's intervals, a
    background mean for the readings of the same S seconds as the site's (covering the window as the
    site's must); without one the site's value is not compared (as a null reading: no raise, no clear)."""
    rig = Rig([{"channel": "dust.a34002", "above": 80, "background": "bg.a34002"}])
    rig.feed("bg.a34002", 10, at=0)
    rig.feed("dust.a34002", 30, at=0)
    for t in range(10, 3600, 10):
        rig.feed("bg.a34002", None, at=t, flag="B")
        rig.feed("dust.a34002", 30 if t < 1800 else 100, at=t)
    assert rig.rec.events == [], "the site's 100 was compared with a background value an hour old"
    rig.feed("bg.a34002", 70, at=3600)
    rig.feed("dust.a34002", 100, at=3600)
    assert rig.rec.events == [], "100 - 70 = 30"
    rig.feed("bg.a34002", 10, at=3610)
    rig.feed("dust.a34002", 100, at=3610)
    assert rig.rec.states() == [("dust.a34002:above", "raised")], "100 - 10 = 90 > 80, with a fresh background"

    windowed = Rig([{"channel": "dust.a34002", "preset": "dust-15min", "background": "bg.a34002"}])
    for t in range(0, 1000, 10):
        windowed.feed("bg.a34002", 10, at=t)
        windowed.feed("dust.a34002", 30, at=t)
    for t in range(1000, 8000, 10):  # the background dies; an hour later the site's 15-minute mean is 100
        windowed.feed("bg.a34002", None, at=t, flag="B")
        windowed.feed("dust.a34002", 30 if t < 4000 else 100, at=t)
    assert windowed.rec.events == [], "a background mean of readings two hours old was subtracted"
    for t in range(8000, 9000, 10):  # back, reading 15: the site's mean is 85 above it
        windowed.feed("bg.a34002", 15, at=t)
        windowed.feed("dust.a34002", 100, at=t)
        if windowed.rec.events:
            break
    body = windowed.rec.bodies()[0]
    assert body["state"] == "raised" and body["value"] == pytest.approx(85)
    assert t >= 8000 + 0.75 * 900 - 10, "not before the background's readings cover the window"


# --------------------------------------------------------------------------------------------------
# stale, fault


def test_stale_rule_raises_after_s_seconds_without_a_valid_reading_and_clears_on_the_next():
    rig = Rig([{"channel": "cod.w01018", "stale": 30}])
    rig.feed("cod.w01018", 20, at=0)
    rig.feed("cod.w01018", None, at=10, flag="B")
    rig.feed("cod.w01018", None, at=20, flag="B")
    rig.tick(29.9)
    assert rig.rec.events == []
    rig.tick(30.5)
    assert rig.rec.bodies() == [{"id": "cod.w01018:stale", "channel": "cod.w01018", "rule": "stale",
                                 "state": "raised", "value": 30.5, "threshold": 30,
                                 "ts": ts(30.5)}]
    rig.tick(100)
    assert len(rig.rec.events) == 1
    rig.feed("cod.w01018", 21, at=101)
    assert rig.rec.states()[1:] == [("cod.w01018:stale", "cleared")]
    assert rig.rec.bodies()[1]["value"] == 0


@pytest.mark.parametrize("flag", ["C", "M", "D", "F", "S"])
def test_values_flagged_other_than_n_or_t_are_no_valid_reading_for_stale(flag):
    """An analyzer calibrating for longer than S sends numbers, but no valid reading (SPEC: stale is
    "no valid reading for S seconds"; the limits and the aggregates count only N and T too)."""
    rig = Rig([{"channel": "cod.w01018", "stale": 30}])
    rig.feed("cod.w01018", 20, at=0)
    for t in range(5, 40, 5):
        rig.feed("cod.w01018", 20, at=t, flag=flag)
    assert rig.rec.states() == [("cod.w01018:stale", "raised")]
    rig.feed("cod.w01018", 20, at=45, flag="T")
    assert rig.rec.states() == [("cod.w01018:stale", "raised"), ("cod.w01018:stale", "cleared")]


def test_stale_uses_the_agents_monotonic_clock_not_reading_times():
    rig = Rig([{"channel": "cod.w01018", "stale": 30}])
    rig.feed("cod.w01018", 20, at=0)
    # The gateway's clock steps back a day: the readings' timestamps say "long ago", yet they are fresh.
    for t in range(10, 100, 10):
        rig.t = t
        rig.engine.observe([Reading("cod", "w01018", T0_MS - 86_400_000 + t * 1000, 20.0)])
        rig.engine.tick()
    assert rig.rec.events == []


def test_a_channel_never_seen_goes_stale_from_the_start():
    rig = Rig([{"channel": "cod.w21003", "stale": 60}])
    rig.tick(59)
    assert rig.rec.events == []
    rig.tick(61)
    assert rig.rec.states() == [("cod.w21003:stale", "raised")]


def test_a_stale_rule_added_by_a_reload_counts_from_the_reload():
    # Readings of channels no rule looks at are skipped: a rule added later knows them from then on.
    rig = Rig([])
    rig.feed("cod.w01018", 20, at=0)
    rig.feed("cod.w01018", None, at=500, flag="B")
    rig.engine.reconfigure(make_config([{"channel": "cod.w01018", "stale": 60}]))
    rig.tick(1000)
    rig.feed("cod.w01018", None, at=1059, flag="B")
    assert rig.rec.events == []
    rig.tick(1061)
    assert rig.rec.states() == [("cod.w01018:stale", "raised")]
    rig.feed("cod.w01018", 21, at=1070)
    assert rig.rec.states()[1:] == [("cod.w01018:stale", "cleared")]


def test_a_reload_keeps_the_stale_clock_of_a_channel_a_rule_already_watched():
    rig = Rig([{"channel": "cod.w01018", "stale": 60}, {"channel": "cod.w21003", "above": 5}])
    rig.feed("cod.w01018", 20, at=0)
    rig.engine.reconfigure(make_config([{"channel": "cod.w01018", "stale": 60}]))
    rig.tick(30)
    assert rig.rec.events == []
    rig.tick(61)
    assert rig.rec.states() == [("cod.w01018:stale", "raised")]


def test_a_device_added_by_a_reload_goes_stale_from_the_reload_not_from_the_start():
    # A technician adds an analyzer (SIGHUP) to a station running for days: it has not been polled yet,
    # and must not be reported stale at once (a raised and a cleared event for nothing).
    rules = [{"channel": "*", "stale": 60}]
    rig = Rig(rules, devices={"cod": DEVICES["cod"]})

    def poll_cod(until: int) -> None:
        for t in range(int(rig.t) + 1, until + 1):
            for code in ("w01018", "w21003", "w01010"):
                rig.feed(f"cod.{code}", 20, at=t)

    poll_cod(1000)
    rig.engine.reconfigure(make_config(rules, {"cod": DEVICES["cod"], "bg": DEVICES["bg"]}))
    poll_cod(1059)
    assert rig.rec.events == []
    poll_cod(1061)  # still nothing from it, 60 s after the reload
    assert rig.rec.states() == [("bg.a34002:stale", "raised")]


def test_fault_rule_raises_after_flag_b_or_d_for_s_seconds_and_clears():
    rig = Rig([{"channel": "cod.w01018", "fault": 60}])
    rig.feed("cod.w01018", None, at=0, flag="B")
    rig.feed("cod.w01018", None, at=30, flag="D")
    rig.feed("cod.w01018", None, at=59, flag="B")
    assert rig.rec.events == []
    rig.feed("cod.w01018", None, at=60, flag="D")
    assert rig.rec.bodies() == [{"id": "cod.w01018:fault", "channel": "cod.w01018", "rule": "fault",
                                 "state": "raised", "value": 60, "threshold": 60,
                                 "ts": ts(60)}]
    rig.feed("cod.w01018", None, at=70, flag="B")
    rig.feed("cod.w01018", 12, at=80, flag="N")
    assert rig.rec.states() == [("cod.w01018:fault", "raised"), ("cod.w01018:fault", "cleared")]


def test_a_fault_interrupted_by_a_good_reading_starts_over():
    rig = Rig([{"channel": "cod.w01018", "fault": 60}])
    rig.feed("cod.w01018", None, at=0, flag="B")
    rig.feed("cod.w01018", 12, at=40)
    rig.feed("cod.w01018", None, at=50, flag="B")
    rig.feed("cod.w01018", None, at=100, flag="B")
    assert rig.rec.events == []
    rig.feed("cod.w01018", None, at=110, flag="B")
    assert rig.rec.states() == [("cod.w01018:fault", "raised")]


# --------------------------------------------------------------------------------------------------
# wildcards


def test_wildcards_expand_to_every_channel_and_the_most_specific_rule_wins():
    analyzer = {"an": {"bus": "rs485", "driver": "hj212", "interval": 10}}  # channels learnt from its packets
    rig = Rig([{"channel": "*", "stale": 30}, {"channel": "cod.*", "above": 100}, {"channel": "an.*", "above": 100},
               {"channel": "cod.w01018", "stale": 300}], devices={**DEVICES, **analyzer})
    rig.feed("cod.w21003", 150, at=1)
    rig.feed("dust.a34002", 150, at=2)  # "cod.*" does not match dust
    rig.feed("an.newcode", 101, at=3)  # a channel the config does not list (HJ 212 analyzer): expanded when seen
    assert rig.rec.states() == [("cod.w21003:above", "raised"), ("an.newcode:above", "raised")]
    rig.tick(30.5)
    stale = {b["channel"] for b in rig.rec.bodies() if b["rule"] == "stale"}
    # every channel the config lists (and fog.running of the Modbus device) except the fresh ones,
    # and not cod.w01018, whose own rule says 300 s
    assert stale == {"cod.w01010", "dust.a34004", "dust.a34001", "bg.a34002", "fog.running"}
    rig.tick(33.5)
    stale = {b["channel"] for b in rig.rec.bodies() if b["rule"] == "stale"}
    assert {"cod.w21003", "dust.a34002", "an.newcode"} <= stale and "cod.w01018" not in stale
    rig.tick(300)
    assert ("cod.w01018:stale", "raised") in rig.rec.states()
    assert len(rig.rec.states()) == len(set(rig.rec.states())), "each alarm raised once"


# --------------------------------------------------------------------------------------------------
# presets

PRESET_TABLE = [
    # preset, channel code, temperature, limit, window (DOMAIN.md "Limits for alarm presets")
    ("gb3838-iii", "w01018", None, 20, None),
    ("gb3838-iii", "w21003", None, 1.0, None),
    ("gb3838-iv", "w01018", None, 30, None),
    ("gb3838-iv", "w21003", None, 1.5, None),
    ("gb3838-v", "w01018", None, 40, None),
    ("gb3838-v", "w21003", None, 2.0, None),
    ("gb18918-1a", "w01018", None, 50, None),
    ("gb18918-1a", "w21003", None, 5, None),
    ("gb18918-1a", "w21003", 20.0, 5, None),
    ("gb18918-1a", "w21003", 12.0, 8, None),
    ("gb18918-1a", "w21003", 4.0, 8, None),
    ("gb18918-1b", "w01018", None, 60, None),
    ("gb18918-1b", "w21003", 12.1, 8, None),
    ("gb18918-1b", "w21003", 12.0, 15, None),
    ("gb3095-2012-ii", "a34004", None, 75, 86400),
    ("gb3095-2012-ii", "a34002", None, 150, 86400),
    ("gb3095-2026-ii", "a34004", None, 50, 86400),
    ("dust-15min", "a34002", None, 80, 900),
]


@pytest.mark.parametrize(("preset", "code", "temperature", "limit", "window"), PRESET_TABLE)
def test_presets_resolve_to_the_limits_of_each_standard(preset, code, temperature, limit, window):
    assert resolve_preset(preset, code, temperature) == (limit, window)


def test_every_preset_names_its_standard_and_year_and_config_knows_them_all():
    presets = load_presets()
    assert tuple(presets) == PRESETS
    expected = {"gb3838-iii": ("GB 3838-2002", 2002), "gb18918-1b": ("GB 18918-2002", 2002),
                "gb3095-2012-ii": ("GB 3095-2012", 2012), "gb3095-2026-ii": ("GB 3095-2026", 2026)}
    for name, (standard, year) in expected.items():
        assert (presets[name].standard, presets[name].year) == (standard, year)
    assert {(p, c) for p, c, *_ in PRESET_TABLE} == {(p.name, c) for p in presets.values() for c in p.limits}


@pytest.mark.parametrize(("preset", "code", "temperature", "limit", "window"),
                         [row for row in PRESET_TABLE if row[2] is None])
def test_a_preset_rule_raises_at_its_limit_with_its_window(preset, code, temperature, limit, window):
    device = "cod" if code.startswith("w") else "dust"
    step = (window or 10) / 20
    # The device is polled every `step` (a window mean needs 75 % of the values its interval gives).
    devices = {name: {**dev, "interval": step} if name == device else dev for name, dev in DEVICES.items()}
    rig = Rig([{"channel": f"{device}.{code}", "preset": preset}], devices=devices)
    for i in range(17):  # 80 % of the window: enough readings for a mean
        rig.feed(f"{device}.{code}", limit, at=i * step)  # at the limit is not above it
    assert rig.rec.events == []
    for i in range(17, 60):
        rig.feed(f"{device}.{code}", limit * 1.5, at=i * step)
        if rig.rec.events:
            break
    body = rig.rec.bodies()[0]
    assert (body["id"], body["rule"], body["threshold"]) == (f"{device}.{code}:{preset}", "above", limit)
    assert body["value"] > limit


def test_gb18918_nh3n_limit_follows_the_water_temperature_channel():
    rig = Rig([{"channel": "cod.w21003", "preset": "gb18918-1a", "hysteresis": 0.5}])
    rig.feed("cod.w01010", 10.5, at=0)
    rig.feed("cod.w21003", 7.0, at=1)  # cold water: limit 8
    assert rig.rec.events == []
    rig.feed("cod.w01010", 14.0, at=2)
    rig.feed("cod.w21003", 7.0, at=3)  # warm: limit 5
    assert rig.rec.bodies()[0]["threshold"] == 5 and rig.rec.bodies()[0]["value"] == 7.0
    rig.feed("cod.w01010", 11.0, at=4)
    rig.feed("cod.w21003", 7.0, at=5)  # cold again: 7 < 8 - 0.5 clears, carrying the limit in force
    assert rig.rec.bodies()[1]["state"] == "cleared" and rig.rec.bodies()[1]["threshold"] == 8


def test_the_water_temperature_of_the_same_poll_sets_the_nh3n_limit_whatever_the_channel_order():
    """NH3-N listed before the temperature in a poll (and a first poll after a start, with no earlier
    temperature): 6.5 mg/L in 10 degC water is within the cold limit 8, so nothing is raised."""
    rig = Rig([{"channel": "cod.w21003", "preset": "gb18918-1a"}])
    rig.engine.observe([Reading("cod", "w21003", rig.wall_ms(), 6.5, "mg/L", "N"),
                        Reading("cod", "w01010", rig.wall_ms(), 10.0, "degC", "N")])
    rig.engine.tick()
    assert rig.rec.events == []


def test_the_last_water_temperature_survives_a_restart():
    """The temperature comes from another device, polled after the analyzer: after a restart, the
    analyzer's first value is judged with the temperature saved before the stop."""
    rig = Rig([{"channel": "cod.w21003", "preset": "gb18918-1a"}])
    rig.feed("probe.w01010", 10.0, at=0)
    rig.engine.save_at_next_tick()
    rig.tick(1)
    again = Rig([{"channel": "cod.w21003", "preset": "gb18918-1a"}], saved=rig.saved())
    again.feed("cod.w21003", 6.5, at=0)
    assert again.rec.events == [], "judged against the cold limit 8"
    again.feed("probe.w01010", 14.0, at=1)
    again.feed("cod.w21003", 6.5, at=2)
    assert again.rec.bodies()[0]["threshold"] == 5, "warm water now: the normal limit"


def test_a_water_temperature_that_stopped_coming_no_longer_relaxes_the_nh3n_limit():
    """The thermometer dies in 10 degC water (null/B from then on): its last value kept the cold NH3-N
    limit (8 mg/L instead of 5) for good, saved and restored across restarts too, so that 6.5 mg/L went
    unreported into the summer. A temperature counts for TEMPERATURE_HOLD_S (an hour) after it was
    taken, then the normal (stricter) limit applies, as with no temperature at all; a restart counts
    its age from its reading's time."""
    rig = Rig([{"channel": "cod.w21003", "preset": "gb18918-1a"}])
    rig.feed("probe.w01010", 10.0, at=0)
    rig.feed("cod.w21003", 6.5, at=1)
    assert rig.rec.events == [], "cold water: limit 8"
    for t in range(60, 3600, 60):
        rig.feed("probe.w01010", None, at=t, flag="B")
        rig.feed("cod.w21003", 6.5, at=t + 1)
    assert rig.rec.events == [], "the temperature is less than an hour old"
    rig.feed("cod.w21003", 6.5, at=3601 + 60)
    assert [(b["state"], b["threshold"]) for b in rig.rec.bodies()] == [("raised", 5)]

    before = Rig([{"channel": "cod.w21003", "preset": "gb18918-1a"}])
    before.feed("probe.w01010", 10.0, at=0)
    before.engine.save_at_next_tick()
    before.tick(1)
    later = Rig([{"channel": "cod.w21003", "preset": "gb18918-1a"}], saved=before.saved(), start=7200)
    later.feed("cod.w21003", 6.5, at=7200)
    assert [(b["state"], b["threshold"]) for b in later.rec.bodies()] == [("raised", 5)], \
        "restarted two hours after the last temperature"


def test_a_preset_limit_is_converted_to_the_channels_mass_unit():
    rig = Rig([{"channel": "dust.a34002", "preset": "dust-15min"}])
    for t in range(0, 900, 10):
        rig.feed("dust.a34002", 0.09, at=t, unit="mg/m3")  # 90 ug/m3
        if rig.rec.events:
            break
    assert rig.rec.bodies()[0]["threshold"] == 0.08


def test_the_limits_in_force_on_a_channel_are_those_of_its_alarms():
    # What the console draws as the dashed limits of a chart: a preset's limit (in the channel's unit,
    # with the cold-water variant), and for each alarm id the rule that applies, not a shadowed wildcard.
    rig = Rig([{"channel": "*", "above": 1000}, {"channel": "cod.w01018", "above": 50, "below": 5},
               {"channel": "cod.w21003", "preset": "gb18918-1a"}, {"channel": "dust.a34002", "preset": "dust-15min"}])
    assert rig.engine.limits("cod.w01018") == [{"rule": "above", "value": 50}, {"rule": "below", "value": 5}]
    assert rig.engine.limits("cod.w21003") == [{"rule": "above", "value": 1000}, {"rule": "above", "value": 5}]
    rig.feed("cod.w01010", 10, at=0)  # water at 10 degC: the NH3-N limit is 8
    assert rig.engine.limits("cod.w21003")[1] == {"rule": "above", "value": 8}
    rig.feed("dust.a34002", 0.05, at=0, unit="mg/m3")
    assert rig.engine.limits("dust.a34002") == [{"rule": "above", "value": 1000}, {"rule": "above", "value": 0.08}]
    assert rig.engine.limits("fog.running") == [{"rule": "above", "value": 1000}]
    assert rig.engine.limits("nodev.x") == []


def test_a_preset_without_a_limit_for_the_channel_is_not_applied(caplog):
    with caplog.at_level(logging.WARNING, logger="agent.alarms"):
        rig = Rig([{"channel": "dust.a34001", "preset": "dust-15min"}])
    assert "preset dust-15min" in caplog.text and "no limit for channel code a34001" in caplog.text
    for t in range(0, 1000, 10):
        rig.feed("dust.a34001", 10, at=t)
    assert rig.rec.events == []


def test_preset_and_explicit_limit_on_one_channel_are_two_alarms():
    rig = Rig([{"channel": "cod.w01018", "preset": "gb18918-1a"},
               {"channel": "cod.w01018", "above": 45}])
    rig.feed("cod.w01018", 55, at=0)
    assert sorted(rig.rec.states()) == [("cod.w01018:above", "raised"), ("cod.w01018:gb18918-1a", "raised")]


# --------------------------------------------------------------------------------------------------
# state across restarts


def test_restart_with_an_active_alarm_raises_no_second_time_then_clears_once():
    alarms = [{"channel": "cod.w01018", "above": 50, "clear_delay": 30}]
    first = Rig(alarms)
    first.feed("cod.w01018", 55, at=0)
    assert first.rec.states() == [("cod.w01018:above", "raised")]
    active = json.loads(first.rec.meta["active_alarms"])
    assert active == [{"id": "cod.w01018:above", "channel": "cod.w01018", "rule": "above",
                       "since": ts(0), "value": 55, "threshold": 50}]

    second = Rig(alarms, saved=first.saved(), start=500)
    assert second.engine.active() == active
    second.feed("cod.w01018", 56, at=510)
    second.feed("cod.w01018", 57, at=520)
    assert second.rec.events == []
    second.feed("cod.w01018", 40, at=530)
    second.feed("cod.w01018", 41, at=559)
    assert second.rec.events == [], "clear_delay is respected after a restart too"
    second.feed("cod.w01018", 41, at=560)
    assert second.rec.states() == [("cod.w01018:above", "cleared")]
    assert json.loads(second.rec.meta["active_alarms"]) == []
    second.feed("cod.w01018", 42, at=600)
    assert len(second.rec.events) == 1

    third = Rig(alarms, saved=second.saved(), start=700)
    third.feed("cod.w01018", 42, at=700)
    assert third.rec.events == [] and third.engine.active() == []


def test_an_active_alarm_whose_rule_was_removed_is_cleared_at_start():
    first = Rig([{"channel": "cod.w01018", "above": 50}, {"channel": "*", "stale": 30}])
    first.feed("cod.w01018", 55, at=0)
    second = Rig([{"channel": "*", "stale": 30}], saved=first.saved())
    assert second.rec.bodies() == [{"id": "cod.w01018:above", "channel": "cod.w01018", "rule": "above",
                                    "state": "cleared", "value": None, "threshold": 50,
                                    "ts": ts(0)}]
    assert json.loads(second.rec.meta["active_alarms"]) == []


def test_a_restored_stale_alarm_clears_on_the_first_valid_reading():
    first = Rig([{"channel": "*", "stale": 30}])
    first.tick(31)
    assert ("cod.w01018:stale", "raised") in first.rec.states()
    second = Rig([{"channel": "*", "stale": 30}], saved=first.saved())
    second.feed("cod.w01018", 20, at=1)
    assert second.rec.states() == [("cod.w01018:stale", "cleared")]


def test_windows_are_restored_after_a_restart():
    alarms = [{"channel": "dust.a34002", "above": 50, "window": 100}]
    first = Rig(alarms)
    for t in range(0, 90, 10):
        first.feed("dust.a34002", 40, at=t)
        if t == 60:
            first.tick(61)  # windows are saved at most once a minute: t=0..60
    second = Rig(alarms, saved=first.saved(), saved_windows=first.saved_windows(), start=85)
    second.feed("dust.a34002", 100, at=90)  # (7 x 40 + 100) / 8 = 47.5
    assert second.rec.events == []
    second.feed("dust.a34002", 100, at=100)  # without the saved readings there would be no mean yet
    assert second.rec.states() == [("dust.a34002:above", "raised")]
    assert second.rec.bodies()[0]["value"] in (pytest.approx(480 / 9), pytest.approx(440 / 8))


BUSY_DEVICES = {f"d{d}": {"driver": "simulated", "interval": 0.1,
                           "channels": {f"c{c}": {"unit": "mg/L"} for c in range(10)}} for d in range(20)}
BUSY_RULES = [{"channel": "*", "above": 1000, "window": 300}, {"channel": "d0.c0", "below": 5}]


def busy_engine(rec: FakeRecorder, t: list[float]) -> AlarmEngine:
    """200 channels with a 300 s window at 10 readings/s (a busy station), fed until every window is
    full (312 s, two readings per bucket of 2.5 s); d0.c0 also has a lower limit of 5."""
    engine = AlarmEngine(make_config(BUSY_RULES, BUSY_DEVICES), rec, None, clock=lambda: t[0],
                         wall_ms=lambda: T0_MS + int(t[0] * 1000))
    for step in range(250):
        t[0] = step * 1.25
        engine.observe([Reading(f"d{d}", f"c{c}", T0_MS + step * 1250, 10.0 + c + step % 7, "mg/L", "N")
                        for d in range(20) for c in range(10)])
    return engine


def test_windows_of_many_channels_take_little_memory_and_are_saved_whole():
    """A window keeps at most ~WINDOW_BUCKETS buckets whatever the rate; each must be small: 200
    windows held 4.9 MB in lists of Python numbers, and each save of them built ~6 MB more."""
    import tracemalloc

    t = [0.0]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        engine = busy_engine(FakeRecorder(), t)
        held = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.reset_peak()
        saved = engine._windows_json()
        peak = tracemalloc.get_traced_memory()[1] - before - held
    finally:
        tracemalloc.stop()
    assert held < 2_000_000, f"200 windows hold {held / 1e6:.1f} MB"
    assert peak < 4 * len(saved), f"saving {len(saved) / 1e6:.1f} MB of windows took {peak / 1e6:.1f} MB"
    windows = json.loads(saved)["windows"]
    assert len(windows) == 200 and 100 <= len(windows["d3.c4"]["300.0"]["b"]) <= 121
    restored = AlarmEngine(make_config(BUSY_RULES, BUSY_DEVICES), FakeRecorder(), None, clock=lambda: t[0],
                           wall_ms=lambda: T0_MS + int(t[0] * 1000), saved_windows=saved)
    assert json.loads(restored._windows_json())["windows"] == windows
    old_format = json.dumps({**engine._state(), "windows": windows})  # as saved before the split
    from_old = AlarmEngine(make_config(BUSY_RULES, BUSY_DEVICES), FakeRecorder(), old_format, clock=lambda: t[0],
                           wall_ms=lambda: T0_MS + int(t[0] * 1000))
    assert json.loads(from_old._windows_json())["windows"] == windows


def test_an_event_saves_the_active_alarms_but_not_the_windows():
    """Each raise and clear commits the alarm state and keeps a copy beside the buffer file: with the
    windows in it, that was ~0.8 MB written twice at every event of a busy station."""
    rec, t = FakeRecorder(), [0.0]
    engine = busy_engine(rec, t)
    t[0] = 312.5
    engine.tick()  # more than a minute since the start: the windows are saved
    windows = rec.meta.pop("alarm_windows")
    assert len(json.loads(windows)["windows"]) == 200
    t[0] = 313.0
    engine.observe([Reading("d0", "c0", T0_MS + 313_000, 1.0, "mg/L", "N")])
    engine.tick()
    assert [(b["id"], b["state"]) for _, _, b in rec.events] == [("d0.c0:below", "raised")]
    state = json.loads(rec.meta["alarm_state"])
    assert [a["id"] for a in state["active"]] == ["d0.c0:below"] and "windows" not in state
    assert len(rec.meta["alarm_state"]) < 1000 and rec.beside["alarm_state"] == rec.meta["alarm_state"]
    assert "alarm_windows" not in rec.meta, "windows are saved once a minute, not with the event"
    t[0] = 380.0
    engine.tick()
    assert json.loads(rec.meta["alarm_windows"])["windows"].keys() == json.loads(windows)["windows"].keys()


def test_an_unreadable_saved_state_starts_clean(caplog):
    with caplog.at_level(logging.ERROR, logger="agent.alarms"):
        rig = Rig([{"channel": "cod.w01018", "above": 50}], saved="{not json")
    assert "not valid JSON" in caplog.text
    rig.feed("cod.w01018", 60, at=0)
    assert rig.rec.states() == [("cod.w01018:above", "raised")]


def test_reconfigure_keeps_alarms_whose_rule_remains_and_clears_the_others():
    rig = Rig([{"channel": "cod.w01018", "above": 50}, {"channel": "cod.w21003", "above": 5}])
    rig.feed("cod.w01018", 60, at=0)
    rig.feed("cod.w21003", 6, at=0)
    rig.engine.reconfigure(make_config([{"channel": "cod.w01018", "above": 55}]))
    rig.tick(1)
    assert rig.rec.states()[2:] == [("cod.w21003:above", "cleared")]
    rig.feed("cod.w01018", 60, at=2)
    assert len(rig.rec.events) == 3, "still active: not raised again"
    rig.feed("cod.w01018", 54, at=3)
    assert rig.rec.bodies()[3] | {"ts": None} == {"id": "cod.w01018:above", "channel": "cod.w01018",
                                                  "rule": "above", "state": "cleared", "value": 54,
                                                  "threshold": 55, "ts": None}


def test_alarms_of_a_removed_device_or_channel_clear_once_and_no_stale_rule_watches_them():
    rules = [{"channel": "*", "above": 50}, {"channel": "*", "stale": 30}]
    rig = Rig(rules)
    rig.feed("dust.a34002", 60, at=0)
    rig.feed("cod.w21003", 60, at=0)
    rig.feed("cod.w01018", 1, at=0)
    assert rig.rec.states() == [("dust.a34002:above", "raised"), ("cod.w21003:above", "raised")]
    cod = {**DEVICES["cod"], "channels": {"w01018": {"unit": "mg/L"}}}  # w21003 removed from cod, dust removed
    rig.engine.reconfigure(make_config(rules, {"cod": cod, "fog": DEVICES["fog"]}))
    rig.tick(1)
    assert sorted(rig.rec.states()[2:]) == [("cod.w21003:above", "cleared"), ("dust.a34002:above", "cleared")]
    rig.feed("cod.w01018", 1, at=20)
    rig.tick(200)
    stale = {i for i, state in rig.rec.states()[4:] if state == "raised"}
    assert stale == {"fog.running:stale", "cod.w01018:stale"}, "only configured channels go stale"
    assert {a["channel"] for a in rig.engine.active()} == {"fog.running", "cod.w01018"}


def test_an_alarm_saved_active_on_a_device_removed_before_a_restart_clears_at_the_start():
    rules = [{"channel": "*", "above": 50}]
    rig = Rig(rules)
    rig.feed("dust.a34002", 60, at=0)
    saved = rig.saved()
    restarted = FakeRecorder()
    engine = AlarmEngine(make_config(rules, {"cod": DEVICES["cod"]}), restarted, saved, None,
                         clock=lambda: 9000.0, wall_ms=lambda: T0_MS + 5_000, inline_actions=True)
    assert restarted.states() == [("dust.a34002:above", "cleared")]
    assert engine.active() == []


# --------------------------------------------------------------------------------------------------
# actions

FOG = {"channel": "dust.a34002", "above": 80, "action": {"device": "fog", "coil": 0, "min_on": 60}}


def test_action_writes_on_raise_and_off_on_clear_after_the_minimum_on_time():
    writer = FakeWriter()
    rig = Rig([FOG], writer=writer)
    rig.feed("dust.a34002", 90, at=0)
    assert writer.calls == [(0, "fog", "coil", 0, True)]
    rig.feed("dust.a34002", 70, at=10)
    assert rig.rec.states()[-1] == ("dust.a34002:above", "cleared"), "the alarm clears at once"
    rig.tick(59)
    assert len(writer.calls) == 1, "the cannon stays on for min_on"
    rig.tick(60)
    assert writer.calls[1:] == [(60, "fog", "coil", 0, False)]


def test_an_alarm_flapping_within_the_minimum_on_time_does_not_toggle_the_output():
    writer = FakeWriter()
    rig = Rig([FOG], writer=writer)
    for t, v in ((0, 90), (10, 70), (20, 90), (30, 70), (40, 90)):
        rig.feed("dust.a34002", v, at=t)
    rig.tick(200)
    assert writer.values() == [True]
    rig.feed("dust.a34002", 70, at=210)
    assert writer.values() == [True, False], "off once min_on has long passed"


def test_a_failed_write_is_retried_with_backoff_without_blocking_the_alarm():
    writer = FakeWriter(fail=2)
    rig = Rig([FOG], writer=writer)
    rig.feed("dust.a34002", 90, at=0)
    assert rig.rec.states() == [("dust.a34002:above", "raised")], "the event does not wait for the write"
    for t in (0.5, 1, 1.5, 2, 3, 4, 5, 6, 7, 8):
        rig.tick(t)
    assert [c[0] for c in writer.calls] == [0, ACTION_RETRY_FIRST_S, 3 * ACTION_RETRY_FIRST_S]
    assert writer.values() == [True, True, True]
    state = json.loads(rig.saved())
    assert state["actions"]["fog|coil|0"]["written"] is True


def test_a_register_action_writes_its_on_and_off_values():
    writer = FakeWriter()
    rule = {"channel": "cod.w01018", "above": 50,
            "action": {"device": "fog", "register": 7, "on": 3, "off": 1}}
    rig = Rig([rule], writer=writer)
    rig.feed("cod.w01018", 60, at=0)
    rig.feed("cod.w01018", 40, at=1)
    assert [c[1:] for c in writer.calls] == [("fog", "register", 7, 3), ("fog", "register", 7, 1)]


def test_two_alarms_driving_one_output_keep_it_on_until_both_clear():
    writer = FakeWriter()
    rig = Rig([{"channel": "dust.*", "above": 80, "action": {"device": "fog", "coil": 0}}], writer=writer)
    rig.feed("dust.a34002", 90, at=0)
    rig.feed("dust.a34004", 90, at=1)
    rig.feed("dust.a34002", 10, at=2)
    assert writer.values() == [True]
    rig.feed("dust.a34004", 10, at=3)
    assert writer.values() == [True, False]


def test_an_output_whose_device_a_reload_removed_is_not_written_until_the_device_is_back(caplog):
    """The off-write of the fog cannon is pending (min_on) or failing when a reload removes the fog device
    from the file: no bus reaches it any more, and the write was retried every minute for good (and after
    every restart, the target being saved). It is not written while the device is gone (logged), and
    switched off once a reload configures the device again."""
    writer = FakeWriter()
    rig = Rig([FOG], writer=writer)
    rig.feed("dust.a34002", 90, at=0)
    writer.fail = 100  # the relay board does not answer
    rig.feed("dust.a34002", 10, at=61)  # cleared; the off-write fails, and is retried
    rig.tick(64)
    assert writer.values() == [True, False, False]
    without_fog = {name: dev for name, dev in DEVICES.items() if name != "fog"}
    rule = {"channel": "dust.a34002", "above": 80}
    with caplog.at_level(logging.WARNING, logger="agent.alarms"):
        rig.engine.reconfigure(make_config([rule], without_fog))
        for t in range(65, 3600, 5):
            rig.tick(t)
    assert writer.values() == [True, False, False], "no write to a device no longer configured"
    assert "device fog is no longer configured" in caplog.text
    assert json.loads(rig.saved())["actions"]["fog|coil|0"]["written"] is None, "kept, its state unknown"
    writer.fail = 0  # the board is back, and so is the device in the file
    rig.engine.reconfigure(make_config([rule]))
    rig.tick(3600)
    assert writer.values() == [True, False, False, False]
    assert json.loads(rig.saved()).get("actions", {}) == {}, "switched off: forgotten"


def test_an_off_write_that_failed_before_a_restart_is_done_after_it():
    writer = FakeWriter()
    rig = Rig([FOG], writer=writer)
    rig.feed("dust.a34002", 90, at=0)
    writer.fail = 100
    rig.feed("dust.a34002", 10, at=70)  # off fails
    assert writer.values() == [True, False]
    writer2 = FakeWriter()
    again = Rig([FOG], saved=rig.saved(), writer=writer2, start=70)  # restarted where the first run stopped
    again.tick(70)
    assert writer2.values() == [False]
    # ... and an output saved "on" whose rule is gone is switched off too, once on for min_on
    third = Rig([FOG], writer=FakeWriter())
    third.feed("dust.a34002", 90, at=0)
    writer4 = FakeWriter()
    fourth = Rig([{"channel": "dust.a34002", "above": 80}], saved=third.saved(), writer=writer4, start=1)
    fourth.tick(1)
    assert writer4.calls == [], "on for 1 s of min_on 60 s"
    fourth.tick(60)
    assert [c[1:] for c in writer4.calls] == [("fog", "coil", 0, False)]
    assert "actions" not in json.loads(fourth.saved()) or not json.loads(fourth.saved())["actions"]


def test_an_off_write_that_failed_is_done_after_a_restart_even_once_the_failure_was_saved():
    """An "off" that failed (the relay board did not answer) leaves the output's state unknown; a stop
    saves the state as it stands then: the next start must still switch the output off, not forget it."""
    writer = FakeWriter()
    rig = Rig([FOG], writer=writer)
    rig.feed("dust.a34002", 90, at=0)
    writer.fail = 100
    rig.feed("dust.a34002", 10, at=70)  # the off write fails
    assert writer.values() == [True, False]
    rig.engine.save_at_next_tick()  # a stop saves the state (and the windows) at the recorder's last tick
    rig.tick(71)
    for rules in ([FOG], [{"channel": "dust.a34002", "above": 80}]):  # same rule; or its action removed meanwhile
        writer2 = FakeWriter()
        again = Rig(rules, saved=rig.saved(), writer=writer2)
        again.tick(0)
        assert [c[1:] for c in writer2.calls] == [("fog", "coil", 0, False)], rules


def test_a_reload_that_changes_an_actions_values_writes_the_output_again_with_the_new_ones():
    """A technician changes the sampler's "on" value (its mode register: 3 -> 4) while the alarm is
    active: the register is written with the new value at once, and its "off" value when it clears."""
    writer = FakeWriter()
    rule = {"channel": "cod.w01018", "above": 50, "action": {"device": "fog", "register": 7, "on": 3, "off": 1}}
    rig = Rig([rule], writer=writer)
    rig.feed("cod.w01018", 60, at=0)
    changed = {**rule, "action": {**rule["action"], "on": 4}}
    rig.engine.reconfigure(make_config([changed]))
    rig.tick(1)
    assert [c[1:] for c in writer.calls] == [("fog", "register", 7, 3), ("fog", "register", 7, 4)]
    rig.feed("cod.w01018", 40, at=3)
    rig.engine.reconfigure(make_config([{**changed, "action": {**changed["action"], "off": 0}}]))
    rig.tick(4)
    assert [c[1:] for c in writer.calls[2:]] == [("fog", "register", 7, 1), ("fog", "register", 7, 0)]
    # ... and across a restart: the saved state holds the values written
    again = Rig([{**changed, "action": {**changed["action"], "off": 2}}], saved=rig.saved(), writer=FakeWriter())
    again.tick(0)
    assert [c[1:] for c in again.writer.calls] == [("fog", "register", 7, 2)]
    unchanged = Rig([{**changed, "action": {**changed["action"], "off": 0}}], saved=rig.saved(), writer=FakeWriter())
    unchanged.tick(0)
    assert unchanged.writer.calls == [], "the same values: nothing written"


def test_the_minimum_on_time_still_holds_after_a_restart():
    """The alarm clears 10 s after the cannon went on (min_on 60 s) and the agent is restarted 10 s later
    (an upgrade): the cannon stays on until 60 s after its on-write, not switched off at the start."""
    writer = FakeWriter()
    rig = Rig([FOG], writer=writer)
    rig.feed("dust.a34002", 90, at=0)
    rig.feed("dust.a34002", 10, at=10)
    rig.engine.save_at_next_tick()
    rig.tick(20)
    assert writer.values() == [True]
    writer2 = FakeWriter()
    again = Rig([FOG], saved=rig.saved(), writer=writer2, start=20)  # both clocks go on from 20 s
    for t in (20, 30, 59):
        again.tick(t)
    assert writer2.calls == [], "still within min_on"
    again.tick(60)
    assert [c[1:] for c in writer2.calls] == [("fog", "coil", 0, False)]


def test_a_reload_that_changes_an_actions_values_during_its_write_writes_the_new_value_after_it():
    """The "on" write is still on the wire (a slow bus) when a reload changes the on value: once it is done,
    the new value is written, and the old write's result does not say the output holds the new value (the
    first write of the new one fails: the saved state must say so, not "written")."""
    import threading

    release = threading.Event()
    written: list[int | bool] = []
    fail_new = [1]

    def writer(device_id: str, kind: str, address: int, value: int | bool) -> None:
        release.wait(10)
        written.append(value)
        if value == 4 and fail_new[0]:
            fail_new[0] -= 1
            raise OSError("no answer from slave 1")

    def saved_written() -> object:
        return json.loads(rec.meta["alarm_state"])["actions"]["fog|register|7"]["written"]

    rule = {"channel": "cod.w01018", "above": 50, "action": {"device": "fog", "register": 7, "on": 3, "off": 1}}
    rec = FakeRecorder()
    engine = AlarmEngine(make_config([rule]), rec, None, writer)
    try:
        engine.observe([Reading("cod", "w01018", T0_MS, 60.0)])
        engine.reconfigure(make_config([{**rule, "action": {**rule["action"], "on": 4}}]))
        engine.tick()
        release.set()
        wait_for(lambda: (engine.tick(), written == [3, 4])[1], 5, "the new on value tried after the old")
        engine.finish_actions(5)
        engine.tick()
        assert saved_written() is None, "the old value's write says nothing of the new one's"
        wait_for(lambda: (engine.tick(), saved_written() is True)[1], 10, "the new value written on retry")
        assert written == [3, 4, 4]
    finally:
        engine.close()


def test_an_active_alarm_writes_its_output_on_again_after_a_restart():
    first = Rig([FOG], writer=FakeWriter())
    first.feed("dust.a34002", 90, at=0)
    writer = FakeWriter()
    second = Rig([FOG], saved=first.saved(), writer=writer)
    second.tick(0)
    assert writer.values() == [True]
    second.feed("dust.a34002", 10, at=1)
    second.tick(61)
    assert writer.values() == [True, False]


def test_without_a_writer_actions_are_logged_once_per_rule(caplog):
    with caplog.at_level(logging.WARNING, logger="agent.alarms"):
        rig = Rig([FOG, {"channel": "cod.w01018", "above": 50, "action": {"device": "fog", "coil": 1}}])
        rig.feed("dust.a34002", 90, at=0)
        rig.feed("dust.a34002", 10, at=100)
        rig.engine.reconfigure(rig.engine.config)
        rig.tick(101)
    lines = [r.getMessage() for r in caplog.records if "not executed" in r.getMessage()]
    assert len(lines) == 2 and "alarms.0" in lines[0] and "alarms.1" in lines[1]
    assert rig.rec.states() == [("dust.a34002:above", "raised"), ("dust.a34002:above", "cleared")]


def test_action_writes_run_on_a_worker_thread():
    import threading

    seen: list[str] = []

    def writer(device_id: str, kind: str, address: int, value: int | bool) -> None:
        seen.append(threading.current_thread().name)

    rec = FakeRecorder()
    engine = AlarmEngine(make_config([FOG]), rec, None, writer)
    try:
        engine.observe([Reading("dust", "a34002", T0_MS, 90.0)])
        wait_for(lambda: seen, 5, "the write")
        assert seen == ["alarm-actions"]
        wait_for(lambda: (engine.tick(), "actions" in json.loads(rec.meta["alarm_state"]))[1], 5,
                 "the write confirmed in the saved state")
    finally:
        engine.close()


def test_a_limit_given_as_an_int_is_kept_as_written():
    """State rebuilt from stored events (a salvage) holds thresholds as JSON ints: no AttributeError on
    Python 3.11, where int has no is_integer()."""
    from agent.alarms import _json_number

    assert [_json_number(v) for v in (80, 80.0, 2.5, None, float("nan"))] == [80, 80, 2.5, None, None]


def test_a_reload_says_the_rules_were_reloaded_only_when_they_changed(caplog):
    """A reload that changed a device's interval only must not log that the rules were reloaded: the
    operator reads that line as "the rules were edited"."""
    rules = [{"channel": "cod.w01018", "above": 50}]
    rig = Rig(rules)
    with caplog.at_level(logging.INFO, logger="agent.alarms"):
        rig.engine.reconfigure(make_config(rules, {**DEVICES, "cod": {**DEVICES["cod"], "interval": 7}}))
        rig.tick(1)
        assert "alarm rules reloaded" not in caplog.text
        rig.engine.reconfigure(make_config([*rules, {"channel": "cod.w01018", "below": 1}]))
        rig.tick(2)
    assert "alarm rules reloaded (2 rules)" in caplog.text


def test_a_reading_that_the_engine_fails_on_skips_only_itself(caplog, monkeypatch):
    """An unforeseen error on one reading (as the 1e308 window sum was) skipped the alarm evaluation of
    every reading after it in the batch, other devices included."""
    rig = Rig([{"channel": "*", "above": 50}])
    evaluate = rig.engine._observe_one

    def failing_on_cod(ch, r, now):
        if r.device == "cod":
            raise OverflowError("a bug met by this reading")
        evaluate(ch, r, now)

    monkeypatch.setattr(rig.engine, "_observe_one", failing_on_cod)
    with caplog.at_level(logging.ERROR, logger="agent.alarms"):
        for t in range(3):
            rig.t = t
            rig.engine.observe([Reading("cod", "w01018", rig.wall_ms(), 60.0, "mg/L"),
                                Reading("dust", "a34002", rig.wall_ms(), 60.0, "ug/m3")])
    assert rig.rec.states() == [("dust.a34002:above", "raised")]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "cod.w01018" in errors[0].getMessage() and errors[0].exc_info is not None


def test_a_background_on_an_instrument_clock_that_lags_is_still_subtracted():
    """The background instrument stamps its readings by its own clock (an `hj212` analyzer's DataTime),
    ten minutes behind this machine's, while it reads every 10 s without fail: it is current, and the
    site's value is compared with it. Timed by the readings' own stamps, it counted as ten minutes old
    (more than two of its intervals): the site's rule compared nothing, and no alarm was ever raised."""
    lag_ms = 600_000
    devices = {**DEVICES, "bg": {"bus": "rs485", "driver": "hj212", "interval": 10}}
    rig = Rig([{"channel": "dust.a34002", "above": 80, "background": "bg.a34002"}], devices=devices)
    for t in range(0, 100, 10):
        rig.t = t
        rig.engine.observe([Reading("bg", "a34002", rig.wall_ms() - lag_ms, 10.0, None, "N"),
                            Reading("dust", "a34002", rig.wall_ms(), 30.0 if t < 50 else 100.0, None, "N")])
        rig.engine.tick()
    assert rig.rec.states() == [("dust.a34002:above", "raised")], "100 - 10 = 90 > 80"

    windowed = Rig([{"channel": "dust.a34002", "preset": "dust-15min", "background": "bg.a34002"}], devices=devices)
    for t in range(0, 3000, 10):
        windowed.t = t
        windowed.engine.observe([Reading("bg", "a34002", windowed.wall_ms() - lag_ms, 15.0, None, "N"),
                                 Reading("dust", "a34002", windowed.wall_ms(), 100.0, None, "N")])
        windowed.engine.tick()
        if windowed.rec.events:
            break
    assert windowed.rec.bodies() and windowed.rec.bodies()[0]["value"] == pytest.approx(85), \
        "the site's 15-minute mean 85 above the background's"
