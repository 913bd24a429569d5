"""Alarm actions end to end (issue 5): an alarm switches an output of a real Modbus TCP slave on raise and
back on clear, and keeps it on for at least `min_on` seconds.

The slaves are the project's strict Modbus slave (`drivers.sim.slave`) on loopback, run inside the test:
what is checked is what arrived over the wire (function 05 / 06 requests), each write stamped with the
test's monotonic clock (the same clock as `wait_for`'s deadlines). The agent is a real process
(`edge-agent run`) publishing to a real mosquitto; the alarm events are checked on `env/<station>/alarm`.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest
from harness import AgentProcess, Collector, sim_config, wait_for, write_config

from drivers.sim.slave import RegisterBank, SlaveCore, TcpServer

STATION = "TEST0001"
ALARM_ID = "dust.a34002:above"
LIMIT = 80
HIGH, LOW = 120, 40  # PM10 in ug/m3: above the limit, back within it
STARTUP_S = 20  # agent start to the first write, on a loaded CI machine
MARGIN_S = 1.5  # the output must still be on this long before min_on has elapsed


class RelayBoard(RegisterBank):
    """A strict slave (only the outputs defined exist: a write anywhere else gets exception 02) that logs
    every accepted write with the test's monotonic time."""

    def __init__(self):
        super().__init__(strict=True)
        self.writes: list[tuple[float, str, int, int]] = []  # (monotonic time, table, address, value)
        self._lock = threading.Lock()

    def write(self, table, address, values):
        err = super().write(table, address, values)
        if err is None:
            with self._lock:
                self.writes += [(time.monotonic(), table, address + i, v) for i, v in enumerate(values)]
        return err

    def log(self) -> list[tuple[float, str, int, int]]:
        with self._lock:
            return list(self.writes)

    def first_write(self, table: str, address: int, value: int) -> float | None:
        """Monotonic time of the first write of `value` at `address`, or None."""
        return next((t for t, tb, a, v in self.log() if (tb, a, v) == (table, address, value)), None)


@pytest.fixture
def servers():
    started: list[TcpServer] = []

    def start(units: dict) -> TcpServer:
        server = TcpServer(SlaveCore(units), "127.0.0.1", 0).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def dust_monitor(value: int) -> RegisterBank:
    bank = RegisterBank(strict=True)
    bank.set("holding", 0, [value])  # a34002 (PM10), uint16 ug/m3
    return bank


def station(tmp_path, broker, buses: dict, devices: dict, limit: float, action: dict) -> dict:
    """A dust station: the monitor `dust` (a34002 at holding 0) plus `devices`, one alarm rule with `action`."""
    config = sim_config(tmp_path, broker, station_id=STATION, devices=0, buses=buses,
                        alarms=[{"channel": "dust.a34002", "above": limit, "hysteresis": 2, "action": action}])
    config["devices"] = {
        "dust": {"bus": "lan", "slave": 1, "interval": 0.2,
                 "registers": [{"channel": "a34002", "address": 0, "type": "uint16", "unit": "ug/m3"}]},
        **devices,
    }
    return config


def tcp_bus(server: TcpServer) -> dict:
    return {"type": "tcp", "host": "127.0.0.1", "port": server.port, "timeout": 0.5, "retries": 1}


def fog_cannon_config(tmp_path, broker, server: TcpServer, action: dict) -> dict:
    """The dust monitor and a fog cannon relay (unit 5, its coil 0 polled too) on one Modbus TCP link."""
    return station(tmp_path, broker, {"lan": tcp_bus(server)},
                   {"fog": {"bus": "lan", "slave": 5, "interval": 0.2,
                            "registers": [{"channel": "fog_on", "address": 0, "table": "coil"}]}},
                   LIMIT, action)


def fog_cannon_station(tmp_path, broker, server: TcpServer, action: dict):
    """`fog_cannon_config` written to station.yaml: its path."""
    return write_config(tmp_path / "station.yaml", fog_cannon_config(tmp_path, broker, server, action))


