"""Acceptance from the outside: the real agent (configured by YAML only, as a technician would) polls
instruments written in `tests/instruments.py` from SPEC §2 and DOMAIN.md alone (raw sockets, raw
bytes, this project's code not imported there), publishes to a real mosquitto, and what arrives on
the data topic is checked: exact values at the extremes of every type and order, scale and offset,
the four tables, flags D (exception, status word, NaN) and B (silence, bad CRC, short frame, another
unit's answer), units, and the rhythm of the healthy devices on a bus with a dead one.
"""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
from harness import AgentProcess, Collector, sim_config, wait_for, write_config
from instruments import ModbusRtuSlave, ModbusTcpServer, Unit

INTERVAL = 0.5


def serve(kind: str, units: list[Unit], tmp_path, **bus_options) -> tuple[ModbusTcpServer | ModbusRtuSlave, dict]:
    """The independent instrument serving `units` over Modbus `kind` (tcp, or rtu on a pty), started,
    and the bus section of the agent's configuration that reaches it (with `bus_options`: timeout, ...)."""
    if kind == "tcp":
        server = ModbusTcpServer(units).start()
        return server, {"type": "tcp", "host": "127.0.0.1", "port": server.port, **bus_options}
    server = ModbusRtuSlave(units, tmp_path / "ttyBUS").start()
    return server, {"type": "rtu", "port": server.path, "baudrate": 9600, **bus_options}


@pytest.fixture
def run_station(tmp_path, broker):
    """run_station(buses, devices) -> AgentProcess configured with those YAML sections; stopped after."""
    agents: list[AgentProcess] = []

    def _run(buses: dict, devices: dict, **sections) -> AgentProcess:
        config = sim_config(tmp_path, broker, devices=0, **sections)
        config["buses"] = buses
        config["devices"] = devices
        agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
        agents.append(agent)
        return agent

    yield _run
    for agent in agents:
        assert agent.stop() == 0, agent.log()[-3000:]


def readings(collector: Collector, device: str) -> list[dict]:
    return [r for m in collector.json_messages("/data") for r in m.get("readings", []) if r["device"] == device]


def polls(collector: Collector, device: str) -> list[dict[str, dict]]:
    """The device's readings grouped by poll (same ts), in time order: [{channel: reading}]."""
    by_ts: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in readings(collector, device):
        by_ts[r["ts"]][r["channel"]] = r
    return [by_ts[ts] for ts in sorted(by_ts)]


def complete_poll(collector: Collector, device: str, channels: set[str]) -> dict[str, dict] | None:
    for poll in polls(collector, device):
        if set(poll) >= channels:
            return poll
    return None


# name, type, order, raw value, extra entry keys, value expected on MQTT
EXTREMES = [
    ("i16_min", "int16", "ABCD", -32768, {}, -32768),
    ("i16_max_badc", "int16", "BADC", 32767, {}, 32767),
    ("i16_m1_dcba", "int16", "DCBA", -1, {}, -1),
    ("u16_max_cdab", "uint16", "CDAB", 65535, {}, 65535),
    ("u16_dcba", "uint16", "DCBA", 0x1234, {}, 0x1234),
    ("i32_min_abcd", "int32", "ABCD", -2**31, {}, -2**31),
    ("i32_min_cdab", "int32", "CDAB", -2**31, {}, -2**31),
    ("i32_neg_badc", "int32", "BADC", -123456789, {}, -123456789),
    ("i32_neg_dcba", "int32", "DCBA", -123456789, {}, -123456789),
    ("u32_max_abcd", "uint32", "ABCD", 2**32 - 1, {}, 2**32 - 1),
    ("u32_cdab", "uint32", "CDAB", 0x01020304, {}, 0x01020304),
    ("u32_badc", "uint32", "BADC", 0x01020304, {}, 0x01020304),
    ("u32_dcba", "uint32", "DCBA", 0x01020304, {}, 0x01020304),
    ("i64_abcd", "int64", "ABCD", -(2**53), {}, -(2**53)),
    ("i64_cdab", "int64", "CDAB", -(2**53) + 1, {}, -(2**53) + 1),
    ("u64_2p53_abcd", "uint64", "ABCD", 2**53, {}, 2**53),
    ("u64_cdab", "uint64", "CDAB", 2**53 - 1, {}, 2**53 - 1),
    ("u64_badc", "uint64", "BADC", 0x0001020304050607, {}, 0x0001020304050607),
    ("u64_dcba", "uint64", "DCBA", 0x0001020304050607, {}, 0x0001020304050607),
    ("f32_abcd", "float32", "ABCD", 123.456, {}, 123.456),
    ("f32_cdab", "float32", "CDAB", -0.001, {}, -0.001),
    ("f32_badc", "float32", "BADC", 3.4028234663852886e38, {}, 3.4028235e38),
    ("f32_dcba", "float32", "DCBA", 23.4, {}, 23.4),
    ("f64_abcd", "float64", "ABCD", -0.1, {}, -0.1),
    ("f64_cdab", "float64", "CDAB", 1e300, {}, 1e300),
    ("f64_badc", "float64", "BADC", 2.5e-10, {}, 2.5e-10),
    ("f64_dcba", "float64", "DCBA", 123456.789, {}, 123456.789),
    ("ph_scaled", "int16", "ABCD", 712, {"scale": 0.01}, 7.12),
    ("i16_scaled_off", "int16", "ABCD", -32768, {"scale": 0.01, "offset": 5}, -322.68),
    ("u32_scaled", "uint32", "CDAB", 2**32 - 1, {"scale": 0.001}, 4294967.295),
    ("temp_off", "int16", "DCBA", -125, {"scale": 0.1, "offset": -40}, -52.5),
]


