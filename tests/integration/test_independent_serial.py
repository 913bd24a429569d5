"""Serial streaming sensors from the outside: frames built byte by byte by `tests/instruments.py` (its
own PMS5003, SDS011 and HJ 212 checksums, from DOMAIN.md) are written into a pseudo-terminal, with
broken checksums, frames split across reads, noise between frames (false headers too) and intervals
without any frame; the real agent, configured by YAML only, reads them and publishes to a real
mosquitto. Checked on the data topic: each interval carries the latest intact frame sent before it,
never a value of a broken frame, and null with flag B when nothing arrived.
"""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from harness import AgentProcess, Collector, sim_config, wait_for, write_config
from instruments import PassivePms5003, SerialStreamer, hj212_packet, pms5003_frame, sds011_frame

INTERVAL = 1.0
POISON = 4444  # the value every broken frame carries: it must never be published


@pytest.fixture
def station(tmp_path, broker):
    """station(driver, **device) -> (agent, streamer): one serial device on a pty; stopped after."""
    running: list = []

    def _start(driver: str, **device) -> tuple[AgentProcess, SerialStreamer]:
        line = SerialStreamer(tmp_path / "ttyS9")
        running.append(line)
        config = sim_config(tmp_path, broker, devices=0)
        config["buses"] = {"uart": {"type": "serial", "port": line.path, "baudrate": 9600}}
        config["devices"] = {"dev": {"bus": "uart", "driver": driver, "interval": INTERVAL, **device}}
        agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
        running.append(agent)
        return agent, line

    yield _start
    for thing in reversed(running):
        if isinstance(thing, AgentProcess):
            assert thing.stop() == 0, thing.log()[-3000:]
        else:
            thing.close()


def readings(collector: Collector, channel: str) -> list[dict]:
    return [r for m in collector.json_messages("/data") for r in m.get("readings", [])
            if r["device"] == "dev" and r["channel"] == channel]


def _epoch(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def send_noisy(line: SerialStreamer, frame: bytes, rng: random.Random, header: bytes) -> None:
    """Noise (with a false header) before the frame, then the frame byte by byte or split in two reads."""
    line.send(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 6))) + header[:1])
    line.send(header + bytes(rng.randrange(256) for _ in range(3)))  # a false header, cut short
    if rng.random() < 0.5:
        for b in frame:
            line.send(bytes([b]))
    else:
        cut = rng.randrange(1, len(frame))
        line.send(frame[:cut])
        time.sleep(0.03)
        line.send(frame[cut:])


def stream(line: SerialStreamer, make, header: bytes, *, seconds: float, start_value: int,
           silence: tuple[float, float]) -> list[tuple[float, int]]:
    """Send a frame every 0.2 s for `seconds` (value start_value, +1, ...), every third one broken
    (POISON), none during `silence` (seconds from the start); returns (time sent, value) of the intact ones."""
    rng = random.Random(7)
    sent: list[tuple[float, int]] = []
    t0 = time.time()
    value, k = start_value, 0
    while (now := time.time()) - t0 < seconds:
        if not silence[0] <= now - t0 < silence[1]:
            k += 1
            if k % 3 == 0:
                send_noisy(line, make(POISON, corrupt=True), rng, header)
            else:
                send_noisy(line, make(value, corrupt=False), rng, header)
                sent.append((time.time(), value))
                value += 1
        time.sleep(0.2)
    return sent


def check_latest_of_interval(got: list[dict], sent: list[tuple[float, int]], scale: float,
                             silence_window: tuple[float, float]) -> None:
    """Every N reading is an intact frame's value, the latest one sent before its poll (give or take
    the 0.2 s between frames and the transfer); intervals inside the silence read null/B."""
    values = {v * scale: t for t, v in sent}
    normal = [r for r in got if r["flag"] == "N"]
    assert normal, got
    for r in normal:
        assert r["value"] in values, (r, "not the value of any intact frame")
        t_poll = _epoch(r["ts"])
        newer = [v for t, v in sent if values[r["value"]] < t < t_poll - 0.3]
        assert not newer, (r, "a later intact frame was sent well before this poll", newer)
    assert all(r["value"] is None for r in got if r["flag"] != "N"), got
    assert {r["flag"] for r in got} <= {"N", "B"}, got
    quiet = [r for r in got if silence_window[0] + INTERVAL + 0.3 < _epoch(r["ts"]) < silence_window[1]]
    assert quiet and all((r["value"], r["flag"]) == (None, "B") for r in quiet), quiet


