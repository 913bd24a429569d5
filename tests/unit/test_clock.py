"""Clock step detection (pure logic with injected clocks) and the kernel's synchronisation state."""

from __future__ import annotations

from agent.clock import ClockWatch, kernel_synchronised


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
