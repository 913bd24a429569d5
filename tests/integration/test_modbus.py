"""Modbus RTU and TCP against real slaves: the driver (its own RTU and TCP master, pyserial underneath on
RTU) talks to the project's simulated slave over Modbus TCP on loopback and over Modbus RTU on a
pseudo-terminal pair, with the slave misbehaving on purpose (silent, late, answers that answer something
else), the bus poller serves a silent and a healthy slave on one line, and at the end `edge-agent simulate`
and `edge-agent run` talk to each other as two real processes.

Expected register contents are built here from SPEC §2's byte-order table (and literal vectors for the
float orders seen in the field), not with the codec under test.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from harness import REPO, AgentProcess, Collector, free_port, wait_for, write_config

from agent.model import Reading
from agent.poller import BusPoller
from drivers import modbus_link, profiles
from drivers.modbus import SILENT_AFTER_POLLS, DeviceWriter, ModbusBus, ModbusDriver, WriteFailed
from drivers.planner import naive_plan
from drivers.registers import RegisterSpec
from drivers.sim.instruments import SimInstrument
from drivers.sim.slave import Fault, RegisterBank, RtuPtyServer, SlaveCore, TcpServer

# --------------------------------------------------------------------------------------------------
# helpers


def wire_words(fmt: str, value: float | int, order: str) -> list[int]:
    """Registers on the wire for `value` packed big-endian as `fmt`, placed per SPEC §2: CDAB reverses
    the words, BADC swaps the bytes inside each word, DCBA does both."""
    data = struct.pack(">" + fmt, value)
    words = [data[i : i + 2] for i in range(0, len(data), 2)]
    if order in ("BADC", "DCBA"):
        words = [w[::-1] for w in words]
    if order in ("CDAB", "DCBA"):
        words = words[::-1]
    return [int.from_bytes(w, "big") for w in words]


class Link:
    """A simulated slave line (TCP on loopback or RTU on a pty) and a ModbusBus connected to it."""

    def __init__(self, kind: str, units: dict, tmp: Path, *, timeout: float = 0.3, retries: int = 1,
                 baudrate: int = 9600):
        self.kind = kind
        self.core = SlaveCore(units)
        self.path = tmp / "ttySIM0"
        if kind == "tcp":
            self.server: TcpServer | RtuPtyServer = TcpServer(self.core, "127.0.0.1", 0).start()
            self.bus = ModbusBus("lan", "tcp", host="127.0.0.1", tcp_port=self.server.port, timeout=timeout,
                                 retries=retries)
        else:
            self.server = RtuPtyServer(self.core, self.path).start()
            self.bus = ModbusBus("rs485", "rtu", port=str(self.path), baudrate=baudrate, timeout=timeout,
                                 retries=retries)

    def driver(self, device_id: str, slave: int, specs, interval: float = 1.0, **kw) -> ModbusDriver:
        return ModbusDriver(device_id, self.bus, slave, interval, specs, **kw)

    def close(self) -> None:
        self.bus.close()
        self.server.stop()


@pytest.fixture(params=["tcp", "rtu"])
def kind(request) -> str:
    return request.param


def by_channel(readings: list[Reading]) -> dict[str, Reading]:
    return {r.channel: r for r in readings}


# --------------------------------------------------------------------------------------------------
# decoding against a real slave

FORMATS = {"int32": "i", "uint32": "I", "int64": "q", "uint64": "Q", "float32": "f", "float64": "d"}
SAMPLES = {
    "int32": -123456789,
    "uint32": 3456789012,
    "int64": -1234567890123456789,
    "uint64": 12345678901234567890,
    "float32": 123.456,
    "float64": -9876.54321,
}
# float32 123.456 = 0x42F6E979 as four field instruments send it (DOMAIN.md: ABCD, CDAB, DCBA, BADC).
FLOAT_VECTORS = {
    "ABCD": [0x42F6, 0xE979],
    "CDAB": [0xE979, 0x42F6],
    "BADC": [0xF642, 0x79E9],
    "DCBA": [0x79E9, 0xF642],
}


def every_type_map() -> tuple[list[RegisterSpec], list[tuple[str, int, list[int]]], dict[str, float]]:
    """Every type and order, 16-bit types with scale and offset, the input table and bits: the specs,
    the register contents as (table, address, words) and the values they must decode to."""
    specs: list[RegisterSpec] = []
    cells: list[tuple[str, int, list[int]]] = []
    expected: dict[str, float] = {}
    address = 0
    for type_, fmt in FORMATS.items():
        for order in ("ABCD", "CDAB", "BADC", "DCBA"):
            channel = f"{type_}_{order}"
            spec = RegisterSpec(channel=channel, address=address, type=type_, order=order)
            cells.append(("holding", address, wire_words(fmt, SAMPLES[type_], order)))
            specs.append(spec)
            expected[channel] = float(SAMPLES[type_])
            address += spec.count
    for order, words in FLOAT_VECTORS.items():  # literal field vectors
        specs.append(RegisterSpec(channel=f"field_{order}", address=address, type="float32", order=order))
        cells.append(("holding", address, words))
        expected[f"field_{order}"] = 123.456
        address += 2
    extra = [  # 16-bit types, scale and offset, input table, bits
        (RegisterSpec(channel="i16", address=200, type="int16"), "holding", [0x10000 - 12345], -12345.0),
        (RegisterSpec(channel="u16", address=201, type="uint16"), "holding", [54321], 54321.0),
        (RegisterSpec(channel="ph", address=202, type="int16", scale=0.01), "holding", [712], 7.12),
        (RegisterSpec(channel="temp", address=203, type="uint16", scale=0.1, offset=-40), "holding", [1234], 83.4),
        (RegisterSpec(channel="i32s", address=204, type="int32", order="CDAB", scale=0.001), "holding",
         wire_words("i", -2500, "CDAB"), -2.5),
        (RegisterSpec(channel="f32so", address=206, type="float32", order="DCBA", scale=2, offset=1), "holding",
         wire_words("f", 1.25, "DCBA"), 3.5),
        (RegisterSpec(channel="reg_bool", address=208, type="bool"), "holding", [7], 1.0),
        *[(RegisterSpec(channel=f"i16_{order}", address=209 + k, type="int16", order=order), "holding",
           wire_words("h", -123, order), -123.0) for k, order in enumerate(("ABCD", "CDAB", "BADC", "DCBA"))],
        (RegisterSpec(channel="in_f32", address=10, type="float32", table="input", order="CDAB"), "input",
         wire_words("f", -0.5, "CDAB"), -0.5),
        (RegisterSpec(channel="coil3", address=3, table="coil"), "coil", [1], 1.0),
        (RegisterSpec(channel="coil4", address=4, table="coil"), "coil", [0], 0.0),
        (RegisterSpec(channel="di9", address=9, table="discrete"), "discrete", [1], 1.0),
    ]
    for spec, table, words, value in extra:
        specs.append(spec)
        cells.append((table, spec.address, words))
        expected[spec.channel] = value
    return specs, cells, expected


def assert_decoded(readings: list[Reading], expected: dict[str, float]) -> None:
    got = by_channel(readings)
    assert set(got) == set(expected)
    for channel, value in expected.items():
        r = got[channel]
        assert (r.value, r.flag) == (value, "N"), channel


def test_every_type_and_order_decodes_exactly_at_a_real_slave(kind, tmp_path):
    specs, cells, expected = every_type_map()
    bank = RegisterBank()
    for table, address, words in cells:
        bank.set(table, address, words)
    link = Link(kind, {7: bank}, tmp_path)
    try:
        readings = link.driver("dev", 7, specs).poll(1_000)
    finally:
        link.close()
    assert_decoded(readings, expected)
    assert link.core.counters[7].requests == 5, "holding 0..97, holding 200..212, input, coils, discrete"


# pymodbus's own server: a Modbus implementation this project did not write, on the other end of the
# wire (TCP on loopback; RTU on a socat pseudo-terminal pair), serving `cells` as unit UNIT.
PYMODBUS_PEER = r"""
import asyncio, json, sys
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