def extreme_map(unit: Unit) -> list[dict]:
    """Lay the EXTREMES out contiguously in holding registers from address 0; the inline registers."""
    from instruments import registers_for

    entries, address = [], 0
    for name, type_, order, raw, extra, _ in EXTREMES:
        unit.put("holding", address, raw, type_, order)
        entries.append({"channel": name, "address": address, "type": type_, "order": order, "unit": "x", **extra})
        address += len(registers_for(raw, type_, order))
    return entries


@pytest.mark.parametrize("kind", ["tcp", "rtu"])
def test_every_type_and_order_at_its_extremes_arrives_exact(kind, tmp_path, run_station, collector):
    unit = Unit(7)
    registers = extreme_map(unit)
    server, bus = serve(kind, [unit], tmp_path, timeout=0.5)
    try:
        run_station({"line": bus}, {"ext": {"bus": "line", "slave": 7, "interval": INTERVAL, "registers": registers}})
        names = {e[0] for e in EXTREMES}
        poll = wait_for(lambda: complete_poll(collector, "ext", names), 20, "a complete poll of ext")
        wrong = {}
        for name, _, _, _, _, expected in EXTREMES:
            r = poll[name]
            if r["value"] != expected or r["flag"] != "N" or r["unit"] != "x":
                wrong[name] = (r["value"], r["flag"], r["unit"], "expected", expected)
        assert not wrong, wrong
    finally:
        server.close()


def test_register_40001_is_address_0_of_holding_and_tables_are_kept_apart(tmp_path, run_station, collector):
    """Address 0 of holding, input, coil and discrete are four different things; the wire carries
    address 0 (not 1) for register 40001, function 03/04/01/02 for the four tables."""
    unit = Unit(1)
    unit.put("holding", 0, 401, "uint16")  # register 40001
    unit.put("holding", 1, 402, "uint16")  # register 40002
    unit.put("input", 0, 301, "uint16")  # register 30001
    unit.put("input", 1, 302, "uint16")
    unit.put("coil", 0, True)
    unit.put("coil", 1, False)
    unit.put("discrete", 0, False)
    unit.put("discrete", 1, True)
    server = ModbusTcpServer([unit]).start()
    try:
        run_station({"lan": {"type": "tcp", "host": "127.0.0.1", "port": server.port, "timeout": 0.5}},
                    {"dev": {"bus": "lan", "slave": 1, "interval": INTERVAL, "registers": [
                        {"channel": "h0", "address": 0, "type": "uint16"},
                        {"channel": "i0", "address": 0, "type": "uint16", "table": "input"},
                        {"channel": "i1", "address": 1, "type": "uint16", "table": "input"},
                        {"channel": "c0", "address": 0, "type": "bool", "table": "coil"},
                        {"channel": "c1", "address": 1, "type": "bool", "table": "coil"},
                        {"channel": "d0", "address": 0, "type": "bool", "table": "discrete"},
                        {"channel": "d1", "address": 1, "type": "bool", "table": "discrete"},
                    ]}})
        poll = wait_for(lambda: complete_poll(collector, "dev", {"h0", "i0", "i1", "c0", "c1", "d0", "d1"}), 20,
                        "a complete poll")
        assert {ch: (r["value"], r["flag"]) for ch, r in poll.items()} == {
            "h0": (401, "N"), "i0": (301, "N"), "i1": (302, "N"),
            "c0": (1, "N"), "c1": (0, "N"), "d0": (0, "N"), "d1": (1, "N")}
        first = {(f, a) for _, f, a, _ in unit.requests}
        assert (3, 0) in first and (4, 0) in first and (1, 0) in first and (2, 0) in first, unit.requests
    finally:
        server.close()


