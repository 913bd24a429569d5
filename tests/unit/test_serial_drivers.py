"""The serial drivers (drivers.serial_drivers) over real pseudo-terminals: the latest valid frame of an
interval, flag B when a sensor is silent, noise that never yields a corrupted value, rate-limited
reject logs, PMS5003 passive mode, HJ 212 packets stamped with their DataTime, and a port that
vanishes and comes back. The instruments are written to the pty master by the test (or by the
simulators of drivers.sim.serial_sim); the drivers open the slave end like a real serial port."""

from __future__ import annotations

import logging
import os
import random
import select
import time
import tty
from collections.abc import Iterator
from datetime import UTC, datetime
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pytest
import serial
from harness import as_another_user, wait_for
from hj212_strict import build as strict_build

from agent import hj212
from agent.config import parse_config
from drivers import serial_drivers
from drivers.serial_drivers import (
    Hj212Driver,
    Pms5003Driver,
    Sds011Driver,
    SerialLine,
    StreamDriver,
    build_bus_drivers,
)
from drivers.serial_frames import (
    PMS5003_CHANNELS,
    PMS5003_CMD_READ,
    PMS5003_UNITS,
    encode_pms5003,
    encode_sds011,
)
from drivers.sim.serial_sim import (
    HJ212_POISON,
    PMS5003_POISON,
    SDS011_POISON,
    Hj212Sim,
    Pms5003Sim,
    Sds011Sim,
    SerialSim,
)

LOGGER = "drivers.serial_drivers"


