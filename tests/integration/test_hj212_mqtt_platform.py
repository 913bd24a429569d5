"""A provincial platform consuming `mqtt.payload: hj212` (SPEC §4): a real `edge-agent run` configured only
by YAML, a real mosquitto, and a reader of HJ 212 packets written from SPEC.md and DOMAIN.md
(tests/hj212_mqtt_reader.py, which imports nothing from agent/). The buffer file is read with sqlite3 only
to know what was polled."""

from __future__ import annotations

import json
import sqlite3
import sys
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from clockshift import ShiftedClock
from harness import AgentProcess, Broker, Collector, run_cli, sim_config, wait_for, write_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hj212_mqtt_reader import number_problem, qn_problem, read  # noqa: E402
from hj212_platform import crc212  # noqa: E402

PW = "Pw1234"
MN24 = "010000A8900016F000169DC0"


def test_the_readers_crc_reproduces_domain_md_examples():
    for packet in (b"##0101QN=20160801085857223;ST=32;CN=1062;PW=100000;MN=010000A8900016F000169DC0;Flag=5;"
                   b"CP=&&RtdInterval=30&&1C80\r\n",
                   b"##0087QN=20160801085000001;ST=91;CN=9014;PW=123456;MN=010000A8900016F000169DC0;Flag=4;"
                   b"CP=&&&&C241\r\n"):
        got = read(packet)
        assert got.ok, got.problems
    assert crc212(b"QN=20160801085857223;ST=32;CN=1062;PW=100000;MN=010000A8900016F000169DC0;Flag=5;"
                  b"CP=&&RtdInterval=30&&") == 0x1C80
    assert not read(b"##0101QN=20160801085857223;ST=32;CN=1062;PW=100000;MN=010000A8900016F000169DC0;Flag=5;"
                    b"CP=&&RtdInterval=31&&1C80\r\n").ok


def extreme_station(tmp_path, broker, station_id: str, tz: str) -> dict:
    """Constant values a platform must read back exactly: tiny, huge, negative, and a channel that
    never answers (null, flag B)."""
    config = sim_config(tmp_path, broker, station_id=station_id, mqtt={"payload": "hj212"})
    config["station"]["timezone"] = tz
    config["devices"] = {
        "ext": {"driver": "simulated", "interval": 0.5,
                "channels": {"tiny": {"mean": 1e-7}, "huge": {"mean": 1e12}, "neg": {"mean": -3.25},
                             "w01018": {"mean": 23.4, "unit": "mg/L"}, "dead": {"mean": 1, "dropout": 1.0}}},
        "pm": {"driver": "simulated", "interval": 0.5, "channels": {"a34004": {"mean": 41.5}}},
    }
    config["hj212"] = {"st": 39, "pw": PW}
    return config


