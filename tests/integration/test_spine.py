"""The station spine end to end: simulated instruments -> agent process -> SQLite -> real mosquitto.

Every test runs `edge-agent run` as a real process against a mosquitto it starts itself, and checks
what a platform engineer cares about: which seqs arrived, in which order, and that none is missing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from harness import (
    REPO,
    AgentProcess,
    Broker,
    Collector,
    db_last_seq,
    free_port,
    run_cli,
    silent_listener,
    sim_config,
    start_tail,
    wait_for,
    write_config,
)
from paho.mqtt.enums import CallbackAPIVersion

from agent import __version__


def assert_complete(seqs: list[int], first: int, last: int) -> None:
    missing = set(range(first, last + 1)) - set(seqs)
    assert not missing, f"{len(missing)} seqs missing, e.g. {sorted(missing)[:10]}"


def assert_ordered_per_message(collector: Collector) -> None:
    for msg in collector.json_messages("/data"):
        seqs = [r["seq"] for r in msg.get("readings", [])]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), f"message not in seq order: {seqs[:20]}"


def test_readings_arrive_with_the_documented_payload(tmp_path, broker, collector):
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker, channels=2, interval=0.2))
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: len(collector.reading_seqs()) >= 10, 20, "10 readings")
        # The operator's `top -H` sees what each thread is.
        threads = {(t / "comm").read_text().strip() for t in Path(f"/proc/{agent.proc.pid}/task").iterdir()}
        assert {"recorder", "publisher", "bus:sim:sim0"} <= threads, threads
    finally:
        assert agent.stop() == 0
    msg = collector.json_messages("/data")[0]
    assert msg["v"] == 1 and msg["station"] == "TEST0001"
    r = msg["readings"][0]
    assert set(r) == {"seq", "device", "channel", "ts", "value", "unit", "flag"}
    assert r["device"] == "sim0" and r["channel"] in ("c00", "c01") and r["unit"] == "mg/L" and r["flag"] == "N"
    assert r["ts"].endswith("Z") and len(r["ts"]) == len("2026-11-29T02:00:00.000Z")
    status = [json.loads(p) for t, p, retained in collector.messages if t.endswith("/status")]
    assert status[0]["state"] == "online" and status[-1]["state"] == "offline", "birth and clean offline"


def test_broker_outage_loses_nothing(tmp_path):
    broker = Broker(tmp_path / "broker", persistence=True).start()
    platform = Collector(broker, "env/#", persistent=True)
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker, channels=20, interval=0.2))
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: len(platform.reading_seqs()) >= 200, 20, "readings before the outage")
        broker.stop()
        time.sleep(10)  # the outage itself (not a wait for a condition)
        broker.start()
        wait_for(lambda: sum(m.get("state") == "online" for m in platform.json_messages("/status")) >= 2, 30,
                 "agent reconnected")
        target = db_last_seq(tmp_path / "buffer.db")
        wait_for(lambda: platform.has_readings_upto(target), 30, f"seqs 1..{target}")
    finally:
        assert agent.stop() == 0
        platform.close()
        broker.stop()
    assert_ordered_per_message(platform)
    assert "lost" in agent.log() or "cannot connect" in agent.log()


def test_kill9_while_draining_backlog_then_restart_loses_nothing(tmp_path, broker, collector):
    config = sim_config(tmp_path, broker, channels=80, interval=0.1, mqtt={"max_batch": 5})
    broker.stop()
    cfg = write_config(tmp_path / "station.yaml", config)
    agent = AgentProcess(cfg)
    wait_for(lambda: (tmp_path / "buffer.db").exists() and db_last_seq(tmp_path / "buffer.db") >= 4000, 30,
             "a backlog of 4000 readings")
    broker.start()
    again = Collector(broker, "env/#")
    wait_for(lambda: len(again.reading_seqs()) >= 200, 30, "drain started")
    agent.kill9()
    committed = db_last_seq(tmp_path / "buffer.db")
    agent2 = AgentProcess(cfg)
    try:
        wait_for(lambda: again.has_readings_upto(committed), 60,
                 f"every committed seq up to {committed}")
        wait_for(lambda: max(again.reading_seqs()) > committed, 20, "numbering continues after the restart")
    finally:
        assert agent2.stop() == 0
        again.close()
    seqs = again.reading_seqs()
    new = [s for s in seqs if s > committed]
    assert new and min(new) == committed + 1, "seq continues right after the last committed one"


def test_cold_start_without_broker_keeps_readings_taken_before_first_connection(tmp_path):
    broker = Broker(tmp_path / "broker")  # configured, not started: the 4G link is not up yet
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker, channels=5, interval=0.2))
    agent = AgentProcess(cfg)
    wait_for(lambda: (tmp_path / "buffer.db").exists() and db_last_seq(tmp_path / "buffer.db") >= 50, 20,
             "readings stored with no broker")
    agent.kill9()
    taken = db_last_seq(tmp_path / "buffer.db")
    broker.start()
    collector = Collector(broker, "env/#")
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: collector.has_readings_upto(taken), 30,
                 f"all {taken} readings taken before the first connection")
    finally:
        agent.stop()
        collector.close()
        broker.stop()


def test_corrupt_database_is_moved_aside_and_seq_continues(tmp_path, broker, collector):
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker, channels=3, interval=0.1))
    agent = AgentProcess(cfg)
    wait_for(lambda: len(collector.reading_seqs()) >= 30, 20, "readings")
    assert agent.stop() == 0
    old_high = db_last_seq(tmp_path / "buffer.db")
    (tmp_path / "buffer.db").write_bytes(b"\x00garbage from a failing SD card" * 5000)
    for side in ("buffer.db-wal", "buffer.db-shm"):
        (tmp_path / side).unlink(missing_ok=True)
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: max(collector.reading_seqs()) > old_high, 20, "new readings after the rescue")
    finally:
        assert agent.stop() == 0
    assert any(".corrupt-" in p.name for p in tmp_path.iterdir()), "the damaged file is kept"
    assert "corrupt" in agent.log() and "moved aside" in agent.log()
    new = [s for s in collector.reading_seqs() if s > old_high]
    assert min(new) > old_high


def test_unpublished_backlog_of_a_corrupt_file_is_salvaged_and_numbering_goes_on_right_after_it(tmp_path):
    """An outage builds a backlog, the agent stops cleanly, then the SD card damages a page of the file:
    the readings still readable are delivered with their seqs, and new readings continue right after
    the last seq the clean stop noted beside the mark (no seq above it was ever issued: no jump, no
    gap to announce)."""
    broker = Broker(tmp_path / "broker")  # not started: the backlog builds up
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker, channels=5, interval=0.1))
    db = tmp_path / "buffer.db"
    agent = AgentProcess(cfg)
    wait_for(lambda: db.exists() and db_last_seq(db) >= 300, 30, "a backlog of 300 readings")
    assert agent.stop() == 0
    backlog = db_last_seq(db)
    assert json.loads((tmp_path / "buffer.db.seq").read_text())["readings.issued"] == backlog
    conn = sqlite3.connect(db)
    meta_page = conn.execute("SELECT pageno FROM dbstat WHERE name='meta' AND pagetype='leaf'").fetchone()[0]
    conn.close()
    with open(db, "r+b") as f:  # the page of the agent's state: the readings themselves are intact
        f.seek((meta_page - 1) * 1024)
        f.write(b"\xa5" * 1024)
    broker.start()
    collector = Collector(broker, "env/#")
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: max(collector.reading_seqs(), default=0) > backlog + 20, 30, "new readings")
    finally:
        assert agent.stop() == 0
        collector.close()
        broker.stop()
    assert "corrupt" in agent.log() and "salvaged unpublished rows: readings" in agent.log()
    assert_complete(collector.reading_seqs(), 1, max(collector.reading_seqs()))
    assert not [m for m in collector.json_messages("/data") if "gap" in m], "nothing lost, nothing skipped"


def test_a_new_storage_path_by_sighup_continues_the_seqs_after_the_restart(tmp_path, broker, collector):
    """The technician moves the buffer to another disk by editing storage.path and reloading: the
    running agent keeps its file, and the buffer the next start opens at the new path numbers on
    from the old one's high-water mark (SPEC §3: never reused), not from 1."""
    config = sim_config(tmp_path, broker, channels=2, interval=0.1)
    cfg = write_config(tmp_path / "station.yaml", config)
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: len(collector.reading_seqs()) >= 20, 20, "readings")
        config["storage"]["path"] = str(tmp_path / "ssd" / "buffer.db")
        (tmp_path / "ssd").mkdir()
        write_config(cfg, config)
        agent.signal(signal.SIGHUP)
        wait_for(lambda: "storage.path changed" in agent.log(), 10, "the reload")
    finally:
        assert agent.stop() == 0
    old_last = db_last_seq(tmp_path / "buffer.db")
    before = len(collector.reading_seqs())
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: len(collector.reading_seqs()) > before + 5, 20, "readings from the new buffer")
    finally:
        assert agent.stop() == 0
    assert min(collector.reading_seqs()[before:]) > old_last, "no seq of the old buffer is issued again"
    assert (tmp_path / "ssd" / "buffer.db").exists()