class Pty:
    """A raw pty pair: the test writes the instrument's bytes to `master`, the driver opens `path`."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.master, view)
            view = view[n:]

    def read_available(self, timeout: float = 0.0) -> bytes:
        out = b""
        while select.select([self.master], [], [], timeout)[0]:
            out += os.read(self.master, 4096)
            timeout = 0.0
        return out

    def close(self) -> None:
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def pty() -> Iterator[Pty]:
    p = Pty()
    yield p
    p.close()


@pytest.fixture
def built() -> Iterator[list]:
    """Drivers to close at the end of the test (their serial line thread stops with the last one)."""
    drivers: list = []
    yield drivers
    for d in drivers:
        d.close()


def build(built: list, port: str, devices: dict[str, tuple[str, float]], **kwargs) -> list:
    bus = SimpleNamespace(type="serial", port=port, baudrate=9600, parity="N", bytesize=8, stopbits=1, timeout=0.5)
    devs = {dev_id: SimpleNamespace(driver=drv, interval=interval) for dev_id, (drv, interval) in devices.items()}
    drivers = build_bus_drivers("line", bus, devs, **kwargs)
    built.extend(drivers)
    return drivers


def wait_open(driver) -> None:
    wait_for(lambda: driver.line.is_open, 5, "serial port open")


def pms_values(n: int) -> dict[str, float]:
    return {ch: float(n * 10 + k) for k, ch in enumerate(PMS5003_CHANNELS)}


def by_channel(readings) -> dict:
    return {r.channel: r for r in readings}


# --------------------------------------------------------------------------------------------------
# PMS5003 / SDS011 streaming
# --------------------------------------------------------------------------------------------------


def test_latest_frame_of_the_interval_becomes_one_reading_per_channel(pty, built):
    (pm,) = build(built, pty.path, {"pm": ("pms5003", 10)})
    wait_open(pm)
    for n in (1, 2, 3):
        pty.write(encode_pms5003(pms_values(n)))
    wait_for(lambda: pm.frames >= 3, 5, "three frames")
    readings = pm.poll(1_795_000_000_000)
    assert [r.channel for r in readings] == list(PMS5003_CHANNELS)
    assert all(r.device == "pm" and r.ts_ms == 1_795_000_000_000 and r.flag == "N" for r in readings)
    assert {r.channel: r.value for r in readings} == pms_values(3)
    assert {r.channel: r.unit for r in readings} == PMS5003_UNITS
    assert by_channel(readings)["a34004"].unit == "ug/m3" and by_channel(readings)["n0_3"].unit == "count/0.1L"


def test_a_silent_sensor_gives_null_flag_b_each_interval_and_recovers(pty, built):
    (pm,) = build(built, pty.path, {"pm": ("sds011", 10)})
    wait_open(pm)
    assert pm.poll(500) == [], "the poll at start-up closes no interval: nothing to report yet"
    for _ in range(2):
        readings = pm.poll(1000)
        assert [(r.channel, r.value, r.flag) for r in readings] == [("a34004", None, "B"), ("a34002", None, "B")]
    assert pm.problem == "no valid frame in the last interval", "what status shows beside `failing`"
    pty.write(encode_sds011(12.3, 45.6))
    wait_for(lambda: pm.frames >= 1, 5, "a frame")
    assert [(r.value, r.flag) for r in pm.poll(2000)] == [(12.3, "N"), (45.6, "N")]
    assert pm.problem is None
    # The frame is reported once: a silent sensor never looks alive through a repeated old value.
    assert [(r.value, r.flag) for r in pm.poll(3000)] == [(None, "B"), (None, "B")]


def test_a_sensor_that_stays_silent_is_logged_once_then_reminded_of_with_the_count(pty, built, caplog,
                                                                                   monkeypatch):
    caplog.set_level(logging.INFO, LOGGER)
    (pm,) = build(built, pty.path, {"pm": ("sds011", 10)})
    wait_open(pm)
    pm.poll(0)  # start-up
    for ts in range(1, 4):
        pm.poll(ts)
    monkeypatch.setattr(serial_drivers, "STILL_SILENT_EVERY_S", 0.0)
    pm.poll(4)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("device pm")]
    assert lines == ["device pm: no valid frame in the last interval; value null, flag B until it sends again",
                     "device pm: still no valid frame, 4 polls in a row"]


def test_noise_splits_and_bad_checksums_never_produce_a_corrupted_value(pty, built):
    (pm,) = build(built, pty.path, {"pm": ("sds011", 10)})
    wait_open(pm)
    rng = random.Random(7)
    good: list[tuple[float, float]] = []
    seen: list[tuple[float, float]] = []
    for n in range(40):
        stream = bytearray(rng.randbytes(rng.randint(0, 30)))
        if rng.random() < 0.5:
            bad = bytearray(encode_sds011(SDS011_POISON, SDS011_POISON))
            bad[rng.choice([8, 9])] ^= 0x01  # bad checksum or tail
            stream += bad
        if rng.random() < 0.3:
            stream += b"\xaa\xc0"  # a false header right before the real frame
        value = (round(1 + n * 0.7, 1), round(100 + n * 1.3, 1))
        good.append(value)
        stream += encode_sds011(*value)
        frames_before = pm.frames
        cut = sorted(rng.sample(range(1, len(stream)), 2))
        for piece in (stream[: cut[0]], stream[cut[0] : cut[1]], stream[cut[1] :]):
            pty.write(bytes(piece))
        wait_for(lambda b=frames_before: pm.frames > b, 5, f"frame {n}", interval=0.002)
        readings = pm.poll(n)
        seen.append((readings[0].value, readings[1].value))
    assert seen == good, "every poll got exactly the good frame written in its interval"
    assert pm.reader.rejected > 0


def test_rejected_frames_are_logged_at_most_once_per_period_with_counts(pty, built, caplog):
    caplog.set_level(logging.INFO, LOGGER)
    (pm,) = build(built, pty.path, {"pm": ("pms5003", 10)}, reject_log_every=60)
    wait_open(pm)
    for n in range(3):
        bad = bytearray(encode_pms5003(pms_values(1)))
        bad[-1] ^= 0xFF
        pty.write(bytes(bad) + encode_pms5003(pms_values(2)))
        wait_for(lambda n=n: pm.reader.bad_checksum >= n + 1 and pm.frames >= n + 1, 5, "bad and good frames")
        pm.poll(n)
    lines = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "device pm: 1 frame(s) rejected (bad checksum 1)" in lines[0]
    assert pm.stats()["bad_checksum"] == 3

    # With a short period the next line carries everything counted since the previous one.
    pm._rejects.every = 0.0
    pm.poll(10)
    lines = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(lines) == 2 and "2 frame(s) rejected (bad checksum 2)" in lines[1], lines


# --------------------------------------------------------------------------------------------------
# PMS5003 passive mode
# --------------------------------------------------------------------------------------------------


def test_pms5003_that_answers_the_mode_command_is_read_on_demand(tmp_path, built):
    sensor = Pms5003Sim(period=3600)  # active mode would stream one frame an hour: only reads help
    sim = SerialSim([sensor], tmp_path / "ttyPMS")
    sim.start()
    try:
        (pm,) = build(built, sim.path, {"pm": ("pms5003", 2.0)})
        wait_for(lambda: sensor.mode == "passive", 5, "the passive-mode command")
        wait_for(lambda: pm.poll(0) and pm.passive, 5, "the sensor's answer to the mode command")
        for _ in range(3):
            readings = pm.poll(1)
            assert {r.channel: r.value for r in readings} == sensor.sent[-1], "the frame asked for in this poll"
            assert all(r.flag == "N" for r in readings)
        assert sum(1 for cmd, _ in sensor.commands if cmd == PMS5003_CMD_READ) >= 3
        # The sensor stops answering: flag B, and the mode command is sent again; then it answers again.
        sensor.silent = True
        mode_commands = pm.stats()["mode_commands"]
        assert all(r.value is None and r.flag == "B" for r in pm.poll(2))
        assert pm.stats()["mode_commands"] == mode_commands + 1
        sensor.silent = False
        wait_for(lambda: pm.poll(3)[4].value is not None, 10, "readings again")
        # Passive again at a poll after the sensor's answer to the mode command, which may come after
        # the frame that gave those readings (it did on a busy machine): the polls go on meanwhile.
        wait_for(lambda: pm.poll(4) and pm.passive, 5, "passive mode again")
    finally:
        sim.close()


def test_pms5003_that_ignores_commands_is_read_from_its_stream(tmp_path, built):
    sensor = Pms5003Sim(passive_support=False, period=0.05)
    sim = SerialSim([sensor], tmp_path / "ttyPMS")
    sim.start()
    try:
        (pm,) = build(built, sim.path, {"pm": ("pms5003", 10)})
        wait_for(lambda: pm.frames >= 3, 5, "streamed frames")
        readings = pm.poll(0)
        assert all(r.flag == "N" for r in readings)
        assert {r.channel: r.value for r in readings} in sensor.sent
        assert not pm.passive and pm.stats()["mode_commands"] >= 1
    finally:
        sim.close()


# --------------------------------------------------------------------------------------------------
# HJ 212
# --------------------------------------------------------------------------------------------------


def packet_frame(data_time: str, items: dict[str, tuple[float | None, str]], *, flag: int = hj212.FLAG_V2017) -> bytes:
    dt = datetime.strptime(data_time, "%Y%m%d%H%M%S")
    packet = hj212.realtime_packet("ANALYZER0001", "32", "123456", dt, items, qn="20261129100000000", flag=flag)
    return hj212.encode_one(packet)


def test_hj212_items_become_readings_stamped_with_the_packets_datatime(pty, built):
    (an,) = build(built, pty.path, {"an": ("hj212", 10)})
    wait_open(an)
    pty.write(packet_frame("20261129100000", {"w01018": (23.4, "N"), "w21003": (1.25, "T")}))
    pty.write(packet_frame("20261129100005", {"w01018": (None, "D"), "w21003": (1.5, "N")}))
    wait_for(lambda: an.stats().get("packets", 0) >= 2, 5, "two packets")
    readings = by_channel(an.poll(1))
    stamp = int(datetime(2026, 11, 29, 2, 0, 5, tzinfo=UTC).timestamp() * 1000)  # 10:00:05 in Shanghai
    assert (readings["w01018"].value, readings["w01018"].flag, readings["w01018"].ts_ms) == (None, "D", stamp)
    assert (readings["w21003"].value, readings["w21003"].flag, readings["w21003"].ts_ms) == (1.5, "N", stamp)
    assert readings["w01018"].unit == "mg/L"
    # Silent afterwards: every channel seen so far is null with flag B, stamped with the poll time on
    # the analyzer's clock (its DataTime lies hours before this machine's time here).
    silent = an.poll(int(time.time() * 1000))
    assert [(r.channel, r.value, r.flag) for r in silent] == [("w01018", None, "B"), ("w21003", None, "B")]
    assert all(stamp <= r.ts_ms <= stamp + 60_000 for r in silent), "just after its last DataTime"


def test_hj212_a_channels_times_never_step_back_when_the_analyzers_clock_lags(pty, built):
    """An analyzer whose DataTime lags two minutes (a slow clock, or the time its measurement was
    taken): a B reading between two packets lies between them in time, not two minutes ahead."""
    (an,) = build(built, pty.path, {"an": ("hj212", 3)})
    wait_open(an)
    shanghai = ZoneInfo("Asia/Shanghai")

    def lagging(seconds_from_now: float) -> str:
        return datetime.fromtimestamp(time.time() - 120 + seconds_from_now, shanghai).strftime("%Y%m%d%H%M%S")

    times = []
    pty.write(packet_frame(lagging(0), {"w01018": (23.4, "N")}))
    wait_for(lambda: an.stats().get("packets", 0) >= 1, 5, "a packet")
    times += [(r.flag, r.ts_ms) for r in an.poll(int(time.time() * 1000))]
    times += [(r.flag, r.ts_ms) for r in an.poll(int(time.time() * 1000) + 3000)]  # nothing came: B
    pty.write(packet_frame(lagging(6), {"w01018": (23.5, "N")}))
    wait_for(lambda: an.stats().get("packets", 0) >= 2, 5, "a second packet")
    times += [(r.flag, r.ts_ms) for r in an.poll(int(time.time() * 1000) + 6000)]
    assert [flag for flag, _ in times] == ["N", "B", "N"]
    assert [ts for _, ts in times] == sorted(ts for _, ts in times), times


def test_hj212_datatime_is_read_in_the_station_timezone(pty, built):
    (an,) = build(built, pty.path, {"an": ("hj212", 10)}, timezone="Europe/Berlin")
    wait_open(an)
    pty.write(packet_frame("20260701120000", {"w01018": (5.0, "N")}))
    wait_for(lambda: an.stats().get("packets", 0) >= 1, 5, "a packet")
    (reading,) = an.poll(1)
    assert reading.ts_ms == int(datetime(2026, 7, 1, 10, 0, 0, tzinfo=UTC).timestamp() * 1000)  # CEST = UTC+2


def test_hj212_datatime_of_the_repeated_autumn_hour_is_the_pass_of_now():
    """Berlin shows 02:00-02:59 twice on 2026-10-25 (00:00Z-00:59Z, then 01:00Z-01:59Z). An analyzer's
    DataTime of that hour is the pass this machine is in; it was always the first, so that the packets
    of the second were dated an hour back (and left out of the periods already computed)."""
    berlin = ZoneInfo("Europe/Berlin")
    packet = hj212.decode(packet_frame("20261025023000", {"w01018": (5.0, "N")}))

    def utc(hhmm: str) -> int:
        return int(datetime.fromisoformat(f"2026-10-25T{hhmm}:00+00:00").timestamp() * 1000)

    assert serial_drivers._ts_ms_of(packet, berlin, utc("00:30")) == utc("00:30")
    assert serial_drivers._ts_ms_of(packet, berlin, utc("01:31")) == utc("01:30")
    assert serial_drivers._ts_ms_of(packet, berlin, utc("03:00")) == utc("01:30")
    assert serial_drivers._ts_ms_of(packet, berlin, 0) == utc("00:30")


def test_hj212_packets_with_a_bad_crc_length_or_content_are_rejected_whole(pty, built):
    (an,) = build(built, pty.path, {"an": ("hj212", 10)})
    wait_open(an)
    pty.write(packet_frame("20261129100000", {"w01018": (20.0, "N"), "w21003": (1.0, "N")}))
    wait_for(lambda: an.stats().get("packets", 0) >= 1, 5, "a packet")
    an.poll(0)
    poison = {"w01018": (HJ212_POISON, "N"), "w21003": (HJ212_POISON, "N")}
    good = packet_frame("20261129100001", poison)
    bad_crc = good[:-6] + b"%04X" % (int(good[-6:-2], 16) ^ 0x0001) + b"\r\n"
    bad_len = good[:2] + b"%04d" % (int(good[2:6]) - 1) + good[6:]
    # Syntactically valid frames (right CRC) whose content cannot be trusted.
    bad_number = hj212.encode_one(hj212.Packet(st="32", cn="2011", pw="123456", mn="A1", cp=[
        {"DataTime": "20261129100002"}, {"w01018-Rtd": "999", "w01018-Flag": "N"}, {"w21003-Rtd": "1.x"}]))
    bad_flag = hj212.encode_one(hj212.Packet(st="32", cn="2011", pw="123456", mn="A1", cp=[
        {"DataTime": "20261129100003"}, {"w01018-Rtd": "999", "w01018-Flag": "Q"}]))
    no_time = hj212.encode_one(hj212.Packet(st="32", cn="2011", pw="123456", mn="A1", cp=[
        {"w01018-Rtd": "999", "w01018-Flag": "N"}]))
    minute = hj212.encode_one(hj212.Packet(st="32", cn="2051", pw="123456", mn="A1", cp=[
        {"DataTime": "20261129100000"}, {"w01018-Avg": "999", "w01018-Flag": "N"}]))
    for frame in (bad_crc, bad_len, bad_number, bad_flag, no_time, minute):
        pty.write(frame)
    wait_for(lambda: an.stats().get("bad_content", 0) >= 3 and an.stats().get("ignored", 0) >= 1, 5,
             "every frame examined")
    stats = an.stats()
    assert stats["bad_crc"] == 1 and stats["packets"] == 1
    assert all(r.value is None and r.flag == "B" for r in an.poll(1)), "nothing of the bad packets is stored"


def test_hj212_datatime_that_no_part_of_the_agent_can_date_rejects_the_packet(pty, built):
    """Year 1 in Shanghai is year 0 in UTC, which no ISO time can say (the alarm engine raised on it,
    its alarm cleared without an event); year 9999 leaves no room for a period's end (audit Q)."""
    (an,) = build(built, pty.path, {"an": ("hj212", 10)})
    wait_open(an)
    for data_time in ("00010101000000", "19691231235959", "99991231235959"):
        pty.write(hj212.encode_one(hj212.Packet(st="32", cn="2011", pw="123456", mn="A1", cp=[
            {"DataTime": data_time}, {"w01018-Rtd": str(HJ212_POISON)}])))
    pty.write(packet_frame("19700101080000", {"w01018": (5.0, "N")}))  # the Unix epoch: still dated
    wait_for(lambda: an.stats().get("bad_content", 0) >= 3 and an.stats().get("packets", 0) >= 1, 5,
             "every packet examined")
    assert [(r.value, r.ts_ms) for r in an.poll(1)] == [(5.0, 0)]


