"""`payload: hj212` building blocks on real database files: polls and time ranges read from the buffer,
2011 / 2051 / 2061 / 2031 packets built from stored rows, and `edge-agent tail` reading HJ 212."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from agent.buffer import Buffer, EventRow
from agent.hj212 import Reassembler, crc16, decode, period_items, realtime_items
from agent.hj212_payload import Hj212Identity, Hj212Payload, group_periods
from agent.model import STREAM_AGGREGATES, Reading
from agent.tail import SeqTracker, format_message

SHANGHAI = ZoneInfo("Asia/Shanghai")
IDENTITY = Hj212Identity(mn="14010500000017", st="32", pw="123456", timezone="Asia/Shanghai")
T0 = int(datetime(2026, 11, 29, 2, 0, 0, tzinfo=UTC).timestamp() * 1000)  # 10:00:00 in Shanghai


def store_polls(buf: Buffer, polls: list[list[Reading]]) -> None:
    buf.begin()
    for poll in polls:
        buf.insert_readings(poll)
    buf.commit()


def poll(device: str, ts_ms: int, channels: dict[str, float | None], flag: str = "N") -> list[Reading]:
    return [Reading(device, ch, ts_ms, value, "mg/L", flag if value is not None else "B")
            for ch, value in channels.items()]


def aggregate(buf: Buffer, device: str, channel: str, period: str, start_ms: int, avg: float | None = 1.5,
              flag: str = "N", cou: float | None = None) -> int:
    start = datetime.fromtimestamp(start_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    body = {"device": device, "channel": channel, "period": period, "start": start, "avg": avg,
            "min": None if avg is None else avg - 1, "max": None if avg is None else avg + 1, "cou": cou,
            "count": 10, "flag": flag}
    buf.begin()
    seq = buf.insert_event(STREAM_AGGREGATES, start_ms, body)
    buf.commit()
    return seq


@pytest.fixture
def buf(tmp_path):
    b = Buffer.open_writer(tmp_path / "b.db")
    b.ensure_time_index()
    yield b
    b.close()


# ---------------------------------------------------------------- buffer queries


def test_reading_polls_groups_consecutive_readings_of_one_device_and_instant(buf):
    store_polls(buf, [poll("cod", T0, {"w01018": 23.4, "w01001": 7.1}),
                      poll("pm", T0, {"a34004": 45.0}),
                      poll("cod", T0 + 60_000, {"w01018": 23.5, "w01001": 7.2})])
    polls = buf.reading_polls(0, 100)
    assert [(p.device, p.ts_ms, p.first_seq, p.last_seq) for p in polls] == [
        ("cod", T0, 1, 2), ("pm", T0, 3, 3), ("cod", T0 + 60_000, 4, 5)]
    assert [r.channel for r in polls[0].readings] == ["w01018", "w01001"]
    assert [p.first_seq for p in buf.reading_polls(2, 100)] == [3, 4]
    assert [p.last_seq for p in buf.reading_polls(0, 100, upto_seq=3)] == [2, 3]
    assert [p.last_seq for p in buf.reading_polls(0, 100, max_polls=2)] == [2, 3]


def test_reading_polls_never_cuts_a_poll_at_the_limit(buf):
    store_polls(buf, [poll("big", T0, {f"c{i:03d}": float(i) for i in range(600)}),
                      poll("small", T0, {"x": 1.0})])
    polls = buf.reading_polls(0, 10)
    assert len(polls) == 1 and len(polls[0].readings) == 600 and polls[0].last_seq == 600
    assert [p.device for p in buf.reading_polls(600, 10)] == ["small"]


def test_a_step_of_a_scan_by_time_keeps_the_range_and_completes_the_poll_it_ends_in(buf):
    """A resend by time reads a few seqs at a time (`scan_upto`) with a time filter: the polls taken in
    the range, both ends inclusive, whatever their order in seq; a poll the step's end cuts is read to
    its end (one 2011 packet per poll), not beyond `upto_seq`."""
    store_polls(buf, [poll("cod", T0 - 1, {"a": 1.0, "b": 2.0}),      # seqs 1-2: before the range
                      poll("cod", T0, {"a": 1.0, "b": 2.0}),          # 3-4: its first instant
                      poll("cod", T0 + 61_000, {"a": 1.0, "b": 2.0}),  # 5-6: after it
                      poll("cod", T0 + 60_000, {"a": 1.0, "b": 2.0, "c": 3.0})])  # 7-9: its last, clock stepped back
    in_range = (T0, T0 + 60_000)
    assert [(p.first_seq, p.last_seq) for p in buf.reading_polls(0, 100, ts_range=in_range)] == [(3, 4), (7, 9)]
    assert [(p.first_seq, p.last_seq) for p in buf.reading_polls(0, 100, ts_range=in_range, scan_upto=7)] == [
        (3, 4), (7, 9)]
    assert [(p.first_seq, p.last_seq) for p in buf.reading_polls(0, 100, ts_range=in_range, scan_upto=7,
                                                                 upto_seq=8)] == [(3, 4), (7, 8)]
    assert buf.reading_polls(4, 100, ts_range=in_range, scan_upto=6) == []
    batch = buf.readings_json(0, 100, upto_seq=8, ts_range=in_range)
    assert (batch.first_seq, batch.last_seq, batch.count) == (3, 8, 4)
    assert [r["seq"] for r in json.loads(f"[{batch.items}]")] == [3, 4, 7, 8]


def test_aggregates_between_is_inclusive_ordered_by_time_and_filtered_by_unit(buf):
    ten = 600_000
    aggregate(buf, "cod", "w01018", "10m", T0 + ten)  # seq 1, stored out of time order
    aggregate(buf, "cod", "w01018", "10m", T0)  # 2
    aggregate(buf, "cod", "w01018", "1h", T0)  # 3
    aggregate(buf, "cod", "w01018", "10m", T0 + 2 * ten)  # 4
    aggregate(buf, "pm", "a34004", "10m", T0)  # 5
    rows = buf.aggregates_between(T0, T0 + ten, unit="m")
    assert [(r.ts_ms, r.seq) for r in rows] == [(T0, 2), (T0, 5), (T0 + ten, 1)]
    assert [r.seq for r in buf.aggregates_between(T0, T0 + 2 * ten, unit="h")] == [3]
    assert [r.seq for r in buf.aggregates_between(T0, T0, unit="m", after=(T0, 2))] == [5]
    assert len(buf.aggregates_between(T0, T0 + 2 * ten)) == 5
    assert buf.aggregates_between(T0 + 1, T0 + ten - 1, unit="m") == []
    with pytest.raises(ValueError):
        buf.aggregates_between(0, 1, unit="x")


def test_paging_through_a_long_backfill_costs_the_same_per_page_at_its_end_as_at_its_start(buf):
    """A backfill pages through `aggregates_between` with `after`: each page was read from the range's start
    again (SQLite bounded the index scan by BeginTime, not by the page's `after`), so a year of 10-minute
    periods of 10 channels (525 600 rows) took 56 s of queries, its last pages 30 times its first, while
    the uplink sent no real-time data. The cost of a page, in SQLite VM steps, is now the same throughout."""
    buf.begin()
    for k in range(2000):
        for c in range(10):
            buf.insert_event(STREAM_AGGREGATES, T0 + k * 600_000, {
                "device": "cod", "channel": f"c{c}", "period": "10m", "avg": 1.0, "count": 1, "flag": "N"})
    buf.commit()
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    buf.conn.set_progress_handler(count, 100)
    costs, after, seqs = [], None, []
    while True:
        steps[0] = 0
        page = buf.aggregates_between(T0, T0 + 2000 * 600_000, unit="m", after=after, limit=500)
        costs.append(steps[0])
        seqs += [r.seq for r in page]
        if len(page) < 500:
            break
        after = (page[-1].ts_ms, page[-1].seq)
    buf.conn.set_progress_handler(None, 0)
    assert seqs == list(range(1, 20_001)), "every row once, in order"
    assert max(costs) <= 2 * costs[0], costs


# ---------------------------------------------------------------- packets


def test_poll_packet_is_a_2011_with_station_identity_local_datatime_and_every_channel(buf):
    store_polls(buf, [poll("cod", T0 + 250, {"w01018": 23.4, "w01001": 7.0, "w21003": None})])
    message = Hj212Payload(IDENTITY).poll_message(buf.reading_polls(0, 10)[0])
    assert len(message.frames) == 1 and (message.first_seq, message.last_seq, message.count) == (1, 3, 3)
    frame = message.frames[0]
    data = frame[6:-6]
    assert int(frame[-6:-2], 16) == crc16(data) and int(frame[2:6]) == len(data)
    packet = decode(frame)
    assert (packet.cn, packet.mn, packet.st, packet.pw, packet.flag) == ("2011", IDENTITY.mn, "32", "123456", 4)
    assert packet.qn == message.qn and packet.get("DataTime") == "20261129100000"
    assert realtime_items(packet) == {"w01018": (23.4, "N"), "w01001": (7.0, "N"), "w21003": (None, "B")}
    assert b"w01001-Rtd=7," in frame, "plain decimal, no trailing .0"


def test_numbers_are_plain_decimal_and_non_finite_values_go_as_a_flag(buf):
    store_polls(buf, [poll("d", T0, {"tiny": 1e-7, "huge": 1.5e17, "inf": float("inf")})])
    packet = decode(Hj212Payload(IDENTITY).poll_message(buf.reading_polls(0, 10)[0]).frames[0])
    assert packet.get("tiny-Rtd") == "0.0000001" and packet.get("huge-Rtd") == "150000000000000000"
    assert packet.get("inf-Rtd") is None and packet.get("inf-Flag") == "N"


def test_a_poll_over_1024_characters_is_split_and_reassembles(buf):
    store_polls(buf, [poll("big", T0, {f"w{i:05d}": i + 0.125 for i in range(120)})])
    message = Hj212Payload(IDENTITY).poll_message(buf.reading_polls(0, 500)[0])
    assert len(message.frames) > 1 and all(len(f) <= 1036 for f in message.frames)
    pieces = [decode(f) for f in message.frames]
    assert {p.qn for p in pieces} == {message.qn} and [p.pno for p in pieces] == list(range(1, len(pieces) + 1))
    joined = None
    r = Reassembler()
    for p in pieces:
        joined = r.add(p)
    assert joined is not None and len(realtime_items(joined)) == 120
    assert joined.get("DataTime") == "20261129100000"


def test_qns_are_distinct_even_for_polls_of_the_same_instant(buf):
    store_polls(buf, [poll("a", T0, {"x": 1.0}), poll("b", T0, {"x": 2.0})])
    payload = Hj212Payload(IDENTITY, clock=lambda: 1_800_000_000.0)
    qns = [payload.poll_message(p).qn for p in buf.reading_polls(0, 10)]
    assert len(set(qns)) == 2 and all(len(q) == 17 for q in qns)


def test_answer_flag_is_kept_on_every_piece(buf):
    store_polls(buf, [poll("big", T0, {f"w{i:05d}": float(i) for i in range(150)})])
    message = Hj212Payload(IDENTITY).poll_message(buf.reading_polls(0, 500)[0], flag=5)
    assert {decode(f).flag for f in message.frames} == {5 | 2}


def test_period_packets_group_channels_per_period_start_and_pick_the_cn(buf):
    hour = 3_600_000
    aggregate(buf, "cod", "w01018", "10m", T0, avg=20.25)
    aggregate(buf, "cod", "w01001", "10m", T0, avg=7.5, flag="D")
    aggregate(buf, "flow", "w00000", "10m", T0, avg=3.0, cou=1800.0)
    aggregate(buf, "pm", "w01018", "10m", T0, avg=30.0)  # same code on another device: next packet
    aggregate(buf, "cod", "w01018", "1h", T0, avg=21.0)
    aggregate(buf, "cod", "w01018", "1d", T0 - 10 * hour, avg=22.0)  # day starts at 00:00 local
    aggregate(buf, "cod", "w01018", "10m", T0 + 600_000, avg=None, flag="B")
    rows = buf.events_after(STREAM_AGGREGATES, 0, 100)
    groups = list(group_periods(rows))
    assert [[r.seq for r in g] for g in groups] == [[1, 2, 3], [4], [5], [6], [7]]
    payload = Hj212Payload(IDENTITY)
    packets = [decode(payload.period_message(g).frames[0]) for g in groups]
    assert [p.cn for p in packets] == ["2051", "2051", "2061", "2031", "2051"]
    assert [p.get("DataTime") for p in packets] == ["20261129100000", "20261129100000", "20261129100000",
                                                   "20261129000000", "20261129101000"]
    items = period_items(packets[0])
    assert items["w01018"] == {"cou": None, "min": 19.25, "avg": 20.25, "max": 21.25, "flag": "N"}
    assert items["w01001"]["flag"] == "D" and items["w00000"]["cou"] == 1800.0
    assert period_items(packets[4]) == {"w01018": {"cou": None, "min": None, "avg": None, "max": None, "flag": "B"}}
    answer = payload.period_message(groups[0], qn="20261129120000000")
    assert decode(answer.frames[0]).qn == "20261129120000000"


def test_rows_hj212_cannot_carry_are_skipped_not_retried_forever():
    payload = Hj212Payload(IDENTITY)
    odd = EventRow(9, T0, {"channel": "w01018", "period": "5y", "avg": 1.0, "flag": "N"})
    message = payload.period_message([odd])
    assert message.frames == [] and message.last_seq == 9


# ---------------------------------------------------------------- tail


def test_tail_shows_cn_datatime_and_items_of_hj212_messages(buf):
    store_polls(buf, [poll("cod", T0, {"w01018": 23.4, "w01001": None})])
    frame = Hj212Payload(IDENTITY).poll_message(buf.reading_polls(0, 10)[0]).frames[0]
    lines = format_message("env/14010500000017/data", frame, SeqTracker())
    assert "CN=2011" in lines[0] and "DataTime=20261129100000" in lines[0] and "MN=14010500000017" in lines[0]
    assert "123456" not in "\n".join(lines), "never print the password"
    assert any("w01018: Rtd=23.4 Flag=N" in line for line in lines)
    assert any("w01001: Flag=B" in line for line in lines)


def test_tail_flags_a_bad_frame_and_joins_split_packets(buf):
    store_polls(buf, [poll("big", T0, {f"w{i:05d}": float(i) for i in range(120)})])
    frames = Hj212Payload(IDENTITY).poll_message(buf.reading_polls(0, 500)[0]).frames
    tracker = SeqTracker()
    first = format_message("env/S/data", frames[0], tracker)
    assert "piece 1/" in first[0]
    lines = [line for f in frames[1:] for line in format_message("env/S/data", f, tracker)]
    assert sum("CN=2011" in line for line in lines) == 1 + len(frames) - 2
    assert sum(line.strip().startswith("w") for line in lines) == 120
    broken = frames[0][:20] + b"X" + frames[0][21:]
    [bad] = format_message("env/S/data", broken, SeqTracker())
    assert "BAD HJ 212 frame" in bad and "PW=***" in bad
    assert "123456" not in bad, "never the password, not even of a frame it cannot decode"
    assert format_message("env/S/data", b'{"v":1,"station":"S","readings":[]}', SeqTracker()) == []


def test_tail_shows_malformed_messages_and_goes_on_and_tells_late_from_duplicate():
    tracker = SeqTracker()

    def data(*seqs: object) -> bytes:
        return json.dumps({"v": 1, "station": "S", "readings": [
            {"seq": s, "device": "d", "channel": "c", "ts": "t", "value": 1, "unit": "", "flag": "N"} for s in seqs]
        }).encode()

    assert format_message("env/S/data", data(1, 2, 3), tracker)[-1].endswith(" N")
    for bad in (data("x"), b'{"readings": [1]}', b'{"readings": null}', b'{"gap": "x"}'):
        lines = format_message("env/S/data", bad, tracker)
        assert len(lines) == 1 and "MALFORMED" in lines[0], lines
    assert len(format_message("env/S/data", b"[" * 5000, tracker)) == 1, "nested too deeply: shown as text"
    assert "GAP 4..5 missing" in format_message("env/S/data", data(6), tracker)[0]
    assert format_message("env/S/data", data(5), tracker)[0].endswith("LATE (was missing)")
    assert format_message("env/S/data", data(5), tracker)[0].endswith("DUP")
    assert format_message("env/S/data", data(4), tracker)[0].endswith("LATE (was missing)")
    assert format_message("env/S/data", data(7), tracker)[0].endswith(" N"), "numbering goes on from 6"


def test_tail_started_mid_stream_does_not_call_a_resend_of_what_it_never_saw_a_duplicate():
    tracker = SeqTracker()
    assert tracker.see("readings", 40) == "" and tracker.see("readings", 41) == ""
    assert tracker.see("readings", 3) == "EARLIER (before tail started)"
    assert tracker.see("readings", 40) == "DUP"


def test_tail_flags_an_hj212_packet_published_again_as_a_duplicate(buf):
    """With `payload: hj212` the data and agg topics carry no seq, and a resend (or a re-publication after
    a reconnection) repeats a poll's packet under a new QN: tail printed it as a new measurement, with no
    flag, so a platform engineer could not tell a repeat from new data. A packet with the command, station,
    DataTime and items of one seen before on its topic is flagged DUP; two devices' polls of one instant
    are not duplicates of each other."""
    store_polls(buf, [poll("cod", T0, {"w01018": 23.4}), poll("nh3n", T0, {"w21003": 1.2}),
                      poll("cod", T0 + 60_000, {"w01018": 23.4})])
    aggregate(buf, "cod", "w01018", "1h", T0)
    payload = Hj212Payload(IDENTITY)
    cod, nh3n, cod_later = buf.reading_polls(0, 10)
    hour = payload.period_message(buf.events_after(STREAM_AGGREGATES, 0, 10))
    tracker = SeqTracker()

    def head(topic: str, frame: bytes) -> str:
        return format_message(f"env/14010500000017/{topic}", frame, tracker)[0]

    for p in (cod, nh3n, cod_later):  # cod_later: the same value a minute later
        assert not head("data", payload.poll_message(p).frames[0]).endswith("DUP")
    assert not head("agg", hour.frames[0]).endswith("DUP")
    resent = payload.poll_message(cod)
    assert resent.qn != payload.poll_message(cod).qn, "each publication has a QN of its own"
    assert head("data", resent.frames[0]).endswith(" DUP")
    assert head("agg", payload.period_message(buf.events_after(STREAM_AGGREGATES, 0, 10)).frames[0]).endswith(" DUP")