def test_a_sighup_while_the_agent_starts_is_a_reload_not_its_end(tmp_path, broker, collector):
    """The config file is a named pipe: `run` blocks reading it, mid-start, until the test writes it.
    A SIGHUP sent then (a reload right after a start) must not end the process, the default action."""
    text = tmp_path / "written.yaml"
    write_config(text, sim_config(tmp_path, broker, channels=1, interval=0.2))
    fifo = tmp_path / "station.yaml"
    os.mkfifo(fifo)
    agent = AgentProcess(fifo)
    try:
        def catches_sighup() -> bool:  # SigCgt: the signals the process has a handler for (SIGHUP: bit 0)
            status = Path(f"/proc/{agent.proc.pid}/status").read_text()
            return bool(int(status.split("SigCgt:")[1].split()[0], 16) & 1)

        # It cannot get past reading the pipe: a handler now is the start's own, not the station's.
        wait_for(catches_sighup, 20, "the agent catching SIGHUP before its config is read")
        agent.signal(signal.SIGHUP)
        with open(fifo, "w") as f:  # unblocks the start
            f.write(text.read_text())
        os.replace(text, fifo)  # what the reload reads, a second later
        wait_for(lambda: "configuration reloaded" in agent.log(), 20, "the SIGHUP acted on as a reload")
        assert agent.alive()
        wait_for(lambda: len(collector.reading_seqs()) >= 5, 20, "readings published")
    finally:
        assert agent.stop() == 0


def test_resend_command_republishes_a_stored_range_and_bad_commands_are_refused(tmp_path, broker, collector):
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker, channels=2, interval=0.2))
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: len(collector.reading_seqs()) >= 20, 20, "readings")
        pub = Collector(broker, "nothing/#")
        base = "env/TEST0001"
        pub.client.publish(f"{base}/cmd", json.dumps({"id": "r1", "cmd": "resend", "from_seq": 3, "to_seq": 7}),
                           qos=1)
        for bad in [b"not json", b"[1,2]", json.dumps({"id": "x", "cmd": "reboot"}).encode(),
                    json.dumps({"id": "y", "cmd": "resend", "from_seq": "a", "to_seq": 2}).encode(),
                    json.dumps({"cmd": "ping"}).encode(),
                    json.dumps({"id": "big", "cmd": "resend", "from_seq": 10**30, "to_seq": 10**30}).encode(),
                    json.dumps({"id": "nocmd"}).encode(),
                    b'{"id": "deep", "x": ' + b"[" * 1500 + b"]" * 1500 + b"}"]:
            pub.client.publish(f"{base}/cmd", bad, qos=1)
        pub.client.publish(f"{base}/cmd", json.dumps({"id": "p1", "cmd": "ping"}), qos=1)
        replies = lambda: collector.json_messages("/cmd/reply")  # noqa: E731
        wait_for(lambda: len(replies()) >= 10, 20, "10 replies")
        by_id = {r["id"]: r for r in replies()}
        assert by_id["r1"]["ok"] is True and by_id["r1"]["count"] == 5, by_id["r1"]
        assert by_id["p1"]["ok"] is True
        assert by_id["x"]["ok"] is False and "unknown command" in by_id["x"]["error"]
        assert by_id["y"]["ok"] is False
        assert by_id["big"]["ok"] is False and "from 0 to" in by_id["big"]["error"]
        assert by_id["nocmd"]["ok"] is False and "missing 'cmd'" in by_id["nocmd"]["error"]
        assert sum(1 for r in replies() if r["ok"] is False) == 8
        assert not [r for r in replies() if "internal error" in r.get("error", "")], "every refusal is explained"
        assert "Traceback" not in agent.log()
        assert collector.reading_seqs().count(5) >= 2, "seq 5 was published again"
        before = max(collector.reading_seqs())
        wait_for(lambda: max(collector.reading_seqs()) > before + 10, 20, "publishing goes on after bad commands")
        # A range wider than the limit is fine when the buffer holds fewer readings than the limit in it.
        pub.client.publish(f"{base}/cmd", json.dumps({"id": "wide", "cmd": "resend", "from_seq": 1,
                                                      "to_seq": 500_000}), qos=1)
        wide = wait_for(lambda: [r for r in replies() if r["id"] == "wide"], 20, "the wide resend's reply")[0]
        assert wide["ok"] is True and wide["count"] > 20, wide
        pub.close()
    finally:
        assert agent.stop() == 0


