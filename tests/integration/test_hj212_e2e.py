"""HJ 212 end to end: `edge-agent run` as a real process, a real mosquitto, and an HJ 212 platform written
in the test (tests/unit/test_uplink.py's `Platform`, a TCP server on loopback).

What a platform engineer checks: every poll arrives as a valid 2011 packet and is acknowledged, an outage
of the platform loses nothing, a backfill request is answered with the stored records in order between
9011 and 9012, bad requests are refused with the right QnRtn, and `payload: hj212` on MQTT carries one
valid packet per poll.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from harness import AgentProcess, Collector, free_port, sim_config, wait_for, write_config

from agent.buffer import Buffer
from agent.hj212 import decode, period_items, realtime_items
from agent.model import STREAM_AGGREGATES

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))
from test_uplink import Platform  # noqa: E402

SHANGHAI = ZoneInfo("Asia/Shanghai")
STATION = "14010500000017"
PW = "s3cr3T"


def station_config(tmp_path, broker, platform_port: int | None = None, **overrides) -> dict:
    """Two simulated analyzers with their own pollutant codes, polled once a second."""
    config = sim_config(tmp_path, broker, station_id=STATION, **overrides)
    config["devices"] = {
        "cod": {"driver": "simulated", "interval": 1.0,
                "channels": {"w01018": {"unit": "mg/L", "mean": 23, "amplitude": 2, "period": 60, "noise": 0.1},
                             "w01001": {"mean": 7.2, "noise": 0.05, "decimals": 2}}},
        "nh3n": {"driver": "simulated", "interval": 1.0,
                 "channels": {"w21003": {"unit": "mg/L", "mean": 1.2, "noise": 0.1, "decimals": 3}}},
    }
    hj212: dict = {"st": 32, "pw": PW}
    if platform_port is not None:
        hj212["uplinks"] = [{"host": "127.0.0.1", "port": platform_port, "timeout": 2, "retries": 1}]
    config["hj212"] = hj212
    return config


def db_polls(path: Path, upto_seq: int | None = None) -> Counter:
    """(DataTime in station time, channels) of every stored poll with seq <= upto_seq."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT device, ts_ms, group_concat(channel) FROM readings WHERE seq <= ? "
                            "GROUP BY device, ts_ms", (upto_seq if upto_seq is not None else 2**62,)).fetchall()
    return Counter((datetime.fromtimestamp(ts / 1000, SHANGHAI).strftime("%Y%m%d%H%M%S"),
                    frozenset(channels.split(","))) for _, ts, channels in rows)


def db_scalar(path: Path, sql: str) -> object:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return conn.execute(sql).fetchone()[0]


def local_ms(text: str) -> int:
    return int(datetime.strptime(text, "%Y%m%d%H%M%S").replace(tzinfo=SHANGHAI).timestamp() * 1000)


