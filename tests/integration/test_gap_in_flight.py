"""A gap means loss (SPEC §3): readings the broker may have received are never announced as dropped.
Real mosquitto, a relay that can withhold the broker's answers and cut the link, a real buffer file
with a small size cap, the real recorder and publisher threads (in process)."""

from __future__ import annotations

import socket
import threading
import time

from harness import Broker, Collector, free_port, wait_for, wired_publisher

from agent.buffer import Buffer
from agent.model import Reading

T0 = 1_700_000_000_000


class Relay:
    """TCP from `port` to the broker. `hold_answers`: what the broker sends is not passed on (PUBACKs
    withheld); `cut()`: every connection closed and new ones refused until `restore()`."""

    def __init__(self, port: int, broker_port: int):
        self.broker_port = broker_port
        self.hold_answers = threading.Event()
        self._open = True
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._open:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.broker_port))
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, answers: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                while answers and self.hold_answers.is_set() and self._open:  # held, then dropped at a cut
                    time.sleep(0.01)
                if not data or not self._open:
                    return
                dst.sendall(data)
        except OSError:
            return

    def cut(self) -> None:
        self._open = False
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def restore(self) -> None:
        self.hold_answers.clear()
        self._open = True

    def close(self) -> None:
        self.cut()
        self._listener.close()


def test_readings_in_flight_when_the_link_dropped_are_not_evicted_as_a_gap(tmp_path):
    """The publisher's cursor fell back to the watermark as soon as the link dropped, and with it what
    the size cap's eviction keeps as "in flight" (`Publisher.in_flight_upto`, whose docstring says it
    stays until the next connection starts over): the readings published but not yet acknowledged were
    the first the cap dropped, and announced as a gap, though the broker had them. Here the broker
    passes 1000 readings on to a subscriber while its PUBACKs are withheld, the link is cut, and the
    station goes on storing until the cap drops readings: the gap must not name any of those 1000."""
    broker = Broker(tmp_path / "broker").start()
    port = free_port()
    relay = Relay(port, broker.port)
    collector = Collector(broker, "env/ST1/data")
    path = tmp_path / "buffer.db"
    writer = Buffer.open_writer(path, max_mb=1)
    recorder, publisher = wired_publisher(writer, path, port, commit_interval_ms=100, max_mb=1,
                                          client_id="gap", max_batch=100, reconnect_max=2)
    recorder.start()
    publisher.start()
    seq = 0

    def store(n: int) -> None:
        nonlocal seq
        recorder.submit([Reading("d", "c", T0 + seq + i, float(seq + i), "mg/L", "N") for i in range(n)])
        seq += n

    try:
        wait_for(lambda: publisher.online, 10, "connected")
        relay.hold_answers.set()
        store(1000)
        wait_for(lambda: set(range(1, 1001)) <= set(collector.reading_seqs()), 20, "the broker passing them on")
        assert publisher.acked_upto() == 0, "no PUBACK reached the agent"
        relay.cut()
        wait_for(lambda: not publisher.online, 10, "the publisher offline")
        deadline = time.monotonic() + 60
        while recorder.gaps_recorded == 0:  # offline: the cap drops the oldest unpublished readings
            assert time.monotonic() < deadline, "the size cap never dropped readings"
            store(2000)
            recorder.flush()
        relay.restore()
        gaps = wait_for(lambda: [m["gap"] for m in collector.json_messages("/data") if "gap" in m], 60,
                        "the gap announced")
        received_before_the_cut = set(range(1, 1001))
        for first, last in gaps:
            assert not received_before_the_cut & set(range(first, last + 1)), \
                f"gap {first}..{last} names readings the broker had received"
    finally:
        collector.close()
        publisher.stop()
        recorder.stop()
        writer.close()
        relay.close()
        broker.stop()