def test_a_flood_of_resends_is_worked_off_within_the_window_and_the_excess_refused(tmp_path, broker, collector):
    """Each resend is published within the publisher's window, after what is new, and answered when
    done; at most four are under way, more are refused until one is answered (a flood queued every
    message at once: ~12 MB per command). Live readings go on meanwhile."""
    # Small messages: a resend of ~3000 readings is ~300 messages, ten windows' worth. Two devices: 400
    # readings/s, in messages as small as with one.
    config = sim_config(tmp_path, broker, channels=20, interval=0.1, devices=2, mqtt={"max_batch": 1})
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    try:
        wait_for(lambda: len(collector.reading_seqs()) >= 3000, 30, "a few thousand readings")
        top = max(collector.reading_seqs())
        pub = Collector(broker, "nothing/#")
        for i in range(6):
            pub.client.publish("env/TEST0001/cmd", json.dumps(
                {"id": f"r{i}", "cmd": "resend", "from_seq": 1, "to_seq": top}), qos=1)
        replies = lambda: {r["id"]: r for r in collector.json_messages("/cmd/reply")}  # noqa: E731
        wait_for(lambda: len(replies()) == 6, 60, "an answer to each of the 6 resends")
        done = [r for r in replies().values() if r["ok"]]
        refused = [r for r in replies().values() if not r["ok"]]
        assert len(done) >= 4 and all(r["count"] == top and "missing" not in r for r in done)
        assert refused and all("under way" in r["error"] for r in refused)
        assert all(collector.reading_seqs().count(s) >= 1 + len(done) for s in (1, top // 2, top))
        newest = max(collector.reading_seqs())
        wait_for(lambda: max(collector.reading_seqs()) > newest + 100, 20, "live readings go on")
        pub.client.publish("env/TEST0001/cmd", json.dumps({"id": "again", "cmd": "resend", "from_seq": 1,
                                                           "to_seq": 5}), qos=1)
        wait_for(lambda: "again" in replies(), 20, "a resend accepted once the others are answered")
        assert replies()["again"]["ok"] is True and replies()["again"]["count"] == 5
        pub.close()
    finally:
        assert agent.stop() == 0


def test_a_resend_cut_off_by_a_broker_restart_still_delivers_its_whole_range(tmp_path):
    """The broker goes down in the middle of a large resend: the messages in flight then are lost with
    the connection, so after the reconnect the resend goes on from its first batch the broker had not
    acknowledged, and its reply (after the range) counts only what the broker took. A persistent
    platform session on a persistent broker receives every seq of the range across the restart."""
    broker = Broker(tmp_path / "broker", persistence=True).start()
    platform = Collector(broker, "env/#", persistent=True)
    # One reading per message: the resend is 15 000 messages (over a second on loopback), so the restart
    # lands mid-way.
    config = sim_config(tmp_path, broker, channels=50, devices=3, interval=0.1, mqtt={"max_batch": 1})
    cfg = write_config(tmp_path / "station.yaml", config)
    agent = AgentProcess(cfg)
    pub = None
    try:
        wait_for(lambda: len(set(platform.reading_seqs())) >= 15_000, 60, "15 000 readings delivered", interval=0.5)
        last = 15_000
        # Then a quiet station (75 readings a second instead of 1500), so that the live data does not hold
        # the resend back on a loaded machine: the resend is what is under test.
        for device in config["devices"].values():
            device["interval"] = 2
        write_config(cfg, config)
        agent.signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in agent.log(), 20, "the quieter configuration loaded")
        assert_complete(platform.reading_seqs(), 1, last)
        before = len(platform.messages)

        def resent(upto: int | None = None) -> list[int]:
            """Seqs of the range received since the command (before message `upto`)."""
            msgs = list(platform.messages)[before:upto]
            return [r["seq"] for t, p, _ in msgs if t.endswith("/data")
                    for r in json.loads(p).get("readings", []) if r["seq"] <= last]

        replies = lambda: [r for r in platform.json_messages("/cmd/reply") if r["id"] == "cut"]  # noqa: E731
        pub = Collector(broker, "nothing/#")
        pub.client.publish("env/TEST0001/cmd", json.dumps({"id": "cut", "cmd": "resend", "from_seq": 1,
                                                           "to_seq": last}), qos=1).wait_for_publish(10)
        wait_for(lambda: len(resent()) >= 200, 20, "the resend under way")
        # The agent is held (SIGSTOP) while the broker goes down, so that the restart lands mid-way
        # whatever the machine's speed: on a quiet one the whole range (a second or two) was sometimes
        # done before the broker had stopped. Its connection drops meanwhile, as a link's would.
        agent.signal(signal.SIGSTOP)
        try:
            pub.close()
            pub = None
            broker.stop()
            assert not replies(), "the restart must land before the resend is done"
            assert len(set(resent())) < last, "the restart must land mid-way"
        finally:
            agent.signal(signal.SIGCONT)
        broker.start()
        reply = wait_for(replies, 60, "the resend's reply")[0]
        assert reply["ok"] is True and reply["count"] == last and "missing" not in reply, reply
        # The reply comes after the range: every seq of it had arrived before the reply did.
        at = next(i for i, (t, p, _) in enumerate(list(platform.messages))
                  if t.endswith("/cmd/reply") and json.loads(p)["id"] == "cut")
        assert_complete(resent(at), 1, last)
        assert "connection to broker lost" in agent.log() or "closed the connection" in agent.log()
    finally:
        if pub is not None:
            pub.close()
        assert agent.stop() == 0
        platform.close()
        broker.stop()
    assert_ordered_per_message(platform)


def _vm_kb(pid: int, field: str) -> int:
    """`VmRSS` or `VmHWM` (peak resident) of a process, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def test_a_flood_of_commands_is_answered_within_a_bound_and_the_connection_holds(tmp_path, broker, collector):
    """A platform script looping on P/cmd (80 000 pings as fast as a client can send them): each reply
    waited for its PUBACK in paho's queue, without a bound: the agent grew by over 100 MB, the data queued
    behind tens of thousands of replies, and once 65 535 replies were waiting paho refused the next
    publish ("Message queue full": its message ids had wrapped) and the agent dropped its connection,
    again at each flood. Commands arriving while too many replies wait are dropped unanswered (and that
    is logged); the connection holds, the memory stays flat, and the agent answers again afterwards."""
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker, channels=2, interval=0.2))
    agent = AgentProcess(cfg)
    flooder = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="flooder")
    flooder.max_inflight_messages_set(0)
    flooder.max_queued_messages_set(0)
    flooder.connect("127.0.0.1", broker.port)
    flooder.loop_start()
    try:
        wait_for(lambda: len(collector.reading_seqs()) >= 5, 20, "readings")
        rss_before = _vm_kb(agent.proc.pid, "VmRSS")
        for i in range(80_000):
            sent = flooder.publish("env/TEST0001/cmd", b'{"id":%d,"cmd":"ping"}' % i, qos=1)
            if i % 10_000 == 9_999:  # the flooder's own message ids wrap at 65 535 unacknowledged (a busy broker)
                sent.wait_for_publish(60)
        replies = lambda: {r["id"] for r in collector.json_messages("/cmd/reply")}  # noqa: E731
        def answered() -> bool:
            flooder.publish("env/TEST0001/cmd", json.dumps({"id": "after", "cmd": "ping"}), qos=1)
            return "after" in replies()
        wait_for(answered, 120, "a ping answered after the flood", interval=0.5)
        grown_mb = (_vm_kb(agent.proc.pid, "VmHWM") - rss_before) / 1024
        newest = max(collector.reading_seqs())
        wait_for(lambda: max(collector.reading_seqs()) > newest + 10, 20, "readings go on")
    finally:
        flooder.loop_stop()
        flooder.disconnect()
        assert agent.stop() == 0
    log = agent.log()
    assert log.count("connected to") == 1 and "publish failed" not in log, log[-3000:]
    assert "dropped unanswered" in log
    assert grown_mb < 40, f"the agent grew by {grown_mb:.0f} MB during the flood"


def test_a_flood_of_costly_commands_does_not_hold_the_live_data_up(tmp_path, broker, collector):
    """Each resend of more than 100 000 readings is refused after counting the stored rows of its range
    (a few ms each): a platform script sending them in a loop kept the publisher's thread on commands,
    and the replies waiting for their PUBACK filled the publisher's window, so no live reading was
    published for as long as the flood lasted (none in 10 s). Replies may take at most half the window:
    live data messages go out between the flood's replies."""
    from agent.buffer import Buffer
    from agent.model import STREAM_READINGS, Reading

    stored = 150_000
    buf = Buffer.open_writer(tmp_path / "buffer.db", sync="normal")
    buf.begin()
    rows = buf.insert_readings([Reading("old", f"c{i % 10}", 1_764_000_000_000 + i * 100, float(i), "mg/L", "N")
                                for i in range(stored)])
    buf.set_sent_upto(STREAM_READINGS, rows[-1].seq)
    buf.commit()
    buf.close()
    config = sim_config(tmp_path, broker, channels=3, interval=0.1)
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    flooder = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="flooder")
    flooder.max_inflight_messages_set(0)
    flooder.max_queued_messages_set(0)
    flooder.connect("127.0.0.1", broker.port)
    flooder.loop_start()
    try:
        wait_for(lambda: any(s > stored for s in collector.reading_seqs()), 20, "live readings")
        last = None
        for i in range(20_000):
            last = flooder.publish("env/TEST0001/cmd", json.dumps(
                {"id": i, "cmd": "resend", "from_seq": 1, "to_seq": stored}).encode(), qos=1)
        last.wait_for_publish(60)

        def answered() -> bool:
            flooder.publish("env/TEST0001/cmd", json.dumps({"id": "after", "cmd": "ping"}), qos=1)
            return any(r["id"] == "after" for r in collector.json_messages("/cmd/reply"))
        wait_for(answered, 120, "a ping answered after the flood", interval=0.5)
    finally:
        flooder.loop_stop()
        flooder.disconnect()
        assert agent.stop() == 0
    messages = list(collector.messages)
    flood = [i for i, (t, p, _) in enumerate(messages)
             if t.endswith("/cmd/reply") and isinstance(json.loads(p)["id"], int)]
    assert len(flood) >= 20 and all(not json.loads(messages[i][1])["ok"] for i in flood)
    live = [i for i, (t, p, _) in enumerate(messages[flood[0]:flood[-1]], flood[0]) if t.endswith("/data")
            and any(r["seq"] > stored for r in json.loads(p)["readings"])]
    assert len(live) >= 3, f"{len(live)} live data messages among {len(flood)} replies to the flood"


