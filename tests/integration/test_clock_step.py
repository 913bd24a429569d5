"""A wall clock that steps during a run (issue 7, item 4): an agent process whose wall clock jumps back by
90 s (and is later set forward again, as NTP would correct it) keeps its seq order, raises each alarm
once on the monotonic clock and never publishes an aggregate period twice.

The wall clock of the agent process alone is moved, by the LD_PRELOAD shim of tests/clockshift.py: the
real time plus an offset in seconds read from a file; the monotonic clock is untouched, as a real step
leaves it.

The offset file also places the agent's clock 12 s before a minute boundary E at start (in the middle
of an hour, so that no hour or day period ends during the test), so that the minute [E-60, E) ends
soon. Timeline, in the agent's wall-clock time:

  E-12  start; sim0.w01018 (COD 60 > 50, delay 3 s) is raised ~3 s later; sim0.w21003 (NH3-N 8 > 5,
        delay 20 s) starts its delay
  E+2   minute [E-60, E) computed and published
  E+3   clock stepped back by 90 s to E-87: readings now fall in [E-120, E-60), a minute never computed;
        the NH3-N delay keeps running on the monotonic clock and raises about 20 s after the first value
  E-80  clock set forward to E-4 (+~76 s): [E-120, E-60) is computed at once; the readings of E-4..E
        fall in the minute already computed and are left out of it; its end, E+2, is passed again and
        it is not computed a second time
  E+5   clock set forward to E+58 (+~53 s): the minute [E, E+60), with readings from before the first
        step and from after the second, is computed at E+62, once

About 40 s in all.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path

import pytest
from clockshift import ShiftedClock
from harness import (
    AgentProcess,
    Collector,
    as_published,
    db_last_seq,
    run_cli,
    sim_config,
    wait_for,
    write_config,
)

from agent.model import parse_iso_utc_ms

LEAD_S = 12  # the agent's clock starts this long before the minute boundary E
BACK_S = -90.0  # the backward step
COD, NH3, PH = "w01018", "w21003", "w01001"
COD_DELAY_S = 3.0  # raised before the steps
NH3_DELAY_S = 20.0  # running when the clock steps back
CHANNELS = {("sim0", COD), ("sim0", NH3), ("sim0", PH)}
INTERVAL = 0.2
NEEDED = 225  # ceil(0.75 x 60 s / 0.2 s): valid values a minute needs for flag N


def station(tmp_path, broker) -> dict:
    config = sim_config(tmp_path, broker, devices=0, aggregate={"minute": 1}, alarms=[
        {"channel": f"sim0.{COD}", "above": 50, "delay": COD_DELAY_S},
        {"channel": f"sim0.{NH3}", "above": 5, "delay": NH3_DELAY_S},
        {"channel": f"sim0.{PH}", "above": 9, "below": 6},  # pH stays within: never raised
        {"channel": "sim0.*", "stale": 5},  # a reading every 0.2 s: never stale, whatever the wall clock says
    ])
    config["devices"] = {"sim0": {"driver": "simulated", "interval": INTERVAL, "channels": {
        COD: {"unit": "mg/L", "mean": 60, "amplitude": 0, "noise": 0},
        NH3: {"unit": "mg/L", "mean": 8, "amplitude": 0, "noise": 0},
        PH: {"mean": 7.2, "amplitude": 0.4, "period": 20, "noise": 0.05},
    }}}
    return config


def query(db, sql: str, *args):
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute(sql, args).fetchall()


def ts_jumps(rows: list[tuple[int, int]]) -> list[tuple[int, float]]:
    """(seq, seconds) wherever a reading's time differs from the one before it by more than 30 s."""
    return [(seq, (ts - prev) / 1000) for (_, prev), (seq, ts) in zip(rows, rows[1:], strict=False)
            if abs(ts - prev) > 30_000]


def alarm_events(collector: Collector) -> list[dict]:
    by_seq = {m["alarm"]["seq"]: m["alarm"] for m in collector.json_messages("/alarm")}
    return [by_seq[s] for s in sorted(by_seq)]


def raised(collector: Collector, channel: str) -> dict | None:
    return next((a for a in alarm_events(collector) if a["channel"] == channel and a["state"] == "raised"), None)


def aggregates(collector: Collector) -> list[dict]:
    """Aggregates received, one per seq (delivery is at-least-once), in seq order."""
    by_seq = {a["seq"]: a for m in collector.json_messages("/agg") for a in m["aggregates"]}
    return [by_seq[s] for s in sorted(by_seq)]