def test_hj212_analyzer_cannot_add_channels_without_end(pty, built, caplog):
    """A packet of a thousand items, or codes that change at every packet, would add a channel each,
    read null/B at every poll from then on: at most MAX_LEARNT_CHANNELS beyond the declared ones, each
    code at most 64 characters; one log line for the rest (audit Q)."""
    bus = SimpleNamespace(port=pty.path)
    dev = SimpleNamespace(driver="hj212", interval=10, channels={"w01018": {"unit": "mg/L"}})
    (an,) = build_bus_drivers("line", bus, {"an": dev}, seen={"an": {"w21003": "mg/L"}})
    built.append(an)
    wait_open(an)
    limit = serial_drivers.MAX_LEARNT_CHANNELS
    codes = [f"x{k:04d}" for k in range(limit + 50)]
    for start in range(0, len(codes), 30):
        items = {code: (1.0, "N") for code in codes[start : start + 30]}
        pty.write(packet_frame(f"20261129100{start // 30:03d}", items))
    pty.write(packet_frame("20261129101000", {"w01018": (7.0, "N"), "c" + "x" * 64: (1.0, "N")}))
    wait_for(lambda: an.stats().get("packets", 0) >= 6, 5, "every packet")
    readings = by_channel(an.poll(1))
    assert list(readings)[:2] == ["w01018", "w21003"], "declared, then stored before"
    assert len(readings) == 2 + limit - 1, "the channel stored before counts towards the limit"
    assert readings["w01018"].value == 7.0, "a declared channel is always read"
    assert an.stats()["channels_refused"] == 51 + 1
    refused = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(refused) == 1 and "not declared" in refused[0].getMessage()