def alarm_events(collector: Collector) -> list[dict]:
    """The alarm bodies received on env/<station>/alarm, one per seq (at-least-once delivery), in seq order."""
    topics = {topic for topic, _, _ in list(collector.messages) if topic.endswith("/alarm")}
    assert topics <= {f"env/{STATION}/alarm"}, topics
    by_seq = {m["alarm"]["seq"]: m["alarm"] for m in collector.json_messages(f"env/{STATION}/alarm")}
    return [by_seq[s] for s in sorted(by_seq)]


def states(collector: Collector) -> list[tuple[str, str]]:
    return [(a["id"], a["state"]) for a in alarm_events(collector)]


def hold_and_release(board: RelayBoard, table: str, address: int, on: int, off: int, on_at: float,
                     cleared_at: float, min_on: float) -> float:
    """After the alarm cleared at `cleared_at`: the output stays `on` until MARGIN_S before `min_on` has
    elapsed since the on-write, then is written `off` no earlier than `min_on` after it. Returns the
    monotonic time of the off-write."""
    hold_until = on_at + min_on - MARGIN_S
    assert cleared_at <= hold_until - 1.0, (
        f"the alarm cleared {cleared_at - on_at:.1f} s after the on-write: too late to see min_on {min_on} s hold")
    while time.monotonic() < hold_until:
        assert board.get(table, address) == [on], f"{table} {address} switched off before min_on"
        time.sleep(0.05)
    assert board.get(table, address) == [on], "still on just before min_on"
    assert board.first_write(table, address, off) is None
    off_at = wait_for(lambda: board.first_write(table, address, off), min_on + 10, f"{table} {address} back off")
    assert board.get(table, address) == [off]
    held = off_at - on_at
    # The engine counts min_on from the confirmed on-write and looks at it about once a second.
    assert min_on <= held <= min_on + 4, f"on for {held:.2f} s with min_on {min_on} s"
    return off_at


def test_fog_cannon_coil_switched_on_at_raise_and_off_after_min_on_from_clear(tmp_path, broker, collector, servers):
    """Monitor and fog cannon relay on one Modbus TCP link (the write goes between the two devices' polls);
    the value comes back in range at the slave."""
    min_on = 6.0
    dust = dust_monitor(HIGH)  # above the limit from the start
    fog = RelayBoard()
    fog.set("coil", 0, [0])
    server = servers({1: dust, 5: fog})
    cfg = fog_cannon_station(tmp_path, broker, server, {"device": "fog", "coil": 0, "min_on": min_on})
    agent = AgentProcess(cfg)
    try:
        on_at = wait_for(lambda: fog.first_write("coil", 0, 1), STARTUP_S, "fog cannon coil 0 switched on")
        assert fog.get("coil", 0) == [1]
        wait_for(lambda: states(collector) == [(ALARM_ID, "raised")], 10, "the alarm raised on P/alarm")

        dust.set("holding", 0, [LOW])  # the dust settles
        wait_for(lambda: states(collector) == [(ALARM_ID, "raised"), (ALARM_ID, "cleared")], 10,
                 "the alarm cleared on P/alarm")
        cleared_at = time.monotonic()
        hold_and_release(fog, "coil", 0, 1, 0, on_at, cleared_at, min_on)

        raised, cleared = alarm_events(collector)
        assert {k: raised[k] for k in ("channel", "rule", "value", "threshold")} == {
            "channel": "dust.a34002", "rule": "above", "value": HIGH, "threshold": LIMIT}
        assert {k: cleared[k] for k in ("channel", "rule", "value", "threshold")} == {
            "channel": "dust.a34002", "rule": "above", "value": LOW, "threshold": LIMIT}
        polls = server.core.counters[5].requests
        wait_for(lambda: server.core.counters[5].requests >= polls + 5, 10, "more polls of the relay after the off")
        assert "alarm action fog coil 0 on written" in agent.log()
        assert "alarm action fog coil 0 off written" in agent.log()
    finally:
        assert agent.stop() == 0
    assert [(tb, a, v) for _, tb, a, v in fog.log()] == [("coil", 0, 1), ("coil", 0, 0)], "one on, one off"
    assert dust.get("holding", 0) == [LOW], "nothing written to the monitor"
    assert states(collector) == [(ALARM_ID, "raised"), (ALARM_ID, "cleared")]


