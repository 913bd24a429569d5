"""Serial instruments end to end: a simulated PMS5003, SDS011 or HJ 212 analyzer writes real frames
(with garbage, split frames and bad checksums mixed in) into a pseudo-terminal owned by the test; the
agent runs as a real process with a `type: serial` bus whose `port` is a symlink to the pty's slave
end, and publishes to a real mosquitto. Checked on the data topic: values are exactly those of frames
the instrument sent intact (never a poison value of a corrupted frame), a sensor that goes silent
gives value null with flag B each interval and recovers, HJ 212 readings carry the packet's DataTime.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime

import pytest
from harness import AgentProcess, Collector, sim_config, wait_for, write_config

from agent.model import parse_iso_utc_ms
from drivers.serial_frames import PMS5003_CHANNELS, PMS5003_CMD_READ
from drivers.sim.serial_sim import (
    HJ212_POISON,
    PMS5003_POISON,
    SDS011_POISON,
    Hj212Sim,
    Instrument,
    Pms5003Sim,
    Sds011Sim,
    SerialSim,
)

INTERVAL = 0.5
NOISE = {"garbage": 0.3, "split": 0.3, "bad_checksum": 0.3}


@pytest.fixture
def start(tmp_path, broker):
    """start(instrument, driver) -> (agent, sim): the simulator on a pty behind tmp_path/ttySIM and the
    agent configured with one serial device on it. Both are stopped at the end of the test."""
    running: list = []

    def _start(instrument: Instrument, driver: str) -> tuple[AgentProcess, SerialSim]:
        sim = SerialSim([instrument], tmp_path / "ttySIM", name=f"sim-{driver}")
        sim.start()
        running.append(sim)
        config = sim_config(tmp_path, broker, devices=0)
        config["buses"] = {"uart": {"type": "serial", "port": sim.path, "baudrate": 9600, "timeout": 0.3}}
        config["devices"] = {"dev": {"bus": "uart", "driver": driver, "interval": INTERVAL}}
        agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
        running.append(agent)
        return agent, sim

    yield _start
    for thing in reversed(running):
        if isinstance(thing, AgentProcess):
            assert thing.stop() == 0, thing.log()[-3000:]
        else:
            thing.close()


def readings(collector: Collector, channel: str | None = None) -> list[dict]:
    return [r for m in collector.json_messages("/data") for r in m.get("readings", [])
            if r["device"] == "dev" and (channel is None or r["channel"] == channel)]


def polls(collector: Collector) -> dict[str, dict[str, dict]]:
    """Readings grouped by poll (same ts), in arrival order: {ts: {channel: reading}}."""
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in readings(collector):
        out[r["ts"]][r["channel"]] = r
    return out


def silence_and_recover(collector: Collector, instrument: Instrument, channel: str) -> None:
    """The instrument goes silent: null/B readings each interval; then it speaks again."""
    start = len(readings(collector, channel))
    instrument.silent = True

    def nulls() -> list[dict]:
        return [r for r in readings(collector, channel)[start:] if r["value"] is None and r["flag"] == "B"]

    wait_for(lambda: len(nulls()) >= 3, 15, "three null/B readings of the silent sensor")
    instrument.silent = False
    silent_end = len(readings(collector, channel))
    wait_for(lambda: any(r["value"] is not None for r in readings(collector, channel)[silent_end:]), 15,
             "a valid reading after the sensor came back")
    after = readings(collector, channel)[start:]
    gaps = [i for i, r in enumerate(after) if r["value"] is None and r["flag"] == "B"]
    assert all(r["value"] is None and r["flag"] == "B" for r in after[gaps[0] : gaps[-1] + 1]), \
        "one null/B reading per interval while silent, nothing else"
    assert any(r["value"] is not None for r in after[gaps[-1] + 1 :]), "valid readings after the silence"


def test_pms5003_end_to_end_in_passive_mode_with_noise_and_silence(start, collector):
    sensor = Pms5003Sim(period=0.25, seed=11, **NOISE)
    agent, _ = start(sensor, "pms5003")
    wait_for(lambda: len([r for r in readings(collector, "a34004") if r["value"] is not None]) >= 6
             and sensor.poisoned >= 3, 20, "six PM2.5 readings, three corrupted frames sent")
    assert sensor.mode == "passive", "the agent put the sensor in passive mode"
    assert sum(1 for cmd, _ in sensor.commands if cmd == PMS5003_CMD_READ) >= 3
    silence_and_recover(collector, sensor, "a34004")

    sent = [{ch: v for ch, v in frame.items()} for frame in sensor.sent]
    valid = 0
    for ts, poll in polls(collector).items():
        assert set(poll) == set(PMS5003_CHANNELS), f"one reading per channel at {ts}"
        values = {ch: r["value"] for ch, r in poll.items()}
        if values["a34004"] is None:
            assert all(v is None for v in values.values()) and {r["flag"] for r in poll.values()} == {"B"}
            continue
        valid += 1
        assert values in sent, f"a poll's values are exactly one intact frame: {values}"
        assert {r["flag"] for r in poll.values()} == {"N"}
        assert poll["a34004"]["unit"] == "ug/m3" and poll["n0_3"]["unit"] == "count/0.1L"
    assert valid >= 6
    assert all(r["value"] != PMS5003_POISON for r in readings(collector))
    log = agent.log()
    assert "answered the passive-mode command" in log
    assert log.count("frame(s) rejected") == 1, "rejects are logged at most once a minute"


def test_sds011_end_to_end_with_noise_and_silence(start, collector):
    sensor = Sds011Sim(period=0.2, seed=12, **NOISE)
    agent, _ = start(sensor, "sds011")
    wait_for(lambda: len([r for r in readings(collector, "a34002") if r["value"] is not None]) >= 5
             and sensor.poisoned >= 3, 20, "five PM10 readings, three corrupted frames sent")
    silence_and_recover(collector, sensor, "a34004")
    for poll in polls(collector).values():
        assert set(poll) == {"a34004", "a34002"}
        values = {ch: r["value"] for ch, r in poll.items()}
        if values["a34004"] is not None:
            assert values in sensor.sent, f"exactly one intact frame: {values}"
            assert poll["a34004"]["flag"] == "N" and poll["a34004"]["unit"] == "ug/m3"
        else:
            assert values["a34002"] is None and poll["a34002"]["flag"] == "B"
    assert all(r["value"] != SDS011_POISON for r in readings(collector))
    assert "reopening it when it comes back" not in agent.log(), "the port stayed up"


def test_hj212_analyzer_end_to_end_readings_take_the_packets_datatime(start, collector):
    analyzer = Hj212Sim(period=0.2, seed=13, answer=True, fault_every=4, **NOISE)
    agent, _ = start(analyzer, "hj212")
    wait_for(lambda: len([r for r in readings(collector, "w21003") if r["value"] is not None]) >= 8, 20,
             "eight NH3-N readings")
    wait_for(lambda: any(r["flag"] == "D" for r in readings(collector, "w01018"))
             and any(r["flag"] == "T" for r in readings(collector, "w21003")) and analyzer.poisoned >= 3, 20,
             "a COD fault flag, an NH3-N over-range flag, three corrupted packets sent")
    assert analyzer.acks >= 3, "packets asking for an answer were acknowledged (CN 9014)"
    silence_and_recover(collector, analyzer, "w01018")

    # Every (time, value, flag) stored is one the analyzer sent intact, the time being its DataTime.
    sent: dict[str, set] = defaultdict(set)
    for data_time, items in analyzer.sent:
        local = datetime.strptime(data_time, "%Y%m%d%H%M%S").replace(tzinfo=analyzer.tz)
        ts_ms = int(local.timestamp() * 1000)
        for code, (value, flag) in items.items():
            sent[code].add((ts_ms, value, flag))
    got = readings(collector)
    assert {r["channel"] for r in got} == {"w01018", "w21003"}
    for r in got:
        if r["flag"] == "B":
            assert r["value"] is None
            continue
        assert (parse_iso_utc_ms(r["ts"]), r["value"], r["flag"]) in sent[r["channel"]], r
        assert r["unit"] == "mg/L"
    assert {r["flag"] for r in readings(collector, "w21003")} >= {"N", "T"}
    assert all(r["value"] != HJ212_POISON for r in got)
    assert agent.log().count("frame(s) rejected") == 1


def test_a_silent_hj212_analyzer_reads_null_b_for_its_known_and_declared_channels(tmp_path, broker, collector):
    """Its channels are learnt from its packets: after a restart the channels stored before, and from
    the first start those the config declares, read null/B while it sends nothing (SPEC §2)."""
    analyzer = Hj212Sim(period=0.2, seed=5)
    sim = SerialSim([analyzer], tmp_path / "ttySIM", name="sim-hj212")
    sim.start()
    config = sim_config(tmp_path, broker, devices=0)
    config["buses"] = {"uart": {"type": "serial", "port": sim.path, "baudrate": 9600, "timeout": 0.3}}
    config["devices"] = {"dev": {"bus": "uart", "driver": "hj212", "interval": INTERVAL,
                                 "channels": {"w00000": {"unit": "L/s"}}}}
    cfg = write_config(tmp_path / "station.yaml", config)
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: {r["channel"] for r in readings(collector) if r["value"] is not None}
                 >= {"w01018", "w21003"}, 20, "readings of both channels the analyzer sends")
        declared = readings(collector, "w00000")
        assert declared and all((r["value"], r["flag"], r["unit"]) == (None, "B", "L/s") for r in declared), \
            "a declared channel the analyzer does not send reads null/B, with its unit"
        assert agent.stop() == 0
        analyzer.silent = True
        before = len(readings(collector))
        agent = AgentProcess(cfg)
        wait_for(lambda: len({r["ts"] for r in readings(collector)[before:]}) >= 3, 20,
                 "three polls of the silent analyzer after the restart")
    finally:
        assert agent.stop() == 0
        sim.close()
    after = readings(collector)[before:]
    assert {r["channel"] for r in after} == {"w00000", "w01018", "w21003"}
    assert all(r["value"] is None and r["flag"] == "B" for r in after)
    assert {r["unit"] for r in after if r["channel"] != "w00000"} == {"mg/L"}
