"""The Modbus driver's logic without a wire (a scripted bus), the simulated slave's protocol handling,
and the simulated instruments: what each failure turns into, which flags status words give, which
answers answer a request and which request a frame goes to (pure logic; on real frames in
tests/integration/test_modbus.py), that the simulators encode what the profiles say, and that faults
can be switched from a control file."""

from __future__ import annotations

import logging
import math
import struct
from contextlib import contextmanager

import pytest
from harness import free_port
from hypothesis import given, settings
from hypothesis import strategies as st
from pymodbus.framer import FramerRTU

from agent.config import parse_config
from drivers import modbus, profiles
from drivers.modbus import (
    BadAnswer,
    BusStats,
    ExceptionReply,
    Garbled,
    LinkDown,
    ModbusBus,
    ModbusDriver,
    NoAnswer,
    build_bus_drivers,
)
from drivers.modbus import crc16 as driver_crc16
from drivers.modbus_codec import decode, encode_raw, flag_from_status
from drivers.modbus_frames import _Ask, _take_mbap_frame, _take_rtu_frame
from drivers.modbus_link import _Link
from drivers.planner import plan, slice_response
from drivers.registers import RegisterSpec
from drivers.sim.instruments import STATE_FLAGS, SimControl, SimInstrument, _status_raw, parse_fault
from drivers.sim.slave import Fault, RegisterBank, SlaveCore, crc16, rtu_frame

# --------------------------------------------------------------------------------------------------
# the driver against a scripted bus


class ScriptedBus(ModbusBus):
    """A ModbusBus whose reads come from `answer(table, address, count)` (a list, or an exception to raise)."""

    def __init__(self, answer):
        super().__init__("scripted", "tcp", host="nowhere.invalid")
        self.answer = answer
        self.reads: list[tuple[str, int, int]] = []
        self.max_tries: list[int | None] = []

    @contextmanager
    def owned(self):
        yield self

    def read(self, slave, table, address, count, *, max_tries=None):
        self.reads.append((table, address, count))
        self.max_tries.append(max_tries)
        got = self.answer(table, address, count)
        if isinstance(got, Exception):
            raise got
        return got


def f32(value: float) -> list[int]:
    data = struct.pack(">f", value)
    return [int.from_bytes(data[:2], "big"), int.from_bytes(data[2:], "big")]


MAP = [
    RegisterSpec(channel="w01018", address=0, type="float32", unit="mg/L", range=(0, 100)),
    RegisterSpec(channel="w21003", address=2, type="float32", unit="mg/L"),
    RegisterSpec(channel="i12001", address=4, role="status", flags={0: "N", 1: "M", 2: "D", 3: "C"}),
    RegisterSpec(channel="w01001", address=10, type="int16", table="input", scale=0.01),
]


def memory(status: int = 0, cod: float = 35.5):
    holding = f32(cod) + f32(2.25) + [status]

    def answer(table, address, count):
        if table == "holding":
            return holding[address : address + count]
        return [712] * count
    return answer


def test_normal_poll_reads_each_planned_request_once_and_flags_n():
    bus = ScriptedBus(memory())
    driver = ModbusDriver("cod", bus, 2, 60, MAP)
    readings = driver.poll(123)
    assert bus.reads == [("holding", 0, 5), ("input", 10, 1)]
    assert [(r.channel, r.value, r.unit, r.flag, r.ts_ms) for r in readings] == [
        ("w01018", 35.5, "mg/L", "N", 123), ("w21003", 2.25, "mg/L", "N", 123), ("w01001", 7.12, None, "N", 123)]


@pytest.mark.parametrize(("status", "flag"), [(1, "M"), (2, "D"), (3, "C"), (99, "D")])
def test_status_word_flags_every_channel_and_keeps_values(status, flag):
    readings = ModbusDriver("cod", ScriptedBus(memory(status)), 2, 60, MAP).poll(0)
    assert {r.flag for r in readings} == {flag}
    assert readings[0].value == 35.5