def test_a_retained_command_is_ignored(tmp_path, broker, collector):
    """SPEC §4: P/cmd is not retained. One left there by mistake would run at every connection."""
    pub = Collector(broker, "nothing/#")
    stuck = json.dumps({"id": "stuck", "cmd": "ping"})
    pub.client.publish("env/TEST0001/cmd", stuck, qos=1, retain=True).wait_for_publish(10)
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker, channels=2, interval=0.2))
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: "ignored a retained message" in agent.log(), 20, "the retained command seen and ignored")
        pub.client.publish("env/TEST0001/cmd", json.dumps({"id": "live", "cmd": "ping"}), qos=1)
        wait_for(lambda: any(r["id"] == "live" for r in collector.json_messages("/cmd/reply")), 20,
                 "a live ping answered")
        assert [r["id"] for r in collector.json_messages("/cmd/reply")] == ["live"]
        pub.close()
    finally:
        assert agent.stop() == 0


def test_a_command_id_that_utf8_cannot_carry_is_echoed_and_publishing_goes_on(tmp_path, broker, collector):
    """JSON may carry a lone surrogate ("\\ud800"), UTF-8 cannot: the reply echoes the id escaped as it
    came, the way the platform sent it (it took the publisher thread down: nothing was published
    any more, and the retained status said offline while the agent ran on)."""
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker, channels=2, interval=0.2))
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: len(collector.reading_seqs()) >= 5, 20, "readings")
        pub = Collector(broker, "nothing/#")
        for raw in [b'{"id": "a\\ud800", "cmd": "ping"}', b'{"id": "\\udfff", "cmd": "resend", "from_seq": 1}']:
            pub.client.publish("env/TEST0001/cmd", raw, qos=1)
        pub.client.publish("env/TEST0001/cmd", json.dumps({"id": "after", "cmd": "ping"}), qos=1)
        replies = lambda: collector.json_messages("/cmd/reply")  # noqa: E731
        wait_for(lambda: len(replies()) >= 3, 20, "three replies")
        by_id = {r["id"]: r for r in replies()}
        assert by_id["a\ud800"]["ok"] is True and by_id["a\ud800"]["pong"] is True
        assert by_id["\udfff"]["ok"] is False and "'to_seq'" in by_id["\udfff"]["error"]
        assert by_id["after"]["ok"] is True
        before = max(collector.reading_seqs())
        wait_for(lambda: max(collector.reading_seqs()) > before + 10, 20, "publishing goes on")
        assert "Traceback" not in agent.log()
        pub.close()
    finally:
        assert agent.stop() == 0
    assert collector.json_messages("/status")[-1]["reason"] == "stopped"


def test_an_oversized_command_is_refused_and_publishing_goes_on(tmp_path, broker):
    """SPEC §4: anything but a command on P/cmd is answered ok:false and ignored; a 20 MB one too, read
    without being held whole (agent.mqttclient), refused without being decoded, logged once."""
    collector = Collector(broker, "env/TEST0001/+")  # the data and the replies, not the big command
    replies = Collector(broker, "env/TEST0001/cmd/reply")
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker, channels=2, interval=0.2))
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: len(collector.reading_seqs()) >= 5, 20, "readings")
        pub = Collector(broker, "nothing/#")
        big = b'{"id": "huge", "cmd": "ping", "pad": "' + b"x" * 20_000_000 + b'"}'
        pub.client.publish("env/TEST0001/cmd", big, qos=1).wait_for_publish(60)
        del big
        pub.client.publish("env/TEST0001/cmd", json.dumps({"id": "after", "cmd": "ping"}), qos=1)
        answers = lambda: replies.json_messages()  # noqa: E731
        wait_for(lambda: len(answers()) >= 2, 60, "both commands answered")
        refused, pong = answers()[:2]
        assert refused["ok"] is False and refused["id"] is None, "its id is never looked for"
        assert "larger than 4096 bytes" in refused["error"]
        assert pong["id"] == "after" and pong["ok"] is True
        before = max(collector.reading_seqs())
        wait_for(lambda: max(collector.reading_seqs()) > before + 10, 20, "publishing goes on")
        assert agent.log().count("command larger than") == 1
        assert "Traceback" not in agent.log()
        pub.close()
    finally:
        assert agent.stop() == 0
        collector.close()
        replies.close()


