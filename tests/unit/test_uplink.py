"""The HJ 212 TCP uplink against a platform written here (a TCP server on loopback), with the real buffer
and recorder: acknowledged delivery, retries and reconnection, progress kept per uplink, and answers to
the platform's requests (backfill, time, refusals), with garbage on the wire."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from datetime import UTC, datetime
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pytest
from harness import wait_for
from hj212_platform import Platform as IndependentPlatform
from hj212_platform import frame as platform_frame
from hj212_strict import check as strict_check

import agent.uplink as uplink_module
from agent.buffer import Buffer
from agent.hj212 import (
    FrameReader,
    Hj212Error,
    Packet,
    ack_9014,
    crc16,
    encode,
    encode_one,
    parse_time,
    period_items,
    realtime_items,
)
from agent.hj212_payload import Hj212Identity
from agent.model import STREAM_AGGREGATES, STREAM_READINGS, Reading
from agent.recorder import Recorder
from agent.uplink import Uplink, UplinkTarget

SHANGHAI = ZoneInfo("Asia/Shanghai")
MN = "14010500000017"
IDENTITY = Hj212Identity(mn=MN, st="32", pw="123456", timezone="Asia/Shanghai")
T0 = int(datetime(2026, 11, 29, 2, 0, 0, tzinfo=UTC).timestamp() * 1000)  # 10:00:00 in Shanghai


class Platform:
    """An HJ 212 platform on loopback: accepts the station's connections, keeps every valid packet in
    arrival order (and every bad frame), acknowledges data packets that ask for it with 9014 while
    `ack` is true, and sends requests on the newest connection."""

    def __init__(self, *, ack: bool = True, port: int = 0, ack_each_piece: bool = True) -> None:
        self.ack = ack
        self.ack_each_piece = ack_each_piece  # False: a split packet is acknowledged once, after its last piece
        self.ack_delays: dict[int, float] = {}  # 9014 number (1 = the first sent) -> seconds it waits (busy once)
        self.acks_sent = 0
        self.crash_after_first_piece = False  # once: acknowledge a first piece, then drop the connection unread
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", port))
        self.server.listen(4)
        self.port = self.server.getsockname()[1]
        self.packets: list[Packet] = []
        self.errors: list[Hj212Error] = []
        self.conns: list[socket.socket] = []
        self.accepted = 0
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            if self._closed:  # an accept still in flight when the platform closed
                conn.close()
                return
            with self._lock:
                self.conns.append(conn)
                self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        reader = FrameReader()
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            for item in reader.feed(data):
                with self._lock:
                    (self.errors if isinstance(item, Hj212Error) else self.packets).append(item)
                last_piece = item.pno == item.pnum if isinstance(item, Packet) else True
                if isinstance(item, Packet) and item.answer_requested and self.ack and (
                        self.ack_each_piece or last_piece):
                    self.acks_sent += 1
                    time.sleep(self.ack_delays.get(self.acks_sent, 0.0))
                    try:
                        conn.sendall(encode_one(ack_9014(item)))
                    except OSError:
                        return
                    if self.crash_after_first_piece and isinstance(item, Packet) and item.pno == 1 < item.pnum:
                        self.crash_after_first_piece = False
                        conn.close()  # what else came on it is never read
                        return

    def received(self, cn: str | None = None) -> list[Packet]:
        with self._lock:
            return [p for p in self.packets if cn is None or p.cn == cn]

    def connected(self) -> bool:
        with self._lock:
            return bool(self.conns)

    def send(self, data: bytes) -> None:
        wait_for(self.connected, 10, "the station to connect")
        with self._lock:
            conn = self.conns[-1]
        conn.sendall(data)

    def request(self, cn: str, cp: list[dict[str, str]] | None = None, *, qn: str = "20261129120000001",
                pw: str = "123456", mn: str = MN, st: str = "32", timeout: float = 10) -> list[Packet]:
        """Send a request; return the answers with its QN up to the closing 9012 (or refusing 9011)."""
        for frame in encode(Packet(qn=qn, st=st, cn=cn, pw=pw, mn=mn, flag=5, cp=cp or [])):
            self.send(frame)

        def answers() -> list[Packet] | None:
            got = [p for p in self.received() if p.qn == qn]
            done = any(p.cn == "9012" or (p.cn == "9011" and p.get("QnRtn") != "1") for p in got)
            return got if done else None

        return wait_for(answers, timeout, f"the answer to CN={cn}")

    def cut(self) -> None:
        """Drop every connection (the station must reconnect)."""
        with self._lock:
            conns, self.conns = self.conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def close(self) -> None:
        """Stop listening and drop every connection (an outage of the platform)."""
        self._closed = True
        try:
            self.server.shutdown(socket.SHUT_RDWR)  # wakes the accept() in flight
        except OSError:
            pass
        self.server.close()
        self.cut()


class Station:
    """The buffer, its recorder and one uplink, in this process."""

    def __init__(self, tmp_path, platform: Platform, *, timeout: float = 2.0, retries: int = 1) -> None:
        self.path = tmp_path / "buffer.db"
        buf = Buffer.open_writer(self.path)
        buf.ensure_time_index()
        self.recorder = Recorder(buf, commit_interval_ms=20, keep_sent_days=7, max_mb=64)
        self.recorder.start()
        self.target = UplinkTarget("127.0.0.1", platform.port, timeout=timeout, retries=retries)
        self.uplink: Uplink | None = None

    def start_uplink(self, identity: Hj212Identity = IDENTITY, rtd_interval: float | None = None) -> Uplink:
        self.uplink = Uplink(self.target, identity, self.path, self.recorder, reconnect_max=0.5,
                             rtd_interval=rtd_interval)
        self.recorder.add_listener(self.uplink.wake)
        self.uplink.start()
        return self.uplink

    def store(self, device: str, ts_ms: int, values: dict[str, float | None]) -> None:
        self.recorder.submit([Reading(device, ch, ts_ms, v, "mg/L", "N" if v is not None else "B")
                              for ch, v in values.items()])

    def store_aggregate(self, channel: str, period: str, start_ms: int, avg: float, device: str = "cod") -> None:
        start = datetime.fromtimestamp(start_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        self.recorder.submit_event(STREAM_AGGREGATES, start_ms, {
            "device": device, "channel": channel, "period": period, "start": start, "avg": avg, "min": avg - 1,
            "max": avg + 1, "cou": None, "count": 12, "flag": "N"})

    def meta(self) -> dict:
        self.recorder.flush()
        reader = Buffer.open_reader(self.path)
        try:
            return json.loads(reader.meta_value(self.target.meta_key) or "{}")
        finally:
            reader.close()

    def close(self) -> None:
        if self.uplink is not None:
            self.uplink.stop()
        self.recorder.stop()
        self.recorder.buffer.close()


@pytest.fixture
def platform():
    p = Platform()
    yield p
    p.close()


@pytest.fixture
def station(tmp_path, platform):
    s = Station(tmp_path, platform)
    yield s
    s.close()


def local(text: str) -> int:
    return int(parse_time(text, SHANGHAI).timestamp() * 1000)


# ---------------------------------------------------------------- delivery


def test_realtime_packets_arrive_valid_and_acknowledged_and_progress_is_kept(station, platform):
    uplink = station.start_uplink()
    for i in range(5):
        station.store("cod", T0 + i * 1000, {"w01018": 20.0 + i, "w01001": 7.0})
    wait_for(lambda: uplink.marks[STREAM_READINGS] == 10, 10, "5 polls acknowledged")
    data = platform.received("2011")
    assert [p.get("DataTime") for p in data] == [f"2026112910000{i}" for i in range(5)]
    assert all((p.mn, p.st, p.pw, p.flag) == (MN, "32", "123456", 5) for p in data)
    assert realtime_items(data[2]) == {"w01018": (22.0, "N"), "w01001": (7.0, "N")}
    assert not platform.errors
    assert station.meta()["state"] == "online"
    uplink.stop()
    assert station.meta()[STREAM_READINGS] == 10, "progress persisted for the next start"


def test_period_packets_are_pushed_with_flag_a_and_acknowledged(station, platform):
    uplink = station.start_uplink()
    station.store_aggregate("w01018", "10m", T0, 20.5)
    station.store_aggregate("w01001", "10m", T0, 7.25)
    station.store_aggregate("w01018", "1h", T0, 21.0)
    wait_for(lambda: uplink.marks[STREAM_AGGREGATES] == 3, 10, "aggregates acknowledged")
    packets = platform.received("2051") + platform.received("2061")
    assert [(p.cn, p.flag, p.get("DataTime")) for p in packets] == [("2051", 5, "20261129100000"),
                                                                     ("2061", 5, "20261129100000")]
    assert set(period_items(packets[0])) == {"w01018", "w01001"}


def test_unacknowledged_packet_is_retried_then_the_connection_renewed_and_nothing_lost(tmp_path, caplog):
    platform = Platform(ack=False)
    station = Station(tmp_path, platform, timeout=0.3, retries=2)
    try:
        uplink = station.start_uplink()
        station.store("cod", T0, {"w01018": 1.0})
        with caplog.at_level(logging.WARNING, logger="agent.uplink"):
            wait_for(lambda: platform.accepted >= 4, 10, "new connections after the retries")
        first_qn = platform.received("2011")[0].qn
        assert sum(p.qn == first_qn for p in platform.received("2011")) == 3, "sent once and retried twice"
        # A platform that never acknowledges: its lines are not repeated at every packet and connection.
        assert sum("sending again" in m for m in caplog.messages) == 1, caplog.messages
        assert sum("connection dropped" in m for m in caplog.messages) == 1, caplog.messages
        assert uplink.marks[STREAM_READINGS] == 0
        platform.ack = True
        wait_for(lambda: uplink.marks[STREAM_READINGS] == 1, 10, "delivered once acknowledged")
        assert uplink.is_alive()
    finally:
        station.close()
        platform.close()


def test_a_platform_refusing_the_data_is_logged_with_its_reason(tmp_path, caplog):
    """A platform that checks the station's PW (or MN, ST) answers a data packet it refuses with 9011 and
    QnRtn 3..9 instead of a 9014. That answer was dropped unread: the journal said only "no 9014" and
    "connection dropped", for ever, and never that the platform took the password for wrong."""
    refused = []

    def refuse(p):  # the independent platform's answer: 9011 QnRtn=3 (PW error) naming the packet's QN
        h = p.header
        refused.append(h["QN"])
        return [platform_frame(f"QN={h['QN']};ST=91;CN=9011;PW={h['PW']};MN={h['MN']};Flag=4;CP=&&QnRtn=3&&")]

    platform = IndependentPlatform(ack=refuse)
    station = Station(tmp_path, platform, timeout=0.3, retries=0)
    try:
        station.start_uplink()
        station.store("cod", T0, {"w01018": 1.0})
        with caplog.at_level(logging.WARNING, logger="agent.uplink"):
            wait_for(lambda: platform.accepted >= 2, 10, "the connection renewed")
        lines = [m for m in caplog.messages if "QnRtn=3" in m]
        assert lines and "PW error" in lines[0] and refused[0] in lines[0], caplog.messages
        assert "123456" not in " ".join(caplog.messages)
    finally:
        station.close()
        platform.close()


def store_split_poll(station, i: int) -> None:
    """A poll of 40 channels at T0 + i s: its 2011 packet goes in 2 pieces (PNUM/PNO)."""
    station.store("cod", T0 + i * 1000, {f"c{c:02d}": 1234.5678 + c for c in range(40)})


@pytest.mark.parametrize("ack_each_piece", [True, False])
def test_split_packets_are_delivered_to_platforms_acknowledging_each_piece_or_the_whole(tmp_path, caplog,
                                                                                      ack_each_piece):
    """A poll of 40 channels is a packet of 2 pieces (PNUM/PNO, Flag=7). A platform that answers each piece
    gets each piece once; one that answers a packet once it is whole (after its last piece) used to get
    only the first piece, sent again and again, and the connection renewed for ever: nothing delivered."""
    platform = Platform(ack_each_piece=ack_each_piece)
    station = Station(tmp_path, platform, timeout=0.5, retries=1)
    try:
        uplink = station.start_uplink()
        with caplog.at_level(logging.INFO, logger="agent.uplink"):
            for i in range(3):
                store_split_poll(station, i)
            wait_for(lambda: uplink.marks[STREAM_READINGS] == 120, 15, "3 split polls acknowledged")
        pieces = platform.received("2011")
        assert [(p.get("DataTime"), p.pno, p.pnum, p.flag) for p in pieces] == [
            (f"2026112910000{i}", pno, 2, 7) for i in range(3) for pno in (1, 2)]
        assert platform.accepted == 1, "no connection renewed"
        whole = [m for m in caplog.messages if "acknowledges a split packet once" in m]
        assert len(whole) == (0 if ack_each_piece else 1), caplog.messages
    finally:
        station.close()
        platform.close()


@pytest.mark.parametrize("ack_delays", [{1: 1.0}, {1: 1.0, 4: 0.3}], ids=["first-slow", "then-a-last-late"])
def test_one_slow_acknowledgement_never_makes_a_piece_count_as_delivered_unread(tmp_path, caplog, ack_delays):
    """A platform that acknowledges each piece, slow once (the first piece's 9014 after `timeout`): that
    9014 then came while the last piece was awaited, and the uplink took the platform for one that answers
    whole packets, for good. A 9014 (of the first piece, same QN) then counted for the whole packet: a
    platform that went down after reading the first piece of a poll never got its second piece.
    The second 9014 of the next packet, which says "each piece", may come after the uplink went on to
    the packet after (the 4th 9014 late, or a busy machine): it was taken for nothing, the uplink stayed
    in its wrong belief, and the piece lost (seen in CI)."""
    platform = Platform()
    platform.ack_delays = ack_delays
    station = Station(tmp_path, platform, timeout=0.5, retries=1)
    try:
        uplink = station.start_uplink()
        with caplog.at_level(logging.INFO, logger="agent.uplink"):
            for i in range(3):
                store_split_poll(station, i)
            wait_for(lambda: uplink.marks[STREAM_READINGS] == 120, 15, "3 split polls acknowledged")
            platform.crash_after_first_piece = True
            store_split_poll(station, 3)
            wait_for(lambda: uplink.marks[STREAM_READINGS] == 160, 15, "the 4th split poll acknowledged")
        got = {(p.get("DataTime"), p.pno) for p in platform.received("2011")}
        assert {(f"2026112910000{i}", pno) for i in range(4) for pno in (1, 2)} <= got
    finally:
        station.close()
        platform.close()


def test_an_acknowledgement_that_came_while_a_request_was_answered_is_not_missed(tmp_path, monkeypatch, caplog):
    """The platform asks for something (a long backfill) just before it acknowledges the packet in flight:
    the 9014 waits in the socket while the answer is sent. Past `timeout` by then, the uplink sent the
    packet again without reading it (a duplicate), and at its last try dropped the connection."""
    platform = Platform(ack=False)
    station = Station(tmp_path, platform, timeout=0.5, retries=0)
    answering = threading.Event()
    slow_answer = uplink_module.Uplink._get_time

    def get_time(self, request):
        answering.set()
        time.sleep(1.0)  # a backfill of many records takes longer than the timeout
        slow_answer(self, request)

    monkeypatch.setattr(uplink_module.Uplink, "_get_time", get_time)
    try:
        uplink = station.start_uplink()
        station.store("cod", T0, {"w01018": 1.0})
        data = wait_for(lambda: platform.received("2011"), 10, "the poll")[0]
        platform.send(encode_one(Packet(qn="20261129120000002", st="32", cn="1011", pw="123456", mn=MN, flag=5,
                                        cp=[])))
        wait_for(answering.is_set, 5, "the request being answered")
        platform.send(encode_one(ack_9014(data)))
        with caplog.at_level(logging.WARNING, logger="agent.uplink"):
            wait_for(lambda: uplink.marks[STREAM_READINGS] == 1, 10, "the poll acknowledged")
        assert [p.qn for p in platform.received("2011")] == [data.qn], "sent once"
        assert platform.accepted == 1 and not caplog.messages, caplog.messages
    finally:
        station.close()
        platform.close()


def test_a_platform_that_stops_reading_a_backfill_never_blocks_the_uplink_for_its_timeout(tmp_path):
    """A platform asks for a big backfill and does not read the answer (TCP back-pressure). With a long
    `timeout` (slow links), one blocked send made no progress for that long: above 60 s the watchdog was
    withheld and the agent killed, and a stop or reload waited for it. Sending now notes progress and
    heeds a stop."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by the accepted connection
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    station = Station(tmp_path, SimpleNamespace(port=server.getsockname()[1]), timeout=30, retries=0)
    conn = None
    try:
        for i in range(1500):  # stored before the uplink starts: it sends no real-time data, only the backfill
            store_split_poll(station, i)
        station.recorder.flush()
        uplink = station.start_uplink()
        server.settimeout(10)
        conn, _ = server.accept()
        conn.sendall(encode_one(Packet(qn="20261129120000003", st="32", cn="2011", pw="123456", mn=MN, flag=5,
                                       cp=[{"BeginTime": "20261129000000", "EndTime": "20261130000000"}])))
        time.sleep(5)  # never read: the backfill's sends block
        assert time.monotonic() - uplink.last_progress < 2.5, "a blocked send notes progress"
        started = time.monotonic()
        uplink.request_stop()
        uplink.join(5)
        assert not uplink.is_alive() and time.monotonic() - started < 3, "a stop is heeded while a send blocks"
    finally:
        station.close()
        if conn is not None:
            conn.close()
        server.close()


def test_a_cut_connection_loses_no_poll(station, platform):
    uplink = station.start_uplink()
    for i in range(30):
        station.store("cod", T0 + i * 1000, {"w01018": float(i)})
        if i in (10, 20):
            wait_for(lambda n=i: uplink.marks[STREAM_READINGS] >= n, 10, "progress before the cut")
            platform.cut()
        time.sleep(0.01)  # pacing the producer, not waiting for a result
    wait_for(lambda: uplink.marks[STREAM_READINGS] == 30, 20, "every poll after the cuts")
    times = {p.get("DataTime") for p in platform.received("2011")}
    expected = {datetime.fromtimestamp((T0 + i * 1000) / 1000, SHANGHAI).strftime("%Y%m%d%H%M%S") for i in range(30)}
    assert expected <= times
    assert platform.accepted >= 3


def test_new_uplink_starts_from_now_and_a_known_one_resumes_where_it_stopped(station, platform):
    station.store("old", T0, {"x": 1.0})
    station.recorder.flush()
    uplink = station.start_uplink()
    station.store("new", T0 + 1000, {"x": 2.0})
    wait_for(lambda: uplink.marks[STREAM_READINGS] == 2, 10, "the new reading")
    assert [p.get("DataTime") for p in platform.received("2011")] == ["20261129100001"]
    uplink.stop()
    station.uplink = None
    station.store("later", T0 + 2000, {"x": 3.0})
    station.recorder.flush()
    again = station.start_uplink()
    wait_for(lambda: again.marks[STREAM_READINGS] == 3, 10, "the reading stored while it was stopped")
    assert [p.get("DataTime") for p in platform.received("2011")][-1] == "20261129100002"


def test_an_uplink_that_outlives_its_stop_never_writes_back_older_progress(station, platform, monkeypatch):
    """A reload stops the uplinks, waits for them (15 s), then starts their successors with their progress.
    One still in a connect that does not heed a stop (a DNS lookup of the platform's name with the DNS
    down: tens of seconds) ended later, and its last words, its older progress and "offline, agent
    stopped", overwrote what its successor had written meanwhile: after a restart the platform got again
    what it had acknowledged, and `status` showed a running uplink stopped. It is retired instead."""
    uplink = station.start_uplink()
    for i in range(3):
        station.store("cod", T0 + i * 1000, {"w01018": float(i)})
    wait_for(lambda: uplink.marks[STREAM_READINGS] == 3, 10, "3 polls acknowledged")
    platform.cut()
    connecting = threading.Event()
    real_connect = socket.create_connection

    def slow_dns(address, *args, **kwargs):
        if threading.current_thread() is not uplink:  # (another client of this process: a paho collector)
            return real_connect(address, *args, **kwargs)
        connecting.set()
        time.sleep(2.0)  # a name lookup: no timeout, no stop heeded
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(uplink_module.socket, "create_connection", slow_dns)
    wait_for(connecting.is_set, 10, "the uplink reconnecting")
    marks = uplink_module.stop_uplinks([uplink], 0.2)
    assert uplink.is_alive() and marks[station.target.meta_key][STREAM_READINGS] == 3
    assert (station.meta()[STREAM_READINGS], station.meta()["state"]) == (3, "offline"), "its last record, at once"
    successor = {STREAM_READINGS: 9, STREAM_AGGREGATES: 0, "state": "online", "error": None, "since": "x"}
    station.recorder.set_meta(station.target.meta_key, json.dumps(successor))
    uplink.join(10)
    assert not uplink.is_alive()
    station.uplink = None
    assert station.meta() == successor


# ---------------------------------------------------------------- requests


def test_backfill_is_framed_by_9011_and_9012_with_records_in_time_order(station, platform):
    station.store_aggregate("w01018", "10m", local("20261129102000"), 3.0)
    station.store_aggregate("w01018", "10m", local("20261129100000"), 1.0)
    station.store_aggregate("w01001", "10m", local("20261129100000"), 7.0)
    station.store_aggregate("w01018", "10m", local("20261129101000"), 2.0)
    station.store_aggregate("w01018", "1h", local("20261129100000"), 9.0)
    station.store_aggregate("w01018", "10m", local("20261129103000"), 4.0)  # after EndTime
    station.recorder.flush()
    station.start_uplink()
    answer = platform.request("2051", [{"BeginTime": "20261129100000", "EndTime": "20261129102000"}])
    assert [p.cn for p in answer] == ["9011", "2051", "2051", "2051", "9012"]
    assert answer[0].get("QnRtn") == "1" and answer[-1].get("ExeRtn") == "1"
    assert answer[0].st == "91" and answer[-1].st == "91"
    records = answer[1:-1]
    assert [p.get("DataTime") for p in records] == ["20261129100000", "20261129101000", "20261129102000"]
    assert set(period_items(records[0])) == {"w01018", "w01001"}
    assert [period_items(p)["w01018"]["avg"] for p in records] == [1.0, 2.0, 3.0]
    hours = platform.request("2061", [{"BeginTime": "20261129000000", "EndTime": "20261129235959"}],
                             qn="20261129120000002")
    assert [p.cn for p in hours] == ["9011", "2061", "9012"]


def test_a_2011_backfill_sends_the_stored_polls_of_the_range_with_their_datatime(station, platform):
    """A platform that found a hole in its real-time data asks for it again: one 2011 record per device
    poll taken in BeginTime..EndTime (inclusive), in storage order, framed by 9011 and 9012."""
    for k, hhmmss in enumerate(("100000", "100100", "100200", "100300")):
        station.store("cod", local("20261129" + hhmmss), {"w01018": 20.0 + k, "w21003": None if k == 2 else 1.0 + k})
    station.store("ph", local("20261129100100"), {"w01001": 7.1})
    station.recorder.flush()
    station.start_uplink()
    answer = platform.request("2011", [{"BeginTime": "20261129100100", "EndTime": "20261129100200"}])
    assert [p.cn for p in answer] == ["9011", "2011", "2011", "2011", "9012"]
    assert answer[0].get("QnRtn") == "1" and answer[-1].get("ExeRtn") == "1"
    assert [(p.get("DataTime"), realtime_items(p)) for p in answer[1:-1]] == [
        ("20261129100100", {"w01018": (21.0, "N"), "w21003": (2.0, "N")}),
        ("20261129100200", {"w01018": (22.0, "N"), "w21003": (None, "B")}),
        ("20261129100100", {"w01001": (7.1, "N")})]
    assert all(p.flag == 4 and p.st == "32" for p in answer[1:-1]), "records close with the 9012, not a 9014"
    empty = platform.request("2011", [{"BeginTime": "20200101000000", "EndTime": "20200101000000"}],
                             qn="20261129120000002")
    assert [(p.cn, p.get("QnRtn") or p.get("ExeRtn")) for p in empty] == [("9011", "1"), ("9012", "100")]
    for frame in encode(Packet(qn="20261129120000003", st="32", cn="2011", pw="123456", mn=MN, flag=5, cp=[])):
        platform.send(frame)  # "send me real-time data": it is sent anyway
    wait_for(lambda: [(p.cn, p.get("QnRtn")) for p in platform.received() if p.qn == "20261129120000003"] == [
        ("9011", "1")], 10, "the answer to a real-time data request")


def test_a_backfill_over_a_dst_change_takes_every_record_whose_datatime_is_in_the_range(station, platform):
    """BeginTime..EndTime are station times, both inclusive. In Berlin's repeated autumn hour (02:00-02:59
    twice on 2026-10-25) a range names both passes; a BeginTime in the spring gap (02:00-02:59 do not exist
    on 2026-03-29) starts where the clock skipped to, and an EndTime there ends where it skipped. They were
    read with the offset of the hour's first pass: the second pass was never sent (ExeRtn=100), a range from
    02:30 in spring started at 03:30, and one ending at 02:30 took the records of 03:00-03:29."""
    berlin = Hj212Identity(mn=MN, st="32", pw="123456", timezone="Europe/Berlin")

    def utc(text: str) -> int:
        return int(datetime.fromisoformat(text + "+00:00").timestamp() * 1000)

    autumn = {"00:30": "20261025023000", "01:00": "20261025020000", "01:30": "20261025023000"}  # UTC -> DataTime
    for hhmm in autumn:
        station.store("cod", utc(f"2026-10-25T{hhmm}:00"), {"w01018": 1.0})
        station.store_aggregate("w01018", "1m", utc(f"2026-10-25T{hhmm}:00"), 2.0)
    spring = {"00:59": "20260329015900", "01:00": "20260329030000", "01:29": "20260329032900",
              "01:30": "20260329033000"}
    for hhmm in spring:
        station.store("cod", utc(f"2026-03-29T{hhmm}:00"), {"w01018": 1.0})
        station.store_aggregate("w01018", "1m", utc(f"2026-03-29T{hhmm}:00"), 2.0)
    station.recorder.flush()
    station.start_uplink(berlin)
    qns = iter(range(1, 100))

    def asked(cn: str, begin: str, end: str) -> list[str]:
        answer = platform.request(cn, [{"BeginTime": begin, "EndTime": end}], qn=f"2026112912000{next(qns):04d}")
        assert answer[0].get("QnRtn") == "1", answer
        return [p.get("DataTime") for p in answer[1:-1]]

    for cn in ("2011", "2051"):
        assert asked(cn, "20261025020000", "20261025023000") == list(autumn.values()), cn
        assert asked(cn, "20261025020000", "20261025020000") == ["20261025020000"], cn
        assert asked(cn, "20260329023000", "20260329033000") == ["20260329030000", "20260329032900",
                                                                 "20260329033000"], cn
        assert asked(cn, "20260329015900", "20260329023000") == ["20260329015900"], cn


def test_backfill_of_an_empty_range_says_no_data(station, platform):
    station.start_uplink()
    answer = platform.request("2031", [{"BeginTime": "20200101000000", "EndTime": "20200131000000"}])
    assert [(p.cn, p.get("QnRtn") or p.get("ExeRtn")) for p in answer] == [("9011", "1"), ("9012", "100")]


def test_a_backfill_reading_a_big_buffer_notes_progress_while_sqlite_reads_it(station, platform, monkeypatch):
    """Readings have no time index: a 2011 backfill reads the whole table by seq, whatever its range (2
    minutes for a 1.4 GB buffer not in the page cache, audit Y), and the uplink, noting no progress, had
    the watchdog withheld and the agent killed. It now notes progress while SQLite reads."""
    monkeypatch.setattr(uplink_module, "SCAN_PROGRESS_STEPS", 1000)
    t0 = local("20261129100000")
    for i in range(0, 20_000, 1000):
        station.recorder.submit([Reading("cod", f"c{j}", t0 + (i + j) * 1000, 1.0, "mg/L", "N") for j in range(1000)])
    assert station.recorder.flush(30)
    uplink = station.start_uplink()
    notes: list[float] = []
    noted = uplink._reading_the_buffer
    monkeypatch.setattr(uplink, "_reading_the_buffer", lambda: notes.append(time.monotonic()) or noted())
    answer = platform.request("2011", [{"BeginTime": "20200101000000", "EndTime": "20200101000000"}])
    assert [(p.cn, p.get("QnRtn") or p.get("ExeRtn")) for p in answer] == [("9011", "1"), ("9012", "100")]
    assert len(notes) >= 20, "progress noted while 20 000 readings were read"


def test_a_stop_is_heeded_while_a_backfill_reads_a_big_buffer(station, platform, monkeypatch, caplog):
    """The scan of a 2011 backfill (2 minutes for a 1.4 GB buffer out of the page cache) went on to its end
    after a stop: SIGTERM waited 15 s for the uplink and left it running, and a SIGHUP started its successor
    beside it, to which it later wrote back its older progress and "offline, agent stopped". The scan now
    ends at the stop (its SQLite query interrupted), and nothing is logged as a buffer error."""
    monkeypatch.setattr(uplink_module, "SCAN_PROGRESS_STEPS", 1000)
    t0 = local("20261129100000")
    for i in range(0, 20_000, 1000):
        station.recorder.submit([Reading("cod", f"c{j}", t0 + (i + j) * 1000, 1.0, "mg/L", "N") for j in range(1000)])
    assert station.recorder.flush(30)
    uplink = station.start_uplink()
    notes: list[float] = []
    noted = uplink._reading_the_buffer

    def slow_disk() -> int:  # every note of progress stands for 0.1 s of reading a disk
        notes.append(time.monotonic())
        time.sleep(0.1)
        return noted()

    monkeypatch.setattr(uplink, "_reading_the_buffer", slow_disk)
    platform.send(encode_one(Packet(qn="20261129120000001", st="32", cn="2011", pw="123456", mn=MN, flag=5,
                                    cp=[{"BeginTime": "20200101000000", "EndTime": "20200101000000"}])))
    wait_for(lambda: notes, 10, "the backfill reading the buffer")
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="agent.uplink"):
        uplink.stop()
    assert not uplink.is_alive() and time.monotonic() - started < 1.0, f"stopped after {len(notes)} notes"
    assert not [m for m in caplog.messages if "buffer" in m], caplog.messages