def stored_polls(db: Path) -> dict[tuple[str, int], dict[str, tuple[object, str]]]:
    """(device, ts_ms) -> {channel: (value, flag)} of every stored reading."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT device, ts_ms, channel, value, flag FROM readings").fetchall()
    out: dict = {}
    for device, ts, channel, value, flag in rows:
        out.setdefault((device, ts), {})[channel] = (value, flag)
    return out


@pytest.mark.parametrize(("station_id", "tz"), [("14010500000017", "Asia/Shanghai"),
                                                (MN24, "America/Sao_Paulo")])
def test_every_data_message_is_one_wellformed_2011_packet_a_platform_reads_back(tmp_path, broker, station_id, tz):
    config = extreme_station(tmp_path, broker, station_id, tz)
    path = write_config(tmp_path / "station.yaml", config)
    assert run_cli("check-config", str(path)).returncode == 0
    collector = Collector(broker, f"env/{station_id}/data")
    agent = AgentProcess(path)
    try:
        wait_for(lambda: len(collector.messages) >= 12, 30, "12 data messages")
    finally:
        assert agent.stop() == 0
        collector.close()
    packets = [read(payload) for _, payload, _ in collector.messages]
    zone = ZoneInfo(tz)
    polls = stored_polls(tmp_path / "buffer.db")
    by_time = {(dev, datetime.fromtimestamp(ts / 1000, zone).strftime("%Y%m%d%H%M%S")): chans
               for (dev, ts), chans in polls.items()}
    for p in packets:
        assert p.ok, (p.problems, p.raw)
        assert (p.cn, p.head.get("MN"), p.head.get("ST"), p.head.get("PW"), p.head.get("Flag")) == (
            "2011", station_id, "39", PW, "4"), p.raw
        assert qn_problem(p.head.get("QN")) is None, p.raw
        qn_time = datetime.strptime(p.head["QN"][:14], "%Y%m%d%H%M%S").replace(tzinfo=zone)
        assert abs(qn_time - datetime.now(zone)) < timedelta(minutes=5), f"QN in station time: {p.raw}"
        codes = p.codes()
        device = "pm" if "a34004" in codes else "ext"
        key = (device, p.item("DataTime"))
        assert key in by_time, f"DataTime is a stored poll time in {tz}: {p.raw}"
        stored = by_time[key]
        assert set(codes) == set(stored), p.raw
        for channel, (value, flag) in stored.items():
            assert codes[channel].get("Flag") == flag, p.raw
            if value is None:
                assert "Rtd" not in codes[channel], p.raw
                continue
            assert number_problem(codes[channel].get("Rtd")) is None, p.raw
            assert float(codes[channel]["Rtd"]) == pytest.approx(value, rel=1e-12), p.raw
    qns = [p.head["QN"] for p in packets]
    assert len(set(qns)) == len(qns), "every packet has its own QN"
    ext = next(p for p in packets if "huge" in p.codes()).codes()
    assert (ext["tiny"]["Rtd"], ext["huge"]["Rtd"], ext["neg"]["Rtd"], ext["dead"]) == (
        "0.0000001", "1000000000000", "-3.25", {"Flag": "B"})


def test_a_channel_code_hj212_cannot_carry_is_refused_and_a_24_char_station_id_is_accepted(tmp_path, broker):
    good = sim_config(tmp_path, broker, station_id=MN24, mqtt={"payload": "hj212"})
    good["hj212"] = {"st": 32, "pw": PW}
    assert run_cli("check-config", str(write_config(tmp_path / "good.yaml", good))).returncode == 0
    too_long = json.loads(json.dumps(good))
    too_long["station"]["id"] = MN24 + "1"
    assert run_cli("check-config", str(write_config(tmp_path / "long.yaml", too_long))).returncode == 2
    for code in ("w01018-Rtd", "a;b", "a,b", "a=b", "a&b", "a b", "a.b", "é1"):
        bad = json.loads(json.dumps(good))
        bad["devices"]["sim0"]["channels"] = {code: {"mean": 1}}
        result = run_cli("check-config", str(write_config(tmp_path / "bad.yaml", bad)))
        assert result.returncode == 2, (code, result.stdout, result.stderr)
        assert "channels" in result.stdout + result.stderr, (code, result.stdout)
    for code in ("w01018-Rtd", "a;b"):
        bad = json.loads(json.dumps(good))
        bad["devices"]["mb"] = {"bus": "lan", "slave": 1, "interval": 1,
                                "registers": [{"channel": code, "address": 0, "type": "uint16"}]}
        bad["buses"] = {"lan": {"type": "tcp", "host": "127.0.0.1", "port": 5020}}
        result = run_cli("check-config", str(write_config(tmp_path / "bad.yaml", bad)))
        assert result.returncode == 2, (code, result.stdout, result.stderr)


AGG_LEAD_S = 10  # the agent's clock starts this long before a minute boundary E


# Two minute periods: [E-60, E) computed at E+2 (its grace), [E, E+60) at E+62, about 75 s with the agent's
# start. An agent slower to start than AGG_LEAD_S has its first reading after E: a minute more, up to 140 s;
# the wait below allows 150 s, and the test must be let run that long.
@pytest.mark.timeout(200)
def test_agg_packets_agree_with_the_raw_packets_of_their_period(tmp_path, broker, clockshift):
    """minute: 1 periods: each 2051 packet's Avg/Min/Max are those of the 2011 packets received for its
    period, its DataTime is the period start in station time, and a flow's Cou is its volume in m3. The
    agent's wall clock starts AGG_LEAD_S before a minute boundary (tests/clockshift.py): the two periods
    end in about 75 s instead of up to 150 s."""
    tz = "Asia/Kolkata"
    config = sim_config(tmp_path, broker, station_id=MN24, mqtt={"payload": "hj212"})
    config["station"]["timezone"] = tz
    config["aggregate"] = {"minute": 1, "hour": False, "day": False}
    config["devices"] = {
        "cod": {"driver": "simulated", "interval": 0.5,
                "channels": {"w01018": {"mean": 23, "noise": 2, "decimals": 3},
                             "neg": {"mean": -5, "noise": 1, "decimals": 2}}},
        "flow": {"driver": "simulated", "interval": 1, "channels": {"w00000": {"mean": 50, "unit": "L/s"}}},
    }
    config["hj212"] = {"st": 32, "pw": PW}
    collector = Collector(broker, f"env/{MN24}/#")
    clock = ShiftedClock(tmp_path / "clock-offset", clockshift)
    clock.lead_to_a_minute(AGG_LEAD_S)
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config), env=clock.env)
    zone = ZoneInfo(tz)

    def agg():
        return [read(p) for t, p, _ in list(collector.messages) if t.endswith("/agg")]

    try:
        wait_for(lambda: len({p.item("DataTime") for p in agg()}) >= 2, 150, "two minute periods")
    finally:
        assert agent.stop() == 0
        collector.close()
    raw = [read(p) for t, p, _ in collector.messages if t.endswith("/data")]
    assert all(p.ok and p.cn == "2011" for p in raw)
    periods = agg()
    assert len(periods) >= 2
    starts = sorted({p.item("DataTime") for p in periods})
    for p in periods:
        assert p.ok, (p.problems, p.raw)
        assert (p.cn, p.head["MN"], p.head["ST"], p.head["PW"], p.head["Flag"]) == ("2051", MN24, "32", PW, "4")
        assert qn_problem(p.head["QN"]) is None
        start = p.data_time(tz)
        assert start.second == 0, p.raw
        end = start + timedelta(minutes=1)
        for code, stats in p.codes().items():
            values = [float(r.codes()[code]["Rtd"]) for r in raw
                      if code in r.codes() and r.codes()[code].get("Flag") == "N" and start <= r.data_time(tz) < end]
            assert values, (code, p.raw)
            for name in ("Avg", "Min", "Max"):
                assert number_problem(stats.get(name)) is None, (name, p.raw)
            assert float(stats["Avg"]) == pytest.approx(sum(values) / len(values), rel=1e-9), (code, p.raw)
            assert float(stats["Min"]) == min(values), (code, p.raw)
            assert float(stats["Max"]) == max(values), (code, p.raw)
            if code == "w00000" and p.item("DataTime") == starts[1]:
                assert float(stats["Cou"]) == pytest.approx(50 * 60 / 1000, rel=0.05), p.raw
            elif code != "w00000":
                assert "Cou" not in stats, p.raw
    assert datetime.strptime(starts[1], "%Y%m%d%H%M%S") - datetime.strptime(starts[0], "%Y%m%d%H%M%S") == \
        timedelta(minutes=1)
    assert datetime.fromtimestamp(clock.now(), zone) - datetime.strptime(starts[1], "%Y%m%d%H%M%S").replace(
        tzinfo=zone) < timedelta(minutes=3), "DataTime in station time (of the agent's clock)"


def db_polls_by_seq(db: Path, tz: str) -> list[tuple[int, int, str, str]]:
    """(first seq, last seq, device, DataTime in station time) of every stored poll, in seq order."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT min(seq), max(seq), device, ts_ms FROM readings GROUP BY device, ts_ms "
                            "ORDER BY min(seq)").fetchall()
    zone = ZoneInfo(tz)
    return [(a, b, dev, datetime.fromtimestamp(ts / 1000, zone).strftime("%Y%m%d%H%M%S")) for a, b, dev, ts in rows]


