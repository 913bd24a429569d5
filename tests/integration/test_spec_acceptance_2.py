"""SPEC.md checked from the outside, promise by promise, where no other test looks: `status --json`
figures taken together, `max_batch` while a backlog drains, which topics are retained, SIGINT,
a gap announced once and resends over evicted or never-issued seqs, and a YAML register map read
from pymodbus's own slave over Modbus TCP and over RTU on a socat pseudo-terminal pair."""

from __future__ import annotations

import json
import re
import signal
import struct
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from harness import (
    AgentProcess,
    Broker,
    Collector,
    as_published,
    free_port,
    run_cli,
    sim_config,
    start_tail,
    wait_for,
    write_config,
)
from paho.mqtt.enums import CallbackAPIVersion
from test_modbus import PYMODBUS_PEER

ISO_MS_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def status_json(cfg) -> dict:
    result = run_cli("status", "-c", str(cfg), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_status_json_figures_are_taken_from_one_state_of_the_buffer(tmp_path):
    """SPEC §1: `backlog` is the unsent readings and `last_seq` the highest seq stored. Read while the
    agent stores ~1000 readings a second with no broker (nothing sent, no seq skipped), the two must
    describe the same moment: backlog == last_seq - sent_upto, and the readings stream says the same."""
    broker = Broker(tmp_path / "broker")  # never started: everything stays in the backlog
    config = sim_config(tmp_path, broker, channels=200, interval=0.1)
    cfg = write_config(tmp_path / "station.yaml", config)
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: status_json(cfg)["last_seq"] > 2000, 30, "a backlog of a few thousand readings")
        for _ in range(4):
            s = status_json(cfg)
            assert isinstance(s["backlog"], int) and isinstance(s["last_seq"], int), s
            assert s["backlog"] == s["last_seq"] - s["sent_upto"], (s["backlog"], s["last_seq"], s["sent_upto"])
            assert s["streams"]["readings"]["last_seq"] == s["last_seq"], s["streams"]
            assert s["streams"]["readings"]["backlog"] == s["backlog"], s["streams"]
    finally:
        assert agent.stop() == 0


class Subscriber:
    """A platform-like QoS 1 subscriber that keeps topic, payload, retain flag and QoS of each message."""

    def __init__(self, broker: Broker, topic: str):
        self.messages: list[tuple[str, bytes, bool, int]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"acceptance-{id(self)}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "could not subscribe"

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain), msg.qos))

    def on(self, suffix: str) -> list[tuple[dict, bool, int]]:
        with self._lock:
            return [(json.loads(p), r, q) for t, p, r, q in self.messages if t.endswith(suffix)]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_only_the_status_topic_is_retained_everything_goes_at_qos_1_and_sigint_stops_cleanly(tmp_path):
    """SPEC §4's table: P/status retained ("offline" also when the agent stops), P/data, P/alarm and
    P/cmd/reply not; QoS 1 by default (§2). §1: SIGINT stops the agent like SIGTERM, exit 0. A
    subscriber that arrives later gets the retained status and nothing else."""
    broker = Broker(tmp_path / "broker").start()
    live = Subscriber(broker, "env/#")
    config = sim_config(tmp_path, broker, channels=1, interval=0.2)
    config["devices"]["sim0"]["channels"]["c00"].update(mean=60, amplitude=0, noise=0)
    config["alarms"] = [{"channel": "sim0.c00", "above": 50}]
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    try:
        wait_for(lambda: live.on("/alarm") and len(live.on("/data")) >= 3, 20, "readings and the alarm")
        late = Subscriber(broker, "env/#")
        wait_for(lambda: late.on("/status"), 10, "the retained status for a late subscriber")
        live.client.publish("env/TEST0001/cmd", json.dumps({"id": "p", "cmd": "ping"}), qos=1)
        wait_for(lambda: live.on("/cmd/reply"), 10, "the ping's reply")
        late_topics = {t for t, _, retained, _ in late.messages if retained}
        assert late_topics == {"env/TEST0001/status"}, late_topics
        assert late.on("/status")[0][0]["state"] == "online"
        late.close()
        agent.signal(signal.SIGINT)
        agent.proc.wait(20)
        assert agent.proc.returncode == 0, agent.log()[-2000:]
    finally:
        agent.stop()
    for suffix in ("/data", "/alarm", "/cmd/reply"):
        got = live.on(suffix)
        assert got and all(q == 1 for _, _, q in got), (suffix, [q for _, _, q in got])
    wait_for(lambda: [m for m, _, _ in live.on("/status") if m["state"] == "offline"], 10, "offline on P/status")
    after = Subscriber(broker, "env/#")
    try:
        wait_for(lambda: after.messages, 10, "the retained status after the stop")
        assert [(t, r) for t, _, r, _ in after.messages] == [("env/TEST0001/status", True)]
        status = after.on("/status")[0][0]
        assert status["v"] == 1 and status["station"] == "TEST0001" and status["state"] == "offline"
    finally:
        after.close()
        live.close()
        broker.stop()