def test_unknown_command_wrong_password_and_wrong_mn_are_refused(station, platform):
    station.start_uplink()
    assert [(p.cn, p.get("QnRtn")) for p in platform.request("3020", qn="20261129120000011")] == [("9011", "8")]
    assert [(p.cn, p.get("QnRtn")) for p in platform.request("1011", pw="999999", qn="20261129120000012")] == [
        ("9011", "3")]
    assert [(p.cn, p.get("QnRtn")) for p in platform.request("1011", mn="OTHER", qn="20261129120000013")] == [
        ("9011", "4")]
    assert [(p.cn, p.get("QnRtn")) for p in platform.request("1011", st="22", qn="20261129120000014")] == [
        ("9011", "5")]
    refused = platform.request("2051", [{"BeginTime": "yesterday"}], qn="20261129120000015")
    assert [(p.cn, p.get("QnRtn")) for p in refused] == [("9011", "2")]
    # No QN: refused QnRtn 7, and the answer has a QN of its own (every packet starts with one).
    for frame in encode(Packet(qn=None, st="32", cn="1011", pw="123456", mn=MN, flag=5, cp=[])):
        platform.send(frame)
    answer = wait_for(lambda: [p for p in platform.received() if p.cn == "9011" and p.get("QnRtn") == "7"], 10,
                      "the QnRtn=7 answer")
    assert answer[0].qn is not None and len(answer[0].qn) == 17
    # A QN that is not 17 digits is a QN error too (a QN cannot be echoed that is not one); the rest of
    # the header is checked first, as for any request.
    for qn, pw, expected in (("2026-11-29 12:00", "123456", "7"), ("1", "999999", "3")):
        seen = {p.qn for p in platform.received()}
        body = f"QN={qn};ST=32;CN=1011;PW={pw};MN={MN};Flag=5;CP=&&&&"
        platform.send(f"##{len(body):04d}{body}{crc16(body.encode()):04X}\r\n".encode())
        answer = wait_for(lambda seen=seen: [p for p in platform.received() if p.qn not in seen], 10,
                          f"the answer to QN {qn!r}")
        assert [(p.cn, p.get("QnRtn")) for p in answer] == [("9011", expected)]
        assert answer[0].qn is not None and len(answer[0].qn) == 17


