"""Period statistics end to end: simulated devices -> agent process -> SQLite -> real mosquitto.

Two stations run side by side against one broker, so that a single minute boundary proves both paths:
LIVE0001 runs across the boundary and computes the minute at its end (+ 2 s grace); DOWN0001 is stopped
before the boundary and started again after it, and computes the minute that ended while it was down,
once, from the readings it had stored. Every aggregate is checked against the readings in the station's
own buffer: SPEC §4 keys, count of valid values, min, max, mean, flag, and the flow volume.

Both agents' wall clock (tests/clockshift.py, one offset for both) starts LEAD_S before a minute boundary,
so that DOWN0001 is stopped late in that minute and the test waits about 25 s for its end, not up to 80 s.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time

import pytest
from clockshift import ShiftedClock
from harness import AgentProcess, Collector, as_published, db_last_seq, sim_config, wait_for, write_config

KEYS = ["seq", "device", "channel", "period", "start", "avg", "min", "max", "cou", "count", "flag"]
ISO_MINUTE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:00\.000Z")
CHANNELS = {("sim0", "c00"), ("sim0", "c01"), ("flow", "w00000")}
INTERVAL = 0.5
NEEDED = 90  # ceil(0.75 x 60 s / 0.5 s): valid values a minute needs for flag N
CAP_MS = 1000  # a flow value holds for at most 2 device intervals
LEAD_S = 25  # the agents' clock starts this long before a minute boundary: DOWN0001 is stopped ~20 s before it


def station(tmp_path, broker, station_id: str):
    """A station with a two-channel simulated analyzer (5 % failed polls) and a flow meter at 10 L/s."""
    home = tmp_path / station_id
    home.mkdir()
    config = sim_config(home, broker, station_id=station_id, channels=2, interval=INTERVAL,
                        aggregate={"minute": 1})
    config["devices"]["sim0"]["dropout"] = 0.05
    config["devices"]["flow"] = {"driver": "simulated", "interval": INTERVAL,
                                 "channels": {"w00000": {"unit": "L/s", "mean": 10, "amplitude": 0, "noise": 0}}}
    return write_config(home / "station.yaml", config), home / "buffer.db"


def query(db, sql: str, *args):
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute(sql, args).fetchall()


def minute_aggregates(collector: Collector, station_id: str, start: str) -> list[dict] | None:
    """The 1m aggregates of `start` received for the station (one per seq), once every channel has one."""
    by_seq = {a["seq"]: a for m in collector.json_messages("/agg") if m.get("station") == station_id
              for a in m["aggregates"] if a["period"] == "1m" and a["start"] == start}
    found = list(by_seq.values())
    return found if {(a["device"], a["channel"]) for a in found} == CHANNELS else None


def check_against_buffer(agg: dict, db, start_ms: int) -> None:
    """The aggregate is what the readings stored in the buffer for that minute say it must be."""
    end_ms = start_ms + 60_000
    assert list(agg) == KEYS
    assert ISO_MINUTE.fullmatch(agg["start"]) and agg["period"] == "1m"
    rows = query(db, "SELECT ts_ms, value, flag FROM readings WHERE device=? AND channel=? AND ts_ms >= ? "
                     "AND ts_ms < ? ORDER BY ts_ms", agg["device"], agg["channel"], start_ms, end_ms)
    valid = [(ts, v) for ts, v, flag in rows if v is not None and flag in ("N", "T")]
    values = [v for _, v in valid]
    where = f"{agg['device']}.{agg['channel']} {agg['start']}"
    assert agg["count"] == len(values) > 0, where
    assert (agg["min"], agg["max"]) == (as_published(min(values)), as_published(max(values))), where
    assert agg["min"] <= agg["avg"] <= agg["max"], where
    assert agg["avg"] == pytest.approx(sum(values) / len(values), rel=1e-9), where
    assert agg["flag"] == ("N" if len(values) >= NEEDED else "B"), where
    if agg["channel"] != "w00000":
        assert agg["cou"] is None, where
        return
    # Volume: each value holds until the next (at most CAP_MS), the value before the minute holds into it.
    before = query(db, "SELECT ts_ms, value FROM readings WHERE device=? AND channel=? AND ts_ms < ? AND value "
                       "IS NOT NULL ORDER BY ts_ms DESC LIMIT 1", agg["device"], agg["channel"], start_ms)
    litres_ms = 0.0
    if before:
        litres_ms += before[0][1] * max(0, min(valid[0][0], before[0][0] + CAP_MS) - start_ms)
    for (ts, v), (nxt, _) in zip(valid, valid[1:], strict=False):
        litres_ms += v * min(nxt - ts, CAP_MS)
    last_ts, last_v = valid[-1]
    litres_ms += last_v * (min(end_ms, last_ts + CAP_MS) - last_ts)
    assert agg["cou"] == pytest.approx(litres_ms / 1000 / 1000, rel=1e-9), where


def stored_aggregates(db, start: str) -> list[tuple[str, str]]:
    rows = query(db, "SELECT body FROM aggregates")
    found = []
    for (body,) in rows:
        b = json.loads(body)
        if b["period"] == "1m" and b["start"] == start:
            found.append((b["device"], b["channel"]))
    return found


@pytest.mark.timeout(150)
def test_minute_aggregates_arrive_live_and_after_a_restart_once(tmp_path, broker, collector, clockshift):
    live_cfg, live_db = station(tmp_path, broker, "LIVE0001")
    down_cfg, down_db = station(tmp_path, broker, "DOWN0001")
    clock = ShiftedClock(tmp_path / "clock-offset", clockshift)
    clock.lead_to_a_minute(LEAD_S)
    live = AgentProcess(live_cfg, env=clock.env)
    down = AgentProcess(down_cfg, env=clock.env)
    try:
        wait_for(lambda: db_last_seq(down_db) >= 20, 20, "DOWN0001 stores readings")
        # Stop DOWN0001 well before the end of the minute, so that the minute ends while it is down.
        wait_for(lambda: 5 <= clock.now() % 60 < 45, 25, "a moment 5 to 45 s into a minute")
        assert down.stop() == 0
        last_ms = query(down_db, "SELECT max(ts_ms) FROM readings")[0][0]
        start_ms = last_ms // 60_000 * 60_000
        assert clock.now() * 1000 < start_ms + 60_000, "stopped within the minute of its last reading"
        start = time.strftime("%Y-%m-%dT%H:%M:00.000Z", time.gmtime(start_ms / 1000))
        assert stored_aggregates(down_db, start) == [], "not computed before the minute ended"

        # Back once the minute and its 2 s grace are over: the minute ended while the agent was down.
        wait_for(lambda: clock.now() * 1000 >= start_ms + 60_000 + 3000, 70, "the minute (and its grace) to end")
        down = AgentProcess(down_cfg, env=clock.env)

        # DOWN0001: the minute that ended while it was down, computed at start from its stored readings.
        for agg in wait_for(lambda: minute_aggregates(collector, "DOWN0001", start), 30, "DOWN0001's minute"):
            check_against_buffer(agg, down_db, start_ms)
        # LIVE0001: the same minute, computed by the running agent at its end.
        for agg in wait_for(lambda: minute_aggregates(collector, "LIVE0001", start), 30, "LIVE0001's minute"):
            check_against_buffer(agg, live_db, start_ms)

        rebuilt = re.search(r"(\d+) of them ended while the agent was down", down.log())
        assert rebuilt and int(rebuilt.group(1)) >= 1, down.log()

        # Restarting again does not compute that minute a second time.
        assert down.stop() == 0
        mark = db_last_seq(down_db)
        down = AgentProcess(down_cfg, env=clock.env)
        wait_for(lambda: db_last_seq(down_db) >= mark + 30, 20, "readings after the second restart")
        assert sorted(stored_aggregates(down_db, start)) == sorted(CHANNELS)
        assert len(minute_aggregates(collector, "DOWN0001", start) or []) == len(CHANNELS)
        assert "aggregates:" in down.log() and "Traceback" not in down.log() + live.log()
    finally:
        assert down.stop() == 0
        assert live.stop() == 0