def test_hj212_declared_channels_are_reported_before_any_packet(pty, built):
    bus = SimpleNamespace(port=pty.path)
    dev = SimpleNamespace(driver="hj212", interval=10, channels={"w01018": {"unit": "mg/L"}, "w00000": None})
    (an,) = build_bus_drivers("line", bus, {"an": dev})
    built.append(an)
    assert an.poll(4) == []  # start-up
    assert [(r.channel, r.value, r.flag, r.unit) for r in an.poll(5)] == [
        ("w01018", None, "B", "mg/L"), ("w00000", None, "B", "L/s")]


def test_hj212_packet_asking_for_an_answer_gets_a_9014_acknowledgement(pty, built):
    (an,) = build(built, pty.path, {"an": ("hj212", 10)})
    wait_open(an)
    pty.write(packet_frame("20261129100000", {"w01018": (20.0, "N")}, flag=hj212.FLAG_V2017 | hj212.FLAG_ANSWER))
    answer = wait_for(lambda: pty.read_available(0.1), 5, "an acknowledgement")
    (ack,) = hj212.FrameReader().feed(answer)
    assert isinstance(ack, hj212.Packet) and ack.cn == "9014" and ack.qn == "20261129100000000" and ack.st == "91"


def test_hj212_answers_from_the_analyzer_are_never_acknowledged(pty, built):
    """9011, 9012, 9013 (notice answer) and 9014 are answers, which get no 9014 even with Flag A set (a 9013
    was acknowledged: two devices may answer each other's answers for ever); the next data packet is."""
    (an,) = build(built, pty.path, {"an": ("hj212", 10)})
    wait_open(an)
    for k, cn in enumerate(("9011", "9012", "9013", "9014")):
        pty.write(strict_build(f"QN=2026112909595900{k};ST=91;CN={cn};PW=123456;MN=ANALYZER0001;Flag=5;CP=&&&&"))
    pty.write(packet_frame("20261129100000", {"w01018": (20.0, "N")}, flag=hj212.FLAG_V2017 | hj212.FLAG_ANSWER))
    acks = wait_for(lambda: acks_of(pty), 5, "the data packet's 9014")
    assert [(a.cn, a.qn) for a in acks] == [("9014", "20261129100000000")]