def test_over_range_is_t_but_a_status_flag_is_more_severe():
    assert ModbusDriver("cod", ScriptedBus(memory(0, cod=150)), 2, 60, MAP).poll(0)[0].flag == "T"
    assert ModbusDriver("cod", ScriptedBus(memory(1, cod=150)), 2, 60, MAP).poll(0)[0].flag == "M"


@pytest.mark.parametrize("error", [NoAnswer("timeout"), LinkDown("port missing")])
def test_no_answer_gives_up_the_device_with_flag_b(error):
    bus = ScriptedBus(lambda *a: error)
    readings = ModbusDriver("cod", bus, 2, 60, MAP).poll(0)
    assert {(r.value, r.flag) for r in readings} == {(None, "B")}
    assert len(bus.reads) == 1, "the other requests of the device are not tried"


def test_exception_reply_flags_d_only_the_channels_of_that_request():
    base = memory()

    def answer(table, address, count):
        return ExceptionReply(4) if table == "input" else base(table, address, count)
    readings = {r.channel: r for r in ModbusDriver("cod", ScriptedBus(answer), 2, 60, MAP).poll(0)}
    assert (readings["w01001"].value, readings["w01001"].flag) == (None, "D")
    assert readings["w01018"].flag == "N"


def test_unreadable_status_word_flags_its_channels_d():
    specs = [RegisterSpec(channel="a", address=0), RegisterSpec(channel="b", address=100),
             RegisterSpec(channel="s", address=200, role="status", bits={0: "M"}, applies_to=("a",))]

    def answer(table, address, count):
        return ExceptionReply(2) if address == 200 else [5] * count
    readings = {r.channel: r.flag for r in ModbusDriver("d", ScriptedBus(answer), 1, 1, specs).poll(0)}
    assert readings == {"a": "D", "b": "N"}


def test_exception_02_on_a_merged_read_splits_it_for_good(caplog):
    specs = [RegisterSpec(channel="a", address=0), RegisterSpec(channel="b", address=3),
             RegisterSpec(channel="c", address=50)]

    def answer(table, address, count):
        return ExceptionReply(2) if count > 1 else [address + 1]
    bus = ScriptedBus(answer)
    driver = ModbusDriver("picky", bus, 1, 1, specs)
    with caplog.at_level(logging.WARNING):
        first = [(r.value, r.flag) for r in driver.poll(0)]
        second = [(r.value, r.flag) for r in driver.poll(0)]
    assert first == second == [(1.0, "N"), (4.0, "N"), (51.0, "N")]
    assert bus.reads == [("holding", 0, 4), ("holding", 0, 1), ("holding", 3, 1), ("holding", 50, 1),
                         ("holding", 0, 1), ("holding", 3, 1), ("holding", 50, 1)]
    assert sum("one by one" in m for m in caplog.messages) == 1


def test_exception_02_on_a_single_entry_is_d_not_a_split():
    bus = ScriptedBus(lambda *a: ExceptionReply(2))
    readings = ModbusDriver("d", bus, 1, 1, [RegisterSpec(channel="a", address=0)]).poll(0)
    assert [(r.value, r.flag) for r in readings] == [(None, "D")]


def test_device_problems_are_logged_once_each_way(caplog):
    state = {"error": NoAnswer("timeout")}
    bus = ScriptedBus(lambda t, a, c: state["error"] or [1] * c)
    driver = ModbusDriver("cod", bus, 2, 1, [RegisterSpec(channel="a", address=0)])
    with caplog.at_level(logging.INFO, logger="drivers.modbus"):
        for _ in range(3):
            driver.poll(0)
        state["error"] = None
        for _ in range(3):
            driver.poll(0)
    device_lines = [m for m in caplog.messages if m.startswith("device cod")]
    assert len(device_lines) == 2 and "answering normally again" in device_lines[1]


