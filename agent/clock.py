"""The wall clock of a gateway without a real-time clock: is it synchronised, and did it step?

A Raspberry Pi boots with the time it had when it stopped (or 1970) until NTP syncs, and then the
clock jumps. Intervals, delays and schedules in the agent use the monotonic clock, so a step never
breaks them; readings keep the wall-clock time they were taken at. This module only notices and
reports: `ClockWatch.check()` compares the wall clock with the monotonic clock and returns a step
when they disagree, and asks the kernel (adjtimex, read-only) whether NTP considers it synchronised.
`AgeClock` is the wall clock that ages stored rows: it never runs ahead of the monotonic clock.
Standard library only.
"""

from __future__ import annotations

import ctypes
import functools
import time
from dataclasses import dataclass

STEP_THRESHOLD_S = 2.0  # a disagreement larger than this between two checks is a step
TIGHT_READ_S = 0.0001  # a wall-clock read bracketed this closely by two monotonic reads is taken at once
READ_TRIES = 5  # else the most tightly bracketed of this many reads
TIME_ERROR = 5  # adjtimex(2) return value: the clock is not synchronised
EARLIEST_PLAUSIBLE = 1_735_689_600  # 2025-01-01: a wall clock before this is certainly wrong


@dataclass(frozen=True)
class ClockStep:
    """The wall clock moved by `seconds` (negative: backwards) relative to the monotonic clock."""

    seconds: float
    at_wall: float


@functools.cache
def _adjtimex():
    """libc's adjtimex from the symbols already loaded in this process (no library search, which
    would run a subprocess), or None."""
    try:
        return ctypes.CDLL(None, use_errno=True).adjtimex
    except (OSError, AttributeError):
        return None


def kernel_synchronised() -> bool | None:
    """True/False as the kernel's NTP state says (adjtimex with modes=0 changes nothing);
    None where it cannot be asked."""
    adjtimex = _adjtimex()
    if adjtimex is None:
        return None
    buf = ctypes.create_string_buffer(512)  # struct timex (about 208 bytes), modes = 0: read only
    state = adjtimex(buf)
    if state < 0:
        return None
    return state != TIME_ERROR


class ClockWatch:
    """Call `check()` now and then (every few seconds); it returns a ClockStep when the wall clock
    jumped since the previous call."""

    def __init__(self, wall=time.time, mono=time.monotonic, synchronised=kernel_synchronised):
        self._wall = wall
        self._mono = mono
        self._synchronised = synchronised
        self.last_step: ClockStep | None = None
        self._offset = self._read()[1]

    def _read(self) -> tuple[float, float]:
        """(wall-clock time, wall minus monotonic) with the wall-clock read bracketed by two monotonic reads,
        the tightest of a few tries. A thread descheduled between two plain reads (a loaded machine, or a
        wait for the GIL) measured that wait into the offset, and so into a step: -90.004 s for -90 s."""
        best: tuple[float, float, float] | None = None
        for _ in range(READ_TRIES):
            before = self._mono()
            wall = self._wall()
            after = self._mono()
            if best is None or after - before < best[0]:
                best = (after - before, wall, wall - (before + after) / 2)
            if after - before <= TIGHT_READ_S:
                break
        assert best is not None
        return best[1], best[2]

    def check(self) -> ClockStep | None:
        wall, offset = self._read()
        drift = offset - self._offset
        self._offset = offset
        if abs(drift) >= STEP_THRESHOLD_S:
            self.last_step = ClockStep(round(drift, 3), wall)
            return self.last_step
        return None

    def state(self) -> dict:
        """For `status`: synchronised (True/False/None), plausible (not before 2025), last step."""
        wall = self._wall()
        step = self.last_step
        return {
            "synchronized": self._synchronised(),
            "plausible": wall >= EARLIEST_PLAUSIBLE,
            "last_step_s": step.seconds if step else None,
            "last_step_at": step.at_wall if step else None,
        }


class AgeClock:
    """Wall-clock time (Unix ms) for ageing stored rows (`storage.keep_sent_days`): the wall clock, but
    never ahead of the monotonic time elapsed since the previous call. A clock set days ahead by mistake
    (and corrected later) must not make the readings of the last hours look days old and purge them
    before the platform could ask for them again; a clock that steps back is followed at once (rows then
    look younger: kept longer). The first plausible wall-clock time is taken as it is (a gateway that
    boots in 1970 and is set by NTP). A correct forward step leaves this clock behind until the agent
    restarts: rows are then kept that much longer, never shorter, and `max_mb` still bounds them."""

    def __init__(self, wall_ms=None, mono=time.monotonic):
        self._wall_ms = wall_ms or (lambda: int(time.time() * 1000))
        self._mono = mono
        self._last: tuple[int, float] | None = None  # (value returned, monotonic time then)

    def now_ms(self) -> int:
        wall, mono = self._wall_ms(), self._mono()
        if self._last is None or self._last[0] < EARLIEST_PLAUSIBLE * 1000:
            value = wall
        else:
            value = min(wall, self._last[0] + int((mono - self._last[1]) * 1000))
        self._last = (value, mono)
        return value