def test_hj212_analyzer_whose_mn_or_pw_is_too_long_is_read_but_gets_no_invalid_9014(pty, built):
    """An analyzer whose MN is over 24 or PW over 6 characters (the agent uses neither) had every packet
    refused as malformed: its channels read null/B for ever. Its readings are taken; a 9014 would have to
    echo the over-long MN and PW, which no valid packet can, so none is written (it may send again)."""
    (an,) = build(built, pty.path, {"an": ("hj212", 10)})
    wait_open(an)
    mn = "ANALYZER-0001-LONG-MN-26C"
    for second, flag in ((0, 4), (5, 5)):
        pty.write(strict_build(f"QN=2026112910000{second}000;ST=32;CN=2011;PW=12345678;MN={mn};Flag={flag};"
                               f"CP=&&DataTime=2026112910000{second};w01018-Rtd={20 + second},w01018-Flag=N&&"))
    wait_for(lambda: an.stats().get("packets", 0) >= 2, 5, "both packets")
    (reading,) = an.poll(1)
    stamp = int(datetime(2026, 11, 29, 2, 0, 5, tzinfo=UTC).timestamp() * 1000)
    assert (reading.channel, reading.value, reading.flag, reading.ts_ms) == ("w01018", 25.0, "N", stamp)
    assert an.stats().get("malformed", 0) == 0
    assert pty.read_available(0.3) == b"", "a 9014 that breaks the length rules"


