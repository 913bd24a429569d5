"""The recorder's group commit with real pollers, simulated instruments and a real buffer file: it
writes at once when no poller will hand over readings within its window, and waits for those that will."""

from __future__ import annotations

import threading
import time

from harness import wait_for

from agent.buffer import Buffer
from agent.model import Reading
from agent.poller import BusPoller
from agent.recorder import Recorder
from drivers.simulated import SimChannelSpec, SimulatedDriver


class FailingDriver:
    """A device whose every poll is a driver bug: due all the time, never hands anything over."""

    device_id = "broken"
    interval = 0.05

    def poll(self, ts_ms: int) -> list[Reading]:
        raise RuntimeError("driver bug")

    def close(self) -> None:
        pass


def sim(device: str, interval: float = 1.0) -> SimulatedDriver:
    return SimulatedDriver(device, interval, [SimChannelSpec(f"c{i}", "mg/L", mean=10.0 + i) for i in range(4)])


class Station:
    """A recorder on a real file and pollers wired to it as the runtime wires them."""

    def __init__(self, tmp_path, commit_interval_ms: int):
        self.buffer = Buffer.open_writer(tmp_path / "buffer.db")
        self.recorder = Recorder(self.buffer, commit_interval_ms=commit_interval_ms, keep_sent_days=7, max_mb=10)
        self.pollers: list[BusPoller] = []
        self.recorder.set_quiet_check(lambda deadline: all(p.quiet_until >= deadline for p in self.pollers))
        self.batches: list[list[Reading]] = []
        self._lock = threading.Lock()
        self.recorder.add_stored_listener(self._stored)
        self.recorder.start()

    def _stored(self, batch: list[Reading]) -> None:
        with self._lock:
            self.batches.append(batch)

    def add_poller(self, name: str, driver) -> BusPoller:
        poller = BusPoller(name, [driver], self.recorder.submit)
        self.pollers.append(poller)
        poller.start()
        return poller

    def devices_per_batch(self) -> list[set[str]]:
        with self._lock:
            return [{r.device for r in batch} for batch in self.batches]

    def close(self) -> None:
        for p in self.pollers:
            p.stop()
        for p in self.pollers:
            p.join(10)
        self.recorder.stop()
        self.buffer.close()


def test_a_commit_does_not_wait_for_a_window_no_poll_falls_into(tmp_path):
    station = Station(tmp_path, commit_interval_ms=10_000)
    try:
        station.add_poller("sim:a", sim("a", interval=20.0))
        # The next poll is 20 s away, after the 10 s window: the first one is written at once.
        wait_for(lambda: station.batches, 5, "the first poll committed")
        reader = Buffer.open_reader(tmp_path / "buffer.db")
        assert reader.stream_state()[0] == 4
        reader.close()
    finally:
        station.close()


def test_a_commit_waits_for_a_poller_due_within_the_window(tmp_path):
    station = Station(tmp_path, commit_interval_ms=600)
    try:
        station.add_poller("sim:a", sim("a"))
        time.sleep(0.15)  # b's polls come 150 ms after a's: inside a's window
        station.add_poller("sim:b", sim("b"))
        wait_for(lambda: len(station.batches) >= 5, 15, "five commits")
        # The first two commits precede b's first poll or follow it alone; from then on, a's window
        # waits for b's poll 150 ms later (committing at once would split every second in two).
        assert station.devices_per_batch()[2:5] == [{"a", "b"}] * 3, "both devices' polls in each commit"
    finally:
        station.close()


def test_a_poller_that_never_delivers_holds_a_commit_no_longer_than_the_window(tmp_path):
    station = Station(tmp_path, commit_interval_ms=300)
    try:
        station.add_poller("bus:broken", FailingDriver())
        station.add_poller("sim:a", sim("a", interval=0.5))
        wait_for(lambda: len(station.batches) >= 3, 10, "three commits despite a bus that is always due")
        assert all(batch and {r.device for r in batch} == {"a"} for batch in station.batches)
    finally:
        station.close()