def test_non_finite_floats_read_null_with_flag_d_and_leave_the_others_normal(tmp_path, run_station, collector):
    unit = Unit(2)
    unit.put("holding", 0, math.nan, "float32", "CDAB")
    unit.put("holding", 2, math.inf, "float32", "ABCD")
    unit.put("holding", 4, -math.inf, "float64", "DCBA")
    unit.put("holding", 8, 5.25, "float32", "ABCD")
    server = ModbusTcpServer([unit]).start()
    try:
        run_station({"lan": {"type": "tcp", "host": "127.0.0.1", "port": server.port, "timeout": 0.5}},
                    {"nh3n": {"bus": "lan", "slave": 2, "interval": INTERVAL, "registers": [
                        {"channel": "nan", "address": 0, "type": "float32", "order": "CDAB"},
                        {"channel": "inf", "address": 2, "type": "float32"},
                        {"channel": "minf", "address": 4, "type": "float64", "order": "DCBA"},
                        {"channel": "w21003", "address": 8, "type": "float32", "unit": "mg/L"},
                    ]}})
        poll = wait_for(lambda: complete_poll(collector, "nh3n", {"nan", "inf", "minf", "w21003"}), 20, "a poll")
        assert {ch: (r["value"], r["flag"]) for ch, r in poll.items()} == {
            "nan": (None, "D"), "inf": (None, "D"), "minf": (None, "D"), "w21003": (5.25, "N")}
        assert poll["w21003"]["unit"] == "mg/L"
    finally:
        server.close()


# mode of the misbehaving unit -> (value, flag) its channel must read
MISBEHAVIOUR = {
    "exception": (None, "D"),
    "silent": (None, "B"),
    "badcrc": (None, "B"),
    "short": (None, "B"),
    "other_unit": (None, "B"),
}


def _two_units(mode: str) -> tuple[Unit, Unit]:
    good, bad = Unit(1), Unit(2, mode=mode)
    good.put("holding", 0, 23.4, "float32", "DCBA")
    bad.put("holding", 0, 0x1234, "uint16")
    return good, bad


def _devices(bus: str) -> dict:
    return {"cod": {"bus": bus, "slave": 1, "interval": INTERVAL, "registers": [
                {"channel": "w01018", "address": 0, "type": "float32", "order": "DCBA", "unit": "mg/L"}]},
            "bad": {"bus": bus, "slave": 2, "interval": INTERVAL, "registers": [
                {"channel": "w21003", "address": 0, "type": "uint16", "unit": "mg/L"}]}}


# Modbus TCP carries no CRC: a bad CRC is a case of RTU only.
@pytest.mark.parametrize(("kind", "mode"), [(kind, mode) for kind in ("tcp", "rtu") for mode in sorted(MISBEHAVIOUR)
                                            if not (kind == "tcp" and mode == "badcrc")])
def test_a_misbehaving_unit_reads_null_with_its_flag_and_its_neighbour_stays_normal(
        kind, mode, tmp_path, run_station, collector):
    good, bad = _two_units(mode)
    server, bus = serve(kind, [good, bad], tmp_path, timeout=0.3, retries=1)
    try:
        run_station({"line": bus}, _devices("line"))
        wait_for(lambda: len(readings(collector, "bad")) >= 3 and len(readings(collector, "cod")) >= 3, 30,
                 "three polls of each device")
        assert {(r["value"], r["flag"]) for r in readings(collector, "bad")} == {MISBEHAVIOUR[mode]}
        assert {(r["value"], r["flag"], r["unit"]) for r in readings(collector, "cod")} == {(23.4, "N", "mg/L")}
        if mode != "exception":  # no answer: tried once more (retries: 1) before it is given up
            assert sum(1 for _, f, _, _ in bad.requests if f == 3) >= 2
    finally:
        server.close()