kind, where, unit, cells = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
def data(table, bits):
    values = {}
    for name, address, words in cells:
        if name == table:
            values.update((address + i, w) for i, w in enumerate(words))
    column = [values.get(a, 0) for a in range(max(values, default=0) + 1)]
    if bits:
        column = [bool(v) for v in column] + [False] * (-len(column) % 16)
    return [SimData(0, values=column, datatype=DataType.BITS if bits else DataType.REGISTERS)]
device = SimDevice(id=unit, simdata=(data("coil", True), data("discrete", True), data("holding", False),
                                     data("input", False)))
async def main():
    if kind == "tcp":
        server = ModbusTcpServer(device, address=("127.0.0.1", int(where)))
    else:
        server = ModbusSerialServer(device, port=where, baudrate=9600)
    await server.serve_forever()
asyncio.run(main())
"""


def test_every_type_and_order_decodes_exactly_at_a_pymodbus_slave(kind, tmp_path):
    """The same map against pymodbus's server: our framing (CRC, MBAP, byte counts, bit packing) agrees
    with an implementation we did not write, not only with our own simulator."""
    specs, cells, expected = every_type_map()
    procs: list[subprocess.Popen] = []
    try:
        if kind == "tcp":
            port = free_port()
            where = str(port)
            bus = ModbusBus("lan", "tcp", host="127.0.0.1", tcp_port=port, timeout=1.0, retries=2)
        else:
            ours, theirs = tmp_path / "ttyA", tmp_path / "ttyB"
            procs.append(subprocess.Popen(["socat", f"pty,raw,echo=0,link={ours}", f"pty,raw,echo=0,link={theirs}"],
                                          stderr=subprocess.DEVNULL))
            wait_for(lambda: ours.exists() and theirs.exists(), 10, "the socat pty pair")
            where = str(theirs)
            bus = ModbusBus("rs485", "rtu", port=str(ours), baudrate=9600, timeout=1.0, retries=2)
        procs.append(subprocess.Popen([sys.executable, "-c", PYMODBUS_PEER, kind, where, "7", json.dumps(cells)],
                                      stderr=subprocess.DEVNULL))
        driver = ModbusDriver("dev", bus, 7, 1.0, specs)
        readings: list[Reading] = []

        def polled_all() -> bool:  # the server takes a moment to listen
            readings[:] = driver.poll(1_000)
            return all(r.flag == "N" for r in readings)

        wait_for(polled_all, 20, "a poll the pymodbus slave answers", interval=0.2)
        bus.close()
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(10)
    assert_decoded(readings, expected)


def forty_points() -> list[RegisterSpec]:
    """A 40-point analyzer map: 16 float32 at 0..31, 16 int16 at 40..55 (a hole of 8), 8 input uint16."""
    specs = [RegisterSpec(channel=f"f{i:02d}", address=2 * i, type="float32", order="CDAB") for i in range(16)]
    specs += [RegisterSpec(channel=f"s{i:02d}", address=40 + i, type="int16", scale=0.1) for i in range(16)]
    specs += [RegisterSpec(channel=f"in{i}", address=100 + i, type="uint16", table="input") for i in range(8)]
    return specs


def test_forty_point_map_costs_two_requests_at_the_slave_instead_of_forty(tmp_path):
    specs = forty_points()
    link = Link("rtu", {1: RegisterBank(), 2: RegisterBank()}, tmp_path)
    try:
        planned = link.driver("planned", 1, specs)
        naive = link.driver("naive", 2, specs, requests=naive_plan(specs))
        for _ in range(3):
            assert all(r.flag == "N" for r in planned.poll(0) + naive.poll(0))
    finally:
        link.close()
    plan_counts, naive_counts = link.core.counters[1], link.core.counters[2]
    assert len(planned.requests) == 2
    assert plan_counts.requests == 3 * 2
    assert naive_counts.requests == 3 * 40
    assert plan_counts.rx_bytes + plan_counts.tx_bytes < (naive_counts.rx_bytes + naive_counts.tx_bytes) / 4


# --------------------------------------------------------------------------------------------------
# failures


def test_dead_slave_on_shared_rtu_bus_costs_one_timeout_and_recovers(tmp_path):
    alive_bank, dead_bank = RegisterBank(), RegisterBank()
    for bank in (alive_bank, dead_bank):
        bank.set("holding", 0, wire_words("f", 12.5, "ABCD"))
    dead_bank.fault = Fault("silent")
    timeout, retries, interval = 0.1, 2, 0.25
    link = Link("rtu", {1: alive_bank, 2: dead_bank}, tmp_path, timeout=timeout, retries=retries)
    spec = [RegisterSpec(channel="w01018", address=0, type="float32", unit="mg/L")]
    alive = link.driver("alive", 1, spec, interval=interval)
    dead = link.driver("dead", 2, spec, interval=0.3)
    received: list[Reading] = []
    lock = threading.Lock()

    def sink(readings: list[Reading]) -> None:
        with lock:
            received.extend(readings)

    def of(device: str) -> list[Reading]:
        with lock:
            return [r for r in received if r.device == device]

    poller = BusPoller("rs485", [alive, dead], sink)
    poller.start()
    try:
        wait_for(lambda: len(of("dead")) >= 1, 10, "the first poll of the dead slave")
        first_cost = dead.last_poll_s
        wait_for(lambda: len(of("dead")) >= 8, 10, "8 polls of the dead slave")
        dead_cost = dead.last_poll_s
        dead_bank.fault = None
        wait_for(lambda: of("dead")[-1].flag == "N", 5, "the dead slave back to N")
    finally:
        poller.stop()
        poller.join(5)
        link.close()
    dead_readings = of("dead")
    first_ok = next(i for i, r in enumerate(dead_readings) if r.flag == "N")
    assert first_ok >= 8
    assert all(r.value is None and r.flag == "B" for r in dead_readings[:first_ok])
    assert dead_readings[-1].value == 12.5
    # Its tries counted at the slave, not timed (a loaded machine stretches every duration): the first
    # SILENT_AFTER_POLLS polls of a slave gone silent get 1 + retries requests each, every later poll one
    # (then answered), and one more may have been on the line when the poller stopped.
    tries, full = retries + 1, SILENT_AFTER_POLLS
    expected = tries * full + len(dead_readings) - full
    sent = link.core.counters[2].requests
    assert expected <= sent <= expected + 1, \
        f"a dead slave costs one try per poll once given up twice: {sent} requests for {len(dead_readings)} polls"
    assert first_cost >= timeout * tries * 0.9, f"a slave gone silent gets its tries, took {first_cost:.3f}"
    assert dead_cost >= timeout * 0.9, f"each try waits its timeout, took {dead_cost:.3f}"
    assert all(r.flag == "N" for r in of("alive"))
    # Once the dead slave is down to one try per poll, the alive slave is held up by one dead poll at most:
    # never two of them between two of its polls (before, a dead poll of all its tries outlasts its interval)
    dead_ts = [r.ts_ms for r in dead_readings]
    alive_ts = [r.ts_ms for r in of("alive") if r.ts_ms >= dead_ts[full - 1]]
    between = [sum(a < t <= b for t in dead_ts) for a, b in zip(alive_ts, alive_ts[1:], strict=False)]
    assert max(between) <= 1, f"two dead polls between two of the alive slave's: {between}"


def test_a_silent_slave_holds_up_a_healthy_one_no_longer_than_one_silent_poll(tmp_path, caplog):
    # The audit's bus, scaled down: a silent slave whose poll costs more than the interval even with one
    # try (0.35 s) and a healthy one, both due every 0.3 s, so the bus cannot keep up. The healthy slave
    # must be polled at least once per (timeout x tries + its interval). A bus that idles while a device
    # is due (reschedules both after the silent poll) polls it once per 0.65 s at best; a bus that serves
    # the most overdue device and never idles alternates the two.
    silent, healthy = RegisterBank(), RegisterBank()
    healthy.set("holding", 0, [42])
    silent.fault = Fault("silent")
    timeout, retries, interval = 0.35, 1, 0.3  # once given up, one try of 0.35 s: still more than the interval
    link = Link("rtu", {9: silent, 4: healthy}, tmp_path, timeout=timeout, retries=retries)
    spec = [RegisterSpec(channel="x", address=0)]
    drivers = [link.driver("dead", 9, spec, interval=interval), link.driver("good", 4, spec, interval=interval)]
    received: list[Reading] = []
    lock = threading.Lock()

    def sink(readings: list[Reading]) -> None:
        with lock:
            received.extend(readings)

    def count(device: str) -> int:
        with lock:
            return sum(r.device == device for r in received)

    polls = 8
    window = polls * (timeout * (retries + 1) + interval)
    poller = BusPoller("rs485", drivers, sink)
    with caplog.at_level(logging.WARNING, logger="agent.poller"):
        poller.start()
        try:
            wait_for(lambda: count("good") >= polls + 1, window,
                     f"more than {polls} polls of the healthy slave within {polls} x (timeout x tries + interval)")
            wait_for(lambda: any("good" in m and "late" in m for m in caplog.messages), 5, "the overrun logged")
        finally:
            poller.stop()
            poller.join(5)
            link.close()
    with lock:
        assert all((r.value, r.flag) == (42.0, "N") for r in received if r.device == "good")
        assert all((r.value, r.flag) == (None, "B") for r in received if r.device == "dead")
    assert abs(count("good") - count("dead")) <= 1, "the two alternate"
    overrun = [m for m in caplog.messages if m.startswith("bus rs485: device ") and " late " in m]
    assert overrun and all("s late" in m and "missed" in m for m in overrun), caplog.messages
    assert len([m for m in overrun if "device good" in m]) == 1, "rate-limited: one line per device"
    assert poller.missed["good"] > 0


def test_a_tcp_device_addressed_by_its_ip_answers_as_unit_255(tmp_path):
    bank = RegisterBank()
    bank.set("holding", 0, [4321])
    link = Link("tcp", {255: bank}, tmp_path)
    try:
        got = link.driver("native", 255, [RegisterSpec(channel="c", address=0)]).poll(0)
    finally:
        link.close()
    assert [(r.value, r.flag) for r in got] == [(4321.0, "N")]


def test_bad_crc_reads_as_communication_failure(tmp_path):
    bank = RegisterBank()
    bank.set("holding", 0, [712])
    bank.fault = Fault("badcrc")
    link = Link("rtu", {4: bank}, tmp_path, timeout=0.1, retries=1)
    try:
        driver = link.driver("ph", 4, [RegisterSpec(channel="w01001", address=0, type="int16", scale=0.01)])
        r = driver.poll(0)[0]
        assert (r.value, r.flag) == (None, "B")
        assert link.core.counters[4].requests == 2, "tried retries + 1 times"
        bank.fault = None
        assert driver.poll(0)[0].value == 7.12
    finally:
        link.close()


# Every register of the slave that answers late holds a value no other register holds: a value taken from
# another request's answer can never pass for the right one.
LATE_MAP = [
    (RegisterSpec(channel="h0", address=0, type="int16"), "holding", 111),
    (RegisterSpec(channel="h1", address=1, type="int16"), "holding", 112),
    (RegisterSpec(channel="h20", address=20, type="uint16"), "holding", 221),
    (RegisterSpec(channel="h21", address=21, type="uint16"), "holding", 222),
    (RegisterSpec(channel="i10", address=10, type="int16", table="input"), "input", 331),
    (RegisterSpec(channel="i11", address=11, type="int16", table="input"), "input", 332),
]


@pytest.mark.parametrize(("kind", "relabel"), [("rtu", False), ("tcp", False), ("tcp", True)],
                         ids=["rtu", "tcp", "tcp-gateway-relabels"])
def test_answers_later_than_the_timeout_are_never_taken_for_the_next_request(kind, relabel, tmp_path):
    # The slave answers every request 0.22 s after it, the master waits 0.15 s: the answer to one try
    # arrives while the master waits for the next try or the next request, and answers to holding 0..1
    # and holding 20..21 look alike (unit 1, function 3, 4 bytes). On RTU nothing tells them apart but
    # the order; on TCP the transaction id does, unless the gateway stamps the late answer with the id of
    # the request it is serving (`relabel`).
    slow, next_one = RegisterBank(), RegisterBank()
    for spec, table, value in LATE_MAP:
        slow.set(table, spec.address, [value])
    next_one.set("holding", 0, [401, 402])
    slow.fault = Fault("late", delay=0.22, relabel=relabel)
    link = Link(kind, {1: slow, 4: next_one}, tmp_path, timeout=0.15, retries=1)
    expected = {spec.channel: float(value) for spec, _, value in LATE_MAP}
    late = link.driver("late", 1, [spec for spec, _, _ in LATE_MAP])
    after = link.driver("after", 4, [RegisterSpec(channel="r0", address=0), RegisterSpec(channel="r1", address=1)])
    assert len(late.requests) == 3, "holding 0..1, holding 20..21, input 10..11"
    got: list[Reading] = []
    try:
        for _ in range(4):
            got += late.poll(0) + after.poll(0)
    finally:
        link.close()
    expected.update({"r0": 401.0, "r1": 402.0})
    wrong = [(r.device, r.channel, r.value, r.flag) for r in got
             if (r.value, r.flag) not in ((expected[r.channel], "N"), (None, "B"))]
    assert not wrong, f"values from another request's answer: {wrong}"
    assert link.bus.stats.late_answers > 0, "the slave's late answers did reach the master"
    assert sum(r.flag == "N" for r in got if r.device == "late") >= len(LATE_MAP), "the late slave is still read"
    assert all(r.flag == "N" for r in got if r.device == "after")


OWN_VALUES = {"a": 111.0, "b": 222.0}


def look_alike_device(kind: str, tmp_path, bank: RegisterBank, *, timeout: float, retries: int):
    """Unit 1's holding 0 (111) and holding 100 (222) in `bank`, read by device "dev" as channels a and b
    with two requests whose answers look alike (unit 1, function 3, 2 bytes); returns (link, device)."""
    bank.set("holding", 0, [111])
    bank.set("holding", 100, [222])
    link = Link(kind, {1: bank}, tmp_path, timeout=timeout, retries=retries)
    return link, link.driver("dev", 1, [RegisterSpec(channel="a", address=0), RegisterSpec(channel="b", address=100)])


def not_their_own(readings: list[Reading]) -> list[tuple]:
    """The readings of `look_alike_device` that are neither their own register's value (N) nor null (B)."""
    return [(r.channel, r.value, r.flag) for r in readings
            if (r.value, r.flag) not in ((OWN_VALUES[r.channel], "N"), (None, "B"))]