def test_status_command_and_cli_status_report_backlog_and_devices(tmp_path, broker, collector):
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker, channels=2, interval=0.2))
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: len(collector.reading_seqs()) >= 20, 20, "readings")
        result = run_cli("status", "-c", str(cfg), "--json")
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        for key in ("backlog", "last_seq", "devices", "alarms", "broker"):
            assert key in status
        assert status["last_seq"] >= 20
        assert status["broker"]["state"] == "online"
        assert set(status["devices"]["sim0"]["channels"]) == {"c00", "c01"}
        text = run_cli("status", "-c", str(cfg))
        assert text.returncode == 0 and "sim0" in text.stdout and "backlog" in text.stdout
    finally:
        assert agent.stop() == 0


def test_a_burst_of_status_commands_reads_the_buffer_once_a_second_not_once_each(tmp_path, broker, collector):
    """Each `status` command read the buffer on the publisher's thread (the backlog counted, the latest
    value of every channel): a platform asking 100 times a second held the drain (p50 latency of the
    readings 10 -> 100 ms, p99 500 ms, with a small buffer). Commands within a second share one status:
    40 asked at once get the same few `ts`, not 40 different ones."""
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker, channels=2, interval=0.2))
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: collector.reading_seqs(), 20, "readings")
        for i in range(40):
            collector.client.publish("env/TEST0001/cmd", json.dumps({"id": i, "cmd": "status"}), qos=1)
        wait_for(lambda: len(collector.json_messages("/cmd/reply")) >= 40, 30, "40 replies")
        replies = collector.json_messages("/cmd/reply")
        assert all(r["ok"] and r["status"]["last_seq"] >= 1 for r in replies), replies[0]
        taken = {r["status"]["ts"] for r in replies}
        assert len(taken) <= 10, f"{len(taken)} statuses read for 40 commands"
    finally:
        assert agent.stop() == 0


def test_status_json_before_the_first_start_has_the_keys_of_a_running_station(tmp_path, broker, collector):
    """README: `status --json` with no buffer file yet reports backlog 0, last_seq 0 and every device
    `unknown`, so that a technician (or a script) can run it before the first start: with the keys
    it has once the agent ran (`sent_upto`, `pending_gaps`, `ts`, each device's `problem`)."""
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker, channels=2, interval=0.2))
    result = run_cli("status", "-c", str(cfg), "--json")
    assert result.returncode == 0, result.stderr
    before = json.loads(result.stdout)
    assert before["backlog"] == 0 and before["last_seq"] == 0 and before["sent_upto"] == 0
    assert before["devices"]["sim0"]["health"] == "unknown" and before["devices"]["sim0"]["problem"] is None
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: len(collector.reading_seqs()) >= 5, 20, "readings")
    finally:
        assert agent.stop() == 0
    after = json.loads(run_cli("status", "-c", str(cfg), "--json").stdout)
    assert set(before) == set(after), set(before) ^ set(after)
    assert set(before["devices"]["sim0"]) == set(after["devices"]["sim0"])


def tail_piped_into_head(cfg: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "agent.cli", "tail", "-c", str(cfg), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ends_once_head_has_its_line(proc: subprocess.Popen, first_line: str, nudge=lambda: None) -> None:
    """What `head -1` does: read tail's first line and close the pipe; tail must then end (exit 0, no
    traceback) at its next line (`nudge` makes one, when tail prints only what arrives)."""
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith(first_line)
        proc.stdout.close()

        def nudged_and_ended() -> bool:
            nudge()
            return proc.poll() is not None
        wait_for(nudged_and_ended, 30, "tail ends once its reader is gone")
        assert proc.wait() == 0
        assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_tail_piped_into_head_ends_when_head_has_read_its_lines(tmp_path, broker, collector):
    """`edge-agent tail -c FILE | head`: once the reader is gone, tail ends (exit 0) at its next
    message, without a traceback; it used to print a BrokenPipeError and then wait for ever."""
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker))
    status = '{"v":1,"station":"TEST0001","state":"online"}'
    ends_once_head_has_its_line(tail_piped_into_head(cfg), "# subscribed to env/TEST0001/#",
                                lambda: collector.client.publish("env/TEST0001/status", status, qos=1))


def test_tail_piped_into_head_ends_while_the_broker_cannot_be_reached(tmp_path, broker):
    """`edge-agent tail -c FILE | head -1` with the broker down: head has its line (`# cannot connect
    ...`), and tail ends at its next attempt's line. It waited for ever: the broken pipe was raised
    in paho's thread by the attempt's line, where only a message's line was looked after."""
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker))
    ends_once_head_has_its_line(tail_piped_into_head(cfg, "--url", f"mqtt://127.0.0.1:{free_port()}"),
                                "# cannot connect to 127.0.0.1:")


def test_tail_says_when_its_connection_drops_and_ends_on_ctrl_c_without_saying_so(tmp_path, broker):
    """What is published while tail's connection is down never reaches it: it says so when it happens
    (the jump after it is then tail's, not the station's; see tests/unit/test_tail.py). Its own end
    (Ctrl-C) is no lost connection: exit 0, nothing more printed."""
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker))
    outputs = []
    for name in ("ctrl-c", "broker-stop"):
        out = tmp_path / f"tail-{name}.out"
        proc = start_tail(cfg, out, stderr=subprocess.PIPE)
        outputs.append((proc, out))
        wait_for(lambda out=out: out.read_text().startswith("# subscribed"), 20, f"tail ({name}) subscribed")
    try:
        proc, out = outputs[0]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        assert out.read_text().splitlines() == [out.read_text().splitlines()[0]], out.read_text()
        proc, out = outputs[1]
        broker.stop()
        wait_for(lambda: "# disconnected (" in out.read_text(), 20, "tail says its connection dropped")
        assert "reconnecting: what is published meanwhile is not seen here" in out.read_text()
    finally:
        for proc, _ in outputs:
            proc.kill()
            proc.wait()


def test_tail_prints_what_anyone_publishes_without_letting_it_forge_lines_or_drive_the_terminal(
        tmp_path, broker, collector):
    """tail prints what arrives under P/#, P/cmd included (anyone allowed to publish there): a line break
    in a payload or a field forged a line of its own (`data   #999 ...`), and escape sequences reached
    the technician's terminal (a window title set, the screen cleared). Control characters are shown
    escaped; each message still gives its lines."""
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker))
    out = tmp_path / "tail.out"
    proc = start_tail(cfg, out, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: out.read_text().startswith("# subscribed"), 20, "tail subscribed")
        publish = lambda topic, payload: collector.client.publish(f"env/TEST0001/{topic}", payload,  # noqa: E731
                                                                   qos=1).wait_for_publish(10)
        publish("cmd", "hello\ndata   #999 sim0.c00 forged\x1b]0;owned\x07\x1b[2J\x00\u2028".encode())
        publish("data", json.dumps({"v": 1, "station": "TEST0001", "readings": [
            {"seq": 1, "device": "sim0\ndata   #998 forged", "channel": "c00\u001b[31m", "ts": "t",
             "value": 1, "unit": "mg/L\u202e", "flag": "N"}]}))
        publish("status", json.dumps({"v": 1, "station": "TEST0001", "state": "endmark\u0085x"}))
        wait_for(lambda: "endmark" in out.read_text(), 20, "the last message printed")
    finally:
        proc.kill()
        proc.wait()
    text = out.read_text()
    assert not any(line.startswith("data   #99") for line in text.splitlines()), text
    forbidden = ["\x1b", "\x07", "\x00", "\u2028", "\u202e", "\x85"]
    assert not [c for c in forbidden if c in text], repr(text)
    assert "forged" in text and "\\x1b" in text, "what was sent is still shown, escaped"