@pytest.mark.parametrize("kind", ["tcp", "rtu"])
def test_trailing_garbage_after_an_answer_never_gives_a_wrong_value(kind, tmp_path, run_station, collector):
    """Bytes after a complete answer: the value is never taken from them, and the next polls read the
    instrument again (the garbage does not poison the following transactions for good)."""
    good, bad = _two_units("trailing")
    server, bus = serve(kind, [good, bad], tmp_path, timeout=0.3)
    try:
        run_station({"line": bus}, _devices("line"))
        wait_for(lambda: len(readings(collector, "bad")) >= 6 and len(readings(collector, "cod")) >= 6, 30,
                 "six polls of each device")
        bad_values = {(r["value"], r["flag"]) for r in readings(collector, "bad")}
        cod_values = {(r["value"], r["flag"]) for r in readings(collector, "cod")}
        assert bad_values <= {(0x1234, "N"), (None, "B")}, bad_values
        assert cod_values <= {(23.4, "N"), (None, "B")}, cod_values
    finally:
        server.close()


def test_bytes_after_a_tcp_answer_are_not_taken_for_the_start_of_the_next_one(tmp_path, run_station, collector):
    """A Modbus TCP peer that sends two bytes more than its MBAP length says after each answer (a serial
    converter forwarding the RTU answer's CRC too). No request waits for them, so they are dropped: with
    `retries: 0` neither that unit nor its neighbour on the same connection reads null/B because of them
    (the neighbour's answer was read with them in front, out of step, and refused at every poll)."""
    good, bad = _two_units("trailing")
    server, bus = serve("tcp", [good, bad], tmp_path, timeout=0.3, retries=0)
    try:
        run_station({"line": bus}, _devices("line"))
        wait_for(lambda: len(readings(collector, "bad")) >= 5 and len(readings(collector, "cod")) >= 5, 30,
                 "five polls of each device")
        assert {(r["value"], r["flag"]) for r in readings(collector, "cod")} == {(23.4, "N")}
        assert {(r["value"], r["flag"]) for r in readings(collector, "bad")} == {(0x1234, "N")}
    finally:
        server.close()


STATUS_WORDS = [
    ({"role": "status", "flags": {0: "N", 1: "M", 2: "D"}}, 2, "D"),
    ({"role": "status", "flags": {0: "N", 1: "M", 2: "D"}}, 1, "M"),
    ({"role": "status", "flags": {0: "N", 1: "M", 2: "D"}}, 0, "N"),
    ({"role": "status", "ascii": "low"}, ord("D"), "D"),
    ({"role": "status", "ascii": "high"}, ord("C") << 8, "C"),
    ({"role": "status", "bits": {0: "D", 3: "M"}}, 0b1000, "M"),
    ({"role": "status", "bits": {0: "D", 3: "M"}}, 0b1001, "D"),
]


@pytest.mark.parametrize("entry,word,flag", STATUS_WORDS)
def test_a_status_word_sets_the_flag_of_the_values(entry, word, flag, tmp_path, run_station, collector):
    unit = Unit(4)
    unit.put("holding", 0x42, 31.5, "float32", "DCBA")
    unit.put("holding", 0x44, word, "uint16")
    server = ModbusTcpServer([unit]).start()
    try:
        run_station({"lan": {"type": "tcp", "host": "127.0.0.1", "port": server.port, "timeout": 0.5}},
                    {"cod": {"bus": "lan", "slave": 4, "interval": INTERVAL, "registers": [
                        {"channel": "w01018", "address": 0x42, "type": "float32", "order": "DCBA", "unit": "mg/L"},
                        {"channel": "st", "address": 0x44, "type": "uint16", **entry}]}})
        wait_for(lambda: len(readings(collector, "cod")) >= 2, 20, "two polls")
        got = readings(collector, "cod")
        assert {r["channel"] for r in got} == {"w01018"}, "a status word is no reading of its own"
        assert {r["flag"] for r in got} == {flag}, got
    finally:
        server.close()


def _ts(r: dict) -> float:
    from datetime import datetime

    return datetime.fromisoformat(r["ts"].replace("Z", "+00:00")).timestamp()