def store_aggregates(path: Path, rows: list[tuple[str, str, str, str, float]]) -> None:
    """Aggregate events (device, channel, period, start as station time, avg) put into the buffer
    before the agent starts, as the aggregator would have stored them."""
    buf = Buffer.open_writer(path)
    buf.begin()
    for device, channel, period, start, avg in rows:
        ts = local_ms(start)
        buf.insert_event(STREAM_AGGREGATES, ts, {
            "device": device, "channel": channel, "period": period,
            "start": datetime.fromtimestamp(ts / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            "avg": avg, "min": avg - 0.5, "max": avg + 0.5, "cou": None, "count": 10, "flag": "N"})
    buf.commit()
    buf.close()


def packet_key(p) -> tuple[str, frozenset]:
    return p.get("DataTime"), frozenset(realtime_items(p))


@pytest.fixture
def platform():
    p = Platform()
    yield p
    p.close()


def test_uplink_delivers_every_poll_acknowledged_across_a_platform_outage(tmp_path, broker, platform):
    db = tmp_path / "buffer.db"
    agent = AgentProcess(write_config(tmp_path / "station.yaml", station_config(tmp_path, broker, platform.port)))
    second = None
    try:
        wait_for(lambda: len(platform.received("2011")) >= 6, 20, "real-time packets before the outage")
        port = platform.port
        platform.close()
        time.sleep(3)  # the outage itself (not a wait for a condition): polls go on meanwhile
        back = datetime.now(SHANGHAI).strftime("%Y%m%d%H%M%S")
        second = Platform(port=port)
        wait_for(lambda: second.accepted, 20, "the station reconnects")
        target = max(db_polls(db))
        wait_for(lambda: any(p.get("DataTime") >= target[0] for p in second.received("2011")), 20,
                 f"polls up to {target[0]} delivered after the outage")
    finally:
        assert agent.stop() == 0
        if second is not None:
            second.close()
    assert second is not None
    assert [p for p in second.received("2011") if p.get("DataTime") < back], "polls of the outage sent after it"
    received = platform.received("2011") + second.received("2011")
    assert not platform.errors and not second.errors, "every frame had a valid length and CRC"
    assert all((p.mn, p.st, p.pw, p.flag) == (STATION, "32", PW, 5) for p in received)
    meta = json.loads(db_scalar(db, f"SELECT value FROM meta WHERE key='uplink:127.0.0.1:{port}'"))
    acknowledged = db_polls(db, meta["readings"])
    missing = acknowledged - Counter(packet_key(p) for p in received)
    assert not missing, f"polls acknowledged but never received: {sorted(missing)[:5]}"
    assert sum(acknowledged.values()) >= 10
    assert "connection dropped" in agent.log() or "cannot connect" in agent.log()


def test_backfill_request_and_refusals_on_the_uplink(tmp_path, broker, platform):
    db = tmp_path / "buffer.db"
    store_aggregates(db, [
        ("cod", "w01018", "10m", "20261129101000", 2.0),
        ("cod", "w01018", "10m", "20261129100000", 1.0),
        ("nh3n", "w21003", "10m", "20261129100000", 0.5),
        ("cod", "w01018", "1h", "20261129100000", 1.5),
        ("cod", "w01018", "10m", "20261129102000", 3.0),
    ])
    config = station_config(tmp_path, broker, platform.port)
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    try:
        # A new uplink pushes the stored period data with Flag A; the platform acknowledges it.
        wait_for(lambda: len(platform.received("2051")) >= 3 and platform.received("2061"), 20, "period packets")
        pushed = [p for p in platform.received("2051") if p.flag == 5]
        assert [p.get("DataTime") for p in pushed] == ["20261129101000", "20261129100000", "20261129102000"]
        answer = platform.request("2051", [{"BeginTime": "20261129100000", "EndTime": "20261129101000"}], pw=PW)
        assert [p.cn for p in answer] == ["9011", "2051", "2051", "9012"]
        assert (answer[0].get("QnRtn"), answer[-1].get("ExeRtn")) == ("1", "1")
        assert [p.get("DataTime") for p in answer[1:3]] == ["20261129100000", "20261129101000"]
        assert set(period_items(answer[1])) == {"w01018", "w21003"}
        nothing = platform.request("2031", [{"BeginTime": "20200101000000", "EndTime": "20200102000000"}],
                                   qn="20261129120000002", pw=PW)
        assert [(p.cn, p.get("QnRtn") or p.get("ExeRtn")) for p in nothing] == [("9011", "1"), ("9012", "100")]
        unknown = platform.request("3020", qn="20261129120000003", pw=PW)
        assert [(p.cn, p.get("QnRtn")) for p in unknown] == [("9011", "8")]
        interval = platform.request("1061", qn="20261129120000005", pw=PW)  # both devices are polled every 1 s
        assert [(p.cn, p.get("QnRtn") or p.get("RtdInterval") or p.get("ExeRtn")) for p in interval] == [
            ("9011", "1"), ("1061", "1"), ("9012", "1")]
        # The technician slows both analyzers down (a reload that keeps the uplink and its connection):
        # the platform's next 1061 gets the interval now in force.
        config["devices"]["cod"]["interval"] = config["devices"]["nh3n"]["interval"] = 2.5
        write_config(tmp_path / "station.yaml", config)
        agent.signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in agent.log(), 20, "the reload")
        interval = platform.request("1061", qn="20261129120000006", pw=PW)
        assert [(p.cn, p.get("QnRtn") or p.get("RtdInterval") or p.get("ExeRtn")) for p in interval] == [
            ("9011", "1"), ("1061", "2.5"), ("9012", "1")]
        assert platform.accepted == 1, "a reload of the devices alone keeps the platform connection"
        wrong_pw = platform.request("2051", [{"BeginTime": "20261129100000", "EndTime": "20261129101000"}],
                                    pw="WRONG1", qn="20261129120000004")
        assert [(p.cn, p.get("QnRtn")) for p in wrong_pw] == [("9011", "3")]
        assert len(platform.received("2011")) >= 1, "real-time data flows beside the requests"
    finally:
        assert agent.stop() == 0
    assert not platform.errors
    meta = json.loads(db_scalar(db, f"SELECT value FROM meta WHERE key='uplink:127.0.0.1:{platform.port}'"))
    assert meta["aggregates"] == 5, "every pushed period packet was acknowledged"
    assert "QnRtn=3" in agent.log() and "WRONG1" not in agent.log() and PW not in agent.log()


