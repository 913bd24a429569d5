"""A resend by time scans a large buffer a little per turn of the publisher's loop, which then does not
wait between turns; a turn that cannot read the buffer at all (the recorder rescuing or putting back its
file: no reader to open) must not leave the loop turning without waiting, at 100 % of a core, for as
long as that lasts. Real mosquitto, a real buffer file, the real recorder and publisher threads; the
file the recorder writes elsewhere is injected (its identity and `open_reader`)."""

from __future__ import annotations

import json
import os
import time

from harness import Broker, Collector, wait_for, wired_publisher

from agent import publisher as publisher_module
from agent.buffer import Buffer, BufferError
from agent.model import STREAM_READINGS, Reading
from agent.recorder import Recorder

T0 = 1_700_000_000_000


def thread_cpu_s(native_id: int) -> float:
    """User + system CPU seconds of one thread of this process."""
    with open(f"/proc/self/task/{native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_resend_by_time_whose_buffer_cannot_be_opened_does_not_spin(tmp_path, monkeypatch):
    monkeypatch.setattr(publisher_module, "RESEND_SCAN_SEQS", 20)  # a scan of many turns
    monkeypatch.setattr(publisher_module, "RESEND_SCAN_S", 0.002)
    path = tmp_path / "buffer.db"
    writer = Buffer.open_writer(path)
    writer.begin()
    stored = writer.insert_readings([Reading("cod", "w01018", T0 + i * 1000, 1.0, "mg/L", "N")
                                     for i in range(100_000)])
    writer.set_sent_upto(STREAM_READINGS, stored[-1].seq)
    writer.commit()
    broker = Broker(tmp_path / "broker").start()
    collector = Collector(broker, "env/ST1/#")
    recorder, publisher = wired_publisher(writer, path, broker.port, commit_interval_ms=50, max_mb=256,
                                          client_id="spin", reconnect_max=2)
    recorder.start()
    publisher.start()
    try:
        wait_for(lambda: publisher.online, 10, "connected")
        # A range no stored reading lies in: the whole buffer is scanned, 20 seqs a step.
        collector.client.publish("env/ST1/cmd", json.dumps({"id": "t1", "cmd": "resend",
                                                             "from_ts": "2030-01-01T00:00:00Z",
                                                             "to_ts": "2030-01-02T00:00:00Z"}), qos=1)
        wait_for(lambda: publisher._resends and publisher._resends[0].after > 2000, 10, "the scan under way")
        real_identity = Recorder.file_identity
        monkeypatch.setattr(Recorder, "file_identity", lambda self: (0, 0))  # a rescue under way

        def cannot_open(self):
            raise BufferError("another file stands at the path")

        monkeypatch.setattr(Recorder, "open_reader", cannot_open)
        time.sleep(0.3)  # (the turn under way ends)
        before = thread_cpu_s(publisher.native_id)
        time.sleep(1.0)
        used = thread_cpu_s(publisher.native_id) - before
        assert used < 0.3, f"the publisher used {used:.2f} s of CPU in 1 s with no buffer to read"
        monkeypatch.setattr(Recorder, "file_identity", real_identity)
        monkeypatch.undo()
        wait_for(lambda: any(r.get("id") == "t1" for r in collector.json_messages("/cmd/reply")), 30,
                 "the resend answered once the file can be read again")
    finally:
        collector.close()
        publisher.stop()
        recorder.stop()
        writer.close()
        broker.stop()
