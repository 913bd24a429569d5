"""Period statistics (agent.aggregate) driven by hand: a fake recorder that keeps the events and meta
values the aggregator submits, a fake buffer (the stored readings, with their seqs, and the read-only
reader used to rebuild periods after a restart) and an injected wall clock. Expected values are
computed by hand in the comments. No threads, no database, no broker."""

from __future__ import annotations

import json
import logging
import math
import random
from typing import Any

import pytest
import yaml

from agent.aggregate import STATE_KEY, Aggregator, PeriodCalendar, PeriodKind
from agent.config import Config, ConfigError, parse_config
from agent.model import Reading, iso_utc_ms, parse_iso_utc_ms

DAY = "2026-09-21"  # Asia/Shanghai has no DST: local = UTC + 8 h
BODY_KEYS = ["device", "channel", "period", "start", "avg", "min", "max", "cou", "count", "flag"]
UNITS = {"w00000": "L/s", "w01018": "mg/L", "w21003": "mg/L", "w01001": "pH", "a34004": "ug/m3"}


def t(hms: str, day: str = DAY) -> int:
    """Unix ms of `day`T`hms`Z."""
    return parse_iso_utc_ms(f"{day}T{hms}Z")


def z(hms: str, day: str = DAY) -> str:
    """The body's `start` for `day`T`hms`Z."""
    return iso_utc_ms(t(hms, day))


def rd(device: str, channel: str, ts: int, value: float | None, flag: str = "N") -> Reading:
    return Reading(device, channel, ts, value, UNITS.get(channel), flag)


def every(device: str, channel: str, first: int, step_s: float, values: list[Any]) -> list[Reading]:
    """Readings at first, first + step, ...; a value may be (value, flag) or None (null, flag B)."""
    out = []
    for i, v in enumerate(values):
        ts = first + round(i * step_s * 1000)
        if v is None:
            out.append(rd(device, channel, ts, None, "B"))
        elif isinstance(v, tuple):
            out.append(rd(device, channel, ts, v[0], v[1]))
        else:
            out.append(rd(device, channel, ts, float(v)))
    return out


DEVICES: dict[str, Any] = {
    "cod": {"driver": "simulated", "interval": 60, "channels": {"w01018": {"unit": "mg/L"}, "w21003": {}}},
    "flow": {"driver": "simulated", "interval": 60, "channels": {"w00000": {"unit": "L/s"}}},
    "ph": {"driver": "simulated", "interval": 30, "channels": {"w01001": {}}},
    "pm": {"driver": "simulated", "interval": 60, "channels": {"a34004": {"unit": "ug/m3"}}},
}


def make_config(aggregate: dict | None = None, *, station_type: str = "outfall", section: bool = True,
                timezone: str = "Asia/Shanghai", devices: dict | None = None) -> Config:
    data: dict[str, Any] = {
        "station": {"id": "ST01", "type": station_type, "timezone": timezone},
        "storage": {"path": "./buffer.db"},
        "mqtt": {"url": "mqtt://127.0.0.1:1883"},
        "devices": devices or DEVICES,
    }
    if section:
        data["aggregate"] = aggregate if aggregate is not None else {}
    return parse_config(yaml.safe_dump(data, sort_keys=False))