def test_payload_hj212_on_mqtt_is_one_valid_packet_per_poll(tmp_path, broker):
    db = tmp_path / "buffer.db"
    store_aggregates(db, [("cod", "w01018", "10m", "20261129100000", 1.0),
                          ("nh3n", "w21003", "10m", "20261129100000", 0.5)])
    collector = Collector(broker, f"env/{STATION}/#")
    config = station_config(tmp_path, broker, mqtt={"payload": "hj212"})
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    try:
        wait_for(lambda: sum(t.endswith("/data") for t, _, _ in collector.messages) >= 8, 20, "8 data messages")
    finally:
        assert agent.stop() == 0
        collector.close()
    data = [decode(payload) for topic, payload, _ in collector.messages if topic.endswith("/data")]
    assert all((p.cn, p.mn, p.st, p.pw, p.flag) == ("2011", STATION, "32", PW, 4) for p in data)
    assert all(len(realtime_items(p)) in (1, 2) for p in data)
    assert {frozenset(realtime_items(p)) for p in data} == {frozenset({"w01018", "w01001"}), frozenset({"w21003"})}
    sent = db_scalar(db, "SELECT sent_upto FROM streams WHERE name='readings'")
    assert sent == db_scalar(db, "SELECT max(seq) FROM readings"), "a clean stop delivers the backlog"
    assert Counter(packet_key(p) for p in data) == db_polls(db, sent), "exactly one packet per poll"
    agg = [decode(payload) for topic, payload, _ in collector.messages if topic.endswith("/agg")]
    assert [(p.cn, p.get("DataTime"), p.flag) for p in agg] == [("2051", "20261129100000", 4)]
    assert set(period_items(agg[0])) == {"w01018", "w21003"}


def test_rows_an_unreachable_platform_still_needs_go_last_at_the_size_cap_and_their_loss_is_logged(tmp_path, broker):
    """MQTT takes everything while the HJ 212 platform is down and the buffer reaches its cap: the rows
    purged then are ones only MQTT has (the uplink holds back the purge, but the cap wins), and both
    the purge and the uplink, when its platform is back, say that platform misses them."""
    port = free_port()
    config = station_config(tmp_path, broker, port, storage={"max_mb": 0.25, "commit_interval_ms": 100})
    config["devices"]["cod"]["interval"] = config["devices"]["nh3n"]["interval"] = 0.1
    for many in ("many", "more"):  # 800 readings/s besides: the cap soon
        config["devices"][many] = {"driver": "simulated", "interval": 0.1,
                                   "channels": {f"c{i:02d}": {"mean": i} for i in range(40)}}
    collector = Collector(broker, "env/#")
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    platform = None
    try:
        wait_for(lambda: "not yet delivered by an HJ 212 uplink" in agent.log(), 60, "a purge at the size cap")
        platform = Platform(port=port)
        wait_for(lambda: len(platform.received("2011")) >= 5, 30, "the uplink delivering again")
        wait_for(lambda: "are no longer in the buffer" in agent.log(), 10, "the uplink saying what it missed")
    finally:
        assert agent.stop() == 0
        collector.close()
        if platform is not None:
            platform.close()
    assert not [m for m in collector.json_messages("/data") if "gap" in m], "MQTT missed nothing"
    seqs = collector.reading_seqs()
    assert set(range(1, max(seqs) + 1)) <= set(seqs)


def test_status_shows_what_each_platform_has_not_acknowledged(tmp_path, broker, platform):
    """A station may deliver only over HJ 212: with MQTT caught up, `status` said "backlog 0" while a
    platform that never acknowledges had received nothing. It lists each uplink, its state and backlog."""
    from harness import run_cli

    silent = Platform(ack=False)
    try:
        config = station_config(tmp_path, broker, platform.port)
        config["hj212"]["uplinks"].append({"host": "127.0.0.1", "port": silent.port, "timeout": 1, "retries": 0})
        path = write_config(tmp_path / "station.yaml", config)
        agent = AgentProcess(path, env={})
        wait_for(lambda: len(platform.received("2011")) >= 6, 30, "polls at the answering platform")
        agent.stop()
        result = run_cli("status", "-c", str(path), "--json")
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        answering, silent_one = (status["uplinks"][f"127.0.0.1:{p.port}"] for p in (platform, silent))
        assert status["backlog"] == 0
        assert silent_one["readings_backlog"] >= 6, silent_one
        assert answering["readings_backlog"] < silent_one["readings_backlog"], answering
        assert (answering["state"], answering["error"]) == ("offline", "agent stopped")
        text = run_cli("status", "-c", str(path)).stdout
        assert f"uplink   127.0.0.1:{silent.port} offline" in text and "not yet acknowledged: " in text, text
    finally:
        silent.close()