@pytest.mark.parametrize("kind", ["tcp", "rtu"])
def test_an_answer_inside_the_timeout_is_taken_and_one_outside_is_not(kind, tmp_path, run_station, collector):
    """timeout 1 s: a slave answering after 0.4 s reads its values (N); one answering after 1.6 s,
    with no retry (`retries: 0`), reads null/B and its late answers are never taken for its neighbour's
    request, nor for its own next look-alike request. The margins are 0.6 s on either side: the test's
    instruments answer each unit's requests on their own (a unit's `delay` does not keep the server deaf
    to the others: served one after the other, 'quick' asked just after 'slow' timed out answered
    0.4 + 1.6 s after slow's request, 1 s after its own, right at the timeout, and read B now and then)."""
    quick, slow = Unit(1, delay=0.4), Unit(2, delay=1.6)
    quick.put("holding", 0, 111, "uint16")
    slow.put("holding", 0, 222, "uint16")
    slow.put("holding", 40, 333, "uint16")
    server, bus = serve(kind, [quick, slow], tmp_path, timeout=1.0, retries=0)
    try:
        run_station({"line": bus}, {
            "quick": {"bus": "line", "slave": 1, "interval": 1.0, "registers": [
                {"channel": "a", "address": 0, "type": "uint16"}]},
            "slow": {"bus": "line", "slave": 2, "interval": 1.0, "registers": [
                {"channel": "b", "address": 0, "type": "uint16"},
                {"channel": "c", "address": 40, "type": "uint16"}]}})
        wait_for(lambda: len(polls(collector, "quick")) >= 4 and len(polls(collector, "slow")) >= 4, 30,
                 "four polls of each device")
        assert {(r["value"], r["flag"]) for r in readings(collector, "quick")} == {(111, "N")}
        slow_values = {(r["channel"], r["value"], r["flag"]) for r in readings(collector, "slow")}
        assert slow_values == {("b", None, "B"), ("c", None, "B")}, slow_values
    finally:
        server.close()


def test_a_tcp_slave_slower_than_the_timeout_never_reads_its_previous_polls_answer(tmp_path, run_station,
                                                                                  collector):
    """timeout 1 s, a slave answering after 1.6 s, one register, no retry: each poll asks the very same
    request as the last one, whose late answer arrives while the new one waits. That answer is the last
    poll's (values a poll old, for a request given up), and its transaction id says so: this poll reads
    null/B, never that value with N. (On RTU nothing tells it from the answer of a slave whose last
    request was lost on the line: it is taken there, see drivers/modbus_link.py.)"""
    slow = Unit(2, delay=1.6)
    slow.put("holding", 0, 222, "uint16")
    server, bus = serve("tcp", [slow], tmp_path, timeout=1.0, retries=0)
    try:
        run_station({"line": bus}, {"slow": {"bus": "line", "slave": 2, "interval": 1.0, "registers": [
            {"channel": "b", "address": 0, "type": "uint16"}]}})
        wait_for(lambda: len(readings(collector, "slow")) >= 5, 30, "five polls")
        assert {(r["value"], r["flag"]) for r in readings(collector, "slow")} == {(None, "B")}
    finally:
        server.close()