def test_sampler_register_written_on_value_and_off_value_across_a_config_reload(tmp_path, broker, collector,
                                                                                 servers):
    """A sampler's start register (on: 1, off: 0) on a second Modbus TCP link; the alarm clears because the
    limit is raised by a config reload (SIGHUP), which rebuilds the pollers: the off-write goes through the
    new ones and min_on still counts from the on-write made before the reload."""
    min_on, register = 12.0, 10  # a reload can take up to 5 s (the main loop looks at SIGHUP that often)
    dust = dust_monitor(HIGH)
    sampler = RelayBoard()
    sampler.set("holding", register, [0])
    buses = {"lan": tcp_bus(servers({1: dust})), "plant": tcp_bus(servers({3: sampler}))}
    devices = {"sampler": {"bus": "plant", "slave": 3, "interval": 0.2,
                           "registers": [{"channel": "sampling", "address": register}]}}
    action = {"device": "sampler", "register": register, "on": 1, "off": 0, "min_on": min_on}
    cfg = write_config(tmp_path / "station.yaml", station(tmp_path, broker, buses, devices, LIMIT, action))
    agent = AgentProcess(cfg)
    try:
        on_at = wait_for(lambda: sampler.first_write("holding", register, 1), STARTUP_S, "sampler started")
        assert sampler.get("holding", register) == [1]
        wait_for(lambda: states(collector) == [(ALARM_ID, "raised")], 10, "the alarm raised on P/alarm")

        write_config(cfg, station(tmp_path, broker, buses, devices, HIGH + 50, action))  # a higher local limit
        agent.signal(signal.SIGHUP)
        wait_for(lambda: states(collector) == [(ALARM_ID, "raised"), (ALARM_ID, "cleared")], 10,
                 "the alarm cleared on P/alarm")
        cleared_at = time.monotonic()
        hold_and_release(sampler, "holding", register, 1, 0, on_at, cleared_at, min_on)

        raised, cleared = alarm_events(collector)
        assert (raised["value"], raised["threshold"]) == (HIGH, LIMIT)
        assert (cleared["value"], cleared["threshold"]) == (HIGH, HIGH + 50)
        assert "configuration reloaded" in agent.log()
    finally:
        assert agent.stop() == 0
    assert [(tb, a, v) for _, tb, a, v in sampler.log()] == [("holding", register, 1), ("holding", register, 0)]
    assert states(collector) == [(ALARM_ID, "raised"), (ALARM_ID, "cleared")]


def test_a_coil_left_on_by_a_removed_rule_is_switched_off_at_the_next_start(tmp_path, broker, collector, servers):
    """The agent stops with the cannon on; the rule is removed from the config while it is down. At the next
    start the alarm is cleared (value null) and the coil written off, although no rule has an action any more."""
    dust = dust_monitor(HIGH)
    fog = RelayBoard()
    fog.set("coil", 0, [0])
    server = servers({1: dust, 5: fog})
    config = fog_cannon_config(tmp_path, broker, server, {"device": "fog", "coil": 0})
    cfg = write_config(tmp_path / "station.yaml", config)
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: fog.first_write("coil", 0, 1), STARTUP_S, "fog cannon coil 0 switched on")
        wait_for(lambda: states(collector) == [(ALARM_ID, "raised")], 10, "the alarm raised on P/alarm")
    finally:
        assert agent.stop() == 0
    assert fog.get("coil", 0) == [1], "stopping the agent leaves the output as it is"

    write_config(cfg, {**config, "alarms": []})
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: fog.first_write("coil", 0, 0), STARTUP_S, "fog cannon coil 0 switched off")
        assert fog.get("coil", 0) == [0]
        wait_for(lambda: states(collector) == [(ALARM_ID, "raised"), (ALARM_ID, "cleared")], 10,
                 "the orphaned alarm cleared on P/alarm")
        assert alarm_events(collector)[1]["value"] is None
    finally:
        assert agent.stop() == 0
    assert [(tb, a, v) for _, tb, a, v in fog.log()] == [("coil", 0, 1), ("coil", 0, 0)]


