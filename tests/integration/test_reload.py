"""SIGHUP while readings flow: `edge-agent run` as a real process, `edge-agent simulate` serving real
Modbus RTU and SDS011 frames on pseudo-terminals, a real mosquitto.

What the technician relies on when running `systemctl reload edge-agent`: the instruments of the
buses the edit left alone go on being polled at their interval (their port is not closed and opened
again, what their drivers learnt is kept), a bus whose settings changed is taken over by its new
poller only once the old one has ended its poll (one transaction at a time on the wire), and the
reload itself never waits for a slow poll while the other buses stand still.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness import REPO, AgentProcess, Collector, secret, sim_config, wait_for, write_config


def start_simulator(cfg: Path, tmp_path: Path, faults: str = "") -> subprocess.Popen:
    """`edge-agent simulate -c cfg`, with `faults` (a YAML mapping device -> fault) in force."""
    control = tmp_path / "faults.yaml"
    control.write_text(faults or "{}\n")
    return subprocess.Popen([sys.executable, "-m", "agent.cli", "simulate", "-c", str(cfg)], cwd=REPO,
                            stdout=open(tmp_path / "simulate.log", "wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "EDGE_AGENT_SIM_CONTROL": str(control)})


def stop_simulator(sim: subprocess.Popen) -> None:
    sim.send_signal(signal.SIGTERM)
    try:
        sim.wait(10)
    except subprocess.TimeoutExpired:
        sim.kill()
        sim.wait()


def readings_of(collector: Collector, device: str) -> list[dict]:
    return [r for m in collector.json_messages("/data") for r in m.get("readings", []) if r["device"] == device]


def poll_times(collector: Collector, device: str) -> list[float]:
    """Start times (epoch seconds) of the device's polls, as its readings' `ts` say."""
    from datetime import datetime

    stamps = sorted({r["ts"] for r in readings_of(collector, device)})
    return [datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp() for t in stamps]


def station(tmp_path, broker, *, rtu_timeout: float, rtu_retries: int = 1) -> dict:
    """A simulated device every 0.3 s, an RTU line with two analyzers, an SDS011 streaming on its own port."""
    config = sim_config(tmp_path, broker, devices=1, channels=1, interval=0.3)
    config["buses"] = {
        "rs485": {"type": "rtu", "port": str(tmp_path / "ttyRTU"), "timeout": rtu_timeout, "retries": rtu_retries},
        "uart": {"type": "serial", "port": str(tmp_path / "ttySDS")},
    }
    config["devices"].update({
        "cod": {"bus": "rs485", "slave": 2, "interval": 1, "profile": "cod-analyzer"},
        "nh3n": {"bus": "rs485", "slave": 3, "interval": 1, "profile": "nh3n-analyzer"},
        "sds": {"bus": "uart", "driver": "sds011", "interval": 1},
    })
    return config


def test_a_reload_leaves_the_buses_it_does_not_change_polling_with_their_ports_open(tmp_path, broker):
    """Ten reloads of an edited file that changes one simulated device: the RTU line and the serial
    port are opened once, the silent analyzer's failure is logged once, and the streaming sensor gives
    a reading every interval throughout (a reload used to close and reopen every port, and the sensor
    gave nothing for the interval after each)."""
    config = station(tmp_path, broker, rtu_timeout=0.2)
    cfg = write_config(tmp_path / "station.yaml", config)
    sim = start_simulator(cfg, tmp_path, faults="cod: silent\n")
    collector = Collector(broker, "env/#")
    agent = None
    try:
        wait_for(lambda: (tmp_path / "ttyRTU").exists() and (tmp_path / "ttySDS").exists(), 15, "simulated ports")
        agent = AgentProcess(cfg)
        wait_for(lambda: len(readings_of(collector, "sds")) >= 2 and readings_of(collector, "nh3n"), 20,
                 "readings of the serial sensor and the answering analyzer")
        before = len(poll_times(collector, "sds"))
        started = time.time()
        for i in range(10):
            config["devices"]["sim0"]["interval"] = 0.3 if i % 2 else 0.4
            write_config(cfg, config)
            agent.signal(signal.SIGHUP)
            wait_for(lambda n=i + 1: agent.log().count("configuration reloaded") >= n, 10, f"reload {i + 1}")
            time.sleep(0.4)  # the technician's pace, compressed: reloads while readings flow
        wait_for(lambda: len(poll_times(collector, "sds")) >= before + int(time.time() - started) - 1, 10,
                 "a reading of the streaming sensor for every interval of the reloads")
    finally:
        if agent is not None:
            assert agent.stop() == 0
        collector.close()
        stop_simulator(sim)
    log = agent.log()
    assert log.count("bus rs485:") and log.count(f"bus rs485: {tmp_path / 'ttyRTU'} open") == 1, log
    assert log.count("bus uart: serial port") == 1, "the serial port is not closed and opened again"
    assert log.count("device cod (slave 2 on rs485): no answer") == 1, "the failure is not news after a reload"
    assert "restarted: sim:sim0; unchanged, kept polling: rs485, uart" in log
    assert not [r for r in readings_of(collector, "sds") if r["flag"] != "N"]


def test_a_reload_that_changes_a_bus_in_a_slow_poll_neither_stalls_the_others_nor_shares_the_wire(tmp_path, broker):
    """The RTU line's silent analyzer holds it 3 s per poll (timeout 1.5 s, 2 tries). A reload that
    changes the line's timeout while that poll is under way: it is done at once, the simulated device
    on its own poller keeps its 0.3 s interval meanwhile (the reload used to stop every poller and wait
    for the slowest), the line's new poller starts when the old one has ended its poll, and it serves
    the analyzer the old poller never reached before polling the silent one again (it used to poll the
    first device of the line first, so that reloads every few seconds starved the second)."""
    config = station(tmp_path, broker, rtu_timeout=1.5)
    del config["buses"]["uart"], config["devices"]["sds"]
    cfg = write_config(tmp_path / "station.yaml", config)
    sim = start_simulator(cfg, tmp_path, faults="cod: silent\n")
    collector = Collector(broker, "env/#")
    agent = None
    try:
        wait_for(lambda: (tmp_path / "ttyRTU").exists(), 15, "simulated port")
        agent = AgentProcess(cfg)
        wait_for(lambda: "running" in agent.log() and len(readings_of(collector, "sim0")) >= 2, 20, "first polls")
        assert not readings_of(collector, "cod"), "the silent analyzer's first poll (3 s) is under way"
        config["buses"]["rs485"]["timeout"] = 1.4
        write_config(cfg, config)
        sent = time.monotonic()
        agent.signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in agent.log(), 10, "the reload")
        took = time.monotonic() - sent
        wait_for(lambda: readings_of(collector, "nh3n"), 15, "the answering analyzer polled")
        time.sleep(1.0)  # a few more polls of the simulated device after the old poller ended
    finally:
        if agent is not None:
            assert agent.stop() == 0
        collector.close()
        stop_simulator(sim)
    # Waiting for the slow poll would take the rest of its 3 s (more than 2 s here); the margins are for
    # a loaded machine, not a measurement.
    assert took < 1.5, f"the reload took {took:.1f} s: it waited for the slow poll"
    sim_polls = poll_times(collector, "sim0")
    worst = max(b - a for a, b in zip(sim_polls, sim_polls[1:], strict=False))
    assert worst < 1.5, f"the simulated device went {worst:.1f} s without a poll during the reload"
    (cod_first, *_), (nh3n_first, *_) = poll_times(collector, "cod"), poll_times(collector, "nh3n")
    assert nh3n_first - cod_first < 3.0 + 1.0, "the analyzer the old poller never reached is served first"
    assert "Resource temporarily unavailable" not in agent.log(), "the port was never opened twice at once"
    assert "restarted: rs485; unchanged, kept polling: sim:sim0" in agent.log()


def test_a_reload_applies_the_storage_limits_at_once_and_names_what_waits_for_a_restart(tmp_path, broker):
    """`max_mb`, `keep_sent_days` and `commit_interval_ms` apply at the reload (a smaller cap evicts
    published rows at once, SPEC §3); `sync` waits for the restart and the reload says so, with both
    values. (Every storage edit used to wait for the restart, logged as "storage settings changed",
    naming none.)"""
    config = sim_config(tmp_path, broker, devices=2, channels=40, interval=0.1)
    cfg = write_config(tmp_path / "station.yaml", config)
    collector = Collector(broker, "env/TEST0001/data")
    agent = AgentProcess(cfg)
    try:
        # 10 000 readings take about 0.41 MB (41 B each): well above the new cap of 0.3 MB
        wait_for(lambda: len(collector.reading_seqs()) >= 10_000, 60, "a buffer of published readings")
        config["storage"].update(max_mb=0.3, keep_sent_days=2, sync="normal")
        write_config(cfg, config)
        agent.signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in agent.log(), 10, "the reload")
        wait_for(lambda: "buffer at its size cap: purged" in agent.log(), 15, "eviction down to the new cap")
    finally:
        assert agent.stop() == 0
        collector.close()
    log = agent.log()
    assert "storage limits applied: storage.max_mb: 0.3 (was 256); storage.keep_sent_days: 2 (was 7)" in log
    assert "storage.sync is normal in the file but full in force: it takes effect at the next restart " \
           "(systemctl restart edge-agent)" in log
    assert not [m for m in collector.json_messages("/data") if "gap" in m], "only published rows went"


def test_check_configs_warnings_reach_the_journal_at_start_and_at_each_reload(tmp_path, broker):
    """A technician may start or reload an edit without running check-config: what it would warn of (a
    serial port missing on this machine, here) is logged too, once per start or reload. An alarm rule's
    warning is the alarm engine's to say (as "rule not applied"), not said twice."""
    config = sim_config(tmp_path, broker, interval=0.5)
    config["buses"] = {"rs485": {"type": "rtu", "port": "/dev/ttyUSB97"}}
    config["devices"]["cod"] = {"bus": "rs485", "slave": 1, "interval": 5, "profile": "cod-analyzer"}
    config["alarms"] = [{"channel": "dust.a34002", "above": 80}]
    cfg = write_config(tmp_path / "station.yaml", config)
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: "running" in agent.log(), 20, "the agent running")
        config["buses"]["rs485"]["port"] = "/dev/ttyUSB98"
        write_config(cfg, config)
        agent.signal(signal.SIGHUP)
        wait_for(lambda: "/dev/ttyUSB98 does not exist" in agent.log(), 10, "the reload's warning")
    finally:
        assert agent.stop() == 0
    log = agent.log()
    assert log.count(f"{cfg}:") == 2, log  # one warning at start, one at the reload: the port's
    assert log.count("buses.rs485.port: warning: /dev/ttyUSB97 does not exist on this machine") == 1
    assert log.count("buses.rs485.port: warning: /dev/ttyUSB98 does not exist on this machine") == 1
    assert "alarms.0.channel: warning" not in log and "rule not applied" in log