def test_a_request_with_an_over_long_pw_or_mn_is_refused_with_a_valid_answer(tmp_path):
    """A platform that mistyped the password (7 characters) or the station code (25) had its request dropped
    unanswered: the decoder refused the field's length. It is answered 9011 QnRtn=3 (PW error) / 4 (MN
    error), MN checked first, and never executed (a malformed ST or CN: 5 or 8); the answer is a valid
    packet for both independent checkers: it names the station's own PW and MN where the request's do not
    fit a packet."""
    platform = IndependentPlatform()
    station = Station(tmp_path, platform)
    try:
        station.start_uplink()
        wait_for(lambda: platform.accepted, 10, "the station to connect")
        long_mn = "1401050000001700000000001"  # 25 characters
        cases = [  # QN, PW, MN, expected QnRtn, the answer's (PW, MN)
            ("20261129120000041", "1234567", MN, "3", ("123456", MN)),
            ("20261129120000042", "123456", long_mn, "4", ("123456", MN)),
            ("20261129120000043", "12345678", long_mn, "4", ("123456", MN)),
            ("20261129120000044", "1234567", "OTHER", "4", ("123456", "OTHER")),
            ("20261129120000045", "654321", long_mn, "4", ("654321", MN)),
        ]
        for qn, pw, mn, _, _ in cases:
            platform.send(platform_frame(f"QN={qn};ST=32;CN=1011;PW={pw};MN={mn};Flag=5;CP=&&&&"))
        # A malformed ST or CN is an ST error (5) or a CN error (8) likewise.
        platform.send(platform_frame(f"QN=20261129120000046;ST=320;CN=1011;PW=123456;MN={MN};Flag=5;CP=&&&&"))
        platform.send(platform_frame(f"QN=20261129120000047;ST=32;CN=10111;PW=123456;MN={MN};Flag=5;CP=&&&&"))
        cases += [("20261129120000046", "", "", "5", ("123456", MN)),
                  ("20261129120000047", "", "", "8", ("123456", MN))]
        for qn, _, _, code, (pw, mn) in cases:
            answer = wait_for(lambda qn=qn: [p for p in platform.packets if p.header.get("QN") == qn], 10,
                              f"the answer to QN {qn}")
            assert [(p.cn, p.items().get("QnRtn")) for p in answer] == [("9011", code)], qn
            assert (answer[0].header["PW"], answer[0].header["MN"], answer[0].header["ST"]) == (pw, mn, "91")
            assert answer[0].problems == [] and strict_check(answer[0].raw).problems == [], answer[0].raw
        # A bad QN besides: the PW error is said, under a QN of the station's own (a QN is 17 digits).
        seen = len(platform.packets)
        platform.send(platform_frame(f"QN=1;ST=32;CN=1011;PW=1234567;MN={MN};Flag=5;CP=&&&&"))
        answer = wait_for(lambda: platform.packets[seen:], 10, "the answer to the request with a bad QN")
        assert [(p.cn, p.items().get("QnRtn")) for p in answer] == [("9011", "3")]
        assert len(answer[0].header["QN"]) == 17 and strict_check(answer[0].raw).problems == []
        assert not platform.of_cn("1011"), "a refused request was executed"
    finally:
        station.close()
        platform.close()


