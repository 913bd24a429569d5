"""A read of the buffer that fails once (an I/O error, a busy file) is tried again by the publisher on its
own: the readings it was about to publish do not wait for the next commit, which on a quiet station (an
analyzer polled hourly, or the drain of a stop: polling has ended) may be far off or never come. Real
mosquitto, a real buffer file, the real recorder and publisher threads; the one failure is injected."""

from __future__ import annotations

import sqlite3

from harness import Broker, Collector, wait_for, wired_publisher

from agent.buffer import Buffer
from agent.model import Reading

T0 = 1_700_000_000_000


def test_a_read_that_failed_once_is_tried_again_without_waiting_for_a_commit(tmp_path, monkeypatch):
    broker = Broker(tmp_path / "broker").start()
    collector = Collector(broker, "env/ST1/data")
    path = tmp_path / "buffer.db"
    writer = Buffer.open_writer(path)
    recorder, publisher = wired_publisher(writer, path, broker.port, commit_interval_ms=50, max_mb=64,
                                          client_id="retry", reconnect_max=2)
    failures = []
    real_read = Buffer.readings_json

    def read_failing_once(self, *args, **kwargs):
        if not failures and self is not writer:
            failures.append(args)
            raise sqlite3.OperationalError("disk I/O error")
        return real_read(self, *args, **kwargs)

    recorder.start()
    publisher.start()
    try:
        wait_for(lambda: publisher.online, 10, "connected")
        monkeypatch.setattr(Buffer, "readings_json", read_failing_once)
        recorder.submit([Reading("cod", "w01018", T0 + i, float(i), "mg/L", "N") for i in range(10)])
        recorder.flush()  # the last commit for a long while: nothing else is stored after it
        wait_for(lambda: failures, 10, "the read that fails")
        wait_for(lambda: publisher.acked_upto() == 10, 15, "the ten readings acknowledged without another commit")
        # The broker's PUBACK can come before it has delivered the message to a subscriber (the full
        # suite on 2 cores once saw the collector still empty at this point): wait for it.
        wait_for(lambda: set(range(1, 11)) <= set(collector.reading_seqs()), 10, "the ten readings delivered")
    finally:
        collector.close()
        publisher.stop()
        recorder.stop()
        writer.close()
        broker.stop()