def test_a_new_storage_path_is_said_in_full_once_not_at_every_later_reload(tmp_path, broker):
    """After a reload that named another storage.path, every later reload (another edit, the path
    still in the file) said again that the path "changed to" it, with the whole explanation, and kept
    that path's seq mark once more each time. Later reloads say only what waits for the restart, as
    for `storage.sync`."""
    config = sim_config(tmp_path, broker, channels=1)
    cfg = write_config(tmp_path / "station.yaml", config)
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: "running" in agent.log(), 20, "the agent running")
        (tmp_path / "ssd").mkdir()
        config["storage"]["path"] = str(tmp_path / "ssd" / "buffer.db")
        write_config(cfg, config)
        for reloads in (1, 2, 3):
            agent.signal(signal.SIGHUP)
            wait_for(lambda n=reloads: agent.log().count("configuration reloaded") == n, 20, f"reload {reloads}")
            config["devices"]["sim0"]["interval"] = 0.5 + reloads / 10  # an unrelated edit for the next
            write_config(cfg, config)
    finally:
        assert agent.stop() == 0
    log = agent.log()
    assert log.count("storage.path changed to") == 1, log
    assert log.count(f"storage.path is {tmp_path / 'ssd' / 'buffer.db'} in the file but {tmp_path / 'buffer.db'} "
                     "in force: it takes effect at the next restart") == 2, log