@pytest.mark.parametrize(("kind", "relabel"), [("rtu", False), ("tcp", True)], ids=["rtu", "tcp-gateway-relabels"])
def test_answers_later_than_twice_the_timeout_are_never_taken_for_a_look_alike_request(kind, relabel, tmp_path):
    # An analyzer that takes 0.5 s behind a bus timeout of 0.2 s: each answer comes after the late window
    # (2 x timeout) of its request, while the master waits for the next request, whose answer looks alike
    # (unit 1, function 3, 2 bytes). Holding 0 and holding 100 were stored swapped, with flag N, at every
    # poll. Too slow for its timeout, the device may read null/B; never another register's value.
    bank = RegisterBank()
    bank.fault = Fault("late", delay=0.5, relabel=relabel)
    link, device = look_alike_device(kind, tmp_path, bank, timeout=0.2, retries=1)
    assert len(device.requests) == 2
    got: list[Reading] = []
    try:
        for _ in range(5):
            got += device.poll(0)
    finally:
        link.close()
    wrong = not_their_own(got)
    assert not wrong, f"values from another request's answer: {wrong}"
    assert link.bus.stats.late_answers > 0, "the slave's late answers did reach the master"


@pytest.mark.parametrize(("kind", "relabel"), [("rtu", False), ("tcp", True)], ids=["rtu", "tcp-gateway-relabels"])
def test_without_retries_a_slave_far_slower_than_its_timeout_is_told_apart_once_proven_late(
        kind, relabel, tmp_path):
    """Without retries nothing proves a slave 2.5 timeouts slow late before its first answer arrives
    during the next look-alike request: that first answer cannot be told from the awaited one (RTU has no
    transaction id) and may be taken (the README says so). Its next late answer, seen within 2 timeouts
    of a request it does not answer, proves it late, and from then on its late answers are told apart:
    the device reads B, never another register's value."""
    bank = RegisterBank()
    bank.fault = Fault("late", delay=0.5, relabel=relabel)
    link, device = look_alike_device(kind, tmp_path, bank, timeout=0.2, retries=0)
    polls: list[list[Reading]] = []
    try:
        for _ in range(6):
            polls.append(device.poll(0))
    finally:
        link.close()
    wrong = not_their_own([r for poll in polls[2:] for r in poll])
    assert not wrong, f"values from another request's answer once the slave is known late: {wrong}"