def packet_key(p) -> tuple[str, str]:
    return ("pm" if "a34004" in p.codes() else "cod", p.item("DataTime"))


def test_backlog_after_a_broker_outage_and_a_resend_arrive_as_hj212_packets(tmp_path):
    broker = Broker(tmp_path / "broker", persistence=True).start()
    tz = "Europe/Berlin"
    config = sim_config(tmp_path, broker, station_id="14010500000017", mqtt={"payload": "hj212"})
    config["station"]["timezone"] = tz
    config["devices"] = {
        "cod": {"driver": "simulated", "interval": 1, "channels": {"w01018": {"mean": 23, "noise": 1}}},
        "pm": {"driver": "simulated", "interval": 1, "channels": {"a34004": {"mean": 40, "noise": 3}}},
    }
    config["hj212"] = {"st": 32, "pw": PW}
    db = tmp_path / "buffer.db"
    collector = Collector(broker, "env/14010500000017/#", persistent=True)
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    try:
        wait_for(lambda: sum(t.endswith("/data") for t, _, _ in collector.messages) >= 4, 20, "data flowing")
        broker.stop()
        outage_from = len(db_polls_by_seq(db, tz))
        wait_for(lambda: len(db_polls_by_seq(db, tz)) >= outage_from + 16, 30, "8 s of polls during the outage")
        broker.start()
        wait_for(lambda: {packet_key(read(p)) for t, p, _ in list(collector.messages) if t.endswith("/data")}
                 >= {(d, t) for _, _, d, t in db_polls_by_seq(db, tz)[:outage_from + 16]}, 30, "the backlog")
        before = len(collector.messages)
        polls = db_polls_by_seq(db, tz)
        first, last = polls[2][0], polls[9][1]
        collector.client.publish("env/14010500000017/cmd", json.dumps(
            {"id": "r1", "cmd": "resend", "from_seq": first, "to_seq": last}), qos=1)
        wait_for(lambda: any(json.loads(p).get("id") == "r1" for t, p, _ in list(collector.messages)
                             if t.endswith("/cmd/reply")), 20, "the resend's reply")
    finally:
        assert agent.stop() == 0
        collector.close()
        broker.stop()
    data = [read(p) for t, p, _ in collector.messages if t.endswith("/data")]
    assert all(p.ok and p.cn == "2011" for p in data), [p.raw for p in data if not p.ok][:3]
    polls = db_polls_by_seq(db, tz)
    received = [packet_key(p) for p in data]
    assert {(d, t) for _, _, d, t in polls} <= set(received), "every stored poll arrived"
    for device in ("cod", "pm"):
        firsts = list(dict.fromkeys(k for k in received if k[0] == device))
        assert firsts == sorted(firsts), f"{device}: polls arrive in order"
    reply = next(json.loads(p) for t, p, _ in collector.messages if t.endswith("/cmd/reply"))
    assert reply["ok"] is True, reply
    resent = [packet_key(read(p)) for t, p, _ in collector.messages[before:] if t.endswith("/data")]
    wanted = [(d, t) for a, b, d, t in polls if first <= a and b <= last]
    assert [k for k in resent if k in wanted] == wanted, "the resend re-publishes the range with its DataTimes"