def test_answers_and_requests_ending_in_a_bare_lf_are_taken_but_never_one_with_a_bad_crc(tmp_path):
    """Some platform software ends its packets with LF alone (or CR alone): the uplink dropped them as bad
    frames, so its 9014s never counted (each packet sent `retries` times, then the connection renewed, for
    ever) and its requests went unanswered. They are taken; a bad CRC never, nor a packet ending in CR alone
    (a packet without its end is never executed)."""
    def lf(segment: str, crc: str | None = None) -> bytes:
        good = platform_frame(segment)
        return good[:-6] + (crc.encode() if crc else good[-6:-2]) + b"\n"

    acks: list[str] = []

    def ack_with_lf(p):  # the first 9014 has a bad CRC: it must not count; the next ones are good
        if not p.flag & 1 or p.header.get("ST") == "91":
            return []
        h = p.header
        segment = f"QN={h['QN']};ST=91;CN=9014;PW=123456;MN={h['MN']};Flag=4;CP=&&&&"
        acks.append(h["QN"])
        bad = f"{(int(platform_frame(segment)[-6:-2], 16) + 1) % 0x10000:04X}"
        return [lf(segment, bad if len(acks) == 1 else None)]

    platform = IndependentPlatform(ack=ack_with_lf)
    station = Station(tmp_path, platform, timeout=0.5, retries=3)
    try:
        uplink = station.start_uplink()
        station.store("cod", T0, {"w01018": 1.0})
        station.store("cod", T0 + 1000, {"w01018": 2.0})
        wait_for(lambda: uplink.marks[STREAM_READINGS] == 2, 10, "both polls acknowledged by LF-ended 9014s")
        data = platform.of_cn("2011")
        assert [p.items()["DataTime"] for p in data] == ["20261129100000", "20261129100000", "20261129100001"]
        assert acks == [data[0].header["QN"], data[0].header["QN"], data[2].header["QN"]], "a bad CRC counted"
        assert platform.accepted == 1, "the connection was renewed"
        request = f"QN=20261129120000051;ST=32;CN=1011;PW=123456;MN={MN};Flag=5;CP=&&&&"
        platform.send(lf(request))
        platform.send(platform_frame(request.replace("0051", "0054"))[:-2] + b"\r")  # CR alone: not executed
        platform.send(lf(request.replace("0051", "0052")))
        platform.send(lf(request.replace("0051", "0053"), crc="0000"))  # bad CRC: QnRtn 9, not executed
        def answers(qn: str) -> list[str]:
            return [p.cn for p in platform.packets if p.header.get("QN") == qn]

        for qn, cns in (("20261129120000051", ["9011", "1011", "9012"]),
                        ("20261129120000052", ["9011", "1011", "9012"]), ("20261129120000053", ["9011"])):
            wait_for(lambda qn=qn, cns=cns: len(answers(qn)) >= len(cns), 10, f"the answers to QN {qn}")
            assert answers(qn) == cns, qn
        assert [p.items().get("QnRtn") for p in platform.packets if p.header.get("QN") == "20261129120000053"] == [
            "9"]
        assert answers("20261129120000054") == []
    finally:
        station.close()
        platform.close()