@pytest.mark.parametrize("kind", ["rtu", "tcp"])
def test_a_slave_back_from_a_silence_reads_its_own_values_again(kind, tmp_path):
    """A silent slave is never proven late: the requests it did not answer are forgotten after 2 timeouts.
    Once it answers again, its device may read B for a poll, never another register's value, and reads N
    with its own values again."""
    bank = RegisterBank()
    bank.fault = Fault("silent")
    link, device = look_alike_device(kind, tmp_path, bank, timeout=0.1, retries=1)
    got: list[Reading] = []

    def poll() -> list[Reading]:
        readings = device.poll(0)
        got.extend(readings)
        return readings

    try:
        for _ in range(4):
            assert [(r.value, r.flag) for r in poll()] == [(None, "B"), (None, "B")]
        bank.fault = None
        wait_for(lambda: [(r.value, r.flag) for r in poll()] == [(111.0, "N"), (222.0, "N")], 60,
                 "both registers' own values again")
    finally:
        link.close()
    wrong = not_their_own(got)
    assert not wrong, f"values from another request's answer: {wrong}"


class DropsRequests(RegisterBank):
    """A healthy slave on a noisy line: the next `drop` requests addressed to it never reach it."""

    def __init__(self):
        super().__init__()
        self.drop = 0

    @property
    def fault(self) -> Fault | None:  # asked once per request, first thing (`SlaveCore.handle`)
        if self.drop > 0:
            self.drop -= 1
            return Fault("silent")
        return None

    @fault.setter
    def fault(self, value) -> None:
        pass


@pytest.mark.parametrize("kind", ["rtu", "tcp"])
def test_a_healthy_slave_that_missed_one_request_reads_its_values_again(kind, tmp_path):
    """A request lost on the line (noise on RS-485, a request the slave could not parse) was owed for a late
    window of 20 timeouts (05074b6): the next look-alike request's answer retired it instead, that request
    failed, and so on, one request behind at every poll. With retries 0 the device read null/B at every
    poll for good, though the slave answered every request it received at once (audit W)."""
    bank = DropsRequests()
    link, device = look_alike_device(kind, tmp_path, bank, timeout=0.1, retries=0)
    try:
        assert [(r.value, r.flag) for r in device.poll(0)] == [(111.0, "N"), (222.0, "N")]
        bank.drop = 1
        assert [r.flag for r in device.poll(0)] == ["B", "B"], "the lost request"
        started = time.monotonic()
        wait_for(lambda: [(r.value, r.flag) for r in device.poll(0)] == [(111.0, "N"), (222.0, "N")], 5,
                 "both registers' own values again")
        assert time.monotonic() - started < 2, "one lost request costs a poll or so, not the late window"
    finally:
        link.close()


@pytest.mark.parametrize(("kind", "relabel"), [("rtu", False), ("tcp", False), ("tcp", True)],
                         ids=["rtu", "tcp", "tcp-gateway-relabels"])
def test_answers_that_overtake_each_other_are_never_confused(kind, relabel, tmp_path):
    # Holding 0 and holding 100 are read by two requests whose answers look alike (unit 1, function 3,
    # 2 bytes). The first try of holding 0 is answered after 0.40 s (the master waits 0.30), its retry
    # after 0.15 s, the read of holding 100 after 0.02 s, as at a caching gateway: the first answer
    # arrives while the retry is out, and the retry's own answer would come after the next request's.
    bank = RegisterBank()
    bank.fault = Fault("late", delays=(0.40, 0.15, 0.02), relabel=relabel)
    link, device = look_alike_device(kind, tmp_path, bank, timeout=0.30, retries=1)
    assert len(device.requests) == 2
    got: list[Reading] = []
    try:
        for _ in range(3):
            got += device.poll(0)
    finally:
        link.close()
    readings = [(r.channel, r.value, r.flag) for r in got]
    assert readings == [("a", 111.0, "N"), ("b", 222.0, "N")] * 3, \
        "each value from its own request's answer, and none lost: the next look-alike request waits for it"


@pytest.mark.parametrize("fault", ["wrongfc", "shortcount", "wrongunit"])
def test_an_answer_that_does_not_answer_the_request_is_refused(kind, fault, tmp_path):
    # Well-formed frames (valid CRC) that answer something else: holding registers answered with function
    # 04 (input registers), one register short, or by another unit. Refused like no answer: retried,
    # then null/B; once the slave answers properly the values are back.
    bank = RegisterBank()
    bank.set("holding", 0, [712, 250])
    bank.fault = Fault(fault)  # type: ignore[arg-type]
    link = Link(kind, {4: bank}, tmp_path, timeout=0.2, retries=1)
    specs = [RegisterSpec(channel="w01001", address=0, type="int16", scale=0.01),
             RegisterSpec(channel="w01010", address=1, type="int16", scale=0.1)]
    try:
        driver = link.driver("ph", 4, specs)
        assert {(r.value, r.flag) for r in driver.poll(0)} == {(None, "B")}
        assert link.core.counters[4].requests == 2, "a refused answer is retried like no answer"
        assert link.bus.stats.bad_answers == 2
        bank.fault = None
        assert [(r.value, r.flag) for r in driver.poll(0)] == [(7.12, "N"), (25.0, "N")]
    finally:
        link.close()


# --------------------------------------------------------------------------------------------------
# hostile peers and noisy lines: bounded in time and in bytes kept, null/B, logged once

TCP_MAX_FRAME = 260  # the largest Modbus TCP frame: 6-byte MBAP prefix + a length field of at most 254
RTU_MAX_FRAME = 256  # the largest Modbus RTU frame: unit + PDU of at most 253 bytes + CRC


class GarblingPeer:
    """A Modbus TCP endpoint on loopback, in this process, that answers every request with bytes that are
    not Modbus TCP, different each time; once `honest` is set, it answers as the slave `core` would."""

    def __init__(self, core: SlaveCore):
        self.core = core
        self.honest = False
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept, name="garbling-peer", daemon=True)]
        self._threads[0].start()

    def stop(self) -> None:
        self._stop.set()
        for t in list(self._threads):
            t.join(5)
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            t = threading.Thread(target=self._serve, args=(conn,), name="garbling-peer-conn", daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.05)
        buf = b""
        try:
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(4096)
                except TimeoutError:
                    continue
                if not chunk:
                    return
                buf += chunk
                while len(buf) >= 7:
                    tid, _, length, unit = struct.unpack(">HHHB", buf[:7])
                    if len(buf) < 6 + length:
                        break
                    pdu, buf = buf[7 : 6 + length], buf[6 + length :]
                    if not self.honest:
                        conn.sendall(struct.pack(">H", tid) + b"\xde\xad" + os.urandom(29))
                    elif (response := self.core.handle(unit, pdu)) is not None:
                        conn.sendall(struct.pack(">HHHB", tid, 0, len(response) + 1, unit) + response)
        except OSError:
            return
        finally:
            conn.close()