def test_a_backlog_drains_in_messages_of_at_most_200_readings_by_default(tmp_path):
    """SPEC §2: `max_batch: 200` readings per data message when draining a backlog (the default). A
    backlog built while the broker is down arrives whole, in messages of at most 200 readings, the
    full ones holding 200."""
    broker = Broker(tmp_path / "broker", persistence=True).start()
    platform = Collector(broker, "env/#", persistent=True)
    broker.stop()
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker, channels=50, interval=0.2))
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: status_json(cfg)["last_seq"] >= 700, 30, "a backlog of more than three batches")
        broker.start()
        wait_for(lambda: platform.has_readings_upto(700), 30, "the backlog delivered")
    finally:
        assert agent.stop() == 0
        platform.close()
        broker.stop()
    sizes = [len(m["readings"]) for m in platform.json_messages("/data") if "readings" in m]
    assert max(sizes) == 200, sizes[:20]


def test_a_gap_is_announced_once_and_resends_name_the_seqs_they_cannot_send(tmp_path):
    """SPEC §3: readings dropped at `max_mb` are announced once as {"gap": [first, last], "reason":
    "buffer_full"} on the data topic, also across a restart; seqs never reused. SPEC §4's resend of a
    range that was evicted or never issued answers ok with what it sent (README: `missing` ranges)."""
    broker = Broker(tmp_path / "broker")
    config = sim_config(tmp_path, broker, channels=40, interval=0.1, storage={"max_mb": 0.1})
    cfg = write_config(tmp_path / "station.yaml", config)
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: "gap recorded" in agent.log(), 60, "unpublished readings dropped at the cap")
    finally:
        assert agent.stop() == 0
    broker.start()
    platform = Subscriber(broker, "env/#")
    agent = AgentProcess(cfg)
    try:
        gaps = lambda: [m for m, _, _ in platform.on("/data") if "gap" in m]  # noqa: E731
        wait_for(gaps, 20, "the gap announced")
        gap = gaps()[0]
        assert set(gap) == {"v", "station", "gap", "reason"} and gap["reason"] == "buffer_full", gap
        first, last = gap["gap"]
        assert isinstance(first, int) and isinstance(last, int) and 1 <= first <= last
        top = status_json(cfg)["last_seq"]
        wait_for(lambda: max(r["seq"] for m, _, _ in platform.on("/data") for r in m.get("readings", []))
                 >= top, 20, "the backlog delivered")
        for cid, lo, hi in (("evicted", first, last), ("future", top + 10**6, top + 10**6 + 5)):
            platform.client.publish("env/TEST0001/cmd", json.dumps(
                {"id": cid, "cmd": "resend", "from_seq": lo, "to_seq": hi}), qos=1)
        replies = lambda: {m["id"]: m for m, _, _ in platform.on("/cmd/reply")}  # noqa: E731
        wait_for(lambda: len(replies()) == 2, 20, "both resends answered")
        for cid, lo, hi in (("evicted", first, last), ("future", top + 10**6, top + 10**6 + 5)):
            reply = replies()[cid]
            assert reply["ok"] is True and reply["count"] == 0 and reply["missing"] == [[lo, hi]], reply
    finally:
        assert agent.stop() == 0
    agent = AgentProcess(cfg)  # a third start: the gap, announced, is not announced again
    try:
        seen = len(platform.on("/data"))
        wait_for(lambda: len(platform.on("/data")) > seen + 5, 20, "readings after the restart")
        assert len(gaps()) == 1, gaps()
        new = [r["seq"] for m, _, _ in platform.on("/data")[seen:] for r in m.get("readings", [])]
        assert min(new) > top, "seqs go on above those issued before the restarts"
    finally:
        assert agent.stop() == 0
        platform.close()
        broker.stop()