def test_time_requests_report_the_clock_and_never_set_it(station, platform):
    station.start_uplink()
    before = time.time()
    answer = platform.request("1011", [{"PolId": "w01018"}])
    assert [p.cn for p in answer] == ["9011", "1011", "9012"]
    reported = parse_time(answer[1].get("SystemTime"), SHANGHAI).timestamp()
    assert before - 2 <= reported <= time.time() + 1 and answer[1].get("PolId") == "w01018"
    now_text = datetime.now(SHANGHAI).strftime("%Y%m%d%H%M%S")
    agrees = platform.request("1012", [{"SystemTime": now_text}], qn="20261129120000021")
    assert [(p.cn, p.get("QnRtn") or p.get("ExeRtn")) for p in agrees] == [("9011", "1"), ("9012", "1")]
    wrong = platform.request("1012", [{"SystemTime": "20200101000000"}], qn="20261129120000022")
    assert [(p.cn, p.get("QnRtn") or p.get("ExeRtn")) for p in wrong] == [("9011", "1"), ("9012", "2")]


def test_garbage_and_bad_crc_never_kill_the_uplink(station, platform):
    uplink = station.start_uplink()
    good = encode_one(Packet(qn="20261129120000031", st="32", cn="1011", pw="123456", mn=MN, flag=5, cp=[]))
    bad_crc = good[:-6] + (b"0000" if good[-6:-2] != b"0000" else b"0001") + b"\r\n"
    # A request damaged by line noise: a bad CRC and a byte over 0x7F in its data segment
    data = f"QN=20261129120000033;ST=32;CN=1011;PW=123456;MN={MN};Flag=5;CP=&&SystemTime=2026112912000\xe9&&"
    noisy = b"##%04d" % len(data) + data.encode("latin-1") + b"0000\r\n"
    platform.send(b"\x00\xff garbage ##12 ##9999" + bad_crc + b"##0010QN=1;ST=\r\n" + bytes(range(256)) + noisy)
    answer = platform.request("1011", qn="20261129120000032")
    assert [p.cn for p in answer] == ["9011", "1011", "9012"]
    # Each bad-CRC request is answered QnRtn 9 (CRC error) with its QN, and never executed.
    for qn in ("20261129120000031", "20261129120000033"):
        assert [(p.cn, p.get("QnRtn")) for p in platform.received() if p.qn == qn] == [("9011", "9")], qn
    station.store("cod", T0, {"w01018": 5.0})
    wait_for(lambda: uplink.marks[STREAM_READINGS] == 1, 10, "delivery goes on")
    assert uplink.is_alive()


