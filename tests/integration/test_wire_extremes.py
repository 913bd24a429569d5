"""Values at the edge of what a double holds, as instruments send them, end to end: a real Modbus TCP slave
(the project's simulated slave on loopback) serves a float64 register holding the largest finite double,
the agent runs as a real process and publishes to a real mosquitto. Such a value is a number like any
other: its alarm event goes out, and it never stops the station's other messages (audit Q: its event
held `Infinity`, which JSON cannot say, and the publisher retried that event forever, publishing
nothing else any more, also after a restart)."""

from __future__ import annotations

import json
import struct
import sys

from harness import AgentProcess, Collector, sim_config, wait_for, write_config

from drivers.sim.slave import RegisterBank, SlaveCore, TcpServer

DOUBLE_MAX = sys.float_info.max


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