def test_hj212_split_packet_is_reassembled(pty, built):
    (an,) = build(built, pty.path, {"an": ("hj212", 10)})
    wait_open(an)
    items = {f"w{k:05d}": (float(k), "N") for k in range(30)}
    packet = hj212.realtime_packet("ANALYZER0001", "32", "123456", datetime(2026, 11, 29, 10), items,
                                   qn="20261129100000000")
    frames = hj212.encode(packet, max_data_len=200)
    assert len(frames) > 2
    for frame in reversed(frames):
        pty.write(frame)
    wait_for(lambda: an.stats().get("packets", 0) >= 1, 5, "the reassembled packet")
    assert {r.channel: r.value for r in an.poll(0)} == {code: v for code, (v, _) in items.items()}


def acks_of(pty) -> list[hj212.Packet]:
    """The 9014 packets the agent wrote back to the analyzer so far."""
    return [p for p in hj212.FrameReader().feed(pty.read_available(0.1)) if isinstance(p, hj212.Packet)]


def test_hj212_each_piece_of_a_split_packet_that_asks_for_an_answer_gets_its_9014(pty, built):
    """An analyzer that waits for the 9014 of each piece (Flag A is set on each: each piece is a packet that
    asks for an answer, DOMAIN.md's Flag bits) before it sends the next: the agent's own uplink waits so on a
    platform. Only the whole packet was answered, so such an analyzer resent its first piece for ever and
    its channels read null/B. Pieces built by the independent checker (tests/hj212_strict.py)."""
    (an,) = build(built, pty.path, {"an": ("hj212", 10)})
    wait_open(an)
    head = "QN=20261129100000000;ST=32;CN=2011;PW=123456;MN=ANALYZER0001;Flag=7;PNUM=3;PNO={};CP=&&"
    pieces = [strict_build(head.format(n) + f"DataTime=20261129100000;w0{n}018-Rtd={n}.5,w0{n}018-Flag=N&&")
              for n in (1, 2, 3)]
    for piece in pieces:
        pty.write(piece)
        acks = wait_for(lambda: acks_of(pty), 5, "the piece's 9014")
        assert [(a.cn, a.qn, a.st) for a in acks] == [("9014", "20261129100000000", "91")]
    wait_for(lambda: an.stats().get("packets", 0) >= 1, 5, "the reassembled packet")
    assert {r.channel: r.value for r in an.poll(0)} == {"w01018": 1.5, "w02018": 2.5, "w03018": 3.5}


def test_hj212_minute_data_the_agent_does_not_use_is_still_acknowledged_when_asked(pty, built):
    """A 2051 (minute data) packet with Flag=5 is not used (real-time data is), but it reached the gateway
    whole: unanswered, the analyzer sends it again and again, and the real-time packets wait behind it."""
    (an,) = build(built, pty.path, {"an": ("hj212", 10)})
    wait_open(an)
    pty.write(strict_build("QN=20261129100100000;ST=32;CN=2051;PW=123456;MN=ANALYZER0001;Flag=5;"
                           "CP=&&DataTime=20261129100000;w01018-Avg=23.4,w01018-Flag=N&&"))
    acks = wait_for(lambda: acks_of(pty), 5, "a 9014")
    assert [(a.cn, a.qn) for a in acks] == [("9014", "20261129100100000")]
    assert an.stats()["ignored"] == 1


# --------------------------------------------------------------------------------------------------
# The port
# --------------------------------------------------------------------------------------------------


