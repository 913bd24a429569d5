"""The test harness itself: what a failed test leaves running is ended with it."""

from __future__ import annotations

from harness import Broker, kill_leftovers


def test_a_broker_a_failed_test_did_not_stop_ends_with_the_test(tmp_path):
    """Tests stop their brokers after the assertions (test_buffer_damaged_running.py, say): one that
    failed left its mosquitto running for good (a dozen of them on the shared machine after a few runs)."""
    broker = Broker(tmp_path / "broker").start()
    proc = broker.proc
    assert proc is not None
    kill_leftovers()  # what the autouse fixture does after every test
    assert proc.poll() is not None, "mosquitto still running after the test"
    broker.stop()  # a test's own stop afterwards is harmless