def test_answers_from_the_platform_are_never_answered(station, platform):
    """9011, 9012, 9013 (notice answer) and 9014 are answers: a platform sending one the station did not ask for
    gets no reply (a 9013 was taken for an unknown request and answered 9011 QnRtn=8: an answer to an answer,
    which a platform may answer in turn), and a malformed one (a 7-character PW) is dropped, not refused."""
    station.start_uplink()
    for n, cn in enumerate(("9011", "9012", "9013", "9014")):
        for k, pw in enumerate(("123456", "1234567")):
            cp = "QnRtn=1" if cn == "9011" else "ExeRtn=1" if cn == "9012" else ""
            platform.send(platform_frame(f"QN=202611291200009{n}{k};ST=91;CN={cn};PW={pw};MN={MN};Flag=5;CP=&&{cp}&&"))
    assert platform.request("1011", qn="20261129120000099")[-1].cn == "9012", "the next request is answered"
    answered = [(p.qn, p.cn) for p in platform.received() if p.qn and p.qn.startswith("202611291200009")
                and p.qn != "20261129120000099"]
    assert answered == []


def test_a_platform_repeating_requests_it_is_refused_logs_a_line_per_kind_not_one_each(station, platform, caplog):
    """Each refused request, unsupported CN, backfill without valid times or 1012 logged a line: a
    platform that repeats them (a hundred a minute in audit Q's fuzzing) filled the journal. Each is still
    answered; the log says each kind once, then with a count."""
    station.start_uplink()
    caplog.set_level(logging.INFO, logger="agent.uplink")
    for k in range(5):
        assert [p.get("QnRtn") for p in platform.request("1011", pw="999999", qn=f"2026112912000010{k}")] == ["3"]
        assert [p.get("QnRtn") for p in platform.request("3020", qn=f"2026112912000011{k}")] == ["8"]
        assert [p.get("QnRtn") for p in platform.request("2051", [{"BeginTime": "x"}], qn=f"2026112912000012{k}")] == [
            "2"]
        answer = platform.request("1012", [{"SystemTime": "20200101000000"}], qn=f"2026112912000013{k}")
        assert [p.get("QnRtn") or p.get("ExeRtn") for p in answer] == ["1", "2"]
    lines = [r.getMessage() for r in caplog.records if r.name == "agent.uplink"]
    for what in ("refused request", "is not supported", "without a valid BeginTime", "set the clock"):
        assert len([line for line in lines if what in line]) == 1, (what, lines)