def test_a_device_failing_differently_at_every_poll_is_logged_once_per_kind_not_per_poll(caplog):
    # A peer answering garbage gives another text at every poll (the bytes are in it); a gateway may
    # alternate garbage and silence, or exceptions at other registers. None of that is news once the
    # device is known to fail: one line when it goes bad, at most one more for each other kind of failure,
    # one when it recovers; then a new failure is news again.
    polls = iter(
        [BadAnswer(f"not a Modbus TCP answer ({i:032x}), after 2 tries") for i in range(5)]
        + [Garbled("garbled answer, after 2 tries"), BadAnswer("not a Modbus TCP answer (ab), after 2 tries")] * 3
        + [ExceptionReply(4), ExceptionReply(6), NoAnswer("no answer, after 2 tries")]
        + [None, None]
        + [BadAnswer(f"not a Modbus TCP answer ({i:02x}), after 2 tries") for i in range(3)]
    )
    state: dict = {}
    bus = ScriptedBus(lambda t, a, c: state["now"] or [1] * c)
    driver = ModbusDriver("cod", bus, 2, 1, [RegisterSpec(channel="a", address=0)])
    with caplog.at_level(logging.INFO, logger="drivers.modbus"):
        for state["now"] in polls:
            flags = {r.flag for r in driver.poll(0)}
            assert flags == ({"N"} if state["now"] is None else {"D"} if isinstance(state["now"], ExceptionReply)
                             else {"B"})
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.getMessage().startswith("device cod")]
    assert lines == [
        ("WARNING", f"device cod (slave 2 on scripted): bad answer: not a Modbus TCP answer ({0:032x}), after 2 tries"),
        ("WARNING", "device cod (slave 2 on scripted): garbled answer, after 2 tries"),
        ("WARNING", "device cod (slave 2 on scripted): exception 04 reading holding 0+1 (slave device failure)"),
        ("WARNING", "device cod (slave 2 on scripted): no answer, after 2 tries"),
        ("INFO", "device cod (slave 2 on scripted): answering normally again"),
        ("WARNING", "device cod (slave 2 on scripted): bad answer: not a Modbus TCP answer (00), after 2 tries"),
    ]


def test_a_device_given_up_twice_in_a_row_is_tried_once_per_poll_until_it_answers():
    # A dead slave costs the bus timeout x tries at every poll, and the devices after it lose their
    # interval; after two polls given up it gets one try per poll (one timeout), full tries again once
    # it answered (values, or an exception: it is alive) or sent frames that answer something else (a
    # peer that talks: its flood is found on a second try).
    silent, refused = NoAnswer("no answer, after 3 tries"), BadAnswer("function code 4 in the answer, after 3 tries")
    script = iter([silent] * 3 + [None] + [silent] * 2 + [refused] + [None] + [silent] * 2 + [ExceptionReply(2), None])
    state: dict = {}
    bus = ScriptedBus(lambda *a: state["now"] or [1])
    driver = ModbusDriver("ghost", bus, 9, 1, [RegisterSpec(channel="a", address=0)])
    for state["now"] in script:
        driver.poll(0)
    assert bus.max_tries == [None, None, 1, 1, None, None, 1, None, None, None, 1, None]


def test_the_problem_status_shows_is_the_last_poll_s_but_a_bad_answer_s_bytes_do_not_rewrite_it():
    script = iter([NoAnswer("no answer, after 3 tries")] * 2 + [NoAnswer("no answer, after 1 try")]
                  + [BadAnswer(f"not a Modbus TCP answer ({i:02x}), after 1 try") for i in range(3)] + [None])
    state: dict = {}
    driver = ModbusDriver("ghost", ScriptedBus(lambda *a: state["now"] or [1]), 9, 1,
                          [RegisterSpec(channel="a", address=0)])
    said = []
    for state["now"] in script:
        driver.poll(0)
        said.append(driver.problem)
    assert said == ["no answer, after 3 tries"] * 2 + ["no answer, after 1 try"] + [
        "bad answer: not a Modbus TCP answer (00), after 1 try"] * 3 + [None]