def test_pms5003_frames_in_noise(station, collector):
    agent, line = station("pms5003")
    wait_for(lambda: b"\x42\x4d\xe1" in line.received, 20, "the agent's passive-mode command")

    def make(value: int, corrupt: bool) -> bytes:
        words = [value + 1, value + 2, value + 3, value + 10, value, value + 20] + [value * 2] * 6 + [0]
        return pms5003_frame(words, corrupt=corrupt)

    t0 = time.time()
    sent = stream(line, make, b"\x42\x4d", seconds=9, start_value=100, silence=(4.0, 6.5))
    wait_for(lambda: any(_epoch(r["ts"]) > t0 + 8.5 for r in readings(collector, "a34004")), 10, "the last polls")
    got = readings(collector, "a34004")
    check_latest_of_interval(got, sent, 1, (t0 + 4.0, t0 + 6.5))
    units = {r["unit"] for r in got}
    assert units == {"ug/m3"}, units
    for r in readings(collector, "a34002"):  # PM10 of the same frame
        assert r["value"] is None or r["value"] - 20 in {v for _, v in sent}, r


def test_sds011_frames_in_noise(station, collector):
    agent, line = station("sds011")

    def make(value: int, corrupt: bool) -> bytes:
        return sds011_frame(value, value + 500, corrupt=corrupt)

    t0 = time.time()
    sent = stream(line, make, b"\xaa\xc0", seconds=9, start_value=123, silence=(4.0, 6.5))
    wait_for(lambda: any(_epoch(r["ts"]) > t0 + 8.5 for r in readings(collector, "a34004")), 10, "the last polls")
    got = readings(collector, "a34004")
    # values in tenths: exact decimals on MQTT (12.3, not 12.299999)
    values = {round(v / 10, 1): t for t, v in sent}
    for r in got:
        assert r["value"] is None or r["value"] in values, r
    check_latest_of_interval(got, [(t, round(v / 10, 1)) for t, v in sent], 1, (t0 + 4.0, t0 + 6.5))
    assert {r["unit"] for r in got} == {"ug/m3"}


def _hj212_segment(data_time: datetime, cod: float, nh3n_flag: str = "N") -> str:
    stamp = data_time.strftime("%Y%m%d%H%M%S")
    return (f"QN={stamp}000;ST=32;CN=2011;PW=123456;MN=ANALYZER01;Flag=4;CP=&&DataTime={stamp};"
            f"w01018-Rtd={cod},w01018-Flag=N;w21003-Rtd=-0.5,w21003-Flag={nh3n_flag}&&")


def test_hj212_analyzer_packets_take_their_datatime(station, collector):
    """An analyzer speaking HJ 212 on RS-232: readings carry the packet's DataTime (station timezone
    Asia/Shanghai, UTC+8), its values (negative too) and flags; broken CRCs and noise are ignored; an
    interval without a packet reads null/B."""
    agent, line = station("hj212", channels={"w01018": {"unit": "mg/L"}, "w21003": {"unit": "mg/L"}})
    tz = ZoneInfo("Asia/Shanghai")
    rng = random.Random(3)
    sent: dict[str, float] = {}  # expected ts -> COD value
    start = datetime.now(tz).replace(microsecond=0)
    t0 = time.time()
    k = 0
    while time.time() - t0 < 7:
        k += 1
        data_time = start + timedelta(seconds=k)
        if 3.0 <= time.time() - t0 < 5.5:
            time.sleep(0.25)
            continue
        if k % 3 == 0:
            send_noisy(line, hj212_packet(_hj212_segment(data_time, POISON), corrupt=True), rng, b"##")
        else:
            cod = 20 + k / 10
            send_noisy(line, hj212_packet(_hj212_segment(data_time, cod, "D" if k % 4 == 0 else "N")), rng, b"##")
            utc = data_time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
            sent[utc] = cod
        time.sleep(0.25)
    wait_for(lambda: len([r for r in readings(collector, "w01018") if r["flag"] == "B"]) >= 1
             and len(readings(collector, "w01018")) >= 6, 15, "polls before, during and after the silence")
    cod = readings(collector, "w01018")
    normal = [r for r in cod if r["flag"] == "N"]
    assert normal
    for r in normal:
        assert sent.get(r["ts"]) == r["value"], (r, "expected a packet's DataTime and value")
        assert r["unit"] == "mg/L"
    assert all(r["value"] is None for r in cod if r["flag"] == "B")
    assert all(r["value"] != POISON for r in cod)
    nh3n = readings(collector, "w21003")
    assert {r["value"] for r in nh3n if r["flag"] != "B"} == {-0.5}
    assert {r["flag"] for r in nh3n} <= {"N", "D", "B"}