class FakeRecorder:
    """What the aggregator needs of agent.recorder.Recorder; keeps the order of the calls."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, dict]] = []
        self.meta: dict[str, str] = {}
        self.calls: list[str] = []

    def submit_event(self, stream: str, ts_ms: int, body: dict) -> None:
        self.events.append((stream, ts_ms, json.loads(json.dumps(body))))
        self.calls.append("event")

    def set_meta(self, key: str, value: str) -> None:
        self.meta[key] = value
        self.calls.append(f"meta:{key}")

    def bodies(self, period: str | None = None, channel: str | None = None) -> list[dict]:
        return [b for _, _, b in self.events
                if (period is None or b["period"] == period) and (channel is None or b["channel"] == channel)]


class FakeBuffer:
    """The readings table (seqs given in storage order) and the read-only reader over it."""

    def __init__(self) -> None:
        self.rows: list[Reading] = []
        self.opened = 0
        self.closed = 0
        self.recorder: FakeRecorder | None = None  # where the aggregate rows are (set by the Rig)

    def store(self, readings: list[Reading]) -> list[Reading]:
        first = len(self.rows) + 1
        stored = [Reading(r.device, r.channel, r.ts_ms, r.value, r.unit, r.flag, first + i)
                  for i, r in enumerate(readings)]
        self.rows += stored
        return stored

    def reader(self) -> FakeBuffer:
        self.opened += 1
        return self

    def readings_after(self, after_seq: int, limit: int) -> list[Reading]:
        return [r for r in self.rows if r.seq > after_seq][:limit]

    def newest_period_starts(self) -> dict[str, int]:
        newest: dict[str, int] = {}  # the last computed (stored) period of each name, as Buffer's
        for _, start, body in self.recorder.events if self.recorder else ():
            newest[body["period"]] = start
        return newest

    def close(self) -> None:
        self.closed += 1


class Rig:
    """An aggregator with a hand-driven wall clock, fed one poll at a time (committed 100 ms after
    the readings' time, then a tick, as the recorder does)."""

    def __init__(self, config: Config, *, now: int, rec: FakeRecorder | None = None, buf: FakeBuffer | None = None):
        self.config = config
        self.now = now
        self.rec = rec or FakeRecorder()
        self.buf = buf or FakeBuffer()
        self.buf.recorder = self.rec
        self.agg = Aggregator(config, self.rec, self.rec.meta.get(STATE_KEY), self.buf.reader,
                              wall_ms=lambda: self.now)

    def feed(self, readings: list[Reading], *, delay_ms: int = 100) -> None:
        """Commit the readings poll by poll (grouped by timestamp, in time order)."""
        by_ts: dict[int, list[Reading]] = {}
        for r in sorted(readings, key=lambda r: r.ts_ms):
            by_ts.setdefault(r.ts_ms, []).append(r)
        for ts, group in by_ts.items():
            self.now = max(self.now, ts + delay_ms)
            self.agg.observe(self.buf.store(group))
            self.agg.tick()

    def at(self, now: int) -> None:
        """The wall clock reaches `now` (any direction); one tick."""
        self.now = now
        self.agg.tick()

    def restart(self, *, now: int | None = None, config: Config | None = None) -> Rig:
        """A new process on the same buffer and meta (the old aggregator is simply dropped, as by kill -9)."""
        return Rig(config or self.config, now=self.now if now is None else now, rec=self.rec, buf=self.buf)


def body(device: str, channel: str, period: str, start: str, avg: float | None, low: float | None,
         high: float | None, cou: float | None, count: int, flag: str) -> dict:
    return dict(zip(BODY_KEYS, [device, channel, period, start, avg, low, high, cou, count, flag], strict=True))


# --------------------------------------------------------------------------------------------------
# statistics


def test_a_ten_minute_period_matches_hand_computed_values_and_waits_for_the_grace():
    rig = Rig(make_config({"minute": 10, "hour": False, "day": False}), now=t("01:59:00"))
    values = [10, 12, 11, 13, 9, 10, 14, 12, 11, 8]  # sum 110 -> avg 11.0, min 8, max 14
    rig.feed(every("cod", "w01018", t("02:00:00"), 60, values))
    rig.at(t("02:10:01.999"))
    assert rig.rec.events == [], "computed only 2 s (grace) after the period end"
    rig.at(t("02:10:02"))
    assert rig.rec.events == [("aggregates", t("02:00:00"), body("cod", "w01018", "10m", z("02:00:00"), 11.0, 8.0,
                                                                    14.0, None, 10, "N"))]
    assert list(rig.rec.events[0][2]) == BODY_KEYS
    rig.at(t("02:30:00"))
    assert len(rig.rec.events) == 1


def test_hour_and_day_come_from_the_readings_not_from_minute_averages():
    rig = Rig(make_config({"minute": 10}, station_type="other"), now=t("01:59:00"))
    first = [10, 12, 11, 13, 9, 10, 14, 12, 11, 8]  # 10 values, avg 11
    second = [20, 22, 24, 26, 28]  # 5 values (a dead analyzer after 02:14), avg 24
    rig.feed(every("cod", "w01018", t("02:00:00"), 60, first) + every("cod", "w01018", t("02:10:00"), 60, second))
    rig.at(t("03:00:02"))
    # 10m: the second period has 5 of the 10 expected values (needs ceil(0.75 * 10) = 8): flag B.
    assert rig.rec.bodies("10m") == [
        body("cod", "w01018", "10m", z("02:00:00"), 11.0, 8.0, 14.0, None, 10, "N"),
        body("cod", "w01018", "10m", z("02:10:00"), 24.0, 20.0, 28.0, None, 5, "B"),
    ]
    # 1h: (110 + 120) / 15 = 15.333..., not (11 + 24) / 2 = 17.5; 15 of 60 expected values: B.
    assert rig.rec.bodies("1h") == [body("cod", "w01018", "1h", z("02:00:00"), 15.33333333, 8.0, 28.0, None, 15, "B")]
    rig.at(t("16:00:02"))  # local midnight of 2026-09-22
    assert rig.rec.bodies("1d") == [
        body("cod", "w01018", "1d", z("16:00:00", "2026-09-20"), 15.33333333, 8.0, 28.0, None, 15, "B")]


def test_a_flagged_value_makes_a_water_period_abnormal_and_stays_out_of_the_statistics():
    rig = Rig(make_config({"minute": 10, "hour": False, "day": False}), now=t("01:59:00"))
    values: list[Any] = [10, 12, 11, (30.0, "M"), 9, 10, 14, 12, 11, 8]  # maintenance value 30 left out
    rig.feed(every("cod", "w01018", t("02:00:00"), 60, values))
    rig.at(t("02:10:02"))
    # (110 - 13) / 9 = 10.777...; one abnormal value makes the whole water period M.
    assert rig.rec.bodies() == [body("cod", "w01018", "10m", z("02:00:00"), 10.77777778, 8.0, 14.0, None, 9, "M")]


@pytest.mark.parametrize("values, flag", [
    ([10, 12, (11.0, "T"), 13, 9, 10, 14, 12, 11, 8], "T"),  # over range: a measurement, in the avg
    ([10, None, (11.0, "M"), 13, 9, 10, 14, 12, 11, 8], "B"),  # B beats M
    ([10, None, (None, "D"), (11.0, "C"), 9, 10, 14, 12, 11, 8], "D"),  # D beats everything
    ([10, (11.0, "S"), (11.0, "C"), 13, 9, 10, 14, 12, 11, 8], "C"),
    ([10, (None, "N"), 11, 13, 9, 10, 14, 12, 11, 8], "B"),  # a null value is never normal
])
def test_the_most_severe_flag_wins_in_a_water_period(values, flag):
    rig = Rig(make_config({"minute": 10, "hour": False, "day": False}, station_type="river_section"),
              now=t("01:59:00"))
    rig.feed(every("cod", "w01018", t("02:00:00"), 60, values))
    rig.at(t("02:10:02"))
    [got] = rig.rec.bodies()
    assert got["flag"] == flag
    valid = [v if not isinstance(v, tuple) else v[0] for v in values
             if v is not None and not (isinstance(v, tuple) and (v[0] is None or v[1] not in "NT"))]
    assert got["count"] == len(valid)
    assert got["avg"] == pytest.approx(sum(valid) / len(valid))


@pytest.mark.parametrize("faults, flag", [(2, "N"), (3, "D")])
def test_other_stations_are_normal_with_75_percent_valid_values(faults, flag):
    rig = Rig(make_config({"minute": 10, "hour": False, "day": False}, station_type="dust"), now=t("01:59:00"))
    values: list[Any] = [(None, "D")] * faults + [50] * (10 - faults)
    rig.feed(every("pm", "a34004", t("02:00:00"), 60, values))
    rig.at(t("02:10:02"))
    # 10 expected values, 8 needed: 8 valid -> N; 7 valid -> the abnormal flag, D.
    assert rig.rec.bodies() == [body("pm", "a34004", "10m", z("02:00:00"), 50.0, 50.0, 50.0, None, 10 - faults, flag)]


@pytest.mark.parametrize("hours, flag", [(19, "B"), (20, "N")])
def test_a_day_needs_20_valid_hours(hours, flag):
    """DOMAIN.md (and GB 3095-2012's validity table): "a day [needs] 20 valid hours". The day was judged
    on 75 % of its readings, i.e. 18 hours: after a 5-hour outage a day of 19 hours was flagged N. A
    valid hour is one with the hour's share of valid values."""
    rig = Rig(make_config({"minute": 10, "hour": False}, station_type="dust"), now=t("15:59:00", "2026-09-20"))
    day = t("16:00:00", "2026-09-20")  # local midnight of 2026-09-21
    rig.feed(every("pm", "a34004", day, 60, [50] * (hours * 60)))
    rig.at(t("16:00:02"))
    [got] = rig.rec.bodies("1d")
    assert (got["count"], got["flag"]) == (hours * 60, flag)


def test_a_day_counts_its_valid_hours_not_its_share_of_values():
    """Twenty-one hours of readings with 50 of the 60 values of each (every hour valid: 45 needed): 1050
    values, under 75 % of the day's 1440 expected (the day was flagged B), but 21 valid hours."""
    rig = Rig(make_config({"minute": 10, "hour": False}, station_type="dust"), now=t("15:59:00", "2026-09-20"))
    day = t("16:00:00", "2026-09-20")
    rig.feed([r for h in range(21) for r in every("pm", "a34004", day + h * 3_600_000, 60, [50] * 50)])
    rig.at(t("16:00:02"))
    [got] = rig.rec.bodies("1d")
    assert (got["count"], got["flag"]) == (21 * 50, "N")


@pytest.mark.parametrize("values, flag", [(10, "N"), (9, "B")])
def test_a_device_polled_less_than_hourly_needs_20_of_24_of_its_polls_in_a_day(values, flag):
    """An analyzer measuring every 2 hours has at most 12 hours with a value: it needs 10 of its 12
    values (20/24), not 20 valid hours it can never have."""
    devices = {"tp": {"driver": "simulated", "interval": 7200, "channels": {"w21011": {"unit": "mg/L"}}}}
    rig = Rig(make_config({"minute": 10, "hour": False}, station_type="outfall", devices=devices),
              now=t("15:59:00", "2026-09-20"))
    rig.feed(every("tp", "w21011", t("16:00:00", "2026-09-20"), 7200, [0.3] * values))
    rig.at(t("16:00:02"))
    [got] = rig.rec.bodies("1d")
    assert (got["count"], got["flag"]) == (values, flag)


def test_a_day_share_or_count_in_the_file_replaces_the_20_valid_hours():
    for aggregate, flag in [({"min_valid": {"day": 0.75}}, "N"), ({"min_count": {"day": 1140}}, "N"),
                            ({"min_valid": {"minute": 0.5}}, "B")]:
        rig = Rig(make_config({"minute": 10, "hour": False, **aggregate}, station_type="dust"),
                  now=t("15:59:00", "2026-09-20"))
        rig.feed(every("pm", "a34004", t("16:00:00", "2026-09-20"), 60, [50] * (19 * 60)))
        rig.at(t("16:00:02"))
        assert [b["flag"] for b in rig.rec.bodies("1d")] == [flag], aggregate


def test_a_gap_lowers_the_count_and_a_water_period_without_enough_values_is_flagged_b():
    rig = Rig(make_config({"minute": 10, "hour": False, "day": False}), now=t("01:59:00"))
    readings = every("cod", "w01018", t("02:00:00"), 60, [10, 12, 11, 13, 9, 10, 14, 12, 11, 8])
    del readings[3:6]  # no answer at all at 02:03, 02:04, 02:05: 7 values, (110 - 32) / 7
    rig.feed(readings)
    rig.at(t("02:10:02"))
    assert rig.rec.bodies() == [body("cod", "w01018", "10m", z("02:00:00"), 11.14285714, 8.0, 14.0, None, 7, "B")]


def test_minimum_valid_counts_are_configurable():
    readings = every("cod", "w01018", t("02:00:00"), 60, [10, 12, 11, 13, 9])  # 5 of 10 expected
    for aggregate, flag in [({"min_count": {"minute": 5}}, "N"), ({"min_count": {"minute": 6}}, "B"),
                            ({"min_valid": 0.5}, "N"), ({"min_valid": {"minute": 0.6}}, "B"), ({}, "B")]:
        rig = Rig(make_config({"minute": 10, "hour": False, "day": False, **aggregate}), now=t("01:59:00"))
        rig.feed(readings)
        rig.at(t("02:10:02"))
        assert [b["flag"] for b in rig.rec.bodies()] == [flag], aggregate


def test_channels_of_several_devices_are_emitted_per_period_in_order():
    rig = Rig(make_config({"minute": 5, "hour": False, "day": False}), now=t("01:59:00"))
    rig.feed(every("ph", "w01001", t("02:00:00"), 30, [7.0] * 10)
             + every("cod", "w01018", t("02:00:10"), 60, [20, 22, 24, 26, 28]))
    rig.at(t("02:05:02"))
    assert [(b["device"], b["channel"], b["count"], b["avg"], b["flag"]) for b in rig.rec.bodies()] == [
        ("cod", "w01018", 5, 24.0, "N"), ("ph", "w01001", 10, 7.0, "N")]


# --------------------------------------------------------------------------------------------------
# time zones and boundaries


def test_periods_follow_the_local_day_across_midnight_in_asia_shanghai():
    rig = Rig(make_config({"minute": 5}, station_type="other"), now=t("15:50:00"))
    # 15:55 .. 16:05 UTC = 23:55 .. 00:05 local, one reading a minute, value = the minute (55..65).
    readings = every("cod", "w01018", t("15:55:00"), 60, list(range(55, 66)))
    rig.feed(readings[:5])
    rig.at(t("16:00:01"))
    assert rig.rec.events == []
    rig.at(t("16:00:02"))
    day1 = z("16:00:00", "2026-09-20")  # 2026-09-21 00:00 local
    # At local midnight the 5-minute, the hour (23:00 local) and the day periods end together.
    assert rig.rec.bodies() == [
        body("cod", "w01018", "5m", z("15:55:00"), 57.0, 55.0, 59.0, None, 5, "N"),
        body("cod", "w01018", "1h", z("15:00:00"), 57.0, 55.0, 59.0, None, 5, "B"),
        body("cod", "w01018", "1d", day1, 57.0, 55.0, 59.0, None, 5, "B"),
    ]
    rig.feed(readings[5:])
    rig.at(t("16:10:02"))
    assert rig.rec.bodies("5m")[1:] == [
        body("cod", "w01018", "5m", z("16:00:00"), 62.0, 60.0, 64.0, None, 5, "N"),
        body("cod", "w01018", "5m", z("16:05:00"), 65.0, 65.0, 65.0, None, 1, "B"),
    ]
    rig.at(t("16:00:02", "2026-09-22"))
    assert rig.rec.bodies("1h")[1] == body("cod", "w01018", "1h", z("16:00:00"), 62.5, 60.0, 65.0, None, 6, "B")
    assert rig.rec.bodies("1d")[1] == body("cod", "w01018", "1d", z("16:00:00"), 62.5, 60.0, 65.0, None, 6, "B")


def test_local_boundaries_in_a_zone_with_a_half_hour_offset_and_dst():
    kolkata = PeriodCalendar(PeriodKind("hour", 60), __import__("zoneinfo").ZoneInfo("Asia/Kolkata"))
    assert kolkata.span(t("02:40:00")) == (t("02:30:00"), t("03:30:00"))  # 08:00..09:00 local (UTC+5:30)
    berlin = PeriodCalendar(PeriodKind("day", 1440), __import__("zoneinfo").ZoneInfo("Europe/Berlin"))
    start, end = berlin.span(t("12:00:00", "2026-10-25"))  # the day summer time ends lasts 25 hours
    assert (iso_utc_ms(start), end - start) == ("2026-10-24T22:00:00.000Z", 25 * 3_600_000)
    minutes = PeriodCalendar(PeriodKind("minute", 15), __import__("zoneinfo").ZoneInfo("Asia/Kathmandu"))
    assert iso_utc_ms(minutes.span(t("02:16:00"))[0]) == f"{DAY}T02:15:00.000Z"  # :00 local is :15 UTC (+5:45)


def test_a_day_whose_midnight_comes_twice_starts_at_the_first_one():
    """Atlantic/Azores sets its clock back from 01:00 to 00:00 (America/Havana likewise): on 2026-10-25
    midnight comes at 00:00Z and again at 01:00Z. A reading of the second pass, looked up first (the
    agent started then, a reading timed on an analyzer's clock), opened a second day period of that date
    starting an hour late, beside the 25-hour one its other readings fell in."""
    azores = __import__("zoneinfo").ZoneInfo("Atlantic/Azores")
    for ts in (t("01:30:00", "2026-10-25"), t("00:30:00", "2026-10-25"), t("23:59:00", "2026-10-25")):
        start, end = PeriodCalendar(PeriodKind("day", 1440), azores).span(ts)
        assert (iso_utc_ms(start), end - start) == ("2026-10-25T00:00:00.000Z", 25 * 3_600_000), iso_utc_ms(ts)
    hours = PeriodCalendar(PeriodKind("hour", 60), azores)
    assert iso_utc_ms(hours.span(t("01:30:00", "2026-10-25"))[0]) == "2026-10-25T01:00:00.000Z"  # second 00:00


# --------------------------------------------------------------------------------------------------
# flow: volumes, loads, flow-weighted concentrations


def test_flow_cou_is_the_volume_in_m3_and_the_last_value_holds_into_the_next_period():
    rig = Rig(make_config({"minute": 10, "hour": False, "day": False}), now=t("01:59:00"))
    # 40 L/s at 01:59:30 holds 30 s into the period; then ten values of 10 L/s at 02:00:30 .. 02:09:30,
    # the last holding until 02:10:00: 40 x 30 + 10 x 9 x 60 + 10 x 30 = 6900 L = 6.9 m3.
    rig.feed(every("flow", "w00000", t("01:59:30"), 60, [40] + [10] * 10))
    rig.at(t("02:10:02"))
    assert rig.rec.bodies(period="10m")[-1] == body("flow", "w00000", "10m", z("02:00:00"), 10.0, 10.0, 10.0, 6.9,
                                                    10, "N")


def test_flow_gaps_are_held_for_at_most_two_device_intervals():
    rig = Rig(make_config({"minute": 10, "hour": False, "day": False}), now=t("01:59:00"))
    values: list[Any] = [10, 10, 10, 10, "gap", "gap", 10, None, 10, 10]  # 02:00 .. 02:09, interval 60 s
    readings = [r for r in every("flow", "w00000", t("02:00:00"), 60, [0 if v == "gap" else v for v in values])
                if values[(r.ts_ms - t("02:00:00")) // 60_000] != "gap"]
    rig.feed(readings)
    rig.at(t("02:10:02"))
    # 02:00-02:03 held 60 s each (240 s); 02:03 -> 02:06 is 180 s, held 120 s (2 intervals); the null at
    # 02:07 is a gap too: 02:06 -> 02:08 is 120 s; 02:08, 02:09 60 s each: 600 s - 60 s = 540 s x 10 L/s.
    assert rig.rec.bodies() == [body("flow", "w00000", "10m", z("02:00:00"), 10.0, 10.0, 10.0, 5.4, 7, "B")]


def test_flow_units_other_than_litres_per_second_are_converted():
    rig = Rig(make_config({"minute": 10, "hour": False, "day": False}), now=t("01:59:00"))
    rig.feed([Reading("flow", "w00000", t("02:00:00") + i * 60_000, 36.0, "m3/h") for i in range(10)])
    rig.at(t("02:10:02"))
    assert rig.rec.bodies()[0]["cou"] == pytest.approx(6.0)  # 36 m3/h for 10 minutes


def test_flow_weighted_concentration_and_load():
    config = make_config({"minute": 10, "hour": False, "day": False, "flow": "flow.w00000"})
    rig = Rig(config, now=t("01:59:00"))
    q = [10] * 5 + [30] * 5  # L/s at 02:00 .. 02:09: 5 x 60 x 10 + 5 x 60 x 30 = 12000 L = 12 m3
    c = [20] * 5 + [40] * 5  # mg/L at 02:00:10 .. 02:09:10, each paired with the flow 10 s before
    rig.feed(every("flow", "w00000", t("02:00:00"), 60, q) + every("cod", "w01018", t("02:00:10"), 60, c)
             + every("ph", "w01001", t("02:00:00"), 30, [7.0, 8.0] * 10))
    rig.at(t("02:10:02"))
    # COD: (5 x 20 x 10 + 5 x 40 x 30) / (5 x 10 + 5 x 30) = 7000 / 200 = 35 mg/L (plain mean: 30);
    # load 35 mg/L x 12 m3 = 420 g = 0.42 kg. pH is not a concentration: plain mean, no cou.
    assert rig.rec.bodies() == [
        body("cod", "w01018", "10m", z("02:00:00"), 35.0, 20.0, 40.0, 0.42, 10, "N"),
        body("flow", "w00000", "10m", z("02:00:00"), 20.0, 10.0, 30.0, 12.0, 10, "N"),
        body("ph", "w01001", "10m", z("02:00:00"), 7.5, 7.0, 8.0, None, 20, "N"),
    ]


def test_flow_weighting_falls_back_to_the_plain_mean_without_flow_values():
    config = make_config({"minute": 10, "hour": False, "day": False, "flow": "flow.w00000",
                          "flow_weighted": ["cod.w01018"]})
    rig = Rig(config, now=t("01:59:00"))
    rig.feed(every("cod", "w01018", t("02:00:10"), 60, [20] * 5 + [40] * 5)
             + every("cod", "w21003", t("02:00:10"), 60, [1.0] * 10)
             + every("flow", "w00000", t("01:50:00"), 60, [10]))  # too old to pair (> 2 intervals)
    rig.at(t("02:10:02"))
    got = {b["channel"]: (b["avg"], b["cou"]) for b in rig.rec.bodies("10m") if b["start"] == z("02:00:00")}
    # No flow value in this period: plain mean, and no load. w21003 is mg/L but not listed: not weighted.
    assert got == {"w01018": (30.0, None), "w21003": (1.0, None)}


# --------------------------------------------------------------------------------------------------
# clocks, late readings


def test_a_late_reading_is_left_out_of_a_computed_period_but_counts_in_the_hour():
    rig = Rig(make_config({"minute": 10, "day": False}, station_type="other"), now=t("01:59:00"))
    rig.feed(every("cod", "w01018", t("02:00:00"), 60, [10] * 10))
    rig.at(t("02:10:02"))
    rig.feed([rd("cod", "w01018", t("02:09:59"), 99.0)], delay_ms=5000)  # committed at 02:10:04.999
    rig.at(t("03:00:02"))
    assert [(b["period"], b["count"], b["max"]) for b in rig.rec.bodies()] == [("10m", 10, 10.0), ("1h", 11, 99.0)]


def test_a_reading_within_the_grace_is_counted():
    rig = Rig(make_config({"minute": 10, "hour": False, "day": False}), now=t("01:59:00"))
    rig.feed(every("cod", "w01018", t("02:00:00"), 60, [10] * 9))
    rig.feed([rd("cod", "w01018", t("02:09:59"), 20.0)], delay_ms=1500)
    rig.at(t("02:10:02"))
    assert [b["count"] for b in rig.rec.bodies()] == [10]


def test_a_small_backward_clock_step_never_emits_a_period_twice():
    rig = Rig(make_config({"minute": 10, "hour": False, "day": False}), now=t("01:59:00"))
    rig.feed(every("cod", "w01018", t("02:00:00"), 60, [10] * 11))  # ... and 02:10:00 in the next period
    rig.at(t("02:10:02"))
    assert len(rig.rec.events) == 1
    rig.now = t("02:08:30")  # NTP steps the clock back by 2 minutes
    rig.feed(every("cod", "w01018", t("02:08:30"), 60, [50] * 3))  # 02:08:30, 02:09:30, 02:10:30
    rig.at(t("02:10:02"))
    assert len(rig.rec.events) == 1, "the 02:00 period is done: its late readings are left out"
    rig.feed(every("cod", "w01018", t("02:11:30"), 60, [10] * 8))
    rig.at(t("02:20:02"))
    assert [(b["start"], b["count"]) for b in rig.rec.bodies()] == [(z("02:00:00"), 11 - 1), (z("02:10:00"), 10)]


def test_a_clock_that_was_ahead_by_a_year_is_corrected_without_losing_the_real_periods():
    ahead = "2027-09-21"
    rig = Rig(make_config({"minute": 10, "hour": False, "day": False}), now=t("01:59:00", ahead))
    rig.feed(every("cod", "w01018", t("02:00:00", ahead), 60, [10] * 12))
    rig.at(t("02:10:02", ahead))
    rig.at(t("02:30:00"))  # corrected: the open 02:10 period of 2027 is computed at once
    assert [b["start"] for b in rig.rec.bodies()] == [z("02:00:00", ahead), z("02:10:00", ahead)]
    rig = rig.restart()
    rig.feed(every("cod", "w01018", t("02:30:00"), 60, [20] * 10))
    rig.at(t("02:40:02"))
    assert [(b["start"], b["avg"], b["count"]) for b in rig.rec.bodies()][2:] == [(z("02:30:00"), 20.0, 10)]
    state = json.loads(rig.rec.meta[STATE_KEY])
    assert state["kinds"]["10m"] == [[t("02:00:00", ahead), t("02:10:00", ahead)], [t("02:30:00"), t("02:30:00")]]


def test_a_clock_corrected_from_days_ahead_computes_only_the_periods_left_ahead():
    """The first reading after the correction may be ingested before the next tick opens the current
    period: "computing the open periods now" took that one too (a 1s device did so in a real agent), so
    the current minute, hour and day were published with the one reading they had, and every later
    reading of the day was left out of them as late."""
    ahead = "2026-09-25"  # three days
    rig = Rig(make_config({"minute": 10, "hour": True, "day": True}), now=t("01:59:00", ahead))
    rig.feed(every("cod", "w01018", t("02:00:00", ahead), 60, [10] * 5))
    rig.now = t("02:30:00")  # corrected; the poll of 02:30:00 is committed before the next tick
    rig.feed(every("cod", "w01018", t("02:30:00"), 60, [20] * 10))
    rig.at(t("02:40:02"))
    assert [(b["period"], b["start"], b["count"]) for b in rig.rec.bodies()] == [
        ("10m", z("02:00:00", ahead), 5), ("1h", z("02:00:00", ahead), 5), ("1d", z("16:00:00", "2026-09-24"), 5),
        ("10m", z("02:30:00"), 10)]
    rig.at(t("16:00:02"))
    assert [(b["period"], b["start"], b["count"]) for b in rig.rec.bodies()][-2:] == [
        ("1h", z("02:00:00"), 10), ("1d", z("16:00:00", "2026-09-20"), 10)]


@pytest.mark.parametrize("lost_range", [False, True], ids=["state-kept", "ahead-range-dropped-from-state"])
def test_a_clock_stepped_years_ahead_then_corrected_goes_on_computing_periods(lost_range):
    """Real periods, then the clock 74 years ahead (a wrong RTC, a GPS week rollover), then corrected: the
    periods of the real time go on being computed, also after a restart. The range of done periods was
    stretched from before the step to 2100, so every period until then counted as done (none computed).
    `lost_range`: the state no longer holds the range of 2100 (MAX_RANGES keeps the last 8), and the
    periods the buffer holds are the guide at start."""
    ahead = "2100-09-21"
    rig = Rig(make_config({"minute": 10, "hour": True, "day": False}), now=t("01:39:00"))
    rig.feed(every("cod", "w01018", t("01:40:00"), 60, [10] * 11))
    rig.at(t("01:50:02"))
    rig.now = t("01:59:00", ahead)
    rig.feed(every("cod", "w01018", t("02:00:00", ahead), 60, [10] * 12))
    rig.at(t("02:10:02", ahead))
    rig.now = t("02:30:00")  # NTP corrects it
    rig.feed(every("cod", "w01018", t("02:30:00"), 60, [20] * 20))
    rig.at(t("02:50:02"))
    assert [(b["period"], b["start"]) for b in rig.rec.bodies()][-2:] == [("10m", z("02:30:00")),
                                                                           ("10m", z("02:40:00"))]
    if lost_range:
        state = json.loads(rig.rec.meta[STATE_KEY])
        state["kinds"] = {name: [r for r in ranges if r[0] < t("00:00:00", ahead)]
                          for name, ranges in state["kinds"].items()}
        rig.rec.meta[STATE_KEY] = json.dumps(state)
    rig = rig.restart()
    rig.feed(every("cod", "w01018", t("02:50:00"), 60, [20] * 20))
    rig.at(t("03:10:02"))
    assert [(b["period"], b["start"]) for b in rig.rec.bodies() if b["start"] >= z("02:00:00")] == [
        ("10m", z("02:00:00", ahead)), ("10m", z("02:10:00", ahead)), ("1h", z("02:00:00", ahead)),
        ("10m", z("02:30:00")), ("10m", z("02:40:00")), ("10m", z("02:50:00")), ("1h", z("02:00:00")),
        ("10m", z("03:00:00"))]


@pytest.mark.parametrize("boot_clock", [t("01:20:00"), 30_000])  # fake-hwclock 40 min behind; 1970
def test_a_restart_with_a_clock_behind_keeps_the_open_period_until_ntp_corrects_it(boot_clock):
    rig = Rig(make_config({"minute": 10, "hour": False, "day": False}), now=t("01:59:00"))
    rig.feed(every("cod", "w01018", t("02:00:00"), 60, [10, 12, 11, 13, 9]))
    rig = rig.restart(now=boot_clock)  # power cut at 02:04:30, back at 02:05:20 with a stale clock
    rig.at(boot_clock + 1000)
    assert rig.rec.events == [], "the open period is not cut short by a clock that is behind"
    rig.now = t("02:05:30")  # NTP
    rig.feed(every("cod", "w01018", t("02:05:30"), 60, [10, 14, 12, 11, 8]))
    rig.at(t("02:10:02"))
    assert rig.rec.bodies() == [body("cod", "w01018", "10m", z("02:00:00"), 11.0, 8.0, 14.0, None, 10, "N")]


def test_readings_far_ahead_of_the_clock_or_before_2020_are_left_out():
    rig = Rig(make_config({"minute": 10, "hour": False, "day": False}), now=t("01:59:00"))
    rig.agg.observe(rig.buf.store([rd("cod", "w01018", t("03:00:00"), 1.0), rd("cod", "w01018", 86_400_000, 1.0)]))
    rig.feed(every("cod", "w01018", t("02:00:00"), 60, [10] * 10))
    rig.at(t("03:10:02"))
    assert [(b["start"], b["count"]) for b in rig.rec.bodies()] == [(z("02:00:00"), 10)]


# --------------------------------------------------------------------------------------------------
# restarts


def test_an_open_period_is_rebuilt_from_the_stored_readings_after_a_restart():
    rig = Rig(make_config({"minute": 10, "hour": False, "day": False}), now=t("01:59:00"))
    rig.feed(every("cod", "w01018", t("02:00:00"), 60, [10, 12, 11, 13, 9]))
    rig = rig.restart()  # kill -9 at 02:04:00.1, back at once
    rig.feed(every("cod", "w01018", t("02:05:00"), 60, [10, 14, 12, 11, 8]))
    rig.at(t("02:10:02"))
    assert rig.rec.bodies() == [body("cod", "w01018", "10m", z("02:00:00"), 11.0, 8.0, 14.0, None, 10, "N")]
    assert rig.buf.opened == rig.buf.closed == 1, "the reader is closed after the replay"


def test_a_period_that_ended_while_the_agent_was_down_is_computed_once_at_start():
    rig = Rig(make_config({"minute": 10, "day": False}), now=t("01:59:00"))
    rig.feed(every("cod", "w01018", t("02:00:00"), 60, [10, 12, 11, 13, 9, 10, 14, 12, 11, 8]))
    rig.at(t("02:10:01"))  # stopped at 02:10:01, before the grace ran out
    assert rig.rec.events == []
    rig = rig.restart(now=t("02:25:00"))
    assert rig.rec.events == [], "nothing is submitted from the constructor (not the recorder thread)"
    rig.at(t("02:25:00.5"))
    assert rig.rec.bodies() == [body("cod", "w01018", "10m", z("02:00:00"), 11.0, 8.0, 14.0, None, 10, "N")]
    assert rig.rec.calls[-2:] == ["event", f"meta:{STATE_KEY}"], "the state goes with the events"
    rig = rig.restart(now=t("02:26:00"))
    rig.at(t("02:26:01"))
    rig.feed(every("cod", "w01018", t("02:30:00"), 60, [20] * 30))  # up to 02:59
    rig.at(t("03:00:02"))
    assert [(b["period"], b["start"], b["count"]) for b in rig.rec.bodies()] == [
        ("10m", z("02:00:00"), 10), ("10m", z("02:30:00"), 10), ("10m", z("02:40:00"), 10),
        ("10m", z("02:50:00"), 10), ("1h", z("02:00:00"), 40)]


def test_a_new_kind_after_a_restart_starts_with_the_current_period():
    rig = Rig(make_config({"minute": 10, "hour": False, "day": False}), now=t("01:59:00"))
    rig.feed(every("cod", "w01018", t("02:00:00"), 60, [10] * 25))  # 02:00 .. 02:24
    rig = rig.restart(config=make_config({"minute": 10, "hour": True, "day": False}))
    rig.feed(every("cod", "w01018", t("02:25:00"), 60, [10] * 35))
    rig.at(t("03:00:02"))
    # The hour is new: nothing was counted for it before the restart; the replay starts with the oldest
    # open period of the kinds the state knew (10m from 02:20), so the hour has 40 values (flag B).
    assert [(b["period"], b["count"], b["flag"]) for b in rig.rec.bodies()][-2:] == [("10m", 10, "N"),
                                                                                    ("1h", 40, "B")]
    rig = rig.restart(config=make_config({"minute": 5, "hour": True, "day": False}))
    rig.feed(every("cod", "w01018", t("03:00:00"), 60, [10] * 6))
    rig.at(t("03:05:02"))
    assert rig.rec.bodies("5m") == [body("cod", "w01018", "5m", z("03:00:00"), 10.0, 10.0, 10.0, None, 5, "N")]


def scenario(seed: int = 7) -> list[Reading]:
    """An outfall from 15:30 to 16:40 UTC (across local midnight): flow every 60 s, COD every 60 s
    (10 s after the flow), pH every 30 s; some failed reads, flags and missing polls."""
    rng = random.Random(seed)
    out: list[Reading] = []
    for i in range(70 * 2):
        ts = t("15:30:00") + i * 30_000
        if rng.random() < 0.05:
            continue  # a poll lost entirely
        flag = rng.choice("NNNNNNNNNNNNNNNNMDT")
        value = None if rng.random() < 0.04 else round(rng.uniform(6, 9), 2)
        out.append(rd("ph", "w01001", ts, value, "B" if value is None else flag))
        if i % 2 == 0:
            out.append(rd("flow", "w00000", ts, round(rng.uniform(0, 40), 1)))
            out.append(rd("cod", "w01018", ts + 10_000, round(rng.uniform(10, 80), 1), rng.choice("NNNNNNNNNT")))
    return out


def run(config: Config, readings: list[Reading], crashes: dict[int, int]) -> list[dict]:
    """Feed readings poll by poll; before the reading at index i in `crashes`, restart (kill -9) with
    the clock at crashes[i]; in the end let the clock run past the last day."""
    rig = Rig(config, now=t("15:00:00"))
    polls = sorted({r.ts_ms for r in readings})
    for i, ts in enumerate(polls):
        if i in crashes:
            rig = rig.restart(now=crashes[i])
        rig.feed([r for r in readings if r.ts_ms == ts])
    rig.at(t("16:00:03", "2026-09-22"))
    return rig.rec.bodies()


@pytest.mark.parametrize("before", ["15:30:30", "15:36:10", "15:49:30", "15:50:00", "15:50:10", "15:50:30",
                                    "15:59:30", "16:00:00", "16:00:10", "16:00:30", "16:11:10"])
def test_a_restart_anywhere_gives_the_same_aggregates_as_no_restart(before):
    """kill -9 just after the poll before `before` (e.g. "16:00:10": at 16:00:00.1, in the grace of
    the 10m, hour and day periods ending at local midnight), back at once; then once more 3 polls later."""
    config = make_config({"minute": 10, "flow": "flow.w00000"})
    readings = scenario()
    reference = run(config, readings, {})
    assert {b["period"] for b in reference} == {"10m", "1h", "1d"} and len(reference) == 3 * (7 + 2 + 2)
    polls = sorted({r.ts_ms for r in readings})
    crash = polls.index(t(before))
    assert run(config, readings, {crash: polls[crash - 1] + 100}) == reference
    assert run(config, readings, {crash: polls[crash - 1] + 100, crash + 3: polls[crash + 2] + 100}) == reference


@pytest.mark.parametrize("down_from, down_to", [(30, 45), (55, 80), (10, 130)])
def test_periods_that_end_while_the_agent_is_down_are_the_same_as_without_the_restart(down_from, down_to):
    """The agent is down from poll `down_from` to `down_to` (no readings then): the aggregates equal
    those of an agent that ran all along and received no readings in that time."""
    config = make_config({"minute": 10, "flow": "flow.w00000"})
    polls = sorted({r.ts_ms for r in scenario()})
    readings = [r for r in scenario() if not polls[down_from] <= r.ts_ms < polls[down_to]]
    reference = run(config, readings, {})
    kept = sorted({r.ts_ms for r in readings})
    back = kept.index(polls[down_to])
    assert run(config, readings, {back: polls[down_to] + 100}) == reference


def test_a_restart_never_emits_a_period_twice():
    config = make_config({"minute": 10, "flow": "flow.w00000"})
    readings = scenario()
    polls = sorted({r.ts_ms for r in readings})
    bodies = run(config, readings, {i: polls[i - 1] + 100 for i in range(1, len(polls), 7)})
    keys = [(b["device"], b["channel"], b["period"], b["start"]) for b in bodies]
    assert len(keys) == len(set(keys)) == 3 * (7 + 2 + 2)


def test_a_saved_state_older_than_the_stored_periods_never_emits_them_again(caplog):
    """A salvaged buffer may hold aggregate rows newer than its saved state (the state's copy was on a
    damaged page): the periods it holds are done, and only the open one is rebuilt."""
    rig = Rig(make_config({"minute": 10, "hour": False, "day": False}), now=t("01:59:00"))
    rig.feed(every("cod", "w01018", t("02:00:00"), 60, [10] * 10))
    rig.at(t("02:10:02"))
    state_after_the_first = rig.rec.meta[STATE_KEY]
    rig.feed(every("cod", "w01018", t("02:10:00"), 60, [12] * 15))  # 02:10 .. 02:24; 02:10 computed at 02:20:02
    assert [b["start"] for b in rig.rec.bodies()] == [z("02:00:00"), z("02:10:00")]
    rig.rec.meta[STATE_KEY] = state_after_the_first
    rig = rig.restart(now=t("02:24:30"))
    assert "not computed again" in caplog.text
    rig.feed(every("cod", "w01018", t("02:25:00"), 60, [14] * 5))
    rig.at(t("02:30:02"))
    assert [(b["start"], b["count"], b["avg"]) for b in rig.rec.bodies()] == [
        (z("02:00:00"), 10, 10.0), (z("02:10:00"), 10, 12.0), (z("02:20:00"), 10, 13.0)]

    fresh = FakeRecorder()  # a state that counts nothing done yet (its first save), rows stored since
    fresh.meta[STATE_KEY] = json.dumps({"v": 1, "seq": 1, "kinds": {"10m": []}, "carry": []})
    fresh.events = list(rig.rec.events)
    rig = Rig(rig.config, now=t("02:31:00"), rec=fresh, buf=rig.buf)
    rig.at(t("02:40:02"))
    assert len(fresh.bodies()) == 3, "the periods before the newest stored one count as done"


@pytest.mark.parametrize("station_type, min_valid, valid, flag", [
    ("outfall", None, 120, "N"),  # DOMAIN.md: a water 10-minute value needs 120 valid 5-second samples
    ("outfall", None, 119, "B"),
    ("river_section", None, 119, "B"),
    ("outfall", 0.75, 90, "N"),  # the technician's own share rules
    ("dust", None, 90, "N"),  # other stations: 75 %
    ("dust", None, 89, "B"),
])
def test_a_water_ten_minute_value_needs_every_five_second_sample(station_type, min_valid, valid, flag):
    devices = {"cod": {"driver": "simulated", "interval": 5, "channels": {"w01018": {"unit": "mg/L"}}}}
    section = {"minute": 10, "hour": False, "day": False} | ({"min_valid": min_valid} if min_valid else {})
    rig = Rig(make_config(section, station_type=station_type, devices=devices), now=t("01:59:00"))
    rig.feed(every("cod", "w01018", t("02:00:00"), 5, [10.0] * valid))  # the others: polls lost, no reading
    rig.at(t("02:10:02"))
    assert [(b["count"], b["flag"]) for b in rig.rec.bodies()] == [(valid, flag)]


def test_an_interval_that_does_not_divide_the_period_needs_no_more_polls_than_fit():
    devices = {"cod": {"driver": "simulated", "interval": 7, "channels": {"w01018": {"unit": "mg/L"}}}}
    rig = Rig(make_config({"minute": 10, "hour": False, "day": False}, devices=devices), now=t("01:59:00"))
    rig.feed(every("cod", "w01018", t("02:00:00"), 7, [10.0] * 85))  # 600 / 7 = 85.7: 85 or 86 polls fit
    rig.at(t("02:10:02"))
    assert [(b["count"], b["flag"]) for b in rig.rec.bodies()] == [(85, "N")]


def test_an_unreadable_state_starts_afresh(caplog):
    rec = FakeRecorder()
    rec.meta[STATE_KEY] = "{not json"
    rig = Rig(make_config({"minute": 10, "hour": False, "day": False}), now=t("02:00:00"), rec=rec)
    rig.feed(every("cod", "w01018", t("02:00:00"), 60, [10] * 10))
    rig.at(t("02:10:02"))
    assert [b["count"] for b in rig.rec.bodies()] == [10]
    assert "saved state unreadable" in caplog.text


def test_a_failing_buffer_at_start_is_logged_and_periods_restart_empty(caplog):
    rig = Rig(make_config({"minute": 10, "hour": False, "day": False}), now=t("01:59:00"))
    rig.feed(every("cod", "w01018", t("02:00:00"), 60, [10] * 5))

    def broken() -> FakeBuffer:
        raise OSError("disk I/O error")

    agg = Aggregator(rig.config, rig.rec, rig.rec.meta[STATE_KEY], broken, wall_ms=lambda: t("02:05:00"))
    assert "cannot rebuild the open periods" in caplog.text
    agg.tick()
    assert rig.rec.events == []


# --------------------------------------------------------------------------------------------------
# configuration


def test_without_an_aggregate_section_nothing_is_computed():
    rig = Rig(make_config(section=False), now=t("01:59:00"))
    rig.feed(every("cod", "w01018", t("02:00:00"), 60, [10] * 30))
    rig.at(t("03:00:02"))
    assert rig.rec.events == [] and STATE_KEY not in rig.rec.meta


def test_reconfigure_changes_the_minute_period_at_the_next_call():
    rig = Rig(make_config({"minute": 10, "hour": False, "day": False}), now=t("01:59:00"))
    rig.feed(every("cod", "w01018", t("02:00:00"), 60, [10] * 12))
    rig.at(t("02:10:02"))
    rig.agg.reconfigure(make_config({"minute": 5, "hour": False, "day": False}))
    rig.feed(every("cod", "w01018", t("02:12:00"), 60, [20] * 8))  # the open 10m period is dropped
    rig.at(t("02:20:02"))
    # The new 5m period from 02:10 has the readings of 02:10 and 02:11, stored before the reload, too.
    assert [(b["period"], b["start"], b["count"]) for b in rig.rec.bodies()] == [
        ("10m", z("02:00:00"), 10), ("5m", z("02:10:00"), 5), ("5m", z("02:15:00"), 5)]
    assert [b["avg"] for b in rig.rec.bodies("5m")] == [16.0, 20.0], "02:10 and 02:11 at 10, then 20"


def test_reconfigure_to_no_section_stops_and_forgets_the_replay_point():
    rig = Rig(make_config({"minute": 10}), now=t("01:59:00"))
    rig.feed(every("cod", "w01018", t("02:00:00"), 60, [10] * 12))
    rig.at(t("02:10:02"))
    rig.agg.reconfigure(make_config(section=False))
    rig.at(t("02:20:02"))
    state = json.loads(rig.rec.meta[STATE_KEY])
    assert state["seq"] is None and state["kinds"]["10m"] == [[t("02:00:00"), t("02:00:00")]]
    rig.feed(every("cod", "w01018", t("02:21:00"), 60, [10] * 50))
    assert len(rig.rec.events) == 1


def test_aggregate_config_keys_and_their_errors():
    config = make_config({"minute": 1, "min_valid": 0.9, "min_count": {"day": 20}, "flow": "flow.w00000",
                          "flow_weighted": ["cod.w01018"], "grace": 5})
    agg = config.aggregate
    assert (agg.min_valid.minute, agg.min_valid.hour, agg.min_valid.day) == (0.9, 0.9, 0.9)
    assert agg.min_count is not None and (agg.min_count.minute, agg.min_count.day) == (None, 20)
    assert (agg.flow, agg.flow_weighted, agg.grace) == ("flow.w00000", ["cod.w01018"], 5)
    assert make_config({}).aggregate.min_valid.hour == 0.75
    for bad, message in [({"min_valid": 1.5}, "aggregate.min_valid: must be a share above 0 and at most 1"),
                         ({"min_valid": {"hour": 0}}, "aggregate.min_valid.hour: must be greater than 0"),
                         ({"min_count": {"week": 3}}, "aggregate.min_count.week: unknown key 'week'"),
                         ({"flow": "w00000"}, "aggregate.flow: 'w00000' must be \"device.channel\""),
                         ({"grace": -1}, "aggregate.grace: must be at least 0")]:
        with pytest.raises(ConfigError) as info:
            make_config(bad)
        assert message in str(info.value), str(info.value)


def test_numbers_in_the_body_carry_no_float_noise():
    rig = Rig(make_config({"minute": 10, "hour": False, "day": False}), now=t("01:59:00"))
    rig.feed(every("cod", "w01018", t("02:00:00"), 60, [0.1, 0.2, 0.1, 0.2, 0.1, 0.2, 0.1, 0.2, 0.1, 0.2]))
    rig.at(t("02:10:02"))
    [got] = rig.rec.bodies()
    assert got["avg"] == 0.15 and not math.isnan(got["avg"])


def test_the_rounded_average_never_leaves_min_and_max():
    """A constant series with more digits than the body's average keeps: avg == min == max."""
    rig = Rig(make_config({"minute": 10, "hour": False, "day": False}), now=t("01:59:00"))
    rig.feed(every("cod", "w01018", t("02:00:00"), 60, [1.23456789012345] * 10))
    rig.at(t("02:10:02"))
    [got] = rig.rec.bodies()
    assert got["avg"] == got["min"] == got["max"] == 1.23456789012345


def test_min_and_max_carry_the_digits_the_readings_are_published_with():
    rig = Rig(make_config({"minute": 10, "hour": False, "day": False}), now=t("01:59:00"))
    rig.feed(every("cod", "w01018", t("02:00:00"), 60, [15.177000000000001, 16.2, 15.5]))
    rig.at(t("02:10:02"))
    [got] = rig.rec.bodies()
    assert (got["min"], got["max"]) == (15.177, 16.2)


DOUBLE_MAX = 1.7976931348623157e308
FLOAT_MAX_15 = 1.79769313486231e308  # the largest double the readings are published with (agent.buffer)


def test_values_near_the_double_max_give_a_finite_mean_min_and_max():
    """A misbehaving float64 instrument reads 1.5e308, or the double max itself: the sum of two such
    values overflows, and the mean was NaN (published as null with count 10); min and max of the double
    max, rounded to 15 digits, were infinity (stored as `Infinity`, which is not JSON). The statistics
    are those of the values, as finite numbers, and never above what the readings are published with."""
    config = make_config({"minute": 10, "hour": False, "day": False, "flow": "flow.w00000"}, station_type="other")
    rig = Rig(config, now=t("01:59:00"))
    rig.feed(every("cod", "w01018", t("02:00:10"), 60, [DOUBLE_MAX] * 10)
             + every("pm", "a34004", t("02:00:00"), 60, [1.5e308] * 5 + [-1.5e308] * 4 + [3.0])
             + every("cod", "w21003", t("02:00:10"), 60, [1.5e308] * 10)
             + every("flow", "w00000", t("02:00:00"), 60, [1.5e308] * 10))
    rig.at(t("02:10:02"))
    got = {b["channel"]: b for b in rig.rec.bodies()}
    for b in got.values():
        assert all(v is None or math.isfinite(v) for v in (b["avg"], b["min"], b["max"], b["cou"])), b
        json.dumps(b, allow_nan=False)
    assert (got["w01018"]["avg"], got["w01018"]["min"], got["w01018"]["max"]) == (FLOAT_MAX_15,) * 3
    assert got["a34004"]["avg"] == pytest.approx((1.5e308 + 3.0) / 10)  # 5 x 1.5e308 - 4 x 1.5e308 + 3
    assert (got["a34004"]["min"], got["a34004"]["max"]) == (-1.5e308, 1.5e308)
    # Flow-weighted with a flow of 1.5e308: sum(c q) overflows; the weighted mean of equal values is the value.
    assert got["w21003"]["avg"] == 1.5e308 and got["w00000"]["avg"] == 1.5e308


def test_periods_of_a_time_without_aggregates_are_not_computed_after_they_are_enabled_again():
    rig = Rig(make_config({"minute": 10, "hour": False, "day": False}), now=t("01:59:00"))
    rig.feed(every("cod", "w01018", t("02:00:00"), 60, [10] * 12))
    rig.at(t("02:10:02"))
    rig.agg.reconfigure(make_config(section=False))
    rig.feed(every("cod", "w01018", t("02:12:00"), 60, [10] * 59))  # up to 03:10, not aggregated
    rig.agg.reconfigure(make_config({"minute": 10, "hour": False, "day": False}))
    rig.feed(every("cod", "w01018", t("03:11:00"), 60, [20] * 4))
    rig = rig.restart()
    rig.feed(every("cod", "w01018", t("03:15:00"), 60, [20] * 5))
    rig.at(t("03:20:02"))
    # 03:10 holds the reading stored at 03:10:00 before the reload too (the fill of a re-added section)
    assert [(b["start"], b["count"]) for b in rig.rec.bodies()] == [(z("02:00:00"), 10), (z("03:10:00"), 10)]


@pytest.mark.parametrize("first", ["removed", "absent"])
def test_a_section_added_by_a_reload_fills_its_current_period_with_the_stored_readings(first):
    """As a period kind switched on does (README): the period is not computed from the part after the
    reload alone, whether the section was removed by an earlier reload or absent from the start."""
    if first == "removed":
        rig = Rig(make_config({"minute": 10, "hour": False, "day": False}), now=t("02:49:00"))
        rig.feed(every("cod", "w01018", t("02:50:00"), 60, [10] * 10))
        rig.at(t("03:00:02"))
        rig.agg.reconfigure(make_config(section=False))
    else:
        rig = Rig(make_config(section=False), now=t("02:59:00"))
    rig.feed(every("cod", "w01018", t("03:00:00"), 60, [10] * 5))
    rig.agg.reconfigure(make_config({"minute": 10, "hour": False, "day": False}))
    rig.feed(every("cod", "w01018", t("03:05:00"), 60, [20] * 5))
    rig.at(t("03:10:02"))
    assert [(b["start"], b["count"], b["avg"]) for b in rig.rec.bodies() if b["start"] == z("03:00:00")] == [
        (z("03:00:00"), 10, 15.0)]


def test_a_reload_says_the_aggregates_were_reloaded_only_when_their_section_changed(caplog):
    section = {"minute": 10, "hour": False, "day": False}
    rig = Rig(make_config(section), now=t("01:59:00"))
    with caplog.at_level(logging.INFO, logger="agent.aggregate"):
        rig.agg.reconfigure(make_config(section))
        rig.at(t("02:00:00"))
        assert "aggregates reloaded" not in caplog.text
        rig.agg.reconfigure(make_config({**section, "hour": True}))
        rig.at(t("02:00:01"))
        assert "aggregates reloaded: 10m, 1h" in caplog.text
        caplog.clear()
        rig.agg.reconfigure(make_config(section=False))
        rig.at(t("02:00:02"))
    assert "aggregates reloaded: off" in caplog.text


def test_an_analyser_read_once_an_hour_never_gets_a_period_published_twice_after_a_restart():
    """Every 10-minute period of an hourly reading lies more than two periods after the last one done: a
    range of its own. Beyond MAX_RANGES the oldest range was dropped, and the restart's replay (from the
    first reading of the open day) opened its periods again: 01:00..04:00 published a second time."""
    rig = Rig(make_config({"minute": 10, "hour": True, "day": True}), now=t("00:59:00"))
    for hour in range(1, 13):
        rig.feed(every("cod", "w01018", t(f"{hour:02d}:00:00"), 60, [10]))
        rig.at(t(f"{hour:02d}:10:02"))
    rig = rig.restart()
    rig.at(t("12:20:00"))
    starts = [(b["period"], b["start"]) for b in rig.rec.bodies()]
    assert sorted(starts) == sorted(set(starts)), "a period published twice"
    assert len(starts) == 12 + 11  # twelve 10m periods, 01:00..11:00 hours (12:00 is open)