def test_a_dead_slave_on_an_rtu_bus_does_not_break_the_rhythm_of_the_others(tmp_path, run_station, collector):
    """Three analyzers on one RS-485 line, the middle one dead: the two others keep their 1 s interval
    (a dead slave costs the bus at most its timeout × tries, then one timeout per poll), and the dead
    one reads null/B at each of its intervals."""
    cod, dead, nh3n = Unit(1), Unit(2, mode="silent"), Unit(3)
    cod.put("holding", 0x42, 23.4, "float32", "DCBA")
    dead.put("holding", 0, 1.0, "float32", "ABCD")
    nh3n.put("holding", 0, 1.25, "float32", "CDAB")
    server = ModbusRtuSlave([cod, dead, nh3n], tmp_path / "ttyBUS").start()
    try:
        run_station({"rs485": {"type": "rtu", "port": server.path, "baudrate": 9600, "timeout": 0.3, "retries": 1}},
                    {"cod": {"bus": "rs485", "slave": 1, "interval": 1.0, "registers": [
                        {"channel": "w01018", "address": 0x42, "type": "float32", "order": "DCBA", "unit": "mg/L"}]},
                     "ph": {"bus": "rs485", "slave": 2, "interval": 1.0, "registers": [
                        {"channel": "w01001", "address": 0, "type": "float32"}]},
                     "nh3n": {"bus": "rs485", "slave": 3, "interval": 1.0, "registers": [
                        {"channel": "w21003", "address": 0, "type": "float32", "order": "CDAB", "unit": "mg/L"}]}})
        wait_for(lambda: len(readings(collector, "cod")) >= 12 and len(readings(collector, "nh3n")) >= 12, 40,
                 "twelve polls of the healthy analyzers")
        assert {(r["value"], r["flag"]) for r in readings(collector, "cod")} == {(23.4, "N")}
        assert {(r["value"], r["flag"]) for r in readings(collector, "nh3n")} == {(1.25, "N")}
        dead_readings = readings(collector, "ph")
        assert dead_readings and {(r["value"], r["flag"]) for r in dead_readings} == {(None, "B")}
        for device in ("cod", "nh3n"):
            times = sorted(_ts(r) for r in readings(collector, device))
            gaps = [b - a for a, b in zip(times[2:], times[3:], strict=False)]  # after the dead slave's first give-ups
            assert max(gaps) <= 1.0 + 0.3 + 0.15, (device, gaps)
            assert abs(sum(gaps) / len(gaps) - 1.0) < 0.1, (device, gaps)
        times = sorted(_ts(r) for r in dead_readings)
        assert len(times) >= 9, times
        assert max(b - a for a, b in zip(times[2:], times[3:], strict=False)) <= 1.0 + 0.6 + 0.15, times
    finally:
        server.close()


@pytest.mark.parametrize("kind,mode", [("tcp", "dribble"), ("rtu", "dribble"), ("rtu", "split"), ("rtu", "leading"),
                                       ("tcp", "close_after")])
def test_answers_in_pieces_or_a_gateway_closing_each_connection_still_read_normal(
        kind, mode, tmp_path, run_station, collector):
    good, odd = _two_units(mode)
    server, bus = serve(kind, [good, odd], tmp_path, timeout=0.3)
    try:
        run_station({"line": bus}, _devices("line"))
        wait_for(lambda: len(readings(collector, "bad")) >= 4 and len(readings(collector, "cod")) >= 4, 30,
                 "four polls of each device")
        assert {(r["value"], r["flag"]) for r in readings(collector, "bad")} == {(0x1234, "N")}
        assert {(r["value"], r["flag"]) for r in readings(collector, "cod")} == {(23.4, "N")}
    finally:
        server.close()


@pytest.mark.parametrize("code,flag", [(1, "D"), (2, "D"), (4, "D"), (6, "D"), (10, "B"), (11, "B")])
def test_exception_codes_give_d_and_gateway_exceptions_give_b(code, flag, tmp_path, run_station, collector):
    """Exceptions 10/11 are a TCP-to-RTU gateway saying the instrument behind it did not answer (B);
    any other exception is the instrument answering that it cannot (D)."""
    good, bad = _two_units("exception")
    bad.exception_code = code
    server = ModbusTcpServer([good, bad]).start()
    try:
        run_station({"lan": {"type": "tcp", "host": "127.0.0.1", "port": server.port, "timeout": 0.3}},
                    _devices("lan"))
        wait_for(lambda: len(readings(collector, "bad")) >= 2 and len(readings(collector, "cod")) >= 2, 30,
                 "two polls of each device")
        assert {(r["value"], r["flag"]) for r in readings(collector, "bad")} == {(None, flag)}
        assert {(r["value"], r["flag"]) for r in readings(collector, "cod")} == {(23.4, "N")}
    finally:
        server.close()