# A Modbus TCP peer in a process of its own that, on every connection, sends well-formed Modbus TCP frames
# answering no request (input register answers, to a master reading holding registers) as fast as the
# master takes them, reading nothing, until the master closes it. Prints its port, then "accepted" and
# "closed" for each connection. Another process, so that the stream never pauses for this one's threads.
STREAMING_PEER = r"""
import socket, struct, sys
frames = b"".join(struct.pack(">HHHB", 0x8000 + i, 0, 5, 1) + bytes([4, 2, 0, i % 256]) for i in range(4096))
chunk = frames * 24
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
while True:
    conn, _ = listener.accept()
    print("accepted", flush=True)
    try:
        while True:
            conn.sendall(chunk)
    except OSError:
        print("closed", flush=True)
    conn.close()
"""


class StreamingPeer:
    """`STREAMING_PEER` running; `port`, and `events` (its "accepted" / "closed" lines so far)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", STREAMING_PEER], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        self.events: list[str] = []
        self._reader = threading.Thread(target=self._read, name="streaming-peer", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.append(line.strip())

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self._reader.join(5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


#: Noise bytes: none of them is a function code an answer frame can have (1..6, 15, 16, or 0x80 and up for an
#: exception). A pty carries noise thousands of times faster than the baudrate (about 400 kB/s), and in
#: that much random noise a CRC-valid answer frame turns up every ~100 kB: should a request slip through a
#: pause of the noise (the kernel moves pty bytes to the reader in a worker thread, late on a loaded
#: machine), such a frame is a "bad answer" that answers no request sent, a peer that talks, and the device
#: keeps its retries. At 1200 baud a real line carries 24 bytes per 0.2 s try: that is a chance in thousands.
_NOISE = bytes(b for b in range(0x80) if b not in (1, 2, 3, 4, 5, 6, 15, 16))
_NOISE_TABLE = bytes(_NOISE[i % len(_NOISE)] for i in range(256))


class LineNoise:
    """A thread writing random bytes into the slave end of an RTU pty (through its master `fd`) as fast as
    the line takes them, until `stop()`: a babbling device or a noisy RS-485 line. The bytes never make a
    Modbus answer frame (`_NOISE`): whatever the scheduling, the master hears noise or nothing, never an
    answer to another request."""

    def __init__(self, fd: int):
        self.fd = fd
        self.sent = 0
        self._flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="line-noise", daemon=True)

    def start(self) -> LineNoise:
        fcntl.fcntl(self.fd, fcntl.F_SETFL, self._flags | os.O_NONBLOCK)  # never stuck in a write at stop()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, self._flags)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sent += os.write(self.fd, os.urandom(1024).translate(_NOISE_TABLE))
            except BlockingIOError:
                select.select([], [self.fd], [], 0.01)
            except OSError:
                return


def poll_within(driver: ModbusDriver, seconds: float) -> list[Reading]:
    """One poll of `driver`, which must be over within `seconds` (it runs on a thread of its own so that a
    poll that never ends fails the test instead of hanging it)."""
    got: list[Reading] = []
    thread = threading.Thread(target=lambda: got.extend(driver.poll(0)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the poll was not over within {seconds} s"
    return got


def test_a_tcp_peer_that_streams_without_end_is_a_bad_link_not_a_memory_sink(tmp_path):
    # The peer sends Modbus TCP frames nobody asked for, as fast as the master takes them, on every
    # connection. Each poll must end like a silent slave's (null/B, within timeout x tries: the deadline
    # here is generous), holding at most one frame of what arrives and reading no more than a few frames
    # of the stream; the connection is closed and the next transaction opens a fresh one, which a sane
    # slave on that port then answers.
    bank = RegisterBank()
    bank.set("holding", 0, [712])
    peer = StreamingPeer()
    server: TcpServer | None = None
    timeout, retries, polls = 0.2, 1, 3
    bus = ModbusBus("lan", "tcp", host="127.0.0.1", tcp_port=peer.port, timeout=timeout, retries=retries)
    driver = ModbusDriver("evil", bus, 1, 1.0, [RegisterSpec(channel="w01001", address=0, scale=0.01)])
    try:
        for _ in range(polls):
            readings = poll_within(driver, 10 * timeout * (retries + 1))
            assert [(r.value, r.flag) for r in readings] == [(None, "B")]
        stats = bus.stats
        # What the master read and dropped: a few frames a try, not the stream (whose every byte an
        # unbounded reader would hold at once).
        assert stats.discarded_bytes <= polls * (retries + 1) * 8 * TCP_MAX_FRAME, stats
        assert 0 < stats.peak_buffered <= TCP_MAX_FRAME, stats
        assert stats.floods >= polls, f"every poll ran into the stream and gave up on it: {stats}"
        wait_for(lambda: peer.events.count("closed") >= polls, 5, "each poll's connection closed by the master")
        assert peer.events.count("accepted") >= polls, "each poll on a fresh connection"
        peer.stop()
        server = TcpServer(SlaveCore({1: bank}), "127.0.0.1", peer.port).start()
        assert [(r.value, r.flag) for r in poll_within(driver, 5)] == [(7.12, "N")]
    finally:
        peer.stop()  # first: a poll stuck on the stream gets the end of it and lets go of the wire
        bus.close()
        if server is not None:
            server.stop()
    assert bus.stats.peak_buffered <= TCP_MAX_FRAME


def test_an_rtu_line_that_never_falls_silent_reads_null_b_within_the_timeouts(tmp_path):
    # Random bytes arrive without a pause (a babbling device, a noisy line): the line is never silent
    # for the RTU frame gap, so no request can be heard on it. Each poll ends like a silent slave's
    # (null/B, within timeout x tries: the deadline here is generous), dropping the noise as it comes
    # instead of keeping it; when the noise stops, the slave is read again. At 1200 baud the frame gap is
    # 29 ms, far longer than any pause of the writing thread: the noise is really without a gap.
    bank = RegisterBank()
    bank.set("holding", 0, [712])
    timeout, retries, polls = 0.2, 1, 3
    link = Link("rtu", {4: bank}, tmp_path, timeout=timeout, retries=retries, baudrate=1200)
    driver = link.driver("ph", 4, [RegisterSpec(channel="w01001", address=0, type="int16", scale=0.01)])
    assert isinstance(link.server, RtuPtyServer) and link.server._master is not None
    noise = LineNoise(link.server._master)
    try:
        assert [(r.value, r.flag) for r in driver.poll(0)] == [(7.12, "N")]
        bank.fault = Fault("silent")  # should a request slip through a pause after all: still no values
        noise.start()
        try:
            wait_for(lambda: noise.sent > 4 * RTU_MAX_FRAME, 5, "noise on the line")
            for _ in range(polls):
                readings = poll_within(driver, 10 * timeout * (retries + 1))
                assert [(r.value, r.flag) for r in readings] == [(None, "B")]
            stats = link.bus.stats
            assert stats.floods >= polls, "every poll found the line never silent"
            assert stats.discarded_bytes > 10 * RTU_MAX_FRAME, "the noise was read, and dropped"
            assert 0 < stats.peak_buffered <= 2 * RTU_MAX_FRAME, stats
        finally:
            noise.stop()  # first: a poll stuck on the noise gets silence and lets go of the wire
            bank.fault = None
        wait_for(lambda: driver.poll(0)[0].value == 7.12, 5, "the slave read again once the line is quiet")
    finally:
        link.close()
    assert link.bus.stats.peak_buffered <= 2 * RTU_MAX_FRAME


def test_an_rtu_line_that_never_falls_silent_costs_one_try_per_poll_once_given_up(tmp_path):
    # A line without a pause is like a silent slave for every device on it: nothing can be heard. Its
    # tries were counted as "bad answers" (a peer that talks), which keep a device's retries, so every
    # device cost timeout x (retries + 1) at every poll for as long as the noise lasted and the bus
    # overran its schedule (polls skipped). Like silence, it now costs one try per poll once given up
    # twice in a row; the slave is read again once the line is quiet.
    bank = RegisterBank()
    bank.set("holding", 0, [712])
    timeout, retries = 0.2, 2
    link = Link("rtu", {4: bank}, tmp_path, timeout=timeout, retries=retries, baudrate=1200)
    driver = link.driver("ph", 4, [RegisterSpec(channel="w01001", address=0, type="int16", scale=0.01)])
    assert isinstance(link.server, RtuPtyServer) and link.server._master is not None
    noise = LineNoise(link.server._master)
    try:
        bank.fault = Fault("silent")  # should a request slip through a pause after all: still no values
        noise.start()
        try:
            wait_for(lambda: noise.sent > 4 * RTU_MAX_FRAME, 5, "noise on the line")
            for _ in range(2):
                assert [(r.value, r.flag) for r in poll_within(driver, 10 * timeout * (retries + 1))] == [(None, "B")]
            tries, floods = link.bus.stats.requests, link.bus.stats.floods
            assert [(r.value, r.flag) for r in poll_within(driver, 10 * timeout)] == [(None, "B")]
            assert link.bus.stats.requests - tries == 1, "one try once given up twice in a row"
            # The try found the line never silent; or, had the noise paused long enough for the request to
            # go out (a loaded machine), it heard noise where an answer should be: garbled, as the agent says.
            heard = "noise on the line" if link.bus.stats.floods > floods else modbus_link.GARBLED_RTU
            assert driver.problem is not None and heard in driver.problem, driver.problem
        finally:
            noise.stop()
            bank.fault = None
        wait_for(lambda: driver.poll(0)[0].value == 7.12, 5, "the slave read again once the line is quiet")
    finally:
        link.close()


def test_a_peer_answering_garbage_at_every_poll_is_logged_once_not_once_per_poll(caplog):
    # Every answer is other bytes that are not Modbus TCP: a line per poll would each be "new" if the
    # bytes made the line. One WARNING when the device goes bad (with the first answer's bytes), one
    # INFO when it answers properly again; every poll in between still reads null/B.
    bank = RegisterBank()
    bank.set("holding", 0, [712])
    peer = GarblingPeer(SlaveCore({1: bank}))
    bus = ModbusBus("lan", "tcp", host="127.0.0.1", tcp_port=peer.port, timeout=0.2, retries=1)
    driver = ModbusDriver("evil", bus, 1, 1.0, [RegisterSpec(channel="w01001", address=0, scale=0.01)])
    polls = 8
    try:
        with caplog.at_level(logging.INFO, logger="drivers.modbus"):
            for _ in range(polls):
                assert [(r.value, r.flag) for r in driver.poll(0)] == [(None, "B")]
            assert bus.stats.bad_answers == bus.stats.requests >= polls, "every try got garbage"
            peer.honest = True
            assert [(r.value, r.flag) for r in driver.poll(0)] == [(7.12, "N")]
    finally:
        peer.stop()
        bus.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("device evil (slave 1 on lan): bad answer: not a Modbus TCP answer (")
    back = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "device evil" in r.getMessage()]
    assert back == ["device evil (slave 1 on lan): answering normally again"]


def profile_instrument(name: str, device: str) -> SimInstrument:
    return SimInstrument(device, profiles.load(name).registers, clock=lambda: 1_780_000_000.0)


def test_status_words_give_m_c_d_and_exceptions_give_d(kind, tmp_path):
    dust = profile_instrument("dust-monitor", "dust")  # i12001 value map
    cod = profile_instrument("cod-analyzer", "cod")  # ASCII flag letter
    flow = profile_instrument("flow-meter", "flow")  # alarm bits, applies to w00000 only
    link = Link(kind, {1: dust, 2: cod, 3: flow}, tmp_path)
    drivers = {name: link.driver(name, unit, profiles.load(profile).registers,
                                 plan_kwargs=profiles.plan_args(profiles.load(profile)))
               for name, unit, profile in (("dust", 1, "dust-monitor"), ("cod", 2, "cod-analyzer"),
                                           ("flow", 3, "flow-meter"))}
    try:
        def flags() -> dict[str, dict[str, str]]:
            return {name: {r.channel: r.flag for r in d.poll(0)} for name, d in drivers.items()}

        normal = flags()
        assert all(f == "N" for chans in normal.values() for f in chans.values()), normal
        values = by_channel(drivers["dust"].poll(0))
        for channel, value in dust.values().items():
            assert values[channel].value == pytest.approx(value, rel=1e-6)
        for state, flag in (("maintenance", "M"), ("calibration", "C"), ("fault", "D")):
            dust.state = cod.state = state
            got = flags()
            assert set(got["dust"].values()) == {flag}, state
            assert set(got["cod"].values()) == {flag}, state
        flow.state = "fault"
        assert flags()["flow"] == {"w00000": "D", "w00000_total": "N"}
        dust.state = cod.state = flow.state = "normal"
        dust.fault = Fault("exception", 4)
        readings = drivers["dust"].poll(0)
        assert {(r.value, r.flag) for r in readings} == {(None, "D")}
        for gateway_code in (10, 11):  # a TCP-to-RTU gateway: the instrument behind it gave no answer
            dust.fault = Fault("exception", gateway_code)
            sent = drivers["dust"].bus.stats.requests
            readings = drivers["dust"].poll(0)
            assert {(r.value, r.flag) for r in readings} == {(None, "B")}, gateway_code
            assert drivers["dust"].bus.stats.requests - sent == 2, "tried again, as for no answer (retries 1)"
        dust.fault = None
        assert {r.flag for r in drivers["dust"].poll(0)} == {"N"}
    finally:
        link.close()


@pytest.mark.parametrize("refusal", ["02", "03"])
def test_merged_read_refused_with_exception_02_or_03_falls_back_to_single_reads_once(refusal, tmp_path, caplog):
    bank = RegisterBank(strict=True)  # 02: registers 1..2 undefined: a merged read of 0..3 is refused
    if refusal == "03":
        bank = RegisterBank()
        bank.max_read = 2  # 03: "quantity out of range", a slave that serves at most 2 registers a read
    bank.set("holding", 0, [100])
    bank.set("holding", 3, [200])
    specs = [RegisterSpec(channel="a", address=0), RegisterSpec(channel="b", address=3)]
    link = Link("tcp", {1: bank}, tmp_path)
    try:
        driver = link.driver("picky", 1, specs)
        assert len(driver.requests) == 1
        with caplog.at_level(logging.WARNING, logger="drivers.modbus"):
            for _ in range(3):
                assert [(r.value, r.flag) for r in driver.poll(0)] == [(100.0, "N"), (200.0, "N")]
    finally:
        link.close()
    assert link.core.counters[1].requests == 1 + 3 * 2, "refused once, then two reads per poll"
    assert len([m for m in caplog.messages if "one by one" in m and f"exception {refusal}" in m]) == 1


# --------------------------------------------------------------------------------------------------
# links that go away


def test_usb_unplug_and_replug_resumes_polling_by_itself(tmp_path, caplog):
    bank = RegisterBank()
    bank.set("holding", 0, [712])
    link = Link("rtu", {4: bank}, tmp_path, timeout=0.2)
    driver = link.driver("ph", 4, [RegisterSpec(channel="w01001", address=0, type="int16", scale=0.01)])
    try:
        with caplog.at_level(logging.INFO, logger="drivers.modbus"):
            assert driver.poll(0)[0].flag == "N"
            link.server.stop()  # unplugged: the pty is gone and so is the link
            assert not os.path.lexists(link.path)
            for _ in range(5):
                start = time.monotonic()
                r = driver.poll(0)[0]
                assert (r.value, r.flag) == (None, "B")
                assert time.monotonic() - start < 0.05, "a missing port costs no timeout"
            link.server = RtuPtyServer(link.core, link.path).start()  # replugged: a new tty behind the link
            wait_for(lambda: driver.poll(0)[0].flag == "N", 5, "polling resumed")
            assert driver.poll(0)[0].value == 7.12
            # Only the link removed and re-created (same tty behind it): same story.
            os.unlink(link.path)
            assert driver.poll(0)[0].flag == "B"
            assert link.server.pty_name is not None
            os.symlink(link.server.pty_name, link.path)
            wait_for(lambda: driver.poll(0)[0].flag == "N", 5, "polling resumed on the same tty")
    finally:
        link.close()
    lost = [m for m in caplog.messages if ": lost " in m]
    back = [m for m in caplog.messages if m.endswith(" is back")]
    assert len(lost) == 2 and len(back) == 2, caplog.messages


def test_tcp_connection_dropped_or_server_restarted_is_reopened(tmp_path, caplog):
    bank = RegisterBank()
    bank.set("holding", 0, wire_words("f", 3.25, "CDAB"))
    link = Link("tcp", {1: bank}, tmp_path, timeout=0.3, retries=0)
    spec = [RegisterSpec(channel="w21003", address=0, type="float32", order="CDAB")]
    driver = link.driver("nh3n", 1, spec)
    port = link.server.port
    try:
        with caplog.at_level(logging.INFO, logger="drivers.modbus"):
            assert driver.poll(0)[0].value == 3.25
            assert isinstance(link.server, TcpServer)
            link.server.drop_connections()  # the gateway rebooted its sockets
            wait_for(lambda: link.server.connection_count == 0, 2, "server side closed")
            assert driver.poll(0)[0].value == 3.25, "reopened within the same poll, not a retry"
            link.server.stop()
            for _ in range(3):
                assert driver.poll(0)[0].flag == "B"
            link.server = TcpServer(link.core, "127.0.0.1", port).start()
            wait_for(lambda: driver.poll(0)[0].flag == "N", 5, "server back")
    finally:
        link.close()
    assert len([m for m in caplog.messages if ": lost " in m]) == 1, caplog.messages
    assert len([m for m in caplog.messages if m.endswith(" is back")]) == 1, caplog.messages


class UnreachablePeer:
    """A loopback port whose accept queue is full: its SYNs go unanswered, so a connect() to it takes the
    whole timeout, as to a gateway powered off or behind a cut cable (no RST, no ICMP)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=0)
        self.port = self.listener.getsockname()[1]
        self.fillers = []
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", self.port))
            self.fillers.append(filler)

    def close(self) -> None:
        for sock in (*self.fillers, self.listener):
            sock.close()