@pytest.mark.parametrize(("url", "says"), [
    ("mqtt://bob:Tail-Secr3t@127.0.0.1:1883", "do not put a user or password in the url"),
    ("mqtt://127.0.0.1:99999", "port must be a number from 1 to 65535"),
    ("mqtt://[::1", "Invalid IPv6 URL"),
    ("http://127.0.0.1:1883", "unsupported scheme 'http://'"),
])
def test_tail_refuses_a_url_it_cannot_use_in_one_line(tmp_path, broker, url, says):
    """`tail --url` took any text: a port out of range or a broken IPv6 address ended in a Python
    traceback, and `user:password@` was taken silently and ignored (the config's credentials were used;
    the password sat in the shell history and the process list for nothing). The url is checked as
    the config's `mqtt.url` is, in one line, exit 2, without echoing the password."""
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker))
    result = run_cli("tail", "-c", str(cfg), "--url", url, timeout=20)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("edge-agent tail: --url: ") and says in lines[0], lines
    assert "Traceback" not in result.stderr and "Tail-Secr3t" not in result.stderr + result.stdout


def test_tail_says_when_it_cannot_reach_the_broker(tmp_path, broker):
    """`edge-agent tail` with the broker down (or a wrong --url) says so and why, instead of waiting
    in silence as if nothing were published."""
    port = free_port()
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker))
    out = tmp_path / "tail.out"
    proc = start_tail(cfg, out, "--url", f"mqtt://127.0.0.1:{port}", stderr=None)
    try:
        wait_for(lambda: out.read_text(), 10, "a line from tail")
        assert out.read_text().splitlines()[0] == f"# cannot connect to 127.0.0.1:{port} (Connection refused); retrying"
    finally:
        proc.kill()
        proc.wait()


def test_sigterm_while_the_broker_hangs_exits_within_the_shutdown_grace(tmp_path, broker, collector):
    """SPEC §1: on SIGTERM the backlog is published for at most `shutdown_grace` seconds, then the agent
    exits; a broker that accepts nothing (frozen) must not hold it longer, offline status included."""
    config = sim_config(tmp_path, broker, channels=2, interval=0.2, mqtt={"shutdown_grace": 1, "keepalive": 600})
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    assert broker.proc is not None
    wait_for(lambda: len(collector.reading_seqs()) >= 5, 20, "readings")
    broker.proc.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: db_last_seq(tmp_path / "buffer.db") > max(collector.reading_seqs()) + 10, 20,
                 "a backlog behind the frozen broker")
        started = time.monotonic()
        assert agent.stop() == 0
        took = time.monotonic() - started
    finally:
        broker.proc.send_signal(signal.SIGCONT)
    # The grace, plus stopping the pollers and the last commit: well under the 2 s more that waiting
    # for the offline message's acknowledgement used to add.
    assert took < 1 + 0.9, f"stopped after {took:.2f} s with shutdown_grace 1"


@pytest.mark.parametrize("scheme", ["mqtt", "mqtts"])
def test_sigterm_while_connecting_to_a_broker_that_never_answers_exits_within_the_shutdown_grace(tmp_path, scheme):
    """A broker that accepts TCP and never answers (no CONNACK; with TLS, no handshake): the agent waits
    up to its connect timeout (5 s) per attempt, but a stop's grace is not spent waiting there."""
    with silent_listener() as (port, held):
        config = sim_config(tmp_path, Broker(tmp_path / "unused"), channels=1, mqtt={"shutdown_grace": 1})
        config["mqtt"]["url"] = f"{scheme}://127.0.0.1:{port}"
        agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
        wait_for(lambda: len(held) >= 1, 20, "the agent connecting")
        started = time.monotonic()
        assert agent.stop() == 0
        took = time.monotonic() - started
    assert took < 1 + 0.9, f"stopped after {took:.2f} s with shutdown_grace 1"

def test_a_second_agent_on_the_same_buffer_is_refused_and_status_knows_whether_one_runs(tmp_path, broker,
                                                                                         collector):
    """A technician starting `run` by hand beside the service: the second one is refused (it would
    write the same streams and take the broker's client id), the first goes on. Once the agent is
    gone (even by kill -9), status says so instead of the broker state the agent left behind."""
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker, channels=2, interval=0.2))
    first = AgentProcess(cfg)
    wait_for(lambda: len(collector.reading_seqs()) >= 5, 20, "readings")
    second = AgentProcess(cfg)
    try:
        assert second.proc.wait(20) == 1
        assert f"another edge-agent (pid {first.proc.pid}) is running" in second.log()
        status = json.loads(run_cli("status", "-c", str(cfg), "--json").stdout)
        assert status["agent"] == {"running": True, "pid": first.proc.pid, "version": __version__,
                                   "started": status["agent"]["started"], "config_error": None}
        assert status["broker"]["state"] == "online"
        before = max(collector.reading_seqs())
        wait_for(lambda: max(collector.reading_seqs()) > before + 5, 10, "the first agent goes on publishing")
    finally:
        first.proc.kill()
        first.proc.wait()
    status = json.loads(run_cli("status", "-c", str(cfg), "--json").stdout)
    assert status["agent"] == {"running": False, "pid": None}
    assert status["broker"]["state"] == "offline" and "not running" in status["broker"]["error"]
    # The file says "online since <when it connected>": not shown as the time it went offline.
    assert "since" not in status["broker"] and "(it last recorded online since " in status["broker"]["error"]
    assert "NOT running" in run_cli("status", "-c", str(cfg)).stdout
    third = AgentProcess(cfg)  # the lock died with the killed process
    try:
        wait_for(lambda: json.loads(run_cli("status", "-c", str(cfg), "--json").stdout)["agent"]["running"], 20,
                 "the restarted agent holds the lock")
    finally:
        assert third.stop() == 0


def test_a_burst_of_signals_never_hangs_the_agent(tmp_path, broker, collector):
    """Signals microseconds apart (a reload burst, Ctrl-C then the demo's SIGTERM): a handler that set
    an Event could deadlock the main thread on that Event's lock, after which SIGTERM did nothing."""
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker, channels=2, interval=0.2))
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: len(collector.reading_seqs()) >= 5, 20, "readings")
        for _ in range(400):
            agent.signal(signal.SIGHUP)
            agent.signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in agent.log(), 20, "a reload")
        before = max(collector.reading_seqs())
        wait_for(lambda: max(collector.reading_seqs()) > before + 5, 20, "publishing after the burst")
    finally:
        assert agent.stop(timeout=30) == 0, "SIGTERM stops the agent after the burst"


def test_two_stations_with_one_client_id_back_off_instead_of_hammering_the_broker(tmp_path, broker):
    """The broker drops the older of two clients with the same id, at once, each time the other one
    connects. Reconnecting at once made ~1000 connections a second per agent (and as many log lines)."""
    agents = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            config = sim_config(tmp_path / name, broker, channels=1, interval=1)
            config["mqtt"].update(client_id="SAME0001", reconnect_max=5)
            agents.append(AgentProcess(write_config(tmp_path / name / "station.yaml", config)))
        wait_for(lambda: all("another client connected with client_id SAME0001" in a.log() for a in agents), 30,
                 "both agents name the likely cause")
        time.sleep(6)  # an observation window: the storm made thousands of connections in it
        connections = [a.log().count("connected to") for a in agents]
        assert max(connections) < 20, f"connections per agent in ~10 s: {connections}"
    finally:
        for a in agents:
            assert a.stop() == 0