def test_coils_and_discrete_inputs_across_byte_boundaries(tmp_path, run_station, collector):
    """Bits are packed least significant first, 8 to a byte: bit 9 of a read is bit 1 of its second byte."""
    unit = Unit(5)
    coils = [1, 0, 0, 1, 0, 0, 0, 0, 0, 1, 1]
    discretes = [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    for a, bit in enumerate(coils):
        unit.put("coil", 100 + a, bit)
    for a, bit in enumerate(discretes):
        unit.put("discrete", a, bit)
    server = ModbusTcpServer([unit]).start()
    try:
        registers = [{"channel": f"c{a}", "address": 100 + a, "type": "bool", "table": "coil"}
                     for a in range(len(coils))]
        registers += [{"channel": f"d{a}", "address": a, "type": "bool", "table": "discrete"}
                      for a in range(len(discretes))]
        run_station({"lan": {"type": "tcp", "host": "127.0.0.1", "port": server.port, "timeout": 0.5}},
                    {"io": {"bus": "lan", "slave": 5, "interval": INTERVAL, "registers": registers}})
        names = {e["channel"] for e in registers}
        poll = wait_for(lambda: complete_poll(collector, "io", names), 20, "a complete poll")
        assert [poll[f"c{a}"]["value"] for a in range(len(coils))] == coils
        assert [poll[f"d{a}"]["value"] for a in range(len(discretes))] == discretes
        assert {r["flag"] for r in poll.values()} == {"N"}
    finally:
        server.close()


def test_an_alarm_action_switches_a_fog_cannon_coil_on_and_off(tmp_path, run_station, collector):
    """A dust monitor's PM10 above 80 ug/m3: the fog cannon's coil 0 is written on (function 05, FF00)
    and, once PM10 is back below, off (0000); the alarm is raised and cleared once, threshold 80."""
    dust, fog = Unit(1), Unit(9)
    dust.put("holding", 0, 120.0, "float32")  # TSP
    dust.put("holding", 2, 95.5, "float32")  # PM10, above the limit
    fog.put("coil", 0, False)
    server = ModbusTcpServer([dust, fog]).start()
    try:
        run_station({"lan": {"type": "tcp", "host": "127.0.0.1", "port": server.port, "timeout": 0.5}},
                    {"dust": {"bus": "lan", "slave": 1, "interval": INTERVAL, "registers": [
                        {"channel": "a34001", "address": 0, "type": "float32", "unit": "ug/m3"},
                        {"channel": "a34002", "address": 2, "type": "float32", "unit": "ug/m3"}]},
                     "fog": {"bus": "lan", "slave": 9, "interval": INTERVAL, "registers": [
                        {"channel": "running", "address": 0, "type": "bool", "table": "coil"}]}},
                    alarms=[{"channel": "dust.a34002", "above": 80, "action": {"device": "fog", "coil": 0}}])
        wait_for(lambda: (5, 0, True) in fog.writes, 20, "the coil written on")
        wait_for(lambda: any(r["value"] == 1 for r in readings(collector, "fog")), 20, "the cannon reads on")
        dust.put("holding", 2, 42.0, "float32")
        wait_for(lambda: (5, 0, False) in fog.writes, 20, "the coil written off")
        events = wait_for(lambda: [m["alarm"] for m in collector.json_messages("/alarm")
                                   if m["alarm"]["state"] == "cleared"] and
                          [m["alarm"] for m in collector.json_messages("/alarm")], 10, "both alarm events")
        assert [(e["id"], e["state"], e["threshold"]) for e in events] == [
            ("dust.a34002:above", "raised", 80), ("dust.a34002:above", "cleared", 80)]
        assert events[0]["value"] == 95.5
        assert fog.writes == [(5, 0, True), (5, 0, False)]
    finally:
        server.close()


def test_built_in_profiles_read_instruments_laid_out_as_domain_md_describes(tmp_path, run_station, collector):
    """One RS-485 line with six analyzers, each configured by its built-in `profile` only."""
    cod, hach, fpi, ph, flow, dust = Unit(2), Unit(3), Unit(4), Unit(5), Unit(6), Unit(7)
    cod.put("holding", 0x42, 23.4, "float32", "DCBA")  # COD analyzer: float32 DCBA at 0x0042
    cod.put("holding", 0x44, ord("N"), "uint16")  # the ASCII flag letter next to the value
    hach.put("holding", 0, 1.25, "float32", "CDAB")  # HACH ammonia: CDAB at 0
    fpi.put("holding", 0, 0.75, "float32", "ABCD")  # Focused Photonics ammonia: ABCD at 0
    ph.put("holding", 0, 712, "int16")  # pH: int16 raw/100
    ph.put("holding", 1, -52, "int16")  # water temperature below zero: raw/10
    flow.put("holding", 0, 36.0, "float32", "CDAB")  # m3/h
    flow.put("holding", 2, 123456.789, "float64", "CDAB")
    flow.put("holding", 6, 0, "uint16")
    for i, v in enumerate([180.5, 95.25, 48.0, 62.5, 3.5, 270.0, -12.5, 45.0]):
        dust.put("holding", 2 * i, v, "float32", "ABCD")
    dust.put("holding", 0x10, 0, "uint16")  # i12001 running
    server = ModbusRtuSlave([cod, hach, fpi, ph, flow, dust], tmp_path / "ttyUSB0").start()
    try:
        profiles = {"cod": (2, "cod-analyzer"), "hach": (3, "nh3n-analyzer"), "fpi": (4, "nh3n-analyzer-fpi"),
                    "ph": (5, "ph-meter"), "flow": (6, "flow-meter"), "dust": (7, "dust-monitor")}
        run_station({"rs485": {"type": "rtu", "port": server.path, "baudrate": 9600, "timeout": 0.3}},
                    {dev: {"bus": "rs485", "slave": slave, "interval": 1.0, "profile": profile}
                     for dev, (slave, profile) in profiles.items()})
        expected = {
            "cod": {"w01018": (23.4, "mg/L")},
            "hach": {"w21003": (1.25, "mg/L")},
            "fpi": {"w21003": (0.75, "mg/L")},
            "ph": {"w01001": (7.12, None), "w01010": (-5.2, "°C")},
            "flow": {"w00000": (10.0, "L/s"), "w00000_total": (123456.789, "m3")},
            "dust": {"a34001": (180.5, "ug/m3"), "a34002": (95.25, "ug/m3"), "a34004": (48.0, "ug/m3"),
                     "LA": (62.5, "dB(A)"), "a01007": (3.5, "m/s"), "a01008": (270.0, "°"),
                     "a01001": (-12.5, "°C"), "a01002": (45.0, "%")},
        }
        for dev, channels in expected.items():
            poll = wait_for(lambda d=dev, c=set(channels): complete_poll(collector, d, c), 30, f"a poll of {dev}")
            got = {ch: (poll[ch]["value"], poll[ch]["unit"]) for ch in channels}
            assert got == channels, dev
            assert {poll[ch]["flag"] for ch in channels} == {"N"}, (dev, poll)
        cod.put("holding", 0x44, ord("M"), "uint16")  # the analyzer goes into maintenance
        wait_for(lambda: any(r["flag"] == "M" and r["value"] == 23.4 for r in readings(collector, "cod")), 10,
                 "the COD reading flagged M")
    finally:
        server.close()


@pytest.mark.parametrize("kind", ["tcp", "rtu"])
@pytest.mark.parametrize("retries", [0, 2])
def test_a_silent_slave_is_tried_retries_plus_one_times_then_reads_null_b(kind, retries, tmp_path, run_station,
                                                                        collector):
    silent = Unit(8, mode="silent")
    silent.put("holding", 0, 1, "uint16")
    server, bus = serve(kind, [silent], tmp_path, timeout=0.2, retries=retries)
    try:
        run_station({"line": bus}, {"dead": {"bus": "line", "slave": 8, "interval": 2.0, "registers": [
            {"channel": "x", "address": 0, "type": "uint16"}]}})
        first = wait_for(lambda: readings(collector, "dead"), 20, "the first poll")
        assert [(r["value"], r["flag"]) for r in first] == [(None, "B")]
        tries = silent.reads()
        assert len(tries) == retries + 1, tries
        assert tries[-1] - tries[0] >= 0.2 * retries - 0.05  # each try waited its timeout
    finally:
        server.close()


def test_a_map_of_more_than_125_registers_is_read_in_several_requests(tmp_path, run_station, collector):
    """Modbus reads at most 125 registers per request: 80 float32 values (160 registers) still arrive."""
    unit = Unit(1)
    registers = []
    for i in range(80):
        unit.put("input", 2 * i, i + 0.5, "float32", "CDAB")
        registers.append({"channel": f"v{i}", "address": 2 * i, "type": "float32", "order": "CDAB",
                          "table": "input"})
    server = ModbusTcpServer([unit]).start()
    try:
        run_station({"lan": {"type": "tcp", "host": "127.0.0.1", "port": server.port, "timeout": 0.5}},
                    {"big": {"bus": "lan", "slave": 1, "interval": 1.0, "registers": registers}})
        poll = wait_for(lambda: complete_poll(collector, "big", {f"v{i}" for i in range(80)}), 20, "a poll")
        assert {ch: r["value"] for ch, r in poll.items()} == {f"v{i}": i + 0.5 for i in range(80)}
        assert {r["flag"] for r in poll.values()} == {"N"}
        assert all(count <= 125 for _, _, _, count in unit.requests)
    finally:
        server.close()