def test_an_evicted_range_is_announced_on_the_hj212_data_topic_as_the_json_gap_message(tmp_path):
    """SPEC §3 names one form for the announcement, `{"gap": [first, last], "reason": "buffer_full"}` on the
    data topic, and §4 says nothing of it for `payload: hj212`: the agent sends that JSON among the
    packets (HJ 212 has no way to say it). What a platform gets: one message that is not an HJ 212
    packet and parses as JSON, every other data message a valid packet."""
    broker = Broker(tmp_path / "broker", persistence=True).start()
    config = sim_config(tmp_path, broker, station_id="14010500000017", mqtt={"payload": "hj212"},
                        storage={"max_mb": 0.25, "commit_interval_ms": 100})
    config["devices"] = {f"many{d}": {"driver": "simulated", "interval": 0.1,  # 800 readings/s: the cap soon
                                      "channels": {f"c{i:02d}": {"mean": i} for i in range(40)}} for d in range(2)}
    config["hj212"] = {"st": 32, "pw": PW}
    collector = Collector(broker, "env/14010500000017/data", persistent=True)
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    try:
        wait_for(lambda: len(collector.messages) >= 2, 20, "data flowing")
        broker.stop()
        wait_for(lambda: "dropped" in agent.log(), 90, "eviction at the size cap")
        broker.start()

        def gaps():
            out = []
            for _, p, _ in list(collector.messages):
                if not p.startswith(b"##"):
                    out.append(json.loads(p))
            return out
        wait_for(gaps, 30, "the gap announcement")
    finally:
        assert agent.stop() == 0
        collector.close()
        broker.stop()
    announced = gaps()
    assert all(set(g) == {"v", "station", "gap", "reason"} and g["reason"] == "buffer_full" for g in announced)
    assert all(read(p).ok for _, p, _ in collector.messages if p.startswith(b"##"))


def test_a_poll_too_long_for_one_packet_arrives_as_numbered_pieces_each_within_the_standards_length(tmp_path, broker):
    """60 channels with long codes: the 2011 packet is over 1024 characters, so it is split (PNUM/PNO,
    Flag with the D bit: 6); each piece is one valid packet of at most 1024 characters, and the pieces
    of one poll together carry every channel once."""
    codes = [f"channel_with_a_rather_long_code_{i:02d}" for i in range(60)]
    config = sim_config(tmp_path, broker, station_id=MN24, mqtt={"payload": "hj212"})
    config["devices"] = {"big": {"driver": "simulated", "interval": 1,
                                 "channels": {c: {"mean": 1000 + i + 0.123456} for i, c in enumerate(codes)}}}
    config["hj212"] = {"st": 32, "pw": PW}
    collector = Collector(broker, f"env/{MN24}/data")
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    try:
        wait_for(lambda: len(collector.messages) >= 12, 30, "pieces of several polls")
    finally:
        assert agent.stop() == 0
        collector.close()
    pieces = [read(p) for _, p, _ in collector.messages]
    by_qn: dict[str, list] = {}
    for p in pieces:
        assert p.ok, (p.problems, p.raw)
        assert p.head["Flag"] == "6" and p.cn == "2011" and p.item("DataTime"), p.raw
        by_qn.setdefault(p.head["QN"], []).append(p)
    complete = [group for group in by_qn.values() if len(group) == int(group[0].head["PNUM"])]
    assert len(complete) >= 2
    for group in complete:
        assert sorted(int(p.head["PNO"]) for p in group) == list(range(1, len(group) + 1))
        assert len({p.item("DataTime") for p in group}) == 1
        got = [c for p in group for c in p.codes()]
        assert sorted(got) == sorted(codes), "every channel once"