def test_1061_reports_the_realtime_interval_and_1062_never_changes_it(tmp_path, station, platform, caplog):
    """1061 (get the real-time data interval) was refused QnRtn=8 as an unknown CN: it is answered 9011, a 1061
    packet with RtdInterval (the shortest device interval: real-time data goes out at each poll), 9012. 1062
    (set it) is a remote change of configuration, which a command never makes: answered 9011 QnRtn=1, never
    applied (nothing written, the interval stays), ExeRtn=1 only when the interval is already the one asked,
    else 2 (failed), as 1012; without a valid RtdInterval it is refused QnRtn=2."""
    station.start_uplink(rtd_interval=60.0)
    files = sorted(p.name for p in tmp_path.iterdir())

    def asked_interval(qn: str) -> list[tuple[str, str | None]]:
        answer = platform.request("1061", qn=qn)
        return [(p.cn, p.get("QnRtn") or p.get("RtdInterval") or p.get("ExeRtn")) for p in answer]

    assert asked_interval("20261129120000061") == [("9011", "1"), ("1061", "60"), ("9012", "1")]
    report = [p for p in platform.received("1061") if p.qn == "20261129120000061"][0]
    assert (report.st, report.mn, report.flag) == ("32", MN, 4)
    caplog.set_level(logging.INFO, logger="agent.uplink")
    changed = platform.request("1062", [{"RtdInterval": "30"}], qn="20261129120000062")
    assert [(p.cn, p.get("QnRtn") or p.get("ExeRtn")) for p in changed] == [("9011", "1"), ("9012", "2")]
    assert asked_interval("20261129120000063") == [("9011", "1"), ("1061", "60"), ("9012", "1")]
    same = platform.request("1062", [{"RtdInterval": "60"}], qn="20261129120000064")
    assert [(p.cn, p.get("QnRtn") or p.get("ExeRtn")) for p in same] == [("9011", "1"), ("9012", "1")]
    for qn, cp in (("20261129120000065", []), ("20261129120000066", [{"RtdInterval": "often"}])):
        assert [(p.cn, p.get("QnRtn")) for p in platform.request("1062", cp, qn=qn)] == [("9011", "2")]
    lines = [r.getMessage() for r in caplog.records if r.name == "agent.uplink"]
    assert any("RtdInterval" in line and "30" in line and "never" in line for line in lines), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == files


def test_a_reload_that_keeps_the_uplink_applies_the_new_backoff_ceiling_at_once(station, platform):
    """`apply_settings` (a reload of `mqtt.reconnect_max` or of the device intervals, the uplink kept): a backoff
    already grown past the new ceiling is cut to it, not left to wait out the old one."""
    uplink = Uplink(station.target, IDENTITY, station.path, station.recorder, reconnect_max=64.0, rtd_interval=60.0)
    try:
        for _ in range(10):
            uplink._next_backoff()
        assert uplink._next_backoff() > 16, "grown towards the old ceiling"
        uplink.apply_settings(2.0, 2.5)
        assert all(uplink._next_backoff() <= 2.0 for _ in range(5))
        assert uplink.rtd_interval == 2.5
    finally:
        uplink.discard()