class SettlingMonitor(RegisterBank):
    """A dust monitor whose value settles on demand; `on_settled_read` runs (on the slave's thread) at the
    first read that returns the settled value, before the answer goes out."""

    def __init__(self, value: int):
        super().__init__(strict=True)
        self.set("holding", 0, [value])
        self.on_settled_read = None

    def settle(self, value: int, on_read) -> None:
        self.on_settled_read = on_read
        self.set("holding", 0, [value])

    def read(self, table, address, count):
        answer = super().read(table, address, count)
        if self.on_settled_read is not None and table == "holding" and address == 0:
            callback, self.on_settled_read = self.on_settled_read, None
            callback()
        return answer


def test_a_stop_right_after_the_poll_that_clears_an_alarm_switches_its_output_off_first(
        tmp_path, broker, collector, servers):
    """SIGTERM lands while the poll that brings the value back is under way: the stop commits that
    reading (SPEC §1), the alarm clears, its output is written off before the buses close, and the
    `cleared` event reaches the broker before the agent exits."""
    dust = SettlingMonitor(HIGH)
    fog = RelayBoard()
    fog.set("coil", 0, [0])
    server = servers({1: dust, 5: fog})
    cfg = fog_cannon_station(tmp_path, broker, server, {"device": "fog", "coil": 0})
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: fog.first_write("coil", 0, 1), STARTUP_S, "fog cannon coil 0 switched on")
        wait_for(lambda: states(collector) == [(ALARM_ID, "raised")], 10, "the alarm raised on P/alarm")
        dust.settle(LOW, lambda: agent.signal(signal.SIGTERM))
        assert agent.proc.wait(30) == 0
    finally:
        agent.stop()
    assert [(tb, a, v) for _, tb, a, v in fog.log()] == [("coil", 0, 1), ("coil", 0, 0)], agent.log()
    assert fog.get("coil", 0) == [0], "the fog cannon is off while the agent is stopped"
    assert "bus closed" not in agent.log()
    wait_for(lambda: states(collector) == [(ALARM_ID, "raised"), (ALARM_ID, "cleared")], 5,
             "the cleared event, published before the exit")
    restarted = AgentProcess(cfg)  # the state saved at the stop says the output is off: no write at start
    try:
        wait_for(lambda: "station TEST0001 running" in restarted.log(), STARTUP_S, "the agent running again")
        polls = server.core.counters[5].requests
        wait_for(lambda: server.core.counters[5].requests >= polls + 5, 10, "polls of the relay after the start")
    finally:
        assert restarted.stop() == 0
    assert len(fog.log()) == 2, "nothing written again after the restart"


def test_an_off_write_the_dead_relay_board_missed_is_done_at_the_next_start(tmp_path, broker, collector, servers):
    """The relay board (its own Modbus TCP link) is dead when the alarm clears: the off-write fails and is
    retried. The agent is restarted (an upgrade) before the board is back: once it answers again, the new
    run switches the fog cannon off, and nothing else is written."""
    dust = dust_monitor(HIGH)
    fog = RelayBoard()
    fog.set("coil", 0, [0])
    relay = servers({5: fog})
    buses = {"lan": tcp_bus(servers({1: dust})), "relay": tcp_bus(relay)}
    devices = {"fog": {"bus": "relay", "slave": 5, "interval": 0.2,
                       "registers": [{"channel": "fog_on", "address": 0, "table": "coil"}]}}
    cfg = write_config(tmp_path / "station.yaml",
                       station(tmp_path, broker, buses, devices, LIMIT, {"device": "fog", "coil": 0}))
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: fog.first_write("coil", 0, 1), STARTUP_S, "fog cannon coil 0 switched on")
        wait_for(lambda: states(collector) == [(ALARM_ID, "raised")], 10, "the alarm raised on P/alarm")
        relay.stop()  # the relay board loses power
        dust.set("holding", 0, [LOW])
        wait_for(lambda: "alarm action fog coil 0 off failed" in agent.log(), 20, "the off-write failing")
        wait_for(lambda: states(collector) == [(ALARM_ID, "raised"), (ALARM_ID, "cleared")], 10,
                 "the alarm cleared on P/alarm")
    finally:
        assert agent.stop() == 0
    assert fog.get("coil", 0) == [1], "the board missed the off"

    relay.start()  # the board is back (same port) while the agent is down
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: fog.first_write("coil", 0, 0), STARTUP_S, "fog cannon coil 0 switched off after the restart")
        assert fog.get("coil", 0) == [0]
    finally:
        assert agent.stop() == 0
    assert [(tb, a, v) for _, tb, a, v in fog.log()] == [("coil", 0, 1), ("coil", 0, 0)]
    assert states(collector) == [(ALARM_ID, "raised"), (ALARM_ID, "cleared")], "no alarm event from the restart"


