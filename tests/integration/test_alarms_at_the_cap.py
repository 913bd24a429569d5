"""Alarm events under the buffer's size cap (SPEC §3): while the broker is away and the cap drops the
oldest unpublished readings, the alarm events are kept, and once the broker is back every one of them is
published, QoS 1, in seq order, raised and cleared in turn. A real agent process, a real mosquitto with
persistence (a platform's persistent session receives what the broker acknowledged), a real SQLite file."""

from __future__ import annotations

import json
import sqlite3

from harness import AgentProcess, Broker, Collector, sim_config, wait_for, write_config

ALARM_ID = "flap.x:above"


def stored_alarm_seqs(path) -> list[int]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return [r[0] for r in db.execute("SELECT seq FROM alarms ORDER BY seq")]


def test_alarm_events_survive_the_cap_during_an_outage_and_arrive_in_order_once_each(tmp_path):
    broker = Broker(tmp_path / "broker", persistence=True).start()
    collector = Collector(broker, "env/#", persistent=True)
    config = sim_config(tmp_path, broker, channels=80, interval=0.1,  # 800 readings/s: the cap soon
                        storage={"max_mb": 0.5, "commit_interval_ms": 100},
                        alarms=[{"channel": ALARM_ID.split(":")[0], "above": 50}])
    # A channel that crosses its limit every second or so: an alarm raised and cleared over and over.
    config["devices"]["flap"] = {"driver": "simulated", "interval": 0.2,
                                 "channels": {"x": {"unit": "mg/L", "mean": 50, "amplitude": 30, "period": 2,
                                                    "noise": 0}}}
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    try:
        alarms = lambda: [m["alarm"] for m in collector.json_messages("/alarm")]  # noqa: E731
        wait_for(lambda: len(alarms()) >= 2, 30, "the first alarm events published")
        broker.stop()
        wait_for(lambda: "gap recorded" in agent.log(), 120, "eviction of unpublished readings")
        during = stored_alarm_seqs(tmp_path / "buffer.db")
        wait_for(lambda: len(stored_alarm_seqs(tmp_path / "buffer.db")) > len(during) + 4, 60,
                 "more alarm events stored at the cap")
        broker.start()
        assert agent.stop() == 0
        stored = stored_alarm_seqs(tmp_path / "buffer.db")
        # Every event stored while offline is still there (no published one may go: none is published).
        first_unsent = min(s for s in stored if s > max(a["seq"] for a in alarms()[:2]))
        assert stored[stored.index(first_unsent):] == list(range(first_unsent, stored[-1] + 1))
        agent = AgentProcess(write_config(tmp_path / "station.yaml", {**config, "alarms": []}))
        wait_for(lambda: {a["seq"] for a in alarms()} >= set(range(1, stored[-1] + 1)), 60,
                 "every alarm event delivered")
    finally:
        agent.stop()
        collector.close()
        broker.stop()
    seen: list[int] = []
    for a in alarms():
        if a["seq"] not in seen:
            seen.append(a["seq"])
    assert seen[: stored[-1]] == list(range(1, stored[-1] + 1)), "first arrivals in seq order"
    events = {a["seq"]: a for a in alarms()}
    states = [events[s]["state"] for s in range(1, stored[-1] + 1) if events[s]["id"] == ALARM_ID]
    assert states == ["raised", "cleared"] * (len(states) // 2) + ["raised"] * (len(states) % 2), states
    assert all(json.dumps(a) for a in alarms())
