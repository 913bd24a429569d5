"""A reading is marked sent only after the broker's PUBACK (SPEC §3), also on a connection that lives
long enough for paho's message ids to wrap around (65535 messages). Real mosquitto, a real buffer file,
the real recorder and publisher threads (in process, so that the count of messages is exact)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from harness import LIVE_PROCESSES, Broker, Collector, free_port, wait_for, wired_publisher

from agent.buffer import Buffer
from agent.model import Reading
from agent.publisher import BrokerSettings, Publisher
from agent.recorder import Recorder

T0 = 1_700_000_000_000


def relay(port: int, broker: Broker) -> subprocess.Popen:
    """socat carrying one connection from `port` to the broker: SIGSTOP freezes that link, SIGKILL cuts it
    (with whatever it had not passed on yet); a new one is started for the next connection."""
    deadline = time.monotonic() + 30
    while True:
        proc = subprocess.Popen(["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr",
                                 f"TCP:127.0.0.1:{broker.port}"])
        LIVE_PROCESSES.append(proc)
        while proc.poll() is None and time.monotonic() < deadline:
            if subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout:
                return proc
            time.sleep(0.05)
        # socat could not bind (free_port's ports are below the ephemeral range, so no connection of the
        # publisher can hold it as its source; something else may for a moment): again.
        assert time.monotonic() < deadline, "socat not listening within 30 s"


def test_a_message_is_never_taken_as_acknowledged_by_the_puback_of_an_earlier_one_with_its_mid(tmp_path):
    """paho numbers a connection's messages 1..65535 and starts again. The birth status is published
    before the window is reset at connection, so its PUBACK came for a mid the publisher no longer
    tracked, and was kept as an "early" acknowledgement: the data message that got that mid 65535
    messages later was marked sent as it was published, before any PUBACK. Here the link to the broker
    is frozen when that message goes out, then cut: the reading never reached the broker, yet the
    publisher had moved its watermark over it, and it was never published again."""
    broker = Broker(tmp_path / "broker").start()
    port = free_port()
    link = relay(port, broker)
    path = tmp_path / "buffer.db"
    writer = Buffer.open_writer(path)
    backlog = 65_534  # with the subscription (mid 1) and the birth (mid 2): the last data message gets mid 1
    writer.begin()
    writer.insert_readings([Reading("d", "c", T0 + i, float(i), "mg/L", "N") for i in range(backlog)])
    writer.commit()
    recorder, publisher = wired_publisher(writer, path, port, commit_interval_ms=100, max_mb=512,
                                          client_id="acks", max_batch=1)
    recorder.start()
    publisher.start()
    collector = None
    try:
        wait_for(lambda: publisher.acked_upto() == backlog, 120, "the backlog acknowledged")
        collector = Collector(broker, "env/ST1/data")
        os.kill(link.pid, signal.SIGSTOP)  # nothing passes from now on: no PUBACK can come
        recorder.submit([Reading("d", "c", T0 + backlog, 1.0, "mg/L", "N")])  # seq 65535: mid 2 again
        wait_for(lambda: publisher.in_flight_upto() == backlog + 1, 10, "the new reading published")
        link.kill()  # the message is lost with the link
        link.wait()
        assert publisher.acked_upto() == backlog, "marked sent without a PUBACK"
        link = relay(port, broker)
        wait_for(lambda: backlog + 1 in collector.reading_seqs(), 30, "the reading delivered after the restart")
    finally:
        if collector is not None:
            collector.close()
        publisher.stop()
        recorder.stop()
        writer.close()
        link.kill()
        link.wait()
        broker.stop()


def test_a_publish_that_fails_on_a_dead_socket_leaves_the_window_empty_without_an_error(tmp_path):
    """The socket dies under a publish (the write fails: paho reports the connection lost): the
    publisher drops the connection, which forgets the window, this message included. Taking the message
    back out of the emptied window then raised IndexError in the middle of the fill (caught further up
    only because the client was gone by then)."""
    import socket

    broker = Broker(tmp_path / "broker").start()
    path = tmp_path / "buffer.db"
    writer = Buffer.open_writer(path)
    writer.begin()
    writer.insert_readings([Reading("d", "c", T0 + i, float(i), "mg/L", "N") for i in range(50)])
    writer.commit()
    recorder = Recorder(writer, commit_interval_ms=100, keep_sent_days=7, max_mb=64)
    publisher = Publisher(BrokerSettings(urls=[broker.url], client_id="dead", station_id="ST1", max_batch=10),
                          str(path), recorder)
    try:
        assert publisher._connect_once() and publisher.online  # the publisher's own steps, in this thread
        publisher._open_reader()
        publisher.client.socket().shutdown(socket.SHUT_RDWR)  # the link dies: the next write fails
        publisher._publish_readings("env/ST1/data")
        assert publisher.client is None and not publisher.online
        assert not publisher._inflight["readings"] and publisher._cursor["readings"] == 0, \
            "the next connection publishes again from the watermark"
    finally:
        publisher._drop_reader()
        writer.close()
        broker.stop()