def test_a_port_that_vanishes_is_reopened_when_it_comes_back(tmp_path, built, caplog):
    caplog.set_level(logging.INFO, LOGGER)
    sensor = Sds011Sim(period=0.05)
    sim = SerialSim([sensor], tmp_path / "ttySDS")
    sim.start()
    try:
        (pm,) = build(built, sim.path, {"pm": ("sds011", 10)}, reopen_every=0.1)
        wait_for(lambda: pm.frames >= 2, 5, "frames")
        sim.unplug()
        wait_for(lambda: not pm.line.is_open, 5, "the loss noticed")
        pm.poll(0)
        assert all(r.value is None and r.flag == "B" for r in pm.poll(1))
        time.sleep(0.5)  # the port stays away for a while (several reopen attempts), not a wait for a condition
        sim.plug()
        wait_for(lambda: pm.line.is_open, 5, "the port reopened")
        before = pm.frames
        wait_for(lambda: pm.frames > before, 5, "frames again")
        assert pm.poll(2)[0].flag == "N"
        messages = [r.getMessage() for r in caplog.records]
    finally:
        sim.close()
    assert sum("lost" in m for m in messages) == 1, messages
    assert sum("is back" in m for m in messages) == 1, messages
    assert not any("cannot open" in m for m in messages), "one log line each way"


def test_a_port_that_flaps_logs_at_most_three_losses_a_minute(tmp_path, built, caplog):
    """A loose USB connector: the port comes and goes six times within seconds. The log gets three
    "lost" lines and their "is back" lines, not one pair per flap (the README's rule for links)."""
    caplog.set_level(logging.INFO, LOGGER)
    sim = SerialSim([Sds011Sim(period=0.05)], tmp_path / "ttySDS")
    sim.start()
    try:
        (pm,) = build(built, sim.path, {"pm": ("sds011", 10)}, reopen_every=0.05)
        wait_for(lambda: pm.line.is_open, 5, "the port open")
        for _ in range(6):
            sim.unplug()
            wait_for(lambda: not pm.line.is_open, 5, "the loss noticed")
            sim.plug()
            wait_for(lambda: pm.line.is_open, 5, "the port reopened")
        assert pm.line.losses == 6
        messages = [r.getMessage() for r in caplog.records]
    finally:
        sim.close()
    assert sum(" lost" in m for m in messages) == 3, messages
    assert sum("is back" in m for m in messages) == 3, messages


def test_a_port_this_user_may_not_open_says_so_once_with_what_to_check(built, caplog):
    # pyserial's own text says the errno and the path twice; the log says why once, and what to check.
    master, slave = os.openpty()
    try:
        path = os.ttyname(slave)
        os.chmod(path, 0o600)  # not this user's (the test acts as nobody when run as root)
        caplog.set_level(logging.INFO, LOGGER)
        with as_another_user():
            line = SerialLine("pm-uart", path, baudrate=9600, reopen_every=0.05)
            line.start()
            try:
                wait_for(lambda: any("cannot open" in m for m in caplog.messages), 5, "the failure logged")
            finally:
                line.close()
    finally:
        os.close(slave)
        os.close(master)
    (said,) = [m for m in caplog.messages if "cannot open" in m]
    assert said == (f"bus pm-uart: cannot open serial port {path}: Permission denied (the user running edge-agent "
                    "must be in the dialout group, as the service's user is); trying again every 0.05 s")


def test_a_port_missing_at_start_is_opened_when_it_appears(tmp_path, built, caplog):
    caplog.set_level(logging.INFO, LOGGER)
    link = tmp_path / "ttyLATE"
    (pm,) = build(built, str(link), {"pm": ("sds011", 10)}, reopen_every=0.1)
    pm.poll(0)
    assert [(r.value, r.flag) for r in pm.poll(0)] == [(None, "B"), (None, "B")]
    wait_for(lambda: any("cannot open" in r.getMessage() for r in caplog.records), 5, "the failure logged")
    pm.poll(0)
    assert pm.problem == (f"no valid frame in the last interval (serial port {link} not open: No such file or "
                          "directory (unplugged, or another name: ls -l /dev/serial/by-id/))")
    sim = SerialSim([Sds011Sim(period=0.05)], link)
    sim.start()
    try:
        wait_for(lambda: pm.frames >= 1, 5, "frames once the port exists")
        assert pm.poll(1)[0].flag == "N"
    finally:
        sim.close()
    assert sum("cannot open" in r.getMessage() for r in caplog.records) == 1


def test_random_bytes_on_a_shared_line_never_make_poll_raise(pty, built):
    drivers = build(built, pty.path, {"pm": ("pms5003", 10), "sds": ("sds011", 10), "an": ("hj212", 10)})
    wait_open(drivers[0])
    rng = random.Random(1)
    total = 0
    for _ in range(50):
        chunk = rng.randbytes(rng.randint(1, 4000))
        # Sprinkle headers so that every reader has candidates to examine.
        chunk += rng.choice([b"BM\x00\x1c", b"\xaa\xc0", b"##0100QN=", b"##"])
        pty.write(chunk)
        total += len(chunk)
        for d in drivers:
            d.poll(0)
    wait_for(lambda: drivers[0].line.bytes_read >= total, 10, "every byte read")
    assert [len(d.poll(1)) for d in drivers[:2]] == [12, 2]
    assert drivers[0].line._thread.is_alive(), "the reader thread survived"