def test_a_broker_that_goes_down_soon_after_accepting_is_not_blamed_on_a_duplicate_client_id(tmp_path, broker):
    """A 4G link that drops, or a broker restarted, a few seconds after the agent connected is one
    short-lived connection: the log must not send the technician hunting for another client."""
    agent = AgentProcess(write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker, channels=1,
                                                                            interval=1)))
    try:
        wait_for(lambda: "connected to" in agent.log(), 20, "the agent connected")
        broker.stop()
        wait_for(lambda: "closed the connection" in agent.log(), 20, "the drop logged")
        assert "another client" not in agent.log()
    finally:
        assert agent.stop() == 0


def test_a_reload_that_moves_the_station_leaves_offline_where_it_was(tmp_path, broker, collector):
    """A SIGHUP that changes topic_prefix (or the broker): the old retained status must not say online
    for ever."""
    path = tmp_path / "station.yaml"
    write_config(path, sim_config(tmp_path, broker, channels=2, interval=0.2))
    agent = AgentProcess(path)
    try:
        wait_for(lambda: len(collector.reading_seqs()) >= 5, 20, "readings")
        path.write_text(path.read_text().replace("topic_prefix: env", "topic_prefix: env2"))
        agent.signal(signal.SIGHUP)
        wait_for(lambda: "connected to" in agent.log().split("broker settings changed")[-1], 20, "reconnected")
        late = Collector(broker, "env/TEST0001/status")  # a fresh subscriber gets the retained status
        wait_for(lambda: late.json_messages(), 10, "the retained status at the old place")
        assert late.json_messages()[-1]["state"] == "offline"
        late.close()
    finally:
        assert agent.stop() == 0


def test_sighup_with_a_broken_config_keeps_running(tmp_path, broker, collector):
    path = tmp_path / "station.yaml"
    cfg = write_config(path, sim_config(tmp_path, broker, channels=2, interval=0.2))
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: len(collector.reading_seqs()) >= 5, 20, "readings")
        good = path.read_text()
        path.write_text(good.replace("interval: 0.2", "intervall: 0.2"))
        agent.signal(signal.SIGHUP)
        wait_for(lambda: "keeping the running configuration" in agent.log(), 10, "reload refused")
        before = max(collector.reading_seqs())
        wait_for(lambda: max(collector.reading_seqs()) > before + 5, 10, "still publishing")
        assert agent.alive()
    finally:
        assert agent.stop() == 0


def test_failover_to_the_second_broker_url_when_the_first_is_down(tmp_path, broker, collector):
    dead = Broker(tmp_path / "dead")  # configured first, never started
    config = sim_config(tmp_path, broker, channels=2, interval=0.2)
    config["mqtt"].pop("url")
    config["mqtt"]["urls"] = [dead.url, broker.url]
    cfg = write_config(tmp_path / "station.yaml", config)
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: len(collector.reading_seqs()) >= 10, 30, "readings through the second broker")
    finally:
        assert agent.stop() == 0
    assert f"127.0.0.1:{dead.port}" in agent.log(), "the first URL was tried (and its failure logged)"


def test_status_names_the_broker_a_connection_error_is_about(tmp_path):
    dead = Broker(tmp_path / "dead")  # never started: every attempt is refused
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, dead, channels=1, interval=0.5))
    agent = AgentProcess(cfg)

    def broker_state() -> dict:
        """The broker part of `status --json` once it comes from the running agent: before the agent holds
        its lock (a slow start), status says "edge-agent is not running" there, which is not the error
        this test is about."""
        result = run_cli("status", "-c", str(cfg), "--json")
        status = json.loads(result.stdout) if result.returncode == 0 else {}
        return status["broker"] if status.get("agent", {}).get("running") is True else {}

    try:
        state = wait_for(lambda: (s := broker_state()).get("error") and s, 20, "a connection error in status")
    finally:
        assert agent.stop() == 0
    assert state["state"] == "offline"
    assert state["url"] == dead.url, "the error is shown beside the broker it is about"


