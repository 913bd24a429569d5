"""The platform's backfill by time over MQTT: `{"cmd": "resend", "from_ts": …, "to_ts": …}` on P/cmd (an
extension of SPEC §4, README "Commands"). A real `edge-agent run` and a real mosquitto; the buffer file is
written before the agent starts with readings of an instrument whose clock stepped (back into the range,
and back from after it), so the stored `ts` is not monotonic in seq: the resend must find every reading of
the range all the same, in seq order, as the data messages (or HJ 212 2011 packets) a seq resend sends.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from harness import AgentProcess, Broker, Collector, sim_config, wait_for, write_config

from agent.buffer import Buffer
from agent.model import STREAM_READINGS, Reading

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hj212_mqtt_reader import read  # noqa: E402

BASE = "env/TEST0001"


def ms(text: str) -> int:
    """Unix ms of `HH:MM:SS.fff` on 2026-11-29, UTC."""
    return int(datetime.strptime(f"2026-11-29 {text}", "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC).timestamp()
               * 1000)


# Poll times of the instrument "cod", in the order they were stored (seq order): its clock was stepped
# back by 40 minutes after 02:30 and set right again, and later back by 6 minutes after 03:05.
POLL_TIMES = (["01:50:00.000", "01:55:00.000", "01:59:59.999", "02:00:00.000", "02:05:00.000", "02:15:00.000",
               "02:30:00.000"]
              + ["01:55:00.500", "02:00:30.000", "02:10:00.000"]  # stepped back: inside the range again
              + ["02:35:00.000", "02:55:00.000", "03:00:00.000", "03:00:00.001", "03:05:00.000"]
              + ["02:59:59.000", "03:10:00.000"])  # stepped back from after the range into it
START, END = ms("02:00:00.000"), ms("03:00:00.000")


def stored_station(path: Path) -> list[Reading]:
    """The buffer of a station that ran before: `cod`'s polls (two channels each), all published (sent)."""
    buf = Buffer.open_writer(path)
    buf.begin()
    stored = buf.insert_readings([Reading("cod", ch, ms(t), round(20 + i + k / 10, 3), "mg/L", "N")
                                  for i, t in enumerate(POLL_TIMES) for k, ch in enumerate(("w01018", "w21003"))])
    buf.set_sent_upto(STREAM_READINGS, stored[-1].seq)
    buf.commit()
    buf.close()
    return stored


def command(client: Collector, cmd: dict) -> None:
    client.client.publish(f"{BASE}/cmd", json.dumps(cmd), qos=1)


def replies(collector: Collector) -> dict:
    return {r["id"]: r for r in collector.json_messages("/cmd/reply")}


def resent_json(collector: Collector, since: int, upto: int | None = None) -> list[dict]:
    """The stored instrument's readings on the data topic among the messages from index `since` on
    (and before `upto`)."""
    out = []
    for topic, payload, _ in list(collector.messages)[since:upto]:
        if topic == f"{BASE}/data":
            out += [r for r in json.loads(payload).get("readings", []) if r["device"] == "cod"]
    return out