def test_an_unreachable_tcp_peer_reads_null_b_at_every_poll_without_overrunning_the_bus(caplog):
    # Four devices behind a gateway that went dark, due every second, timeout 0.4 s. Each device poll
    # tried to connect and waited the whole timeout: 1.6 s of connects per 1 s round, so polls were
    # skipped (fewer rows than intervals, not even null/B ones) and every device logged an overrun
    # WARNING a minute for as long as the outage lasted. A connect that failed is now tried again only
    # after four times what it cost: the other polls read null/B at once, on their slots.
    peer = UnreachablePeer()
    bus = ModbusBus("lan", "tcp", host="127.0.0.1", tcp_port=peer.port, timeout=0.4, retries=1)
    drivers = [ModbusDriver(f"d{i}", bus, i, 1.0, [RegisterSpec(channel="c", address=0)]) for i in range(1, 5)]
    received: list[Reading] = []
    poller = BusPoller("lan", drivers, received.extend)
    try:
        with caplog.at_level(logging.INFO):
            poller.start()
            wait_for(lambda: all(sum(r.device == d.device_id for r in received) >= 5 for d in drivers), 30,
                     "five polls of every device")
    finally:
        poller.stop()
        poller.join(5)
        peer.close()
    assert {(r.value, r.flag) for r in received} == {(None, "B")}
    assert poller.missed == dict.fromkeys(poller.missed, 0), poller.missed
    assert not [m for m in caplog.messages if " late " in m], caplog.messages
    down = [m for m in caplog.messages if m.startswith("bus lan: ")]
    assert len(down) == 1 and "cannot open" in down[0] and "timed out" in down[0], down
    assert all((d.problem or "").startswith("bus lan: ") for d in drivers), [d.problem for d in drivers]