@pytest.mark.parametrize("kind", ["tcp", "rtu"])
def test_a_yaml_register_map_reads_pymodbus_slave_values_and_a_dead_slave_reads_null_b(kind, tmp_path):
    """SPEC §2 from the configuration file to the data topic, against pymodbus's own slave: `address`
    is the 0-based protocol address, `order` per register, `table: input | coil`, value = raw × scale +
    offset, `unit` carried (null without one); a device that gives no answer reads value null, flag B
    (§4), and the bus moves on."""
    words = struct.unpack(">HH", struct.pack(">f", 23.5))
    cells = [["holding", 0, [words[1], words[0]]],  # float32 CDAB
             ["holding", 20, list(words)],  # float32 ABCD at "40021"
             ["input", 4, [1234]], ["holding", 10, [65436]], ["coil", 3, [1]]]
    procs: list[subprocess.Popen] = []
    broker = Broker(tmp_path / "broker").start()
    platform = Subscriber(broker, "env/#")
    try:
        if kind == "tcp":
            port = free_port()
            where = str(port)
            buses = {"field": {"type": "tcp", "host": "127.0.0.1", "port": port, "timeout": 0.5},
                     "gone": {"type": "tcp", "host": "127.0.0.1", "port": free_port(), "timeout": 0.3}}
        else:
            links = [tmp_path / n for n in ("ttyA", "ttyB", "ttyC", "ttyD")]
            for ours, theirs in (links[:2], links[2:]):
                procs.append(subprocess.Popen(["socat", f"pty,raw,echo=0,link={ours}",
                                               f"pty,raw,echo=0,link={theirs}"], stderr=subprocess.DEVNULL))
            wait_for(lambda: all(p.exists() for p in links), 10, "the socat pty pairs")
            where = str(links[1])
            buses = {"field": {"type": "rtu", "port": str(links[0]), "timeout": 0.3},
                     "gone": {"type": "rtu", "port": str(links[2]), "timeout": 0.2}}  # nobody at ttyD
        procs.append(subprocess.Popen([sys.executable, "-c", PYMODBUS_PEER, kind, where, "7", json.dumps(cells)],
                                      stderr=subprocess.DEVNULL))
        config = sim_config(tmp_path, broker)
        config["buses"] = buses
        config["devices"] = {
            "ana": {"bus": "field", "slave": 7, "interval": 0.5, "registers": [
                {"channel": "w01018", "address": 0, "type": "float32", "order": "CDAB", "unit": "mg/L"},
                {"channel": "w21003", "address": 20, "type": "float32", "unit": "mg/L"},
                {"channel": "raw", "address": 4, "type": "uint16", "table": "input", "scale": 0.01, "offset": 1},
                {"channel": "neg", "address": 10, "type": "int16", "scale": 0.5, "offset": -0.5},
                {"channel": "pump", "address": 3, "type": "bool", "table": "coil"}]},
            "dead": {"bus": "gone", "slave": 2, "interval": 0.5, "registers": [
                {"channel": "w01018", "address": 0, "type": "float32", "unit": "mg/L"}]},
        }
        cfg = write_config(tmp_path / "station.yaml", config)
        assert run_cli("check-config", str(cfg)).returncode == 0
        agent = AgentProcess(cfg)
        try:
            def latest() -> dict:
                return {(r["device"], r["channel"]): r for m, _, _ in platform.on("/data")
                        for r in m.get("readings", [])}

            wait_for(lambda: latest().get(("ana", "pump"), {}).get("flag") == "N"
                     and ("dead", "w01018") in latest(), 30, "readings of both devices")
        finally:
            assert agent.stop() == 0
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(10)
        platform.close()
        broker.stop()
    got = {key: (r["value"], r["unit"], r["flag"]) for key, r in latest().items()}
    assert got == {
        ("ana", "w01018"): (23.5, "mg/L", "N"), ("ana", "w21003"): (23.5, "mg/L", "N"),
        ("ana", "raw"): (as_published(1234 * 0.01 + 1), None, "N"),
        ("ana", "neg"): (as_published(-100 * 0.5 - 0.5), None, "N"), ("ana", "pump"): (1, None, "N"),
        ("dead", "w01018"): (None, "mg/L", "B")}, got