def test_a_device_that_keeps_failing_is_reminded_of_with_the_count(caplog, monkeypatch):
    monkeypatch.setattr(modbus, "STILL_FAILING_EVERY_S", 0.0)
    bus = ScriptedBus(lambda *a: NoAnswer("no answer, after 2 tries"))
    driver = ModbusDriver("ghost", bus, 9, 1, [RegisterSpec(channel="a", address=0)])
    with caplog.at_level(logging.INFO, logger="drivers.modbus"):
        for _ in range(3):
            driver.poll(0)
    assert [m for m in caplog.messages if m.startswith("device ghost")] == [
        "device ghost (slave 9 on scripted): no answer, after 2 tries",
        "device ghost (slave 9 on scripted): still failing, 2 polls in a row: no answer, after 2 tries",
        "device ghost (slave 9 on scripted): still failing, 3 polls in a row: no answer, after 2 tries",
    ]
    monkeypatch.setattr(modbus, "STILL_FAILING_EVERY_S", 900.0)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="drivers.modbus"):
        driver.poll(0)
    assert not [m for m in caplog.messages if m.startswith("device ghost")], "within the period: no line"


def test_a_tcp_bus_that_cannot_connect_says_why(caplog):
    # Nothing listens on the port: the technician reads "Connection refused" (wrong port, service off),
    # not a bare "connection failed" that looks the same as a wrong address or a typo in the name.
    port = free_port()  # below the ephemeral range: never a port this connection could get as its source
    bus = ModbusBus("lan", "tcp", host="127.0.0.1", tcp_port=port, timeout=0.2)
    driver = ModbusDriver("flow", bus, 1, 1, [RegisterSpec(channel="a", address=0)])
    with caplog.at_level(logging.WARNING, logger="drivers.modbus"):
        assert [(r.value, r.flag) for r in driver.poll(0)] == [(None, "B")]
    driver.close()
    assert [m for m in caplog.messages if m.startswith("bus lan")] == [
        f"bus lan: cannot open 127.0.0.1:{port} (Connection refused); its devices read flag B until it returns"]


def test_a_bus_that_stays_down_is_reminded_of_as_a_failing_device_is(caplog, monkeypatch):
    """A TCP gateway refusing (or a USB adapter gone) for days was logged once, at its first failure: the
    journal's last hour (or all of it, once journald rotated that line away) showed a station with
    nothing wrong, where a silent slave is reminded of every STILL_FAILING_EVERY_S."""
    port = free_port()  # below the ephemeral range: never a port this connection could get as its source
    monkeypatch.setattr(modbus, "STILL_FAILING_EVERY_S", 0.0)
    bus = ModbusBus("lan", "tcp", host="127.0.0.1", tcp_port=port, timeout=0.2)
    driver = ModbusDriver("flow", bus, 1, 1, [RegisterSpec(channel="a", address=0)])
    with caplog.at_level(logging.WARNING, logger="drivers.modbus"):
        for _ in range(3):
            assert [(r.value, r.flag) for r in driver.poll(0)] == [(None, "B")]
    said = [m for m in caplog.messages if m.startswith("bus lan")]
    assert said[0] == (f"bus lan: cannot open 127.0.0.1:{port} (Connection refused); its devices read flag B until "
                       "it returns")
    reminder = f"bus lan: still cannot open 127.0.0.1:{port} (Connection refused), down for "
    assert len(said) == 3 and all(m.startswith(reminder) and m.endswith("; its devices read flag B until it returns")
                                  for m in said[1:]), said
    monkeypatch.setattr(modbus, "STILL_FAILING_EVERY_S", 900.0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="drivers.modbus"):
        driver.poll(0)
    driver.close()
    assert not [m for m in caplog.messages if m.startswith("bus lan")], "within the period: no line"


def test_write_checks_its_arguments_at_once_and_fails_cleanly_on_a_closed_bus():
    bus = ModbusBus("lan", "tcp", host="127.0.0.1", tcp_port=1, slaves={"relay": 5})
    for args in [("nobody", "coil", 0, 1), ("relay", "valve", 0, 1), ("relay", "coil", 70000, 1),
                 ("relay", "coil", 0, 2), ("relay", "register", 0, 65536), ("relay", "register", 0, 1.5)]:
        with pytest.raises(ValueError):
            bus.write(*args)
    bus.close()
    result = bus.write("relay", "coil", 0, True).result(1)
    assert not result.ok and result.error == "bus closed"


