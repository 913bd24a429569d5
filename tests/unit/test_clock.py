"""Clock step detection (pure logic with injected clocks) and the kernel's synchronisation state."""

from __future__ import annotations

from agent.clock import EARLIEST_PLAUSIBLE, AgeClock, ClockWatch, kernel_synchronised


class FakeClocks:
    def __init__(self):
        self.wall = 1_800_000_000.0
        self.mono = 100.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def make_watch(clocks: FakeClocks) -> ClockWatch:
    return ClockWatch(wall=lambda: clocks.wall, mono=lambda: clocks.mono, synchronised=lambda: True)


def test_steady_clock_reports_no_step():
    clocks = FakeClocks()
    watch = make_watch(clocks)
    for _ in range(10):
        clocks.advance(5)
        assert watch.check() is None
    assert watch.state()["last_step_s"] is None


def test_backward_and_forward_steps_are_reported_with_their_size():
    clocks = FakeClocks()
    watch = make_watch(clocks)
    clocks.advance(5)
    clocks.wall -= 3600  # NTP pulls a clock that ran an hour fast back
    step = watch.check()
    assert step is not None and round(step.seconds) == -3600
    clocks.advance(5)
    assert watch.check() is None, "a step is reported once"
    clocks.wall += 120
    assert round(watch.check().seconds) == 120
    assert round(watch.state()["last_step_s"]) == 120


def test_small_drift_is_not_a_step():
    clocks = FakeClocks()
    watch = make_watch(clocks)
    clocks.advance(5)
    clocks.wall += 0.5
    assert watch.check() is None


def test_implausible_wall_clock_is_flagged():
    clocks = FakeClocks()
    clocks.wall = 86400.0  # 1970: a Pi that booted without network
    assert make_watch(clocks).state()["plausible"] is False


def test_kernel_synchronisation_state_can_be_read():
    assert kernel_synchronised() in (True, False, None)


def make_age_clock(clocks: FakeClocks) -> AgeClock:
    return AgeClock(wall_ms=lambda: int(clocks.wall * 1000), mono=lambda: clocks.mono)


def test_the_age_clock_does_not_follow_a_forward_step_and_follows_a_backward_one():
    clocks = FakeClocks()
    age = make_age_clock(clocks)
    assert age.now_ms() == clocks.wall * 1000
    clocks.advance(600)
    assert age.now_ms() == clocks.wall * 1000, "a steady clock is the wall clock"
    start = clocks.wall
    clocks.wall += 3 * 86_400  # set three days ahead by mistake
    clocks.advance(600)
    assert age.now_ms() == (start + 600) * 1000, "only the 600 s that passed"
    clocks.advance(600)
    assert age.now_ms() == (start + 1200) * 1000
    clocks.wall = start + 1800 - 3600  # corrected, and an hour too far back
    clocks.mono += 600
    assert age.now_ms() == (start - 1800) * 1000, "a step back is followed at once"
    clocks.advance(600)
    assert age.now_ms() == (start - 1200) * 1000


def test_the_age_clock_takes_the_first_plausible_time_as_it_is():
    clocks = FakeClocks()
    clocks.wall = 30.0  # a Pi without RTC, before NTP
    age = make_age_clock(clocks)
    assert age.now_ms() == 30_000
    clocks.advance(60)
    clocks.wall = EARLIEST_PLAUSIBLE + 86_400 * 700  # NTP sets it
    assert age.now_ms() == clocks.wall * 1000
    clocks.advance(60)
    clocks.wall += 86_400  # a day ahead from now on: not followed
    assert age.now_ms() == (clocks.wall - 86_400) * 1000


class PreemptedClocks:
    """One real time read through a wall and a monotonic clock; `preempt_after_wall` makes the real time
    jump on by that much right after the next wall-clock read, as when the thread is descheduled (or waits
    for the GIL) between its two reads on a loaded machine."""

    def __init__(self):
        self.real = 1_800_000_000.0
        self.offset = 0.0  # the wall clock's step
        self.preempt_after_wall = 0.0

    def wall(self) -> float:
        value = self.real + self.offset
        self.real += self.preempt_after_wall
        self.preempt_after_wall = 0.0
        return value

    def mono(self) -> float:
        return self.real - 1_799_999_900.0


def test_a_step_is_measured_exactly_when_the_thread_is_preempted_between_its_reads():
    # Under load, the thread that checks the clock can be descheduled between the wall and the monotonic
    # read: its wait was measured into the step (-90.004 for a step of -90 s), and status said so.
    clocks = PreemptedClocks()
    watch = ClockWatch(wall=clocks.wall, mono=clocks.mono, synchronised=lambda: True)
    clocks.real += 5
    clocks.offset = -90.0
    clocks.preempt_after_wall = 0.004
    step = watch.check()
    assert step is not None and step.seconds == -90.0
    assert watch.state()["last_step_s"] == -90.0
    clocks.real += 5
    clocks.preempt_after_wall = 0.004
    assert watch.check() is None and watch.state()["last_step_s"] == -90.0
    clocks.real += 5
    clocks.offset += 30.0
    clocks.preempt_after_wall = 0.004
    assert watch.check().seconds == 30.0