def test_closing_the_last_driver_releases_the_port(pty, built):
    drivers = build(built, pty.path, {"pm": ("pms5003", 10), "sds": ("sds011", 10)})
    wait_open(drivers[0])
    drivers[0].close()
    assert drivers[1].line.is_open, "still used by the other device"
    drivers[1].close()
    assert not drivers[1].line.is_open and not drivers[1].line._thread.is_alive()
    with serial.Serial(pty.path, exclusive=True):  # nobody holds the port any more
        pass


def test_build_bus_drivers_takes_the_config_models(tmp_path, pty, built):
    config = parse_config(f"""
station: {{id: ST01, type: dust}}
storage: {{path: buffer.db}}
mqtt: {{url: "mqtt://localhost"}}
buses:
  uart: {{type: serial, port: {pty.path}, baudrate: 9600, timeout: 0.3}}
devices:
  pm: {{bus: uart, driver: pms5003, interval: 5}}
  sds: {{bus: uart, driver: sds011, interval: 7}}
  an: {{bus: uart, driver: hj212, interval: 60}}
""", base_dir=tmp_path)
    drivers = build_bus_drivers("uart", config.buses["uart"], dict(config.devices), timezone=config.station.timezone)
    built.extend(drivers)
    assert [type(d) for d in drivers] == [Pms5003Driver, Sds011Driver, Hj212Driver]
    assert [(d.device_id, d.interval) for d in drivers] == [("pm", 5.0), ("sds", 7.0), ("an", 60.0)]
    assert all(isinstance(d, StreamDriver) for d in drivers[:2])
    assert drivers[0].line is drivers[2].line and drivers[0].line.timeout == 0.3


def test_a_device_that_is_not_a_serial_instrument_is_refused(pty):
    with pytest.raises(ValueError, match="cannot run on serial bus"):
        build_bus_drivers("line", SimpleNamespace(port=pty.path), {"x": SimpleNamespace(driver="modbus", interval=1)})


def test_simulators_send_poison_only_in_frames_the_readers_reject(tmp_path, built):
    """The fault injection of the simulators used by the end-to-end tests: plenty of rejected frames,
    and not one poison value through."""
    sims = [
        (Pms5003Sim(passive_support=False, period=0.02, garbage=0.5, split=0.5, bad_checksum=0.5, seed=1), "pms5003"),
        (Sds011Sim(period=0.02, garbage=0.5, split=0.5, bad_checksum=0.5, seed=2), "sds011"),
        (Hj212Sim(period=0.02, garbage=0.5, split=0.5, bad_checksum=0.5, seed=3), "hj212"),
    ]
    poison = {PMS5003_POISON, SDS011_POISON, HJ212_POISON}
    for k, (inst, driver) in enumerate(sims):
        sim = SerialSim([inst], tmp_path / f"tty{k}")
        sim.start()
        try:
            (d,) = build(built, sim.path, {"dev": (driver, 10)})
            values: set = set()

            def enough(d=d, inst=inst, values=values) -> bool:
                values.update(r.value for r in d.poll(0))
                return inst.poisoned >= 5 and len(values - {None}) >= 5

            wait_for(enough, 10, f"{driver}: poison frames sent and good values read")
            assert not values & poison, driver
        finally:
            sim.close()


@pytest.mark.parametrize("ending", [b"\n", b"\r", b""], ids=["lf", "cr", "none"])
def test_hj212_packets_ending_in_lf_cr_or_nothing_are_taken_and_no_garbage(pty, built, caplog, ending):
    # Length and CRC frame an HJ 212 packet; its CRLF is only a courtesy, which some analyzers' firmware
    # gets wrong (LF or CR alone, or nothing). Such packets were rejected whole ("frame does not end
    # with CRLF"): the analyzer read null/B at every poll while it sent valid data.
    (an,) = build(built, pty.path, {"an": ("hj212", 10)}, reject_log_every=0.0)
    wait_open(an)
    values = [(20261129100000 + k, 20.0 + k) for k in range(3)]
    for data_time, value in values:
        pty.write(packet_frame(str(data_time), {"w01018": (value, "N")})[:-2] + ending)
    wait_for(lambda: an.stats().get("packets", 0) == 3, 5, "three packets")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        readings = by_channel(an.poll(1))
    assert (readings["w01018"].value, readings["w01018"].flag) == (22.0, "N")
    stats = an.stats()
    assert stats.get("malformed", 0) == 0 and stats["garbage_bytes"] == 0, stats
    assert not [m for m in caplog.messages if "rejected" in m], caplog.messages
