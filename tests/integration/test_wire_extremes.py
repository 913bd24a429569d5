"""Values at the edge of what a double holds, as instruments send them, end to end: a real Modbus TCP slave
(the project's simulated slave on loopback) serves a float64 register holding the largest finite double,
the agent runs as a real process and publishes to a real mosquitto. Such a value is a number like any
other: its alarm event goes out, and it never stops the station's other messages (audit Q: its event
held `Infinity`, which JSON cannot say, and the publisher retried that event forever, publishing
nothing else any more, also after a restart)."""

from __future__ import annotations

import json
import sqlite3
import struct
import sys

from clockshift import ShiftedClock
from harness import AgentProcess, Collector, sim_config, wait_for, write_config

from drivers.sim.slave import RegisterBank, SlaveCore, TcpServer

DOUBLE_MAX = sys.float_info.max
FLOAT_MAX_15 = 1.79769313486231e308  # the double max as the readings are published (agent.buffer)


def test_the_largest_double_is_published_and_stops_nothing(tmp_path, broker):
    bank = RegisterBank()
    bank.set("holding", 0, list(struct.unpack(">4H", struct.pack(">d", DOUBLE_MAX))))
    server = TcpServer(SlaveCore({1: bank}), "127.0.0.1", 0).start()
    config = sim_config(tmp_path, broker, channels=1, interval=0.3)
    config["buses"] = {"lan": {"type": "tcp", "host": "127.0.0.1", "port": server.port, "timeout": 0.5}}
    config["devices"]["big"] = {"bus": "lan", "slave": 1, "interval": 0.3,
                                "registers": [{"channel": "x", "address": 0, "type": "float64"}]}
    config["alarms"] = [{"channel": "big.x", "above": 50}]
    collector = Collector(broker, "env/#")
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    try:
        alarms = wait_for(lambda: collector.json_messages("/alarm"), 20, "the alarm event")
        assert alarms[0]["alarm"]["state"] == "raised" and alarms[0]["alarm"]["value"] == DOUBLE_MAX
        after = len(collector.reading_seqs())
        wait_for(lambda: len(collector.reading_seqs()) >= after + 20, 20, "readings going on after the event")
        for topic, payload, _ in list(collector.messages):
            if not topic.endswith("/status"):
                json.loads(payload, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
    finally:
        assert agent.stop() == 0, agent.log()[-3000:]
        collector.close()
        server.stop()
    assert "Traceback" not in agent.log() and "reading the buffer failed" not in agent.log()


def test_aggregates_of_the_largest_doubles_are_published_as_json_numbers(tmp_path, broker, clockshift):
    """A float64 instrument reading the double max (x) and 1.5e308 (y), with minute aggregates: the sum of
    two such values overflows. Their minute's avg, min and max are the values themselves (avg was null
    with count > 0; min and max of the double max were stored as `Infinity`, which made the aggregate
    queries of SQLite fail: a restart could not rebuild its open periods, an HJ 212 backfill failed)."""
    bank = RegisterBank()
    for address, value in ((0, DOUBLE_MAX), (4, 1.5e308)):
        bank.set("holding", address, list(struct.unpack(">4H", struct.pack(">d", value))))
    server = TcpServer(SlaveCore({1: bank}), "127.0.0.1", 0).start()
    config = sim_config(tmp_path, broker, channels=1, interval=0.3,
                        aggregate={"minute": 1, "hour": False, "day": False})
    config["buses"] = {"lan": {"type": "tcp", "host": "127.0.0.1", "port": server.port, "timeout": 0.5}}
    config["devices"]["big"] = {"bus": "lan", "slave": 1, "interval": 0.3,
                                "registers": [{"channel": "x", "address": 0, "type": "float64"},
                                              {"channel": "y", "address": 4, "type": "float64"}]}
    cfg = write_config(tmp_path / "station.yaml", config)
    clock = ShiftedClock(tmp_path / "clock-offset", clockshift)
    clock.lead_to_a_minute(6)
    collector = Collector(broker, "env/#")
    agent = AgentProcess(cfg, env=clock.env)
    restarted = None
    try:
        def big_aggregates() -> dict[str, dict] | None:
            found = {a["channel"]: a for m in collector.json_messages("/agg") for a in m["aggregates"]
                     if a["device"] == "big"}
            return found if set(found) == {"x", "y"} else None

        got = wait_for(big_aggregates, 30, "the minute aggregates of the big values")
        assert got["x"]["count"] > 1 and got["y"]["count"] > 1, got
        assert (got["x"]["avg"], got["x"]["min"], got["x"]["max"]) == (FLOAT_MAX_15,) * 3, got["x"]
        assert (got["y"]["avg"], got["y"]["min"], got["y"]["max"]) == (1.5e308,) * 3, got["y"]
        for topic, payload, _ in list(collector.messages):
            if not topic.endswith("/status"):
                json.loads(payload, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
        assert agent.stop() == 0, agent.log()[-3000:]
        with sqlite3.connect(f"file:{tmp_path / 'buffer.db'}?mode=ro", uri=True) as conn:
            assert conn.execute("SELECT count(*) FROM aggregates WHERE NOT json_valid(body)").fetchone() == (0,)
        restarted = AgentProcess(cfg, env=clock.env)
        wait_for(lambda: "open periods rebuilt" in restarted.log() or "cannot rebuild" in restarted.log(), 20,
                 "the restart's rebuild of its open periods")
        assert "cannot rebuild" not in restarted.log(), restarted.log()[-3000:]
    finally:
        for a in (agent, restarted):
            if a is not None:
                assert a.stop() == 0, a.log()[-3000:]
        collector.close()
        server.stop()
    assert "Traceback" not in agent.log()
