"""The bus poller's schedule as pure logic, on a clock the test advances (poll costs are given, not slept):
which device is served next, that the bus never idles while a device is due, that a late poll skips the
slots it missed and says how many, and that a device keeps its phase when the bus keeps up. The poller
with real slaves on a real line is in tests/integration/test_modbus.py."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from harness import wait_for

from agent.model import Reading
from agent.poller import BusPoller, Schedule, _OverrunReport
from agent.runtime import DeviceProblems
from drivers.simulated import SimChannelSpec, SimulatedDriver


def run(devices: dict[str, tuple[float, float]], horizon: float):
    """Serve `devices` {name: (cost of a poll, interval)} on one bus until `horizon`, as BusPoller does.
    Returns the poll start times per device, the time the bus sat idle, and the slots missed per device."""
    names = list(devices)
    schedule = Schedule([devices[n][1] for n in names], start=0.0)
    polls: dict[str, list[float]] = {n: [] for n in names}
    missed = dict.fromkeys(names, 0)
    now, idle = 0.0, 0.0
    while now < horizon:
        i = schedule.next()
        if schedule.ready[i] > now:
            assert schedule.quiet_until() == schedule.ready[i] > now, "nothing is due while the bus waits"
            idle += schedule.ready[i] - now
            now = schedule.ready[i]
            continue
        started = now
        now += devices[names[i]][0]
        polls[names[i]].append(started)
        missed[names[i]] += schedule.done(i, started, now)[1]
    return polls, idle, missed


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def test_the_audit_bus_alternates_and_never_idles():
    # A silent slave (timeout 1 s x 2 tries) and a healthy one, both every 1 s: the bus is overrun. The
    # healthy one is polled once per silent poll (2 s), never once per silent poll + interval (3 s).
    polls, idle, missed = run({"dead": (2.0, 1.0), "good": (0.001, 1.0)}, 30)
    assert idle == 0
    assert max(gaps(polls["good"])) == pytest.approx(2.0, abs=0.01)
    assert len(polls["good"]) >= len(polls["dead"]) - 1
    # one reading per 2 s where 1 per s was asked: one missed slot per poll, for both
    assert missed["good"] >= len(polls["good"]) - 1
    assert missed["dead"] >= len(polls["dead"]) - 1


@pytest.mark.parametrize("silent_interval", [0.1, 0.3, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("healthy_interval", [0.1, 0.2, 0.5, 1.0, 1.5])
@pytest.mark.parametrize("healthy_first", [True, False])
def test_a_healthy_device_waits_at_most_one_silent_poll(silent_interval, healthy_interval, healthy_first):
    cost = 0.4  # timeout 0.2 x 2 tries
    devices = {"dead": (cost, silent_interval), "good": (0.002, healthy_interval)}
    if healthy_first:
        devices = {"good": devices["good"], "dead": devices["dead"]}
    polls, _, _ = run(devices, 40)
    assert max(gaps(polls["good"])) <= cost + healthy_interval + 0.01, "timeout x tries + its interval"
    assert len(polls["good"]) >= 40 / (cost + healthy_interval) - 1


def test_a_bus_that_keeps_up_keeps_every_device_on_its_slots():
    # 0.4 s of silent poll every 2 s leaves room: the healthy device is late by at most one silent poll
    # and never misses a slot, and its average interval is its own.
    polls, idle, missed = run({"dead": (0.4, 2.0), "good": (0.002, 0.5)}, 60)
    assert missed == {"dead": 0, "good": 0}
    assert idle > 0
    good = polls["good"]
    assert len(good) == 120, "one poll per slot 0, 0.5, ... 59.5"
    assert all(0 <= t - k * 0.5 <= 0.4 + 0.002 + 1e-9 for k, t in enumerate(good)), "late by one silent poll at most"


def test_equally_overdue_devices_are_served_least_recently_served_first():
    schedule = Schedule([1.0, 1.0, 1.0], start=0.0)
    order = []
    now = 0.0
    for _ in range(6):
        i = schedule.next()
        order.append(i)
        schedule.done(i, now, now + 1.0)  # each poll takes a whole interval: all stay due
        now += 1.0
    assert order == [0, 1, 2, 0, 1, 2]


def test_a_late_poll_reports_how_late_and_skips_the_missed_slots():
    schedule = Schedule([1.0], start=10.0)
    assert schedule.done(0, 10.2, 10.3) == (pytest.approx(0.2), 0)
    assert schedule.ready[0] == 11.0
    late, missed = schedule.done(0, 13.5, 13.6)  # slots 11, 12, 13 went by: one poll serves them
    assert (late, missed) == (pytest.approx(2.5), 2)
    assert schedule.slot[0] == 14.0 and schedule.ready[0] == 14.0
    late, missed = schedule.done(0, 14.0, 15.5)  # a poll longer than the interval: due again at its end
    assert (late, missed) == (0.0, 0)
    assert schedule.slot[0] == 15.0 and schedule.ready[0] == 15.5
    assert schedule.quiet_until() == 15.5


def test_overrun_lines_are_rate_limited_with_the_count_in_between(caplog):
    report = _OverrunReport("rs485", "cod", 1.0, every_s=60)
    with caplog.at_level(logging.WARNING, logger="agent.poller"):
        report.note(2.0, 2, now=100.0)
        for k in range(10):
            report.note(1.5, 1, now=101.0 + k)
        report.note(1.2, 1, now=161.0)
    assert len(caplog.messages) == 2
    assert "bus rs485: device cod polled 2.0 s late (interval 1 s), 2 poll(s) missed" in caplog.messages[0]
    assert "11 poll(s) missed in the last 61 s, up to 1.5 s late" in caplog.messages[1]


def test_a_poller_that_replaces_another_keeps_each_devices_interval():
    """A reload rebuilds the pollers: the new one polls a device when its interval since the last poll
    is up, not at once (a burst of SIGHUPs polled a 5 s device every 50 ms)."""
    readings: list[Reading] = []
    first = BusPoller("b", [SimulatedDriver("d", 5.0, [SimChannelSpec(code="c")])], readings.extend)
    first.start()
    wait_for(lambda: readings, 5, "the first poll")
    first.stop()
    first.join(5)
    last = first.last_polls()
    assert set(last) == {"d"} and last["d"] <= time.monotonic()
    second = BusPoller("b", [SimulatedDriver("d", 5.0, [SimChannelSpec(code="c")])], readings.extend, resume=last)
    second.start()
    try:
        wait_for(lambda: second.quiet_until > 0, 5, "the second poller scheduled")
        assert second.quiet_until == pytest.approx(last["d"] + 5.0), "its next poll: 5 s after the last one"
        assert len(readings) == 1, "not polled again at once"
        assert second.last_polls() == last, "what it hands on before its own first poll"
    finally:
        second.stop()
        second.join(5)


def test_a_poller_hands_on_only_its_own_devices_last_polls():
    """The runtime merges every poller's `last_polls()`: a poller that handed on the others' (stale)
    times too made a device on another bus poll again at every second reload."""
    poller = BusPoller("b", [SimulatedDriver("mine", 5.0, [SimChannelSpec(code="c")])], lambda _: None,
                       resume={"other": 1.0, "mine": 2.0})
    assert poller.last_polls() == {"mine": 2.0}


def test_device_problems_are_written_only_when_they_change_and_forgotten_with_the_device():
    """`status` reads why each device fails from the buffer's meta: one write per change, not per poll."""
    written: list[tuple[str, str]] = []
    problems = DeviceProblems(lambda key, value: written.append((key, value)))
    assert written == [("device_problems", "{}")], "what a previous run left is cleared at start"
    problems.note("cod", None)
    problems.note("cod", "no answer, after 2 tries")
    problems.note("cod", "no answer, after 2 tries")
    problems.note("pm", "no valid frame in the last interval")
    assert problems.failing() == ["cod", "pm"]
    problems.note("cod", None)
    problems.keep_only({"cod"})
    assert [value for _, value in written] == [
        "{}", '{"cod":"no answer, after 2 tries"}',
        '{"cod":"no answer, after 2 tries","pm":"no valid frame in the last interval"}',
        '{"pm":"no valid frame in the last interval"}', "{}"]
    assert problems.failing() == []