def test_hj212_packets_with_a_lower_case_crc_are_accepted(station, collector):
    """DOMAIN.md: the CRC is written as 4 upper-case hex digits; accept lower case when reading."""
    agent, line = station("hj212", channels={"w01018": {"unit": "mg/L"}})
    tz = ZoneInfo("Asia/Shanghai")
    start = datetime.now(tz).replace(microsecond=0)
    sent = {}
    for k in range(1, 30):
        data_time = start + timedelta(seconds=k)
        packet = hj212_packet(_hj212_segment(data_time, 30 + k / 4))
        if packet[-6:-2].isdigit():
            continue  # no letter to write in lower case
        line.send(packet[:-6] + packet[-6:-2].lower() + b"\r\n")
        sent[data_time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")] = 30 + k / 4
        if [r for r in readings(collector, "w01018") if r["flag"] == "N"]:
            break
        time.sleep(0.3)
    normal = wait_for(lambda: [r for r in readings(collector, "w01018") if r["flag"] == "N"], 5, "a reading")
    assert all(sent.get(r["ts"]) == r["value"] for r in normal), normal


# The SDS011's query command (Nova's control protocol: AA B4, command 04, twelve data bytes 00, device id
# FF FF for any sensor, checksum = sum of bytes 2..16 mod 256, AB), built here byte by byte.
SDS011_QUERY = b"\xaa\xb4\x04" + bytes(12) + b"\xff\xff" + bytes([(0x04 + 0xFF + 0xFF) & 0xFF]) + b"\xab"


def test_an_sds011_in_query_mode_is_asked_at_each_poll(station, collector):
    # An SDS011 set to query mode (a setting it keeps across power cycles; sensor libraries and tools set
    # it to spare the laser) sends nothing until asked. The driver never asked: the device read null/B
    # for ever, its status "no valid frame in the last interval". A poll without a frame since the
    # previous one now sends the query command and waits for the answer (at most the bus timeout).
    agent, line = station("sds011")
    answered: list[int] = []

    def serve_queries() -> bool:
        while line.received.count(SDS011_QUERY) > len(answered):
            answered.append(300 + len(answered))
            line.send(sds011_frame(answered[-1], answered[-1] + 500))
        return len([r for r in readings(collector, "a34004") if r["flag"] == "N"]) >= 3

    wait_for(serve_queries, 20, "three PM2.5 readings of a sensor in query mode")
    normal = [r for r in readings(collector, "a34004") if r["flag"] == "N"]
    assert {r["value"] for r in normal} <= {v / 10 for v in answered}, (normal, answered)
    assert line.received.replace(SDS011_QUERY, b"") == b"", "nothing but query commands was sent"



def test_a_streaming_sds011_is_not_taken_for_one_in_query_mode(station, collector):
    # A sensor silent at first (its fan spinning up, its cable plugged in late) is sent the query at the
    # polls without a frame. When it then starts streaming (about a frame a second) just after one, its
    # first frame was taken for the query's answer: the log said the sensor was in query mode and would
    # be asked at each poll, then at the next poll that it sent frames by itself again, and `status`
    # said query mode meanwhile. A frame that more frames follow, unasked, before the poll is no answer.
    import threading

    stop = threading.Event()
    agent, line = station("sds011", interval=3)
    wait_for(lambda: SDS011_QUERY in line.received, 20, "a query at a poll without a frame")

    def stream_like_a_sensor() -> None:
        value = 200
        while not stop.is_set():
            line.send(sds011_frame(value, value + 500))
            value += 1
            stop.wait(0.5)

    sensor = threading.Thread(target=stream_like_a_sensor, daemon=True)
    sensor.start()
    try:
        wait_for(lambda: len([r for r in readings(collector, "a34004") if r["flag"] == "N"]) >= 3, 30,
                 "three PM2.5 readings of a streaming sensor")
        sent = len(line.received)
    finally:
        stop.set()
        sensor.join(5)
    assert "query mode" not in agent.log(), agent.log()[-3000:]
    assert line.received[sent:] == b"", "nothing is sent to a streaming sensor"


def test_one_broken_answer_of_a_pms5003_in_passive_mode_costs_one_interval_not_two(tmp_path, broker, collector):
    """The agent puts a PMS5003 in passive mode and asks it for a frame at each poll. One answer broken
    on the line (bad checksum) leaves its interval without a valid frame: null/B for that poll. The
    sensor answers the next read command as always, so the next poll reads its frame: a healthy sensor
    that answered within milliseconds must not read as a communication failure."""
    sensor = PassivePms5003(tmp_path / "ttyPMS", corrupt={3})
    config = sim_config(tmp_path, broker, devices=0)
    config["buses"] = {"uart": {"type": "serial", "port": sensor.path, "baudrate": 9600}}
    config["devices"] = {"dev": {"bus": "uart", "driver": "pms5003", "interval": INTERVAL}}
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    try:
        wait_for(lambda: any((r["value"] or 0) >= 6 for r in readings(collector, "a34004")), 30,
                 "the sixth frame asked for")
        got = readings(collector, "a34004")
        assert all(r["value"] is None for r in got if r["flag"] != "N"), got
        flags = [r["flag"] for r in got]
        first = flags.index("N")
        assert flags[first:].count("B") == 1, f"one broken answer, one interval null/B: {got}"
        asked = [int(r["value"]) for r in got if r["flag"] == "N"]
        assert asked == [v for v in range(asked[0], asked[-1] + 1) if v != 3], "each poll reads the frame it asked for"
    finally:
        assert agent.stop() == 0, agent.log()[-3000:]
        sensor.close()