def test_a_slow_failed_connect_waits_at_most_connect_backoff_max_s_before_the_next_try(monkeypatch):
    # A failed connect that was slow was tried again only after four times what it cost, without a cap:
    # a name server that hangs 20 s (the cost includes the name's resolution) kept the bus's devices at
    # null/B for up to 80 s after the gateway and the resolver were back. The wait is now at most
    # CONNECT_BACKOFF_MAX_S (here lowered so that the cap is less than four connect timeouts): once it has
    # passed, the next poll connects. A refused connect (nothing listens) is still tried again at once.
    monkeypatch.setattr(modbus_link, "CONNECT_BACKOFF_MAX_S", 0.5)
    peer = UnreachablePeer()
    port = peer.port
    bus = ModbusBus("lan", "tcp", host="127.0.0.1", tcp_port=port, timeout=0.4, retries=0)
    bank = RegisterBank()
    bank.set("holding", 0, [7])
    driver = ModbusDriver("d1", bus, 1, 1.0, [RegisterSpec(channel="c", address=0)])
    server = None
    try:
        assert driver.poll(0)[0].flag == "B"  # the connect took the whole timeout
        failed_at = time.monotonic()
        peer.close()
        server = TcpServer(SlaveCore({1: bank}), "127.0.0.1", port).start()
        wait_for(lambda: time.monotonic() > failed_at + modbus_link.CONNECT_BACKOFF_MAX_S, 5, "the cap passed")
        reading = driver.poll(0)[0]
        assert (reading.value, reading.flag) == (7, "N"), "reconnected once the capped backoff had passed"
        server.stop()
        server = None
        assert driver.poll(0)[0].flag == "B"  # the connection is gone and a connect is refused at once
        server = TcpServer(SlaveCore({1: bank}), "127.0.0.1", port).start()
        reading = driver.poll(0)[0]
        assert (reading.value, reading.flag) == (7, "N"), "a refused connect is tried again at the next poll"
    finally:
        bus.close()
        if server is not None:
            server.stop()


# --------------------------------------------------------------------------------------------------
# writes


def test_a_gateway_that_resets_every_connection_logs_a_few_lines_a_minute_not_one_per_poll(caplog):
    """A gateway that refuses connections at every other poll and, in between, accepts them and resets
    each at the first request: the link is lost and back at every other poll. The journal of a gateway
    on an SD card gets at most a few lost/back lines a minute, not two per poll. (The test turns the
    gateway's listener off and on between polls: whether a reset lands before or after the connection
    is set up must not decide what is tested.)"""
    port = free_port()
    resets = 0

    def serve(listener: socket.socket) -> None:
        nonlocal resets
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
            conn.settimeout(2)
            try:
                conn.recv(260)
            except OSError:
                pass
            conn.close()
            resets += 1

    bus = ModbusBus("lan", "tcp", host="127.0.0.1", tcp_port=port, timeout=0.2, retries=0)
    driver = ModbusDriver("dev", bus, 1, 1.0, [RegisterSpec(channel="c", address=0)])
    listener = None
    try:
        with caplog.at_level(logging.INFO, logger="drivers.modbus"):
            for poll in range(30):
                if poll % 2:
                    listener = socket.create_server(("127.0.0.1", port))
                    threading.Thread(target=serve, args=(listener,), name="resetting-gateway", daemon=True).start()
                elif listener is not None:
                    listener.close()
                    listener = None
                assert [(r.value, r.flag) for r in driver.poll(0)] == [(None, "B")]
    finally:
        bus.close()
        if listener is not None:
            listener.close()
    assert resets >= 15, "the link was lost and reopened again and again"
    link_lines = [m for m in caplog.messages if m.startswith("bus lan: ") and (" lost " in m or m.endswith(" is back")
                                                                             or " open" in m)]
    assert 2 <= len(link_lines) <= 7, link_lines  # open, then at most 3 lost + 3 back within the minute