def test_a_reload_that_removes_an_active_rule_clears_its_alarm_once_and_switches_its_output_off(
        tmp_path, broker, collector, servers):
    """SIGHUP with the rule gone while its alarm is active (and the value still above the old limit): the
    alarm is cleared once (value null, the old limit as threshold), the fog cannon switched off, and a
    second reload with the same file changes nothing."""
    dust = dust_monitor(HIGH)
    fog = RelayBoard()
    fog.set("coil", 0, [0])
    server = servers({1: dust, 5: fog})
    config = fog_cannon_config(tmp_path, broker, server, {"device": "fog", "coil": 0})
    cfg = write_config(tmp_path / "station.yaml", config)
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: fog.first_write("coil", 0, 1), STARTUP_S, "fog cannon coil 0 switched on")
        wait_for(lambda: states(collector) == [(ALARM_ID, "raised")], 10, "the alarm raised on P/alarm")
        write_config(cfg, {**config, "alarms": []})
        agent.signal(signal.SIGHUP)
        wait_for(lambda: fog.first_write("coil", 0, 0), 15, "fog cannon coil 0 switched off by the reload")
        wait_for(lambda: states(collector) == [(ALARM_ID, "raised"), (ALARM_ID, "cleared")], 10,
                 "the alarm cleared on P/alarm")
        cleared = alarm_events(collector)[1]
        assert (cleared["value"], cleared["threshold"]) == (None, LIMIT)
        agent.signal(signal.SIGHUP)
        wait_for(lambda: agent.log().count("configuration reloaded") >= 2, 15, "the second reload")
        polls = server.core.counters[5].requests
        wait_for(lambda: server.core.counters[5].requests >= polls + 5, 10, "polls of the relay after it")
    finally:
        assert agent.stop() == 0
    assert [(tb, a, v) for _, tb, a, v in fog.log()] == [("coil", 0, 1), ("coil", 0, 0)]
    assert states(collector) == [(ALARM_ID, "raised"), (ALARM_ID, "cleared")]


def test_on_a_shared_rs485_line_a_dead_relay_delays_its_write_not_the_polls_and_nothing_else_is_written(
        tmp_path, broker, collector):
    """One RS-485 line (a pseudo-terminal, Modbus RTU at 9600 baud): the dust monitor (slave 1), the fog
    cannon's relay (slave 9) and an analyzer that never answers (slave 4). The relay is dead when the
    alarm is raised: its on-write fails and is retried while the monitor goes on being polled; once the
    relay answers again it is switched on, and off after the clear. Only function 05 to coil 0 of slave 9
    ever goes on the line, and no frame is garbled by a write interleaved with a poll."""
    from instruments import ModbusRtuSlave, Unit

    dust, fog, dead = Unit(1), Unit(9), Unit(4, mode="silent")
    dust.put("holding", 0, HIGH)
    dead.put("holding", 0, 7)
    fog.put("coil", 0, False)
    fog.mode = "silent"  # the relay board is off when the dust rises
    line = ModbusRtuSlave([dust, fog, dead], tmp_path / "ttyUSB0").start()
    config = station(tmp_path, broker, {"rs485": {"type": "rtu", "port": line.path, "baudrate": 9600,
                                                  "timeout": 0.3, "retries": 1}},
                     {"fog": {"bus": "rs485", "slave": 9, "interval": 0.5,
                              "registers": [{"channel": "fog_on", "address": 0, "table": "coil"}]},
                      "cod": {"bus": "rs485", "slave": 4, "interval": 0.5,
                              "registers": [{"channel": "w01018", "address": 0, "type": "uint16"}]}},
                     LIMIT, {"device": "fog", "coil": 0})
    config["devices"]["dust"]["bus"] = "rs485"
    config["buses"] = {"rs485": config["buses"]["rs485"]}
    config["devices"]["dust"]["interval"] = 0.5
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    try:
        wait_for(lambda: states(collector) == [(ALARM_ID, "raised")], STARTUP_S, "the alarm raised on P/alarm")
        wait_for(lambda: "alarm action fog coil 0 on failed" in agent.log(), 20, "the on-write failing")
        reads = len(dust.reads())
        wait_for(lambda: len(dust.reads()) >= reads + 5, 20, "the monitor polled while the relay is dead")
        fog.mode = "normal"  # the relay board is back
        wait_for(lambda: (5, 0, True) in fog.writes, 30, "the coil written on once the relay answers")
        dust.put("holding", 0, LOW)
        wait_for(lambda: (5, 0, False) in fog.writes, 20, "the coil written off after the clear")
        wait_for(lambda: states(collector) == [(ALARM_ID, "raised"), (ALARM_ID, "cleared")], 10,
                 "the alarm cleared on P/alarm")
    finally:
        assert agent.stop() == 0
        line.close()
    assert fog.writes == [(5, 0, True), (5, 0, False)]
    assert dust.writes == [] and dead.writes == []
    writes_on_line = [(u.unit_id, f, a) for u in (dust, fog, dead)
                      for _, f, a, _ in u.requests if f not in (1, 2, 3, 4)]
    assert set(writes_on_line) == {(9, 5, 0)}, writes_on_line
    assert line.crc_errors == 0, "a frame on the line was garbled"