def as_published(r: Reading) -> dict:
    ts = datetime.fromtimestamp(r.ts_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{r.ts_ms % 1000:03d}Z"
    return {"seq": r.seq, "device": r.device, "channel": r.channel, "ts": ts, "value": r.value, "unit": r.unit,
            "flag": r.flag}


def test_a_resend_by_time_republishes_the_range_in_seq_order_across_clock_steps(tmp_path, broker, collector):
    stored = stored_station(tmp_path / "buffer.db")
    wanted = [as_published(r) for r in stored if START <= r.ts_ms <= END]
    assert len(wanted) == 2 * 10 and [r["ts"] for r in wanted] != sorted(r["ts"] for r in wanted), "ts steps back"
    config = sim_config(tmp_path, broker, channels=1, interval=0.2)
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    try:
        wait_for(lambda: len(collector.reading_seqs()) >= 3, 20, "live readings")
        assert not resent_json(collector, 0), "the stored readings were published before: not again at start"
        since = len(collector.messages)
        command(collector, {"id": "utc", "cmd": "resend", "from_ts": "2026-11-29T02:00:00Z",
                            "to_ts": "2026-11-29T03:00:00.000Z"})
        reply = wait_for(lambda: replies(collector).get("utc"), 20, "the reply")
        assert reply == {"v": 1, "id": "utc", "ok": True, "cmd": "resend", "from_ts": "2026-11-29T02:00:00.000Z",
                         "to_ts": "2026-11-29T03:00:00.000Z", "count": len(wanted)}
        assert resent_json(collector, since) == wanted
        # The same range in station time (+08:00), milliseconds given or not.
        since = len(collector.messages)
        command(collector, {"id": "cst", "cmd": "resend", "from_ts": "2026-11-29T10:00:00.000+08:00",
                            "to_ts": "2026-11-29T11:00:00+08:00"})
        reply = wait_for(lambda: replies(collector).get("cst"), 20, "the reply")
        assert reply["ok"] is True and reply["count"] == len(wanted), reply
        assert (reply["from_ts"], reply["to_ts"]) == ("2026-11-29T02:00:00.000Z", "2026-11-29T03:00:00.000Z")
        assert resent_json(collector, since) == wanted
        # A range with nothing stored in it: answered, count 0.
        command(collector, {"id": "none", "cmd": "resend", "from_ts": "2026-11-29T04:00:00Z",
                            "to_ts": "2026-11-29T05:00:00Z"})
        assert wait_for(lambda: replies(collector).get("none"), 20, "the reply")["count"] == 0

        since = len(collector.messages)
        refusals = {
            "mixed": ({"from_seq": 1, "to_seq": 5, "from_ts": "2026-11-29T02:00:00Z",
                       "to_ts": "2026-11-29T03:00:00Z"}, "not both"),
            "half-mixed": ({"from_seq": 1, "to_ts": "2026-11-29T03:00:00Z"}, "not both"),
            "reversed": ({"from_ts": "2026-11-29T03:00:00Z", "to_ts": "2026-11-29T02:00:00Z"}, "later than"),
            "naive": ({"from_ts": "2026-11-29T02:00:00", "to_ts": "2026-11-29T03:00:00Z"}, "'from_ts'"),
            "garbage": ({"from_ts": "2026-11-29T02:00:00Z", "to_ts": "yesterday"}, "'to_ts'"),
            "no-day": ({"from_ts": "2026-02-30T02:00:00Z", "to_ts": "2026-11-29T03:00:00Z"}, "'from_ts'"),
            "number": ({"from_ts": 1764381600000, "to_ts": "2026-11-29T03:00:00Z"}, "'from_ts'"),
            "only-from": ({"from_ts": "2026-11-29T02:00:00Z"}, "'to_ts'"),
            "year": ({"from_ts": "2025-11-29T02:00:00Z", "to_ts": "2026-11-30T02:00:00.001Z"},
                     "366 days"),
            "cursor": ({"from_ts": "2026-11-29T02:00:00Z", "to_ts": "2026-11-29T03:00:00Z", "after_seq": -1},
                       "'after_seq'"),
        }
        for cid, (fields, _) in refusals.items():
            command(collector, {"id": cid, "cmd": "resend", **fields})
        wait_for(lambda: set(refusals) <= set(replies(collector)), 20, "every refusal")
        for cid, (_, words) in refusals.items():
            reply = replies(collector)[cid]
            assert reply["ok"] is False and words in reply["error"], (cid, reply)
        # 366 days exactly (a leap year's) are taken; nothing of the refusals was published.
        command(collector, {"id": "leap", "cmd": "resend", "from_ts": "2025-11-29T02:00:00Z",
                            "to_ts": "2026-11-30T02:00:00Z"})
        assert wait_for(lambda: replies(collector).get("leap"), 20, "the reply")["count"] == len(stored)
        assert len(resent_json(collector, since)) == len(stored), "only the accepted resend published anything"
        before = max(collector.reading_seqs())
        wait_for(lambda: max(collector.reading_seqs()) > before + 5, 20, "live readings go on")
        assert "Traceback" not in agent.log()
    finally:
        assert agent.stop() == 0


def test_a_range_over_the_limit_is_resent_in_pages_the_reply_says_how_to_ask_for(tmp_path, broker, collector):
    """At most 100 000 readings per command (as for a seq resend): the reply says `more` and the
    `after_seq` to ask again with; the second page holds the rest, nothing twice, nothing skipped."""
    path = tmp_path / "buffer.db"
    buf = Buffer.open_writer(path, sync="normal")
    buf.begin()
    t0 = ms("02:00:00.000")
    stored = buf.insert_readings([Reading("cod", f"c{i % 10}", t0 + i // 10 * 20, float(i), "mg/L", "N")
                                  for i in range(150_000)])  # 02:00:00 .. 02:05:00 (300 s)
    buf.set_sent_upto(STREAM_READINGS, stored[-1].seq)
    buf.commit()
    buf.close()
    config = sim_config(tmp_path, broker, channels=1, interval=0.5, mqtt={"max_batch": 2000})
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    try:
        wait_for(lambda: collector.reading_seqs(), 20, "live readings")
        ask = {"cmd": "resend", "from_ts": "2026-11-29T02:00:00Z", "to_ts": "2026-11-29T02:05:00Z"}
        command(collector, {"id": "p1", **ask})
        first = wait_for(lambda: replies(collector).get("p1"), 30, "the first page's reply")
        assert first["ok"] is True and first["count"] == 100_000 and first["more"] is True, first
        command(collector, {"id": "p2", **ask, "after_seq": first["after_seq"]})
        second = wait_for(lambda: replies(collector).get("p2"), 30, "the second page's reply")
        assert second["ok"] is True and second["count"] == 50_000 and "more" not in second, second
    finally:
        assert agent.stop() == 0
    seqs = [r["seq"] for r in resent_json(collector, 0)]
    assert seqs == [r.seq for r in stored], "each stored reading once, in seq order, over the two pages"
    assert first["after_seq"] == stored[99_999].seq


def test_a_resend_by_time_sends_hj212_packets_with_their_datatime(tmp_path, broker):
    """`payload: hj212`: the platform sees no seq; it asks by time and gets the 2011 packets of the polls
    taken in the range (their DataTime in station time), in the order they were stored."""
    stored = stored_station(tmp_path / "buffer.db")
    zone = ZoneInfo("Asia/Shanghai")
    polls = list(dict.fromkeys(r.ts_ms for r in stored))
    wanted = [datetime.fromtimestamp(t / 1000, zone).strftime("%Y%m%d%H%M%S") for t in polls if START <= t <= END]
    config = sim_config(tmp_path, broker, station_id="14010500000017", mqtt={"payload": "hj212"})
    config["devices"] = {"pm": {"driver": "simulated", "interval": 0.5, "channels": {"a34004": {"mean": 40}}}}
    config["hj212"] = {"st": 32, "pw": "Pw1234"}
    base = "env/14010500000017"
    collector = Collector(broker, f"{base}/#")
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    try:
        wait_for(lambda: any(t.endswith("/data") for t, _, _ in list(collector.messages)), 20, "live packets")
        since = len(collector.messages)
        collector.client.publish(f"{base}/cmd", json.dumps({"id": "h", "cmd": "resend",
                                                            "from_ts": "2026-11-29T10:00:00+08:00",
                                                            "to_ts": "2026-11-29T03:00:00Z"}), qos=1)
        reply = wait_for(lambda: replies(collector).get("h"), 20, "the reply")
        assert reply["ok"] is True and reply["count"] == 2 * len(wanted), reply
    finally:
        assert agent.stop() == 0
        collector.close()
    packets = [read(p) for t, p, _ in collector.messages[since:] if t == f"{base}/data"]
    resent = [p for p in packets if "w01018" in p.codes()]
    assert all(p.ok and p.cn == "2011" for p in resent), [p.raw for p in resent if not p.ok][:3]
    assert [p.item("DataTime") for p in resent] == wanted
    values = {r.ts_ms: {} for r in stored}
    for r in stored:
        values[r.ts_ms][r.channel] = r.value
    for p, t in zip(resent, [t for t in polls if START <= t <= END], strict=True):
        assert {c: float(v["Rtd"]) for c, v in p.codes().items()} == values[t], p.raw


def test_a_resend_by_time_cut_off_by_a_broker_restart_still_delivers_its_whole_range(tmp_path):
    """As a seq resend: the messages in flight are lost with the connection, the resend goes on after
    the reconnect from its first batch not acknowledged, and the reply counts what the broker took."""
    path = tmp_path / "buffer.db"
    buf = Buffer.open_writer(path, sync="normal")
    buf.begin()
    t0 = ms("02:00:00.000")
    stored = buf.insert_readings([Reading("cod", f"c{i % 10}", t0 + i // 10 * 1000, float(i), "mg/L", "N")
                                  for i in range(20_000)])
    buf.set_sent_upto(STREAM_READINGS, stored[-1].seq)
    buf.commit()
    buf.close()
    broker = Broker(tmp_path / "broker", persistence=True).start()
    platform = Collector(broker, "env/#", persistent=True)
    # One reading per message: 20 000 messages, so that the restart lands mid-way.
    config = sim_config(tmp_path, broker, channels=1, interval=0.5, mqtt={"max_batch": 1})
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    pub = None
    try:
        wait_for(lambda: platform.reading_seqs(), 20, "live readings")
        pub = Collector(broker, "nothing/#")
        command(pub, {"id": "cut", "cmd": "resend", "from_ts": "2026-11-29T02:00:00Z",
                      "to_ts": "2026-11-29T03:00:00Z"})
        wait_for(lambda: len(resent_json(platform, 0)) >= 200, 20, "the resend under way")
        pub.close()
        pub = None
        broker.stop()
        assert not replies(platform), "the restart must land before the resend is done (make the range larger)"
        assert len(resent_json(platform, 0)) < len(stored), "the restart must land mid-way"
        broker.start()
        reply = wait_for(lambda: replies(platform).get("cut"), 60, "the resend's reply")
        assert reply["ok"] is True and reply["count"] == len(stored) and "more" not in reply, reply
        at = next(i for i, (t, p, _) in enumerate(list(platform.messages)) if t.endswith("/cmd/reply"))
        assert {r["seq"] for r in resent_json(platform, 0, at)} == {r.seq for r in stored}, "all before the reply"
    finally:
        if pub is not None:
            pub.close()
        assert agent.stop() == 0
        platform.close()
        broker.stop()


def test_a_resend_by_time_outside_the_years_a_reply_can_say_is_refused_and_the_next_is_answered(
        tmp_path, broker, collector):
    """`0001-01-01T00:00:00+14:00` is a valid ISO 8601 time whose UTC falls in year 0 (and
    `9999-12-31T23:00:00-14:00` in year 10000): no `ts` can say it. Such a resend was taken, found
    nothing, and then failed to write its reply (`from_ts` in it) for ever: the publisher logged "reading
    the buffer failed (year 0 is out of range)", reopened the buffer at every turn, and every later
    resend waited behind it unanswered until the agent restarted. It is refused, and the next one done."""
    stored = stored_station(tmp_path / "buffer.db")
    agent = AgentProcess(write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker, channels=1)))
    try:
        wait_for(lambda: collector.reading_seqs(), 20, "live readings")
        command(collector, {"id": "y0", "cmd": "resend", "from_ts": "0001-01-01T00:00:00+14:00",
                            "to_ts": "0001-01-01T00:00:01+14:00"})
        command(collector, {"id": "y10000", "cmd": "resend", "from_ts": "9999-12-31T23:00:00-14:00",
                            "to_ts": "9999-12-31T23:00:01-14:00"})
        command(collector, {"id": "next", "cmd": "resend", "from_seq": stored[0].seq, "to_seq": stored[1].seq})
        got = wait_for(lambda: (r := replies(collector)).keys() >= {"y0", "y10000", "next"} and r, 30,
                       "the three replies")
        assert got["y0"]["ok"] is False and "from_ts" in got["y0"]["error"], got["y0"]
        assert got["y10000"]["ok"] is False and "from_ts" in got["y10000"]["error"], got["y10000"]
        assert got["next"]["ok"] is True and got["next"]["count"] == 2, got["next"]
    finally:
        assert agent.stop() == 0
    assert "reading the buffer failed" not in agent.log()