def test_build_bus_drivers_shares_one_bus_and_uses_profile_planning():
    config = parse_config("""
station: {id: T1, type: outfall}
storage: {path: /tmp/x.db}
mqtt: {url: "mqtt://127.0.0.1:1"}
buses:
  line: {type: rtu, port: /dev/nonexistent-tty, timeout: 0.2, retries: 2}
devices:
  cod: {bus: line, slave: 2, interval: 30, profile: cod-analyzer, registers: [{channel: w01018, range: [0, 500]},
       {channel: temp, address: 0x46, type: int16, scale: 0.1}]}
  relay: {bus: line, slave: 10, interval: 5, registers: [{channel: sampler_on, address: 0, table: coil}]}
""")
    drivers = build_bus_drivers("line", config.buses["line"], config.devices)
    assert [d.device_id for d in drivers] == ["cod", "relay"]
    bus = drivers[0].bus
    assert drivers[1].bus is bus and bus.kind == "rtu" and bus.timeout == 0.2 and bus.retries == 2
    assert bus.slaves == {"cod": 2, "relay": 10}
    assert len(drivers[0].requests) == 2, "max_gap 0 (the profile's): 0x42..0x44, then 0x46"
    assert next(s for s in drivers[0].specs if s.channel == "w01018").range == (0, 500)
    readings = drivers[0].poll(0)  # the port does not exist: flag B at once, never an exception
    assert {(r.value, r.flag) for r in readings} == {(None, "B")}
    for d in drivers:
        d.close()


# --------------------------------------------------------------------------------------------------
# answers and requests (pure logic; the same on real frames in tests/integration/test_modbus.py)


HOLDING_0_2 = _Ask.read(1, "holding", 0, 2)


@pytest.mark.parametrize(("unit", "pdu", "problem"), [
    (1, "0304" "00010002", None),
    (1, "8302", None),  # a Modbus exception answers any request of its function
    (2, "0304" "00010002", "from unit 2"),
    (1, "0404" "00010002", "function code 4"),
    (1, "0302" "0001", "byte count 2"),
    (1, "0306" "000100020003", "byte count 6"),
    (1, "0304" "000100", "byte count 4"),  # the count says 4, 3 bytes follow
    (1, "8300", "malformed exception"),
])
def test_an_answer_must_answer_its_request(unit, pdu, problem):
    raw = bytes.fromhex(pdu)
    got = HOLDING_0_2.mismatch(unit, raw[0], raw[1:])
    assert (got is None) if problem is None else (problem in got)


def test_bits_and_write_echoes_are_checked_too():
    coils = _Ask.read(3, "coil", 0, 9)  # 9 bits: 2 bytes
    assert coils.mismatch(3, 1, bytes.fromhex("02" "0d01")) is None
    assert coils.values(bytes.fromhex("02" "0d01")) == [1, 0, 1, 1, 0, 0, 0, 0, 1]
    assert "byte count 1" in coils.mismatch(3, 1, bytes.fromhex("01" "0d"))
    assert "function code 2" in coils.mismatch(3, 2, bytes.fromhex("02" "0d01"))
    write = _Ask(3, 6, 7, value=0x0102)
    assert write.mismatch(3, 6, bytes.fromhex("00070102")) is None
    assert "echo" in write.mismatch(3, 6, bytes.fromhex("00080102"))


def rtu(unit: int, pdu: str) -> bytes:
    return rtu_frame(unit, bytes.fromhex(pdu))


def test_rtu_frames_are_found_behind_noise_and_never_made_of_broken_ones():
    good = rtu(1, "0304" "00010002")
    broken = good[:-1] + bytes([good[-1] ^ 0xFF])
    buf = bytearray(b"\x55\xaa" + broken + good + good[:3])
    assert _take_rtu_frame(buf) == (1, 3, bytes.fromhex("04" "00010002"))
    assert buf == good[:3], "noise and the broken frame dropped, the next frame's start kept"
    assert _take_rtu_frame(buf) is None
    # garbage whose "byte count" promises more bytes than will come does not hide a frame after it
    buf = bytearray(bytes.fromhex("0103fa") + good)
    assert _take_rtu_frame(buf) == (1, 3, bytes.fromhex("04" "00010002"))
    assert _take_rtu_frame(bytearray(rtu(5, "8302"))) == (5, 0x83, b"\x02")