def test_a_reload_that_adds_a_console_says_it_waits_for_a_restart(tmp_path, broker):
    """The console is set up at start only (README): a reload that adds one (or edits one that could
    not start, its port taken) said "configuration reloaded" and nothing else, and no console came."""
    config = sim_config(tmp_path, broker, interval=0.5)
    cfg = write_config(tmp_path / "station.yaml", config)
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: "running" in agent.log(), 20, "the agent running")
        config["console"] = {"listen": "127.0.0.1:8080"}
        write_config(cfg, config)
        agent.signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in agent.log(), 10, "the reload")
        agent.signal(signal.SIGHUP)  # said once, not at every reload
        wait_for(lambda: agent.log().count("configuration reloaded") == 2, 10, "the second reload")
    finally:
        assert agent.stop() == 0
    assert agent.log().count("console settings changed: they take effect at the next restart "
                             "(systemctl restart edge-agent)") == 1, agent.log()


def test_a_refused_reload_logs_check_configs_warnings_with_its_errors(tmp_path, broker):
    """A refused reload logged its errors but not what check-config warns of in the same file (a serial
    port missing on this machine, an alarm rule on an unknown device): the technician fixing the error from
    the journal learnt of the rest only at the next reload. The journal now holds check-config's lines,
    errors and warnings alike, in file order (an alarm rule's too: no rule of that file is applied)."""
    config = sim_config(tmp_path, broker, interval=0.5)
    cfg = write_config(tmp_path / "station.yaml", config)
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: "running" in agent.log(), 20, "the agent running")
        config["buses"] = {"rs485": {"type": "rtu", "port": "/dev/ttyUSB97"}}
        config["devices"]["cod"] = {"bus": "rs485", "slave": 1, "interval": 0.01, "profile": "cod-analyzer"}
        config["alarms"] = [{"channel": "dust.a34002", "above": 80}]
        write_config(cfg, config)
        agent.signal(signal.SIGHUP)
        wait_for(lambda: "keeping the running configuration" in agent.log(), 10, "the reload refused")
    finally:
        assert agent.stop() == 0
    lines = [line for line in agent.log().splitlines() if f"{cfg}:" in line]
    said = {line.split(f"{cfg}:", 1)[1].split(": ", 1)[1].split(":", 1)[0]: line for line in lines}
    assert len(lines) == 3 and len(said) == 3, lines
    assert " WARNING " in said["buses.rs485.port"] and "/dev/ttyUSB97 does not exist on this machine" in said[
        "buses.rs485.port"], lines
    assert " ERROR " in said["devices.cod.interval"] and "reload refused: " in said["devices.cod.interval"], lines
    assert " WARNING " in said["alarms.0.channel"] and "unknown device 'dust'" in said["alarms.0.channel"], lines
    positions = [tuple(map(int, line.split(f"{cfg}:", 1)[1].split(":", 2)[:2])) for line in lines]
    assert positions == sorted(positions), lines  # in file order, as check-config prints them


