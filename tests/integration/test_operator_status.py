"""What an operator of hundreds of gateways reads from the broker alone (the retained `P/status`, the
`status` command's reply) and from `edge-agent status --json`: when the agent started (a restart loop
is not a reconnect), which version runs, and a reload that was refused (the station runs an older
configuration than its file, and its next start will fail on that file)."""

from __future__ import annotations

import json
import signal
import time

import paho.mqtt.publish as mqtt_publish
import pytest
from clockshift import ShiftedClock
from harness import (
    AgentProcess,
    Broker,
    Collector,
    free_port,
    run_cli,
    sim_config,
    wait_for,
    write_config,
)

from agent import __version__
from agent.model import parse_iso_utc_ms


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


def _statuses(collector: Collector) -> list[dict]:
    return [json.loads(p) for t, p, _ in collector.messages if t.endswith("/status")]


def _status_reply(broker: Broker, collector: Collector, cmd_id: str) -> dict:
    mqtt_publish.single("env/TEST0001/cmd", json.dumps({"id": cmd_id, "cmd": "status"}),
                        hostname="127.0.0.1", port=broker.port, qos=1)
    return wait_for(lambda: next((m for m in collector.json_messages("/cmd/reply") if m.get("id") == cmd_id), None),
                    20, f"the reply to status command {cmd_id}")["status"]


def test_the_agents_start_and_version_are_on_the_retained_status_the_reply_and_status_json(tmp_path):
    """A retained `online` whose `ts` moves may be a reconnect or a restart; `started` tells them apart
    (a gateway restarting every few minutes is a problem, a broker restart is not), and the `status`
    reply says, as `status --json` does, which station and which agent (pid, version) answered."""
    broker = Broker(tmp_path / "broker").start()
    collector = Collector(broker, "env/#")
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker))
    agent = AgentProcess(cfg)
    try:
        birth = wait_for(lambda: next((s for s in _statuses(collector) if s["state"] == "online"), None), 20,
                         "the retained online status")
        started = birth.get("started")
        assert started is not None, birth
        assert parse_iso_utc_ms(started) <= parse_iso_utc_ms(birth["ts"])
        reply = _status_reply(broker, collector, "s1")
        assert reply["station"] == "TEST0001"
        assert reply["agent"] == {"running": True, "pid": agent.proc.pid, "version": __version__,
                                  "started": started, "config_error": None}
        cli = json.loads(run_cli("status", "-c", str(cfg), "--json").stdout)
        assert cli["agent"] == reply["agent"]

        collector.close()
        broker.stop()  # the broker restarts: the station reconnects, the agent did not restart
        broker.start()
        collector = Collector(broker, "env/#")
        again = wait_for(lambda: next((s for s in _statuses(collector) if s["state"] == "online"), None), 60,
                         "the retained online status after the broker's restart")
        assert again["started"] == started and again["ts"] != birth["ts"]
    finally:
        assert agent.stop() == 0
        collector.close()
        broker.stop()
    after = json.loads(run_cli("status", "-c", str(cfg), "--json").stdout)
    assert after["agent"]["running"] is False and after["agent"]["pid"] is None
    assert "started" not in after["agent"], "a stopped agent's start is not news"


def test_a_refused_reload_is_said_on_the_retained_status_and_the_reply_until_a_good_one(
        tmp_path, broker):
    """`systemctl reload` after an edit that does not load: the agent keeps the running configuration
    (README) and says so in its journal; but nobody reads the journal of hundreds of gateways, and the
    next start (a power cut, a reboot) fails on that file for good (the unit's start limit). The
    retained status and the reply carry `config_error` until a reload succeeds (`status` reads the
    file itself and prints its problems)."""
    collector = Collector(broker, "env/#")
    config = sim_config(tmp_path, broker)
    cfg = write_config(tmp_path / "station.yaml", config)
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: any("active_alarms" in s for s in _statuses(collector)), 30, "the status summary")
        assert all(s.get("config_error") is None for s in _statuses(collector))
        config["devices"]["sim0"]["intervall"] = 5  # a typo made on site
        write_config(cfg, config)
        agent.signal(signal.SIGHUP)
        said = wait_for(lambda: next((s for s in _statuses(collector) if s.get("config_error")), None), 40,
                        "a retained status saying that the reload was refused")
        assert said["state"] == "online"
        assert "station.yaml" in said["config_error"] and "intervall" in said["config_error"]
        reply = _status_reply(broker, collector, "s1")
        assert reply["agent"]["config_error"] == said["config_error"]
        cli = run_cli("status", "-c", str(cfg), "--json")  # reads the file: prints its problems, as documented
        assert cli.returncode == 2 and "intervall" in cli.stderr and "reload of this file is refused" in cli.stderr

        del config["devices"]["sim0"]["intervall"]
        write_config(cfg, config)
        agent.signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in agent.log(), 20, "the good reload")
        cleared = len(_statuses(collector))
        wait_for(lambda: any("config_error" in s and s["config_error"] is None
                             for s in _statuses(collector)[cleared - 1:]),
                 40, "a retained status without the error once a reload succeeded")
        assert _status_reply(broker, collector, "s2")["agent"]["config_error"] is None
        assert json.loads(run_cli("status", "-c", str(cfg), "--json").stdout)["agent"]["config_error"] is None
    finally:
        assert agent.stop() == 0
        collector.close()