def test_1061_without_a_known_interval_is_refused(station, platform):
    """An uplink not told the interval (none configured) cannot report one: 9011 QnRtn=2, not a made-up value."""
    station.start_uplink()
    assert [(p.cn, p.get("QnRtn")) for p in platform.request("1061", qn="20261129120000067")] == [("9011", "2")]


def test_a_request_with_flag_4_gets_no_request_answer_but_is_executed(station, platform, caplog):
    """Flag=4 (HJ 212-2017, A bit clear) asks for no answer: the 9011 was sent anyway. The request is executed
    (its data and 9012 are the result, not the answer) without a 9011; a refused one is logged, not answered.
    A request without Flag (HJ/T 212-2005 style) is answered as before."""
    station.start_uplink()
    caplog.set_level(logging.INFO, logger="agent.uplink")
    platform.send(encode_one(Packet(qn="20261129120000071", st="32", cn="1011", pw="123456", mn=MN, flag=4, cp=[])))
    got = wait_for(lambda: [p.cn for p in platform.received() if p.qn == "20261129120000071"] if any(
        p.cn == "9012" for p in platform.received() if p.qn == "20261129120000071") else None, 10, "the 9012")
    assert got == ["1011", "9012"]
    platform.send(encode_one(Packet(qn="20261129120000072", st="32", cn="1011", pw="999999", mn=MN, flag=4, cp=[])))
    platform.send(encode_one(Packet(qn="20261129120000073", st="32", cn="3020", pw="123456", mn=MN, flag=4, cp=[])))
    # Answered in order: once the next request's answer is here, none came for the two above.
    assert [p.cn for p in platform.request("1011", qn="20261129120000074")] == ["9011", "1011", "9012"]
    assert not [p for p in platform.received() if p.qn in ("20261129120000072", "20261129120000073")]
    lines = [r.getMessage() for r in caplog.records if r.name == "agent.uplink"]
    assert any("20261129120000072" in line and "QnRtn=3" in line and "Flag" in line for line in lines), lines
    assert any("CN=3020" in line and "Flag" in line for line in lines), lines
    for frame in encode(Packet(qn="20261129120000075", st="32", cn="1011", pw="123456", mn=MN, flag=None, cp=[])):
        platform.send(frame)
    assert wait_for(lambda: [p.cn for p in platform.received() if p.qn == "20261129120000075"] if any(
        p.cn == "9012" for p in platform.received() if p.qn == "20261129120000075") else None, 10,
        "the answer to a request without Flag") == ["9011", "1011", "9012"]


def raw_frame(segment: bytes) -> bytes:
    """A frame of `segment` as given (any bytes): its length in bytes, the CRC over its bytes."""
    return b"##%04d" % len(segment) + segment + b"%04X\r\n" % crc16(segment)


def test_a_request_with_text_that_is_not_ascii_is_refused_and_logged(station, platform, caplog):
    """A request holding Chinese text (UTF-8 or GBK) was dropped without a word of why it went unanswered
    (the frame reader gave the frame up at its first byte over 0x7F). Its length (bytes) and CRC are checked
    as for any frame; it is answered 9011 QnRtn=2 (refused), never executed, with a log line naming its CN,
    QN and the encoding; one whose PW or MN holds such text is refused for that field (3, 4), the answer
    naming the station's own. The uplink goes on."""
    uplink = station.start_uplink()
    caplog.set_level(logging.WARNING, logger="agent.uplink")
    cases = [  # QN, encoding, PW, MN, expected QnRtn
        ("20261129120000081", "utf-8", "123456", MN, "2"),
        ("20261129120000082", "gbk", "123456", MN, "2"),
        ("20261129120000083", "utf-8", "密码", MN, "3"),
        ("20261129120000084", "gbk", "123456", "站点" + MN[:10], "4"),
    ]
    for qn, encoding, pw, mn, _ in cases:
        segment = f"QN={qn};ST=32;CN=1011;PW={pw};MN={mn};Flag=5;CP=&&PolId=化学需氧量&&".encode(encoding)
        platform.send(raw_frame(segment))
    for qn, encoding, _, _, code in cases:
        answer = wait_for(lambda qn=qn: [p for p in platform.received() if p.qn == qn], 10, f"the answer to {qn}")
        assert [(p.cn, p.get("QnRtn"), p.pw, p.mn) for p in answer] == [("9011", code, "123456", MN)], encoding
    assert not platform.received("1011"), "a request with text it cannot read was executed"
    lines = [r.getMessage() for r in caplog.records if r.name == "agent.uplink"]
    assert any("20261129120000081" in line and "UTF-8" in line and "CN=1011" in line for line in lines), lines
    assert any("20261129120000082" in line and "not UTF-8" in line for line in lines), lines
    assert "密码" not in " ".join(lines)
    station.store("cod", T0, {"w01018": 5.0})
    wait_for(lambda: uplink.marks[STREAM_READINGS] == 1, 10, "delivery goes on")
    assert [p.cn for p in platform.request("1011", qn="20261129120000085")] == ["9011", "1011", "9012"]


def test_a_9014_with_an_over_long_pw_is_not_taken_and_said_clearly(tmp_path, caplog):
    """A 9014 whose PW is over 6 characters (a platform configured with a longer password) was dropped with a
    generic "bad frame" line: the station then sent the packet again for no reason it said. It is still not
    taken (a malformed packet is never acted on) and never answered (an answer is not answered), but the log
    names the 9014, its QN and the field; the packet goes again and nothing is lost."""
    bad_acks: list[str] = []

    def ack(p):
        h = p.header
        pw = "123456"
        if not bad_acks:
            bad_acks.append(h["QN"])
            pw = "1234567"
        return [platform_frame(f"QN={h['QN']};ST=91;CN=9014;PW={pw};MN={h['MN']};Flag=4;CP=&&&&")]

    platform = IndependentPlatform(ack=ack)
    station = Station(tmp_path, platform, timeout=3.0, retries=2)  # the good 9014 comes well within 3 s
    try:
        uplink = station.start_uplink()
        with caplog.at_level(logging.WARNING, logger="agent.uplink"):
            station.store("cod", T0, {"w01018": 5.0})
            wait_for(lambda: uplink.marks[STREAM_READINGS] == 1, 15, "the reading acknowledged")
        lines = [m for m in caplog.messages if bad_acks[0] in m and "9014" in m]
        assert lines and "PW" in lines[0] and "not taken" in lines[0], caplog.messages
        assert "1234567" not in " ".join(caplog.messages)
        assert len(platform.of_cn("2011")) == 2  # sent again once, then acknowledged
        assert not [p for p in platform.packets if p.header.get("ST") == "91"], "an answer was answered"
    finally:
        station.close()
        platform.close()