def minute(collector: Collector, start_s: int) -> list[dict] | None:
    """The 1m aggregates of the minute starting at `start_s`, once every channel has one."""
    found = [a for a in aggregates(collector) if a["period"] == "1m" and parse_iso_utc_ms(a["start"]) == start_s * 1000]
    return found if {(a["device"], a["channel"]) for a in found} == CHANNELS else None


def status(cfg: Path, env: dict) -> dict:
    result = run_cli("status", "-c", str(cfg), "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def first_ts(db, channel: str) -> int:
    """Time (Unix ms) of the first stored reading of sim0.<channel>."""
    return query(db, "SELECT ts_ms FROM readings WHERE device='sim0' AND channel=? ORDER BY seq LIMIT 1",
                 channel)[0][0]


def newest_ts(db) -> int:
    """Time (Unix ms) of the reading stored last."""
    rows = query(db, "SELECT ts_ms FROM readings ORDER BY seq DESC LIMIT 1")
    return rows[0][0] if rows else 0


def logged_steps(log: str) -> list[float]:
    """The wall-clock steps the agent logged, in seconds."""
    return [float(s) for s in re.findall(r"wall clock stepped by ([+-]\d+\.\d) s", log)]


@pytest.mark.timeout(120)
def test_wall_clock_steps_keep_seq_order_alarms_and_aggregates(clockshift, tmp_path, broker, collector):
    db = tmp_path / "buffer.db"
    cfg = write_config(tmp_path / "station.yaml", station(tmp_path, broker))
    clock = ShiftedClock(tmp_path / "clock-offset", clockshift)
    edge = int(time.time()) // 3600 * 3600 + 1800  # E: hh:30:00, far from any hour or day boundary
    clock.place(edge - LEAD_S)
    agent = AgentProcess(cfg, env=clock.env)

    def status_after_step() -> dict | None:
        s = status(cfg, clock.env)
        return s if s["clock"] and s["clock"]["last_step_s"] == BACK_S else None

    try:
        # Before any step: COD raised after its delay, the minute [E-60, E) computed at E+2.
        wait_for(lambda: raised(collector, f"sim0.{COD}"), 20, "the COD alarm raised")
        wait_for(lambda: minute(collector, edge - 60), LEAD_S + 20, "the minute before E")
        assert raised(collector, f"sim0.{NH3}") is None, "the NH3-N delay must still run when the clock steps"
        assert clock.now() < edge + 10, "too slow: the clock must step back soon after E"

        # The clock steps back by 90 s.
        pre_top_ts = query(db, "SELECT max(ts_ms) FROM readings")[0][0]
        clock.step(BACK_S)
        wait_for(lambda: logged_steps(agent.log()), 15, "the step in the agent's log")
        assert "wall clock stepped by -90.0 s" in agent.log()
        nh3 = wait_for(lambda: raised(collector, f"sim0.{NH3}"), NH3_DELAY_S + 15, "the NH3-N alarm raised")
        st = wait_for(status_after_step, 15, "status showing the step")
        assert st["clock"]["plausible"] is True and st["clock"]["last_step_at"] * 1000 < pre_top_ts
        assert sorted(a["id"] for a in st["alarms"]) == [f"sim0.{COD}:above", f"sim0.{NH3}:above"]
        assert st["devices"]["sim0"]["health"] == "ok", "readings stamped with the stepped clock are current"
        text = run_cli("status", "-c", str(cfg), env=clock.env)
        assert text.returncode == 0 and "last step -90.0 s" in text.stdout, text.stdout + text.stderr

        # Set forward to just before E: the minute stepped back into is computed now, and E+2 is passed again.
        forward = clock.place(edge - 4)
        wait_for(lambda: len(logged_steps(agent.log())) >= 2, 15, "the forward step in the agent's log")
        wait_for(lambda: minute(collector, edge - 120), 15, "the minute the clock stepped back into")
        wait_for(lambda: newest_ts(db) >= (edge + 5) * 1000, 20, "readings 5 s past E (E+2 passed a second time)")

        # Set forward to E+58: the minute [E, E+60) ends.
        forward2 = clock.place(edge + 58)
        wait_for(lambda: minute(collector, edge), 20, "the minute starting at E")
        wait_for(lambda: len(logged_steps(agent.log())) >= 3, 15, "the second forward step in the agent's log")
        mark = db_last_seq(db)
        wait_for(lambda: db_last_seq(db) >= mark + 30, 10, "readings after the last step")
    finally:
        assert agent.stop() == 0
    log = agent.log()
    assert "Traceback" not in log, log[-3000:]
    steps = logged_steps(log)
    assert steps[0] == BACK_S and len(steps) == 3, steps
    assert steps[1:] == [pytest.approx(forward, abs=0.15), pytest.approx(forward2, abs=0.15)], steps

    # Seq: contiguous in the buffer; the reading times jump with the clock while seq goes on.
    rows = query(db, "SELECT seq, ts_ms FROM readings ORDER BY seq")
    last = rows[-1][0]
    assert [seq for seq, _ in rows] == list(range(1, last + 1))
    jumps = ts_jumps(rows)
    assert [s for _, s in jumps] == [pytest.approx(s, abs=1) for s in steps], jumps
    back_seq = jumps[0][0]  # the first reading taken after the backward step

    # Every seq reached the collector, once and in order, with the time it was taken at.
    wait_for(lambda: len(collector.reading_seqs()) >= last, 15, f"seqs 1..{last} at the collector")
    assert collector.reading_seqs() == list(range(1, last + 1)), "seqs out of order or repeated at the collector"
    published = {r["seq"]: parse_iso_utc_ms(r["ts"]) for m in collector.json_messages("/data") for r in m["readings"]}
    assert published == dict(rows), "published times are the stored ones"
    assert published[back_seq] < pre_top_ts, "readings after the step carry the earlier, stepped time"

    # Alarms: each raised once, on the monotonic clock; nothing cleared, nothing else raised.
    events = alarm_events(collector)
    assert [(a["id"], a["state"]) for a in events] == [(f"sim0.{COD}:above", "raised"),
                                                      (f"sim0.{NH3}:above", "raised")], events
    assert query(db, "SELECT count(*) FROM alarms")[0][0] == 2
    cod_delay = (parse_iso_utc_ms(events[0]["ts"]) - first_ts(db, COD)) / 1000
    assert COD_DELAY_S - 0.5 <= cod_delay <= COD_DELAY_S + 1.5, cod_delay
    nh3_ms = parse_iso_utc_ms(nh3["ts"])
    assert nh3_ms < pre_top_ts, "the NH3-N alarm was raised after the step, on a stepped-back reading"
    # Its delay ran across the step on the monotonic clock: 20 s after its first value, on the old clock
    # (a wall-clock delay would have taken 110 s).
    nh3_delay = (nh3_ms - BACK_S * 1000 - first_ts(db, NH3)) / 1000
    assert NH3_DELAY_S - 0.5 <= nh3_delay <= NH3_DELAY_S + 1.5, nh3_delay

    # Aggregates: three minutes, each once (on the platform and in the buffer), each what its readings say.
    aggs = aggregates(collector)
    keys = [(a["device"], a["channel"], a["period"], a["start"]) for a in aggs]
    assert len(keys) == len(set(keys)), f"a period published twice: {keys}"
    stored = [json.loads(body) for (body,) in query(db, "SELECT body FROM aggregates")]
    assert sorted(keys) == sorted((b["device"], b["channel"], b["period"], b["start"]) for b in stored)
    assert {(a["period"], parse_iso_utc_ms(a["start"]) // 1000) for a in aggs} == {
        ("1m", edge - 120), ("1m", edge - 60), ("1m", edge)}, "only the three minutes (hour and day still open)"
    for agg in aggs:
        start_ms = parse_iso_utc_ms(agg["start"])
        # The minute before E was computed before the backward step: the readings stamped into it
        # afterwards (E-4..E, after the first forward step) are left out of it.
        upto = back_seq if start_ms == (edge - 60) * 1000 else last + 1
        values = [v for (v,) in query(db, "SELECT value FROM readings WHERE device=? AND channel=? AND ts_ms >= ? "
                                          "AND ts_ms < ? AND seq < ? AND value IS NOT NULL AND flag IN ('N','T')",
                                      agg["device"], agg["channel"], start_ms, start_ms + 60_000, upto)]
        where = f"{agg['device']}.{agg['channel']} {agg['start']}"
        assert agg["count"] == len(values) > 0, where
        assert (agg["min"], agg["max"]) == (as_published(min(values)), as_published(max(values))), where
        assert agg["min"] <= agg["avg"] <= agg["max"], where
        assert agg["avg"] == pytest.approx(sum(values) / len(values), rel=1e-9), where
        assert agg["flag"] == ("N" if len(values) >= NEEDED else "B"), where
    late = query(db, "SELECT count(*) FROM readings WHERE seq >= ? AND ts_ms >= ? AND ts_ms < ?", back_seq,
                 (edge - 60) * 1000, edge * 1000)[0][0]
    assert late > 0 and "is left out of it" in log, "readings stamped into the minute already computed are left out"
    spans = query(db, "SELECT min(seq) < ? AND max(seq) > ? FROM readings WHERE ts_ms >= ? AND ts_ms < ?",
                  back_seq, back_seq, edge * 1000, (edge + 60) * 1000)[0][0]
    assert spans, "the minute starting at E holds readings from before and after the steps"