def test_status_says_since_when_the_broker_is_offline_not_when_it_was_last_tried(tmp_path):
    """`broker offline since T — broker refused the connection: Not authorized`: T is when the station
    lost the broker, however often it tries again meanwhile. With a wrong password every attempt used
    to move T to that attempt (each refusal is also a disconnect, two errors in turn), so that a
    station refused for days looked refused a second ago."""
    broker = Broker(tmp_path / "broker", passwords={"station": "right-password"}).start()
    (tmp_path / "mqtt.pass").write_text("wrong-password\n")
    config = sim_config(tmp_path, broker)
    config["mqtt"].update(username="station", password_file=str(tmp_path / "mqtt.pass"))
    cfg = write_config(tmp_path / "station.yaml", config)
    agent = AgentProcess(cfg)

    def broker_state() -> dict:
        result = run_cli("status", "-c", str(cfg), "--json")
        return json.loads(result.stdout)["broker"] if result.returncode == 0 else {}

    try:
        first = wait_for(lambda: (s := broker_state()).get("error", "").startswith("broker refused") and s, 20,
                         "the refusal in status")
        wait_for(lambda: len(_refused(broker)) >= 4, 30, "more attempts refused")
        later = broker_state()
    finally:
        assert agent.stop() == 0
        broker.stop()
    assert later["state"] == "offline" and later["since"] == first["since"], (first, later)


def _refused(broker: Broker) -> list[str]:
    """The connections the broker refused for their credentials (its log)."""
    text = broker.log.read_text(errors="replace") if broker.log.exists() else ""
    return [line for line in text.splitlines() if "not authorised" in line.lower()]


def test_the_end_of_a_broker_outage_is_logged_with_how_long_it_lasted(tmp_path):
    """A broker down for hours is one `cannot connect` line and then one every 5 minutes; the line
    that ends it says how long the station was without it and how many attempts failed, so that an
    operator reading the journal of a gateway need not add up the rate-limited lines."""
    broker = Broker(tmp_path / "broker")  # not started yet: every attempt is refused
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker))
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: "cannot connect" in agent.log(), 20, "the first failed attempt")
        wait_for(lambda: "agent.runtime: station" in agent.log(), 20, "the station running")
        broker.start()
        line = wait_for(lambda: next((x for x in agent.log().splitlines() if "connected to" in x), None), 30,
                        "the connection")
    finally:
        assert agent.stop() == 0
        broker.stop()
    assert "after " in line and " of failed attempts (" in line, line
    assert agent.log().count("cannot connect") == 1, "a refused broker is said once, not at each attempt"


def test_log_level_is_taken_in_lower_case_too(tmp_path):
    """`--log-level debug` in a unit's drop-in (as journalctl prints levels) was refused by argparse, and
    the service then ended in its restart loop with exit status 2."""
    cfg = write_config(tmp_path / "station.yaml", {"station": {"id": "TEST0001"}})  # incomplete: exits 2
    for level in ("debug", "Warning"):
        result = run_cli("run", "-c", str(cfg), "--log-level", level)
        assert "invalid choice" not in result.stderr, result.stderr
        assert result.returncode == 2 and "station.yaml:" in result.stderr


def test_the_retained_status_says_why_each_failing_device_fails_as_status_does(tmp_path, broker):
    """`failing_devices` says which instruments fail; from the broker alone an operator must also tell a
    dead USB adapter or a refused TCP gateway (a site visit with a spare part) from an analyzer that
    does not answer (a phone call to the plant): `device_problems` gives each one's reason, the text
    `status` shows on its `why:` line."""
    collector = Collector(broker, "env/#")
    config = sim_config(tmp_path, broker, channels=1)
    config["buses"] = {"lan": {"type": "tcp", "host": "127.0.0.1", "port": free_port(), "timeout": 0.2}}
    config["devices"]["flow"] = {"bus": "lan", "slave": 1, "interval": 0.5,
                                 "registers": [{"channel": "w00000", "address": 0}]}
    cfg = write_config(tmp_path / "station.yaml", config)
    agent = AgentProcess(cfg)
    try:
        said = wait_for(lambda: next((s for s in _statuses(collector) if s.get("failing_devices") == ["flow"]), None),
                        40, "a retained status naming the failing device")
        status = json.loads(run_cli("status", "-c", str(cfg), "--json").stdout)
    finally:
        assert agent.stop() == 0
        collector.close()
    problem = status["devices"]["flow"]["problem"]
    assert problem and "Connection refused" in problem
    assert said.get("device_problems") == {"flow": problem}, said


def test_started_follows_a_clock_step_after_the_start(tmp_path, broker, clockshift):
    """A Pi without a real-time clock starts the agent before NTP has set the clock (the unit does not
    wait for time-sync.target): `started`, taken from the wrong clock, would put the start hours or
    years off for the whole run. When the clock steps, `started` moves with it and the retained status
    says it again."""
    clock = ShiftedClock(tmp_path / "shift", clockshift)
    clock.step(-7200)  # two hours behind, as a fake-hwclock after a long power cut
    collector = Collector(broker, "env/#")
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker))
    real_start = time.time()
    agent = AgentProcess(cfg, env=clock.env)
    try:
        birth = wait_for(lambda: next((s for s in _statuses(collector) if "started" in s), None), 20, "the birth")
        assert abs(parse_iso_utc_ms(birth["started"]) / 1000 - (real_start - 7200)) < 30
        clock.step(7200)  # NTP steps the clock right
        wait_for(lambda: "wall clock stepped" in agent.log(), 20, "the step noticed")
        said = wait_for(lambda: next((s for s in _statuses(collector)
                                      if abs(parse_iso_utc_ms(s.get("started", "1970-01-01T00:00:00.000Z")) / 1000
                                             - real_start) < 30), None), 40,
                        "a retained status whose start is on the corrected clock")
        assert said["state"] == "online"
        reply = _status_reply(broker, collector, "s1")
        assert reply["agent"]["started"] == said["started"]
    finally:
        assert agent.stop() == 0
        collector.close()