def test_an_output_whose_device_a_reload_removed_is_left_alone_and_switched_off_when_it_is_back(
        tmp_path, broker, collector, servers):
    """The alarm has cleared and the fog cannon's off-write waits for min_on when a reload (SIGHUP) removes
    the fog device from the file. No bus reaches it any more: the agent no longer tries to write it (it
    tried, failing with 'not a Modbus device being polled', every minute for good), says so once, and
    switches the cannon off when a second reload puts the device back."""
    min_on = 4.0
    dust = dust_monitor(HIGH)
    fog = RelayBoard()
    fog.set("coil", 0, [0])
    server = servers({1: dust, 5: fog})
    config = fog_cannon_config(tmp_path, broker, server, {"device": "fog", "coil": 0, "min_on": min_on})
    cfg = write_config(tmp_path / "station.yaml", config)
    agent = AgentProcess(cfg)
    try:
        on_at = wait_for(lambda: fog.first_write("coil", 0, 1), STARTUP_S, "fog cannon coil 0 switched on")
        dust.set("holding", 0, [LOW])
        wait_for(lambda: states(collector) == [(ALARM_ID, "raised"), (ALARM_ID, "cleared")], 10,
                 "the alarm cleared on P/alarm")
        assert time.monotonic() < on_at + min_on - 0.5, "cleared too late to reload within min_on"
        without_fog = {**config, "devices": {"dust": config["devices"]["dust"]},
                       "alarms": [{"channel": "dust.a34002", "above": LIMIT, "hysteresis": 2}]}
        write_config(cfg, without_fog)
        agent.signal(signal.SIGHUP)
        wait_for(lambda: "device fog is no longer configured" in agent.log(), 15, "the reload's warning")
        # Well past min_on and the first retries (2 s, 4 s): the dust monitor polled 40 more times.
        polls = server.core.counters[1].requests
        wait_for(lambda: time.monotonic() > on_at + min_on + 6 and server.core.counters[1].requests >= polls + 40,
                 30, "min_on and the retries' time passing")
        assert "not a Modbus device being polled" not in agent.log()
        assert "alarm action fog coil 0 off failed" not in agent.log()
        assert fog.get("coil", 0) == [1], "left alone while its device is not configured"
        write_config(cfg, config)
        agent.signal(signal.SIGHUP)
        wait_for(lambda: fog.first_write("coil", 0, 0), 15, "fog cannon coil 0 switched off once configured again")
    finally:
        assert agent.stop() == 0
    assert [(tb, a, v) for _, tb, a, v in fog.log()] == [("coil", 0, 1), ("coil", 0, 0)]
    assert states(collector) == [(ALARM_ID, "raised"), (ALARM_ID, "cleared")]