def test_sigterm_while_a_backlog_drains_stops_within_the_grace_says_offline_and_the_rest_follows(tmp_path):
    """SPEC §1: on SIGTERM the agent stops polling, commits, goes on publishing the backlog for at most
    `shutdown_grace` seconds, then exits 0 (the retained status saying offline); §3: what it had no
    time to publish is published after the next start, nothing missing."""
    broker = Broker(tmp_path / "broker", persistence=True).start()
    platform = Collector(broker, "env/#", persistent=True)
    broker.stop()
    # A backlog that takes a while to drain one reading a message (20 000 messages: over a second at
    # loopback's fastest), and a short grace: the stop must come before the end of the drain.
    config = sim_config(tmp_path, broker, channels=400, interval=0.1,
                        mqtt={"max_batch": 1, "shutdown_grace": 0.1})
    cfg = write_config(tmp_path / "station.yaml", config)
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: status_json(cfg)["last_seq"] >= 20_000, 60, "a backlog of 20 000 readings")
        broker.start()
        wait_for(lambda: platform.reading_seqs(), 20, "the drain under way")
        began = time.monotonic()
        agent.signal(signal.SIGTERM)
        agent.proc.wait(20)
        took = time.monotonic() - began
        assert agent.proc.returncode == 0, agent.log()[-2000:]
    finally:
        agent.stop()
    assert took < 0.1 + 5, f"stopped {took:.1f} s after SIGTERM with shutdown_grace 0.1"
    stored = status_json(cfg)["last_seq"]
    assert len(set(platform.reading_seqs())) < stored, "the stop came before the end of the drain"
    wait_for(lambda: [m for m in platform.json_messages("/status") if m["state"] == "offline"], 10, "offline")
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: platform.has_readings_upto(stored), 60, "every reading stored before the stop")
    finally:
        assert agent.stop() == 0
        platform.close()
        broker.stop()


def test_tail_follows_the_station_to_the_broker_it_fails_over_to(tmp_path):
    """SPEC §1: `tail -c FILE` subscribes to the station's topics; §2: `urls` are tried in order. With
    the first broker down the agent publishes to the second: tail must find the readings there, not
    retry the first for ever."""
    broker = Broker(tmp_path / "broker").start()
    config = sim_config(tmp_path, broker, interval=0.2)
    del config["mqtt"]["url"]
    config["mqtt"]["urls"] = [f"mqtt://127.0.0.1:{free_port()}", broker.url]
    cfg = write_config(tmp_path / "station.yaml", config)
    agent = AgentProcess(cfg)
    out = tmp_path / "tail.out"
    proc = start_tail(cfg, out)
    try:
        wait_for(lambda: "\ndata   #" in out.read_text(), 20, "readings shown by tail")
        assert f"# subscribed to env/TEST0001/# on 127.0.0.1:{broker.port}" in out.read_text()
    finally:
        proc.kill()
        proc.wait()
        assert agent.stop() == 0
        broker.stop()