class _SlowDriver:
    """A device whose poll holds the bus until the test releases it (a silent slave's timeout)."""

    def __init__(self, device_id: str):
        self.device_id, self.interval = device_id, 1.0
        self.polling, self.release = threading.Event(), threading.Event()
        self.closed_at: float | None = None

    def poll(self, ts_ms: int) -> list[Reading]:
        self.polling.set()
        self.release.wait(10)
        return []

    def close(self) -> None:
        self.closed_at = time.monotonic()


class _LinkDriver(_SlowDriver):
    """A device that opens its link by itself when its poller begins (`start()`), as a serial line does."""

    def __init__(self, device_id: str):
        super().__init__(device_id)
        self.release.set()
        self.started_at: float | None = None

    def start(self) -> None:
        self.started_at = time.monotonic()


def test_a_poller_that_replaces_another_opens_the_link_only_once_the_other_has_ended_its_poll():
    """A reload that changes a bus: the old poller may be in a poll that holds the wire; the new one
    waits for it to end (and close its link) before opening the link, then serves the device the old
    one never reached before the one it last polled."""
    slow = _SlowDriver("silent")
    old = BusPoller("b", [slow, _SlowDriver("healthy")], lambda _: None)
    old.start()
    wait_for(slow.polling.is_set, 5, "the old poller in its slow poll")
    old.stop()
    silent, healthy = _LinkDriver("silent"), _LinkDriver("healthy")
    served: list[str] = []
    silent.poll = lambda ts: served.append("silent") or []  # type: ignore[method-assign]
    healthy.poll = lambda ts: served.append("healthy") or []  # type: ignore[method-assign]
    new = BusPoller("b", [silent, healthy], lambda _: None, predecessors=[old])
    new.start()
    try:
        time.sleep(0.3)  # the new poller waiting (nothing to wait on: it must not act)
        assert silent.started_at is None and not served, "nothing opened nor polled while the old poll runs"
        assert new.last_progress <= old.last_progress + 0.5, "its progress is the old poller's meanwhile"
        slow.release.set()
        wait_for(lambda: served, 5, "the new poller's first poll")
        assert slow.closed_at is not None and silent.started_at is not None and slow.closed_at <= silent.started_at
        assert served[0] == "healthy", "the device the old poller never polled goes first"
    finally:
        new.stop()
        new.join(5)
    assert not old.is_alive()


def test_a_poller_stopped_before_it_began_hands_on_its_predecessors_last_polls():
    """Two reloads in a row: the poller of the first is stopped while it waits; the third waits for both
    and keeps each device to its interval since the first poller's last poll."""
    first = BusPoller("b", [SimulatedDriver("d", 5.0, [SimChannelSpec(code="c")])], lambda _: None)
    first.start()
    wait_for(lambda: first.last_polls(), 5, "the first poll")
    first.stop()
    first.join(5)
    second = BusPoller("b", [SimulatedDriver("d", 5.0, [SimChannelSpec(code="c")])], lambda _: None,
                       predecessors=[first])
    assert second.last_polls() == first.last_polls()