def test_writes_from_another_thread_run_between_polls(tmp_path):
    relay, silent = RegisterBank(), RegisterBank()
    silent.fault = Fault("silent")
    link = Link("rtu", {10: relay, 11: silent}, tmp_path, timeout=0.3, retries=0)
    spec = [RegisterSpec(channel="x", address=0)]
    sampler = link.driver("sampler", 10, spec)
    dead = link.driver("dead", 11, spec)
    try:
        done_at: list[float] = []
        poll_end: list[float] = []
        poll = threading.Thread(target=lambda: (dead.poll(0), poll_end.append(time.monotonic())))
        poll.start()
        wait_for(lambda: link.bus.busy, 2, "the poll holds the wire")
        future = link.bus.write("sampler", "coil", 0, True)
        future.add_done_callback(lambda f: done_at.append(time.monotonic()))
        assert not future.done(), "the write waits for the poll in progress"
        poll.join(5)
        result = future.result(5)
        assert result.ok and relay.get("coil", 0) == [1]
        assert done_at[0] >= poll_end[0] - 0.01
        assert sampler.write("register", 5, -2).result(5).ok and relay.get("holding", 5) == [0xFFFE]
        assert link.bus.write("sampler", "coil", 0, False).result(5).ok and relay.get("coil", 0) == [0]
        failed = link.bus.write("dead", "coil", 0, True).result(5)
        assert not failed.ok and failed.flag == "B"
        relay.strict = True
        refused = link.bus.write("sampler", "register", 99, 1).result(5)
        assert not refused.ok and refused.flag == "D"
        with pytest.raises(ValueError):
            link.bus.write("nobody", "coil", 0, 1)
        with pytest.raises(ValueError):
            link.bus.write("sampler", "register", 0, 70000)
        relay.strict = False
        writer = DeviceWriter(lambda: [sampler, dead])  # what the alarm engine calls, on its own thread
        writer("sampler", "coil", 1, True)
        assert relay.get("coil", 1) == [1]
        with pytest.raises(WriteFailed):
            writer("dead", "coil", 0, True)
        with pytest.raises(LookupError):
            writer("fog", "coil", 0, True)
    finally:
        link.close()


# --------------------------------------------------------------------------------------------------
# end to end: `edge-agent simulate` + `edge-agent run`


def tcp_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def test_simulate_and_run_deliver_normal_readings_for_every_channel(tmp_path, broker):
    config = yaml.safe_load((REPO / "config/examples/modbus-demo.yaml").read_text())
    link = tmp_path / "dev" / "ttySIM0"
    tcp_port = free_port()
    config["mqtt"]["url"] = broker.url
    config["storage"]["path"] = str(tmp_path / "buffer.db")
    for bus in config["buses"].values():
        if bus["type"] == "rtu":
            bus["port"] = str(link)
        else:
            bus["port"] = tcp_port
    for dev in config["devices"].values():
        dev["interval"] = 0.5
    cfg = write_config(tmp_path / "station.yaml", config)
    expected = {(dev_id, spec.channel) for dev_id, dev in config["devices"].items()
                for spec in profiles.load(dev["profile"]).registers if spec.role == "value"}
    sim_log = open(tmp_path / "simulate.log", "wb")
    sim = subprocess.Popen([sys.executable, "-m", "agent.cli", "simulate", "-c", str(cfg)], cwd=REPO,
                           stdout=sim_log, stderr=subprocess.STDOUT)
    collector = Collector(broker, "env/#")
    agent = None
    try:
        wait_for(lambda: link.is_symlink() and tcp_accepts(tcp_port), 15, "simulators listening")
        agent = AgentProcess(cfg)

        def normal_channels() -> set[tuple[str, str]]:
            return {(r["device"], r["channel"]) for m in collector.json_messages("/data")
                    for r in m.get("readings", []) if r["flag"] == "N" and r["value"] is not None}

        wait_for(lambda: expected <= normal_channels(), 20, f"flag N for all {len(expected)} channels")
    finally:
        if agent is not None:
            assert agent.stop() == 0
        collector.close()
        sim.send_signal(signal.SIGTERM)
        assert sim.wait(10) == 0
        sim_log.close()
    assert not os.path.lexists(link), "simulate removes its pty link on exit"
    assert "serving" in (tmp_path / "simulate.log").read_text()


def status_json(cfg: Path) -> dict:
    result = subprocess.run([sys.executable, "-m", "agent.cli", "status", "-c", str(cfg), "--json"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_status_says_why_a_device_fails_and_forgets_it_once_it_answers(tmp_path, broker):
    """The operator sees `failing` for a missing port, a silent slave, a wrong baud rate alike; the
    device's `problem` says which (here: nothing listens on the gateway's port), until it answers."""
    port = free_port()
    config = {
        "station": {"id": "WHY00001", "type": "other", "timezone": "Asia/Shanghai"},
        "storage": {"path": str(tmp_path / "buffer.db"), "commit_interval_ms": 100},
        "mqtt": {"url": broker.url, "reconnect_max": 1},
        "buses": {"lan": {"type": "tcp", "host": "127.0.0.1", "port": port, "timeout": 0.2}},
        "devices": {"flow": {"bus": "lan", "slave": 1, "interval": 0.3,
                             "registers": [{"channel": "w00000", "address": 0, "unit": "L/s", "scale": 0.1}]}},
    }
    cfg = write_config(tmp_path / "station.yaml", config)
    bank = RegisterBank()
    bank.set("holding", 0, [125])
    server = None
    agent = AgentProcess(cfg)
    try:
        def flow() -> dict:
            return status_json(cfg)["devices"]["flow"]

        failing = wait_for(lambda: (d := flow())["health"] == "failing" and d["problem"] and d, 20, "failing, with why")
        assert failing["problem"] == f"bus lan: 127.0.0.1:{port} unavailable: Connection refused"
        server = TcpServer(SlaveCore({1: bank}), "127.0.0.1", port).start()
        answering = wait_for(lambda: (d := flow())["health"] == "ok" and d, 20, "answering")
        assert answering["problem"] is None and answering["channels"]["w00000"]["value"] == 12.5
    finally:
        assert agent.stop() == 0
        if server is not None:
            server.stop()


def test_simulate_says_what_to_change_when_a_tcp_bus_is_not_an_address_of_this_machine(tmp_path):
    """The checklist's step 5 runs `edge-agent simulate` on the laptop with the station's file; its Modbus
    TCP gateway (192.168.1.50 in the examples) is no address of the laptop. simulate stopped with the
    socket's words alone ("Cannot assign requested address"); it now says what to change."""
    config = yaml.safe_load((REPO / "config/examples/modbus-demo.yaml").read_text())
    config["storage"]["path"] = str(tmp_path / "buffer.db")
    config["buses"] = {name: bus for name, bus in config["buses"].items() if bus["type"] == "tcp"}
    for bus in config["buses"].values():
        bus["host"] = "192.0.2.50"  # TEST-NET-1: never an address of this machine
    config["devices"] = {d: dev for d, dev in config["devices"].items() if dev["bus"] in config["buses"]}
    cfg = write_config(tmp_path / "station.yaml", config)
    sim = subprocess.run([sys.executable, "-m", "agent.cli", "simulate", "-c", str(cfg)], cwd=REPO,
                         capture_output=True, text=True, timeout=30)
    assert sim.returncode == 1
    said = next(line for line in sim.stderr.splitlines() if "cannot serve 192.0.2.50:" in line)
    assert "192.0.2.50 is not an address of this machine" in said and "host: 127.0.0.1" in said, said