def test_modbus_tcp_frames_are_split_and_a_foreign_stream_is_refused():
    frame = bytes.fromhex("0007" "0000" "0007" "01" "0304" "00010002")
    buf = bytearray(frame + frame[:5])
    assert _take_mbap_frame(buf) == (7, 1, 3, bytes.fromhex("04" "00010002"))
    assert _take_mbap_frame(buf) is None and len(buf) == 5
    with pytest.raises(Exception, match="not a Modbus TCP answer"):
        _take_mbap_frame(bytearray(b"HTTP/1.1 400"))


@given(st.binary(max_size=64))
def test_the_driver_crc_is_the_modbus_crc(data):
    assert driver_crc16(data) == crc16(data)


def test_a_frame_goes_to_the_oldest_request_it_answers_within_the_late_window():
    link = _Link(timeout=10.0, stats=BusStats(), bus_name="t")
    first, second, other = _Ask.read(1, "holding", 0, 2), _Ask.read(1, "holding", 20, 2), _Ask.read(1, "input", 0, 1)
    for ask in (first, other, second):
        link._remember(ask, 0.0)
    answer = (1, 3, bytes.fromhex("04" "00010002"))  # fits `first` and `second` alike
    assert link._claim(*answer).ask == first, "a slave answers in order: the older request"
    assert link._claim(*answer).ask == second
    assert link._claim(*answer) is None, "nobody waits for a third one"
    assert link._claim(1, 4, bytes.fromhex("02" "0005")).ask == other
    link._remember(first, 0.0)
    link._sent[0].until -= 2 * link.late_s  # sent long ago
    assert link._claim(*answer) is None, "past the late window an answer is no longer recognised"


# --------------------------------------------------------------------------------------------------
# the simulated slave


@given(st.binary(max_size=64))
def test_crc_matches_pymodbus(data):
    assert crc16(data).to_bytes(2, "little") == FramerRTU.compute_CRC(data).to_bytes(2, "big")


def test_crc_of_a_textbook_frame():
    assert rtu_frame(1, bytes.fromhex("0300000001")) == bytes.fromhex("010300000001840a")


def core_with_bank():
    bank = RegisterBank()
    bank.set("holding", 0, [0x1234, 0xABCD])
    bank.set("coil", 0, [1, 0, 1, 1, 0, 0, 0, 0, 1])
    return SlaveCore({1: bank}), bank


def test_slave_reads_registers_and_packs_bits_lsb_first():
    core, _ = core_with_bank()
    assert core.handle(1, bytes.fromhex("0300000002")) == bytes.fromhex("0304" "1234abcd")
    assert core.handle(1, bytes.fromhex("0100000009")) == bytes.fromhex("0102" "0d01")
    assert core.handle(2, bytes.fromhex("0300000002")) is None, "another unit: no answer"


def test_slave_writes_echo_and_land_in_memory():
    core, bank = core_with_bank()
    assert core.handle(1, bytes.fromhex("050005ff00")) == bytes.fromhex("050005ff00")
    assert core.handle(1, bytes.fromhex("0600070102")) == bytes.fromhex("0600070102")
    assert core.handle(1, bytes.fromhex("10000a000204" "00010002")) == bytes.fromhex("10000a0002")
    assert core.handle(1, bytes.fromhex("0f00100003" "01" "05")) == bytes.fromhex("0f00100003")
    assert bank.get("coil", 5) == [1] and bank.get("holding", 7) == [0x0102]
    assert bank.get("holding", 10, 2) == [1, 2] and bank.get("coil", 16, 3) == [1, 0, 1]


@pytest.mark.parametrize(("pdu", "reply"), [
    ("0300000000", "8303"),  # count 0
    ("030000007e", "8302"),  # 126 registers: beyond the protocol limit
    ("03000000", "8303"),  # truncated
    ("050000 1234".replace(" ", ""), "8503"),  # a coil is FF00 or 0000
    ("2b0e01", "ab01"),  # unknown function
])
def test_slave_refuses_malformed_requests(pdu, reply):
    core, _ = core_with_bank()
    assert core.handle(1, bytes.fromhex(pdu)) == bytes.fromhex(reply)


