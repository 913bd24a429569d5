"""A command whose handling fails inside the agent (the `status` command on a buffer that cannot be read)
is answered `ok:false` each time, and its traceback is logged once a minute, not once per command:
anyone allowed to publish on P/cmd could otherwise fill the journal with tracebacks. Real mosquitto, a
real buffer file, the real recorder and publisher threads; the failing status is the station's."""

from __future__ import annotations

import json
import logging
import sqlite3

from harness import Broker, Collector, wait_for, wired_publisher

from agent.buffer import Buffer


def test_a_command_failing_inside_is_answered_each_time_and_logged_once(tmp_path, caplog):
    broker = Broker(tmp_path / "broker").start()
    replies = Collector(broker, "env/ST1/cmd/reply")
    path = tmp_path / "buffer.db"
    writer = Buffer.open_writer(path)
    recorder, publisher = wired_publisher(writer, path, broker.port, commit_interval_ms=50, max_mb=64,
                                          client_id="cmd-errors", reconnect_max=2)

    def damaged_status() -> dict:
        raise sqlite3.DatabaseError("database disk image is malformed")

    publisher.status_provider = damaged_status
    recorder.start()
    publisher.start()
    try:
        wait_for(lambda: publisher.online, 10, "connected")
        with caplog.at_level(logging.ERROR, logger="agent.publisher"):
            for i in range(50):
                replies.client.publish("env/ST1/cmd", json.dumps({"id": i, "cmd": "status"}), qos=1)
            wait_for(lambda: len(replies.json_messages()) == 50, 20, "an answer to each status command")
        assert all(r["ok"] is False and r["error"] == "internal error: DatabaseError"
                   for r in replies.json_messages())
        failed = [r for r in caplog.records if "command" in r.getMessage() and "failed" in r.getMessage()]
        assert len(failed) == 1 and failed[0].exc_info is not None, [r.getMessage() for r in failed]
    finally:
        replies.close()
        publisher.stop()
        recorder.stop()
        writer.close()
        broker.stop()