def test_a_start_refused_for_a_bad_file_prints_check_configs_warnings_with_its_errors(tmp_path, broker):
    """`run` with a file that does not load printed its errors only; check-config prints the warnings of
    that file beside them (a technician reading `journalctl -u edge-agent` saw half of it)."""
    config = sim_config(tmp_path, broker, interval=0.5)
    config["buses"] = {"rs485": {"type": "rtu", "port": "/dev/ttyUSB97"}}
    config["devices"]["cod"] = {"bus": "rs485", "slave": 1, "interval": 0.01, "profile": "cod-analyzer"}
    cfg = write_config(tmp_path / "station.yaml", config)
    result = subprocess.run([sys.executable, "-m", "agent.cli", "run", "-c", str(cfg)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    check = subprocess.run([sys.executable, "-m", "agent.cli", "check-config", str(cfg)], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert result.returncode == check.returncode == 2, result.stderr
    said = [line for line in result.stderr.splitlines() if line.startswith(f"{cfg}:")]
    assert said == check.stderr.splitlines(), (said, check.stderr)
    assert any("buses.rs485.port: warning: /dev/ttyUSB97 does not exist" in line for line in said), said


def test_a_sighup_storm_while_the_broker_is_down_does_not_storm_it_with_connection_attempts(tmp_path, broker):
    """50 reloads of an unchanged file while the broker is down (a script looping on `systemctl reload`):
    each one may bring the next connection attempt forward (renewed TLS files are tried at once), but
    not to less than a second after the last one, so the broker is tried at the backoff's pace, not once
    per SIGHUP (each reload used to start an attempt: 50 in a second, TLS handshakes included)."""
    config = sim_config(tmp_path, broker, interval=0.5)  # reconnect_max 1: an attempt every 0.5-1 s
    cfg = write_config(tmp_path / "station.yaml", config)
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: "connected to" in agent.log(), 20, "the first connection")
        broker.stop()
        wait_for(lambda: "cannot connect to" in agent.log(), 20, "the broker missed")
        down = time.monotonic()
        for n in range(1, 51):
            agent.signal(signal.SIGHUP)
            wait_for(lambda n=n: agent.log().count("configuration reloaded") >= n, 10, f"reload {n}")
        broker.start()
        wait_for(lambda: "failed attempts" in agent.log(), 20, "the connection once the broker is back")
        outage = time.monotonic() - down
    finally:
        assert agent.stop() == 0
    attempts = int(re.search(r"failed attempts \((\d+)\)", agent.log()).group(1))
    assert attempts <= 2 * outage + 3, f"{attempts} connection attempts in an outage of {outage:.1f} s"


def test_a_reload_says_that_environment_values_are_those_the_agent_started_with(tmp_path, broker):
    """The examples take MQTT_USER, MQTT_PASS and HJ212_PW from `/etc/edge-agent/env` (the unit's
    EnvironmentFile): a technician who rotates the password there and runs `systemctl reload` gets the
    old value, since a process's environment is fixed at its start. The reload says which `${NAME}` it
    took from that environment and that an edit of it needs a restart (it said nothing: the new password
    seemed applied, and the broker went on refusing the old one), never their values."""
    user = secret("station-user-7781")
    config = sim_config(tmp_path, broker, interval=0.5, mqtt={"username": "${MQTT_USER}"})
    config["station"]["name"] = "${SITE_NAME}"
    cfg = write_config(tmp_path / "station.yaml", config)
    agent = AgentProcess(cfg, env={"MQTT_USER": user, "SITE_NAME": "Fenhe outfall 17"})
    try:
        wait_for(lambda: "running" in agent.log(), 20, "the agent running")
        agent.signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in agent.log(), 10, "the reload")
    finally:
        assert agent.stop() == 0
    assert ("${SITE_NAME}, ${MQTT_USER}: the values the agent started with (its environment is read at start "
            "only): an edit of the service's environment file takes effect at the next restart "
            "(systemctl restart edge-agent)") in agent.log()


def test_a_reload_that_tunes_max_batch_or_reconnect_max_keeps_the_connection(tmp_path, broker):
    """`mqtt.max_batch` and `reconnect_max` shape what the publisher does, not the connection: a reload
    that changes only them applies them on the connection there is (it dropped and made it again, with
    a retained `offline` "reconfigured" for the platform though the station went nowhere, and the
    messages in flight published twice)."""
    config = sim_config(tmp_path, broker, interval=0.2)
    cfg = write_config(tmp_path / "station.yaml", config)
    collector = Collector(broker, "env/#")
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: len(collector.reading_seqs()) >= 6, 20, "readings published")
        config["mqtt"].update(max_batch=50, reconnect_max=2)
        write_config(cfg, config)
        agent.signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in agent.log(), 10, "the reload")
        after = len(collector.reading_seqs())
        wait_for(lambda: len(collector.reading_seqs()) >= after + 6, 20, "readings published after the reload")
    finally:
        assert agent.stop() == 0
        collector.close()
    log = agent.log()
    assert "broker settings applied on the connection: mqtt.max_batch: 50 (was 200); mqtt.reconnect_max: 2 (was 1)" \
        in log, log
    assert "reconnecting" not in log and log.count("connected to") == 1, log
    states = [m["state"] for m in collector.json_messages("/status")]
    assert states[-1] == "offline" and "offline" not in states[:-1], states  # the stop's, only