def test_an_endpoint_that_resets_every_connection_is_logged_with_its_real_cause_and_rate_limited(tmp_path):
    """A firewall or a wrong port that accepts TCP and resets it: paho's own socket error does not
    get a line per attempt; the agent's one line gives it as the cause."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    resets = []

    def reset_everything() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.recv(1024)  # the CONNECT
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # an RST
            resets.append(1)

    threading.Thread(target=reset_everything, daemon=True).start()
    config = sim_config(tmp_path, Broker(tmp_path / "unused"), channels=1)
    config["mqtt"]["url"] = f"mqtt://127.0.0.1:{listener.getsockname()[1]}"
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    try:
        wait_for(lambda: len(resets) >= 4, 30, "four connection attempts reset")
    finally:
        assert agent.stop() == 0
        listener.close()
    log = agent.log()
    causes = [line for line in log.splitlines() if "cannot connect to" in line]
    assert causes and "closed before the broker answered CONNECT" in causes[0], log
    assert "Connection reset by peer" in causes[0], "the socket error is the cause given"
    assert len(causes) == 1, "one line per distinct reason, not one per attempt"
    assert "paho" not in log, "paho's own socket errors are not logged on their own"

def test_status_of_a_buffer_it_cannot_read_says_unknown_not_zero(tmp_path):
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, Broker(tmp_path / "broker")))
    (tmp_path / "buffer.db").write_bytes(b"\x00garbage from a failing SD card" * 3000)
    result = run_cli("status", "-c", str(cfg), "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["buffer_error"] and (doc["backlog"], doc["last_seq"], doc["alarms"]) == (None, None, None)
    text = run_cli("status", "-c", str(cfg)).stdout
    assert "backlog  unknown" in text and "alarms   unknown" in text
    # A damaged file (this user may read it): the hint is what `run` does about it, not permissions.
    assert text.splitlines()[0] == (f"cannot read the buffer {tmp_path / 'buffer.db'}: file is not a database "
                                    "(run moves a damaged file aside when it starts, or once its own reads or writes "
                                    "meet the damage)")


def test_status_needs_no_credentials_from_the_environment(tmp_path):
    """A technician's `sudo -u edge-agent edge-agent status` has not the service's environment file:
    status never connects, so the broker's user name and password may be unset there."""
    config = sim_config(tmp_path, Broker(tmp_path / "broker"))
    config["mqtt"].update(username="${EDGE_TEST_MQTT_USER}", password="${EDGE_TEST_MQTT_PASS}")
    config["hj212"] = {"st": 32, "pw": "${EDGE_TEST_HJ212_PW}"}  # as in SPEC §2's example
    cfg = write_config(tmp_path / "station.yaml", config)
    result = run_cli("status", "-c", str(cfg), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["backlog"] == 0
    checked = run_cli("check-config", str(cfg))
    assert checked.returncode == 2 and "EDGE_TEST_MQTT_PASS is not set" in checked.stderr, \
        "check-config still says what `run` would miss"


def test_status_needs_no_connection_settings_from_the_environment(tmp_path):
    """An operator templates broker URLs, client ids and hosts through the service's environment file;
    `status` reads only the buffer, so it works without them. What it does read (the buffer's path,
    the station id, the devices) must be there, and a value whose stand-in fails its own checks is
    reported as the unset variable it is."""
    config = sim_config(tmp_path, Broker(tmp_path / "broker"))
    config["station"]["name"] = "${EDGE_TEST_NAME}"
    config["mqtt"] = {"urls": ["${EDGE_TEST_BROKER}", "mqtts://${EDGE_TEST_BACKUP}:8883"],
                      "client_id": "${EDGE_TEST_CID}"}
    config["buses"] = {"lan": {"type": "tcp", "host": "${EDGE_TEST_PLC}", "port": 502}}
    config["devices"]["plc"] = {"bus": "lan", "slave": 1, "interval": 5,
                                "registers": [{"channel": "w01018", "address": 0, "type": "float32"}]}
    config["hj212"] = {"st": 32, "pw": "123456", "uplinks": [{"host": "${EDGE_TEST_PLATFORM}", "port": 9000}]}
    cfg = write_config(tmp_path / "station.yaml", config)
    result = run_cli("status", "-c", str(cfg), "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["backlog"] == 0 and doc["station"] == "TEST0001" and set(doc["devices"]) == {"sim0", "plc"}
    checked = run_cli("check-config", str(cfg))
    assert checked.returncode == 2
    for name in ("EDGE_TEST_NAME", "EDGE_TEST_BROKER", "EDGE_TEST_BACKUP", "EDGE_TEST_CID", "EDGE_TEST_PLC",
                 "EDGE_TEST_PLATFORM"):
        assert f"{name} is not set" in checked.stderr, name

    config["mqtt"]["qos"] = "${EDGE_TEST_QOS}"  # `qos: 1` is all a text stand-in could never be
    config["storage"]["path"] = "${EDGE_TEST_DIR}/buffer.db"  # status reads the buffer there
    cfg = write_config(tmp_path / "station.yaml", config)
    result = run_cli("status", "-c", str(cfg), "--json")
    assert result.returncode == 2
    *problems, hint = result.stderr.strip().splitlines()
    assert len(problems) == 2 and hint.startswith(f"edge-agent status: {cfg} has the problems above"), problems
    assert "storage.path: environment variable EDGE_TEST_DIR is not set" in problems[0]
    assert "mqtt.qos: environment variable EDGE_TEST_QOS is not set" in problems[1]

def test_check_config_cli_prints_file_line_col_and_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("station:\n  id: ST01\n  type: outfall\nstorage:\n  path: b.db\nmqtt:\n  url: mqtt://h\n"
                   "devices:\n  sim:\n    driver: simulated\n    intervall: 1\n")
    result = run_cli("check-config", str(bad))
    assert result.returncode == 2
    assert f"{bad}:11:5: devices.sim.intervall:" in result.stderr
    good = run_cli("check-config", str(Path(__file__).resolve().parents[2] / "config" / "example.yaml"))
    assert good.returncode == 0, good.stderr
    schema = run_cli("schema")
    assert schema.returncode == 0 and json.loads(schema.stdout)["type"] == "object"


def readme_block_after(marker: str) -> list[str]:
    """The lines of the README's first fenced block after `marker`."""
    text = (REPO / "README.md").read_text()
    after = text[text.index(marker):]
    start = after.index("```\n") + 4
    return after[start:after.index("```", start)].strip().splitlines()


def test_the_readme_check_config_examples_are_what_check_config_prints(tmp_path):
    """The quick start's examples of check-config's lines, as a technician gets them: config/example.yaml
    copied to station.yaml with the two mistakes the README shows (a typo in a key, an unset variable),
    and SPEC's example (devices it names but does not define). The README showed the first two lines in
    the wrong order (check-config prints in file order) and at lines that file does not have."""
    station = tmp_path / "station.yaml"
    example = (REPO / "config" / "example.yaml").read_text()
    station.write_text(example.replace("url: mqtt://127.0.0.1:1883", "url: mqtt://${MQTT_HOST}:1883")
                       .replace("    interval: 5 ", "    intervall: 5 ", 1))
    checked = run_cli("check-config", "station.yaml", cwd=tmp_path)
    lines = [line for line in checked.stderr.splitlines() if "MQTT_HOST" in line or "intervall" in line]
    assert checked.returncode == 2
    assert lines == readme_block_after("`check-config` exits 0 when the file is valid"), checked.stderr

    spec = (REPO / "tests" / "unit" / "configs" / "spec-example.yaml").read_text()
    station.write_text(spec[spec.index("station:"):])  # SPEC's text, without the fixture's comment
    checked = run_cli("check-config", "station.yaml", cwd=tmp_path, env={"MQTT_USER": "u", "HJ212_PW": "pw1"})
    for line in readme_block_after("logs such rules as not applied"):
        assert line in checked.stderr.splitlines(), checked.stderr


def test_the_retained_status_summarises_the_station_and_says_why_it_went_offline(tmp_path, broker, collector):
    """An operator of hundreds of gateways reads the retained P/status of each: which devices fail,
    which alarms are active, and whether an offline station stopped or lost its connection."""
    config = sim_config(tmp_path, broker, channels=1, interval=0.5,
                        alarms=[{"channel": "sim0.c00", "above": 5}])  # the channel's mean is 10
    config["buses"] = {"lan": {"type": "tcp", "host": "127.0.0.1", "port": free_port(), "timeout": 0.2}}
    config["devices"]["flow"] = {"bus": "lan", "slave": 1, "interval": 0.5,
                                 "registers": [{"channel": "w00000", "address": 0}]}
    cfg = write_config(tmp_path / "station.yaml", config)

    def statuses() -> list[dict]:
        return [json.loads(p) for t, p, _ in collector.messages if t.endswith("/status")]

    agent = AgentProcess(cfg)
    try:
        said = wait_for(lambda: next((s for s in statuses() if s.get("failing_devices") == ["flow"]
                                      and s.get("active_alarms") == ["sim0.c00:above"]), None), 40,
                        "a retained online status naming the failing device and the active alarm")
        assert said["state"] == "online" and said["agent"].startswith("edge-agent ")
    finally:
        agent.kill9()
    wait_for(lambda: statuses()[-1]["state"] == "offline", 20, "the Last Will")
    assert statuses()[-1] == {"v": 1, "station": "TEST0001", "state": "offline", "reason": "connection lost"}
    before = len(statuses())
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: statuses()[-1]["state"] == "online", 20, "online again")
        # The alarm restored at start is never said to be inactive: the birth either waits for the
        # alarm engine or goes out without the summary, which follows as soon as it is known.
        said = wait_for(lambda: [s for s in statuses()[before:] if "active_alarms" in s], 20, "the summary")
        assert all(s["active_alarms"] == ["sim0.c00:above"] for s in said), said
    finally:
        assert agent.stop() == 0
    last = statuses()[-1]
    assert (last["state"], last["reason"]) == ("offline", "stopped") and last["ts"].endswith("Z")