def test_commands_of_every_wrong_shape_are_answered_ok_false_and_status_json_keeps_its_types(tmp_path):
    """SPEC §4: anything on P/cmd that is not one of the three commands is answered with ok:false (and
    ignored); every reply is {"v":1,"id":…,"ok":…}. A resend over a huge range answers what it sent.
    SPEC §1: `status --json` has backlog and last_seq (integers), devices, alarms (a list), broker,
    while the agent runs and once it stopped."""
    broker = Broker(tmp_path / "broker").start()
    platform = Subscriber(broker, "env/TEST0001/cmd/reply")
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker, channels=1, interval=0.2))
    agent = AgentProcess(cfg)
    refused = [b"", b"null", b"42", b'"ping"', b"{}", b'{"id": "e", "cmd": "ping", "extra": 1}',
               b'{"id": 1.5, "cmd": "ping"}', b'{"id": "t", "cmd": "resend", "from_seq": 3, "to_seq": 1}',
               b'{"id": "n", "cmd": "resend", "from_seq": -1, "to_seq": 1}',
               b'{"id": "b", "cmd": "resend", "from_seq": true, "to_seq": 1}',
               b'{"id": "f", "cmd": "resend", "from_seq": 1.0, "to_seq": 2}',
               b'{"id": "o", "cmd": "resend", "from_seq": 1}', b'{"id": "u", "cmd": "Ping"}',
               b'{"v": 2, "id": "v2", "cmd": "ping"}', b'{"v": "1", "id": "vs", "cmd": "ping"}']
    try:
        wait_for(lambda: status_json(cfg)["last_seq"] >= 5, 20, "a few readings")
        running = status_json(cfg)
        for payload in refused:
            platform.client.publish("env/TEST0001/cmd", payload, qos=1)
        platform.client.publish("env/TEST0001/cmd", json.dumps(
            {"id": "huge", "cmd": "resend", "from_seq": 1, "to_seq": 2**63 - 1}), qos=1)
        platform.client.publish("env/TEST0001/cmd", json.dumps({"v": 1, "id": "v1", "cmd": "ping"}), qos=1)
        wait_for(lambda: len(platform.on("/reply")) == len(refused) + 2, 20, "an answer to each command")
    finally:
        assert agent.stop() == 0
        platform.close()
        broker.stop()
    replies = [m for m, retained, _ in platform.on("/reply")]
    assert all(list(m)[:3] == ["v", "id", "ok"] and m["v"] == 1 for m in replies), replies
    huge = [m for m in replies if m["id"] == "huge"]
    assert len(huge) == 1 and huge[0]["ok"] is True and huge[0]["count"] >= 5, huge
    assert huge[0]["missing"][-1][1] == 2**63 - 1, huge
    versioned = [m for m in replies if m["id"] == "v1"]  # the version every reply carries may be sent back
    assert len(versioned) == 1 and versioned[0]["ok"] is True and versioned[0]["pong"] is True, versioned
    others = [m for m in replies if m["id"] not in ("huge", "v1")]
    assert [m["ok"] for m in others] == [False] * len(refused), others
    assert all(isinstance(m["error"], str) and m["error"] for m in others), others
    stopped = status_json(cfg)
    for status in (running, stopped):
        assert type(status["backlog"]) is int and type(status["last_seq"]) is int, status
        assert isinstance(status["devices"], dict) and isinstance(status["alarms"], list), status
        assert isinstance(status["broker"], dict) and isinstance(status["broker"]["state"], str), status
    assert running["broker"]["state"] == "online" and stopped["broker"]["state"] == "offline"
    assert stopped["last_seq"] >= running["last_seq"] >= 5