def test_strict_bank_and_faults():
    core, bank = core_with_bank()
    bank.strict = True
    assert core.handle(1, bytes.fromhex("0300000003")) == bytes.fromhex("8302")
    bank.fault = Fault("exception", 6)
    assert core.handle(1, bytes.fromhex("0300000001")) == bytes.fromhex("8306")
    bank.fault = Fault("silent")
    assert core.handle(1, bytes.fromhex("0300000001")) is None


# --------------------------------------------------------------------------------------------------
# simulated instruments


STATUS_WORDS = [(name, s) for name in profiles.names() for s in profiles.load(name).registers if s.role == "status"]


@pytest.mark.parametrize(("name", "spec"), STATUS_WORDS, ids=[f"{n}.{s.channel}" for n, s in STATUS_WORDS])
def test_status_words_can_say_normal_and_what_their_map_knows(name, spec):
    for state, flag in STATE_FLAGS.items():
        raw = _status_raw(spec, flag)
        if raw is None:
            assert state != "normal", f"{name}: a status word must be able to say normal"
            continue
        assert flag_from_status(encode_raw(raw, spec.type, spec.order), spec) == flag, state


@settings(max_examples=60, deadline=None)
@given(t=st.floats(min_value=1.7e9, max_value=2.0e9))
def test_simulated_profiles_encode_plausible_values_exactly_as_their_maps_say(t):
    for name in profiles.names():
        specs = profiles.load(name).registers
        inst = SimInstrument(name, specs, clock=lambda t=t: t)
        values = inst.values()
        inst.refresh()
        for spec in specs:
            if spec.role != "value":
                continue
            words = inst.bank.get(spec.table, spec.address, spec.count)
            got = decode(words, spec)
            assert got is not None and math.isfinite(got)
            assert got == pytest.approx(values[spec.channel], rel=1e-6, abs=spec.scale), (name, spec.channel)
            if spec.range is not None:
                assert spec.range[0] <= values[spec.channel] <= spec.range[1]


def test_simulated_values_vary_slowly_and_reads_see_the_present():
    now = [1_780_000_000.0]
    spec = profiles.load("ph-meter").registers
    inst = SimInstrument("ph", spec, clock=lambda: now[0])
    first = inst.values()["w01001"]
    now[0] += 1
    assert abs(inst.values()["w01001"] - first) < 0.05, "one second later: nearly the same"
    words = inst.read("holding", 0, 2)
    assert isinstance(words, list)
    got = {s.channel: decode(w, s) for s, w in slice_response(plan(spec)[0], words)}
    assert got["w01001"] == pytest.approx(inst.values()["w01001"], abs=0.01)


def test_parse_fault_accepts_the_documented_spellings():
    assert parse_fault("silent") == (Fault("silent"), "normal")
    assert parse_fault("exception") == (Fault("exception", 4), "normal")
    assert parse_fault({"exception": 2}) == (Fault("exception", 2), "normal")
    assert parse_fault("calibration") == (None, "calibration")
    for bad in ("loud", {"exception": 0}, {"other": 1}, 3):
        with pytest.raises(ValueError):
            parse_fault(bad)


def test_control_file_switches_faults_when_it_changes(tmp_path, caplog):
    insts = {n: SimInstrument(n, profiles.load("dust-monitor").registers) for n in ("dust", "dust2")}
    path = tmp_path / "faults.yaml"
    ctl = SimControl(path, insts)
    assert ctl.refresh() and insts["dust"].fault is None  # no file: all normal
    path.write_text("dust: silent\ndust2: maintenance\n")
    assert ctl.refresh()
    assert insts["dust"].fault == Fault("silent") and insts["dust2"].state == "maintenance"
    assert not ctl.refresh(), "unchanged file: nothing to do"
    path.write_text("dust: [broken\n")
    with caplog.at_level(logging.ERROR):
        assert not ctl.refresh()
    assert insts["dust"].fault == Fault("silent"), "a broken file keeps the faults"
    path.unlink()
    assert ctl.refresh() and insts["dust"].fault is None and insts["dust2"].state == "normal"
