"""HJ 212 period statistics (SPEC §2 `aggregate`, §4 aggregate message, DOMAIN.md validity rules):
minute, hour and day avg/min/max/cou per `device.channel` with a count of valid values and a validity
flag, stored in the buffer's aggregates stream (own seq) and published by the publisher on `P/agg`.

Runs on the recorder thread like the alarm engine: `observe` gets each committed batch, `tick` runs
about once a second and computes the periods that are due; `reconfigure` (any thread) is applied at
the next call. Imports `agent.config`, `agent.model` and `agent.logutil` only; the buffer is reached
through `reader_factory` (a read-only `agent.buffer.Buffer`) to rebuild periods after a restart.

Decisions (the README's aggregate section should repeat them for technicians):

- On/off: periods are computed only when the file has an `aggregate:` section (`aggregate: {}` gives
  the defaults: 10-minute, hour and day). Kinds: `<n>m` (`aggregate.minute`), `1h` and `1d` when
  `hour`/`day` are true. Other keys (agent/configsections.py `Aggregate`): `min_valid` (a share, or one per
  kind), `min_count` (per kind), `flow`, `flow_weighted`, `grace`.
- Boundaries are the station's local time (`station.timezone`, zoneinfo): a period is [start, end)
  with start at a local multiple of n minutes, the local hour or local midnight; the body's `start`
  is that instant in UTC (Asia/Shanghai: the day starting 2026-11-29 00:00 local is
  `2026-11-28T16:00:00.000Z`). A day lasts 23 or 25 hours where DST changes.
- Hour and day statistics are computed from the readings themselves, not from minute averages: a day
  average is the mean of all the day's valid values, exactly.
- Valid values: non-null, finite, flag N or T (T, above the measuring range, is still a measurement;
  leaving it out would bias the mean down exactly when the water is worst). avg, min, max and count use
  valid values only. Values near the double max (a float64 register of a misbehaving instrument) still
  give a finite mean (a sum that overflows goes on scaled down); min and max are the values as the data
  topic publishes them (15 digits; the double max as 1.79769313486231e308, as the readings say it). A
  reading with another flag, or with no value, is abnormal (null flagged N or T counts as B).
- Flag. Expected values = period length / device interval; a period needs
  ceil(`min_valid` x expected) valid values, never more than the polls that fit in it (default share
  0.75, the standard's "at least 75 %"; at water stations the minute period's default is every
  expected value, DOMAIN.md's "120 valid 5-second samples" of a water 10-minute value; `min_count`
  gives absolute numbers per kind instead; at least 1). A day needs DAY_VALID_HOURS (20) valid hours
  instead, each with the valid values an hour needs (DOMAIN.md "a day 20 valid hours", GB 3095-2012's
  table of validity), unless the file gives `min_valid.day` or `min_count.day`: 75 % of the day's
  values was 18 hours, and a day of 19 hours after an outage was flagged N. A device polled less often
  than hourly needs 20/24 of the polls that fit in the day.
  * Water stations (`station.type` outfall or river_section): one abnormal value makes the period
    abnormal: its flag is the most severe flag among the period's readings, D > B > F > M > C > S > T
    (fault, no communication, stopped, maintenance, calibration, manual, over range). With no abnormal
    reading but too few valid values the flag is B (values missing between instrument and gateway).
    Otherwise N.
  * Other stations: N when the period has enough valid values; else the most severe abnormal flag of
    its readings, or B when values are simply missing.
  A channel with no reading at all in a period gets no row for it (there is nothing to compute).
- cou (period total) only where a total makes sense, else null:
  * Flow channels (code w00000, and the channel named by `aggregate.flow`): volume in m3. Each valid
    value holds until the channel's next valid value, at most 2 x the device interval (a failed read or
    a missed poll is a gap; a longer gap counts 2 intervals), cut at period boundaries (the last value
    before a period holds into it). Units: L/s (the default, DOMAIN.md), m3/s, m3/h, m3/min, L/min, L/h,
    m3/d.
  * With `aggregate.flow`, concentrations (unit mg/L, ug/L, ng/L or g/L, or the channels listed in
    `flow_weighted`) of any device get a flow-weighted avg = sum(c_i q_i) / sum(q_i), q_i being the
    flow's last valid value at most 2 flow-device intervals from c_i; values without such a flow value
    are left out of the weighting; with none paired, or sum(q_i) = 0, or sums that overflow, avg is the
    plain mean. Their cou is the load in kg: avg x the flow channel's volume of the same period x the
    unit factor (mg/L x m3 = g, / 1000).
- Emission: a period is computed when the wall clock passes its end + `aggregate.grace` (default 2 s,
  for the last poll's readings to be committed); readings are placed in periods by their own
  timestamps. A reading whose period has already been computed (late, or the clock stepped back) is
  left out of that period (logged, rate-limited); it still counts in the longer periods still open.
  Readings more than 5 minutes ahead of the wall clock, or before 2020 (clock not set yet), are left out.
  After a backward clock step open periods simply wait for the clock to pass their end again (a Pi
  without RTC boots with the time it saved last, and NTP corrects it a minute later); only when an open
  period starts more than a day after a plausible wall clock (a clock that was far ahead and has been
  corrected) are the open periods of its kind that lie ahead of the clock computed at once (the current one
  waits for its end: a reading taken since the correction may be in it already).
- Never twice: per kind the state keeps the ranges of period starts already done (normally one range
  [first, last], periods without readings in between counting as done; a backward clock step, or a
  period more than two period lengths after the last one done (the agent was down, or the clock jumped
  ahead), starts another; at most 8 are kept, the two closest in time merging beyond that). A period inside a
  range is never opened again, so never emitted again.
- Restart: the state (meta `aggregate_state`) holds those ranges, the seq of the first reading of the
  oldest open period, and the last valid value of each flow channel before it. It is queued in the
  same recorder transaction as the events of the periods computed (both from the recorder thread). At
  start the stored readings from that seq on are replayed through the same code: open periods are
  rebuilt, and periods that ended while the agent was down are computed by the first tick, once. A
  kind new in the configuration is computed from its current period on (with the replayed readings
  that fall in it). The replay covers the open day (up to a day of readings): exact day values after
  a restart need `storage.keep_sent_days` >= 1. Nothing is computed from readings stored while
  aggregates were off, nor (no saved state) from readings stored before the first start. Before the
  replay, the newest period of each kind that the buffer holds counts as done, with those before it,
  even where the state says otherwise (a salvaged file may hold rows newer than its state).
- Reload: a kind that is no longer configured (another minute length, another time zone) drops its
  open periods (logged); a new kind starts with the current period, filled with the readings stored
  since its start that this run has seen (found through the first seq of each minute of the last
  day; at most 200 000 of them, else it starts empty, logged). Flow settings apply to the channels'
  next periods.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from datetime import time as dtime
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from agent.config import Config
from agent.logutil import RateLimitedLog
from agent.model import FLAG_COMM, FLAG_NORMAL, FLAG_OVER_RANGE, STREAM_AGGREGATES, Reading, iso_utc_ms, now_ms

__all__ = [
    "FLAG_SEVERITY",
    "LOAD_UNITS",
    "STATE_KEY",
    "VOLUME_CODES",
    "VOLUME_UNITS",
    "Aggregator",
    "PeriodCalendar",
    "PeriodKind",
    "ReadingSource",
]

log = logging.getLogger(__name__)

STATE_KEY = "aggregate_state"  # meta key of the saved state
STATE_VERSION = 1
WATER_STATIONS = frozenset({"outfall", "river_section"})  # one abnormal value makes the period abnormal
# DOMAIN.md: "a water 10-minute value needs at least 120 valid 5-second samples": all of them.
WATER_MINUTE_SHARE = 1.0
VALID_FLAGS = frozenset({FLAG_NORMAL, FLAG_OVER_RANGE})  # values that enter avg/min/max/count
FLAG_SEVERITY = "DBFMCST"  # most severe first: the flag an abnormal period gets
FUTURE_TOLERANCE_MS = 300_000  # readings further ahead of the wall clock are left out
BACK_STEP_MS = 86_400_000  # open periods this far ahead of the wall clock are computed at once
MIN_PLAUSIBLE_MS = 1_577_836_800_000  # 2020-01-01T00:00:00Z: earlier timestamps mean the clock is not set
MAX_RANGES = 8  # ranges of done period starts kept per kind (a backward clock step, a gap): the closest merge
REPLAY_BATCH = 5000  # readings read at a time when rebuilding periods at start
SEQ_INDEX_MINUTES = 1500  # minutes (a day and more) whose first seq is kept for a reload's new kinds
RELOAD_REPLAY_MAX = 200_000  # readings a reload may replay into its new kinds (about a second of work)
UNKNOWN_INTERVAL_S = 60.0  # device interval assumed for a device no longer configured
FLOAT_MAX_15 = 1.79769313486231e308  # the largest double as published (15 digits): agent.buffer.FLOAT_MAX_15
SCALE_DOWN = 2.0 ** -64  # a sum that overflows the double goes on scaled by this (see _Acc.add_value)
DAY_VALID_HOURS = 20  # DOMAIN.md: "a day [needs] 20 valid hours" (unless the file gives min_valid/min_count.day)

# Flow codes whose cou is a volume, with the unit assumed when the reading names none (DOMAIN.md).
VOLUME_CODES: Mapping[str, str] = {"w00000": "L/s"}
# m3 per (unit x second), keyed by the normalised unit.
VOLUME_UNITS: Mapping[str, float] = {
    "l/s": 1e-3, "m3/s": 1.0, "m3/h": 1 / 3600, "m3/min": 1 / 60, "l/min": 1e-3 / 60, "l/h": 1e-3 / 3600,
    "m3/d": 1 / 86400,
}
# Concentrations in water: kg of pollutant per (m3 of water x unit).
LOAD_UNITS: Mapping[str, float] = {"mg/l": 1e-3, "ug/l": 1e-6, "ng/l": 1e-9, "g/l": 1.0}

_Key = tuple[str, str]  # (device, channel)


class ReadingSource(Protocol):
    """What the aggregator needs of a read-only `agent.buffer.Buffer`."""

    def readings_after(self, after_seq: int, limit: int) -> list[Reading]: ...

    def newest_period_starts(self) -> dict[str, int]: ...

    def close(self) -> None: ...


def _norm_unit(unit: str | None) -> str:
    if not unit:
        return ""
    return unit.strip().lower().replace("µ", "u").replace("μ", "u").replace("³", "3").replace(" ", "")


def _severity(flag: str) -> int:
    index = FLAG_SEVERITY.find(flag)
    return index if index >= 0 else len(FLAG_SEVERITY)


def _as_published(x: float) -> float:
    """A reading's value as the data topic publishes it (15 significant digits, SQLite's JSON), so that a
    period's min and max are the readings' own numbers. The few doubles above FLOAT_MAX_15 round up to
    infinity, which JSON cannot say: they are FLOAT_MAX_15, as the readings say them (`agent.buffer`)."""
    rounded = float(f"{x:.15g}")
    return rounded if math.isfinite(rounded) else math.copysign(FLOAT_MAX_15, x)


def _number(x: float | None) -> float | None:
    """A computed number for the body: 10 significant digits (no float noise such as 10.299999999)."""
    if x is None or not math.isfinite(x):
        return None
    rounded = float(f"{x:.10g}")
    return rounded if math.isfinite(rounded) else x  # the double max rounds up to inf: JSON cannot say it


# --------------------------------------------------------------------------------------------------
# Periods and their boundaries


@dataclass(frozen=True)
class PeriodKind:
    """A kind of period: `family` minute/hour/day (the keys of min_valid/min_count) and its nominal
    length in minutes."""

    family: str
    minutes: int

    @property
    def name(self) -> str:
        """The body's `period`: `10m`, `1h`, `1d`."""
        return {"hour": "1h", "day": "1d"}.get(self.family, f"{self.minutes}m")


class PeriodCalendar:
    """Boundaries of one kind of period in one time zone; remembers the last period looked up (the
    next reading nearly always falls in it)."""

    def __init__(self, kind: PeriodKind, tz: ZoneInfo):
        self.kind = kind
        self.tz = tz
        self._start = 0
        self._end = 0

    def span(self, ts_ms: int) -> tuple[int, int]:
        """(start, end) in Unix ms of the period holding `ts_ms`."""
        if self._start <= ts_ms < self._end:
            return self._start, self._end
        start = self.floor(ts_ms)
        end = self.end_of(start)
        if not start <= ts_ms < end:  # a local midnight that does not exist (DST at 00:00): fixed offset
            local = datetime.fromtimestamp(ts_ms // 1000, self.tz)
            offset = int((local.utcoffset() or timedelta()).total_seconds() * 1000)
            length = self.kind.minutes * 60_000
            start = (ts_ms + offset) // length * length - offset
            end = start + length
        self._start, self._end = start, end
        return start, end

    def floor(self, ts_ms: int) -> int:
        """Start of the period holding `ts_ms`: a local multiple of n minutes, hour, or midnight."""
        local = datetime.fromtimestamp(ts_ms // 1000, self.tz)
        family = self.kind.family
        if family == "minute":
            local = local.replace(minute=local.minute - local.minute % self.kind.minutes, second=0)
        elif family == "hour":
            local = local.replace(minute=0, second=0)
        else:  # the first midnight where the clock shows it twice (Atlantic/Azores, America/Havana in autumn)
            local = local.replace(hour=0, minute=0, second=0, fold=0)
        return int(local.timestamp()) * 1000

    def end_of(self, start: int) -> int:
        """End (exclusive) of the period starting at `start`: the next local midnight for days."""
        if self.kind.family != "day":
            return start + self.kind.minutes * 60_000
        day = datetime.fromtimestamp(start // 1000, self.tz).date() + timedelta(days=1)
        end = int(datetime.combine(day, dtime(0), tzinfo=self.tz).timestamp()) * 1000
        return end if end > start else start + 86_400_000


@dataclass(frozen=True)
class _Role:
    """How a channel's statistics are computed (fixed when its accumulator of a period is created)."""

    volume: float | None  # a flow: cou = volume, m3 per (value unit x second)
    weighted: bool  # avg weighted by the station's flow
    load: float | None  # kg per (m3 x value unit): cou = load (weighted channels)
    cap_ms: int  # longest time a value holds (2 device intervals)


class _Acc:
    """One channel in one period."""

    __slots__ = ("role", "n", "count", "total", "comp", "scaled", "low", "high", "abnormal", "vol", "last_ts",
                 "last_q", "cq", "qsum", "hours")

    def __init__(self, role: _Role):
        self.role = role
        self.n = 0  # readings, any flag
        self.count = 0  # valid values
        self.total = 0.0  # their sum (Neumaier-compensated with comp)
        self.comp = 0.0
        self.scaled = False  # the sum overflowed the double: `total` holds it times SCALE_DOWN
        self.low = math.inf
        self.high = -math.inf
        self.abnormal: set[str] = set()
        self.vol = 0.0  # flow x milliseconds (value unit)
        self.last_ts: int | None = None  # last valid flow value in this period
        self.last_q = 0.0
        self.cq = 0.0  # sum of concentration x flow
        self.qsum = 0.0  # sum of the paired flow values
        self.hours: dict[int, int] = {}  # day periods: valid values per local hour (start in Unix ms)

    def add_value(self, x: float) -> None:
        """A valid (finite) value. Values near the double max (a float64 register of a misbehaving
        instrument reads 1.5e308) overflow the sum: from then on it is kept times SCALE_DOWN, so that the
        mean is still the values' mean, not NaN (the body's avg was null with a count of 10)."""
        if self.scaled:
            self.total += x * SCALE_DOWN
        else:
            t = self.total + x
            if math.isinf(t):
                self.total = (self.total + self.comp) * SCALE_DOWN + x * SCALE_DOWN
                self.comp = 0.0
                self.scaled = True
            else:
                if abs(self.total) >= abs(x):
                    self.comp += (self.total - t) + x
                else:
                    self.comp += (x - t) + self.total
                self.total = t
        self.count += 1
        if x < self.low:
            self.low = x
        if x > self.high:
            self.high = x

    def mean(self) -> float:
        if self.scaled:
            return self.total / self.count / SCALE_DOWN  # within [low, high]: finite but for rounding
        return (self.total + self.comp) / self.count

    def integrate(self, ts: int, q: float, start: int, before: tuple[int, float] | None) -> None:
        """A valid flow value at `ts`: add the segment the previous value held (`before`: the channel's
        last valid value when this is the period's first one, held from the period start)."""
        cap = self.role.cap_ms
        if self.last_ts is None:
            if before is not None and before[0] < ts:
                a, b = max(start, before[0]), min(ts, before[0] + cap)
                if b > a:
                    self.vol += before[1] * (b - a)
        elif ts > self.last_ts:
            self.vol += self.last_q * (min(ts, self.last_ts + cap) - self.last_ts)
        else:
            return  # out of time order: in the statistics, not in the volume
        self.last_ts, self.last_q = ts, q

    def volume_m3(self, end: int) -> float:
        """The period's volume, the last value held up to the period end (capped)."""
        vol = self.vol
        if self.last_ts is not None:
            vol += self.last_q * (min(end, self.last_ts + self.role.cap_ms) - self.last_ts)
        assert self.role.volume is not None
        return vol / 1000 * self.role.volume


class _Period:
    """An open period of one kind: the accumulators of the channels seen in it."""

    __slots__ = ("kind", "start", "end", "first_seq", "carry", "accs")

    def __init__(self, kind: PeriodKind, start: int, end: int, first_seq: int, carry: dict[_Key, tuple[int, float]]):
        self.kind = kind
        self.start = start
        self.end = end
        self.first_seq = first_seq  # seq of its first reading: replayed from there after a restart
        self.carry = carry  # flow channels' last valid values before that reading
        self.accs: dict[_Key, _Acc] = {}


# --------------------------------------------------------------------------------------------------
# The aggregator


class Aggregator:
    """Computes the configured periods from committed readings (see the module docstring).

    `recorder` needs `submit_event(stream, ts_ms, body)` and `set_meta(key, value)`; `saved_state` is
    the meta value `aggregate_state` of the previous run (None on a fresh buffer); `reader_factory()`
    opens a read-only buffer (closed after use) to rebuild the open periods at start. `wall_ms` (Unix
    ms) is injectable for tests.
    """

    def __init__(
        self,
        config: Config,
        recorder: Any,
        saved_state: str | None,
        reader_factory: Callable[[], ReadingSource] | None = None,
        *,
        wall_ms: Callable[[], int] = now_ms,
    ):
        self.recorder = recorder
        self.reader_factory = reader_factory
        self.wall_ms = wall_ms
        self._lock = threading.Lock()
        self._pending_config: Config | None = None
        self._calendars: list[PeriodCalendar] = []
        self._open: dict[str, dict[int, _Period]] = {}
        self._hold: dict[_Key, tuple[int, float]] = {}  # flow channels: last valid (ts, value)
        self._roles: dict[_Key, tuple[str | None, _Role]] = {}
        self._warned: set[str] = set()
        self._errlog = RateLimitedLog(log, every_s=300)
        self._last_seq = 0  # highest seq observed (or replayed) in this run
        self._saved_seq: int | None = None  # replay point in the last state saved
        self._replay_floor: dict[str, int] = {}
        # UTC minute -> first seq ingested in it (the last day or so): where a kind added by a reload
        # finds the stored readings of its current period
        self._seq_at_minute: dict[int, int] = {}
        state = self._parse_state(saved_state)
        kinds = state.get("kinds")
        self._ranges: dict[str, list[list[int]]] = {
            str(name): [[int(lo), int(hi)] for lo, hi in ranges]
            for name, ranges in (kinds.items() if isinstance(kinds, dict) else ())
        }
        seq = state.get("seq")
        self._restored_seq: int | None = seq if isinstance(seq, int) and seq > 0 else None
        self._apply_config(config)
        if not self.enabled:
            log.info("aggregates: off (no aggregate section in the configuration)")
            if self._restored_seq is not None:
                self._restored_seq = None
                self._save()  # a later start must not replay the readings of this run
            return
        log.info("aggregates: %s periods in %s, computed %.3g s after their end",
                 ", ".join(c.kind.name for c in self._calendars), config.station.timezone, self._grace_ms / 1000)
        if config.aggregate.day and config.storage.keep_sent_days < 1:
            log.warning("aggregates: storage.keep_sent_days < 1: after a restart, day periods are rebuilt only "
                        "from the readings still stored")
        if self._restored_seq is not None and self.reader_factory is not None:
            now = self.wall_ms()
            known = set(self._ranges)
            self._replay_floor = {c.kind.name: c.span(now)[0] for c in self._calendars if c.kind.name not in known}
            self._hold = self._parse_carry(state.get("carry"))
            self._replay(self._restored_seq, now)
            self._replay_floor = {}

    # ------------------------------------------------------------------ any thread

    def reconfigure(self, config: Config) -> None:
        """Take a reloaded config (SIGHUP); applied on the recorder thread at the next call."""
        with self._lock:
            self._pending_config = config

    def close(self) -> None:
        """Nothing to flush: the state is saved with every computed period; open periods are rebuilt
        from the buffer at the next start."""
        if self.enabled:
            n = sum(len(p) for p in self._open.values())
            log.info("aggregates: %d open periods left to the next start", n)

    # ------------------------------------------------------------------ recorder thread

    def observe(self, readings: Iterable[Reading]) -> None:
        """A committed batch of readings (recorder thread)."""
        self._take_config()
        if not self.enabled:
            self._note_batch(readings)
            return
        now = self.wall_ms()
        for r in readings:
            if r.seq <= self._last_seq:
                continue  # replayed at start already
            self._last_seq = r.seq
            self._ingest(r, now, replay=False)
        if self._saved_seq is None and any(self._open.values()):
            self._save()  # first periods of this run: from now on a restart knows where to replay from

    def tick(self) -> None:
        """About once a second (recorder thread): compute the periods that are due."""
        self._take_config()
        if any(self._open.values()):
            self._close_due(self.wall_ms())

    # ------------------------------------------------------------------ configuration

    def _take_config(self) -> None:
        if self._pending_config is None:
            return
        with self._lock:
            config, self._pending_config = self._pending_config, None
        if config is not None:
            before = {c.kind.name: c.tz.key for c in self._calendars}
            section_before = self.config.aggregate if self.enabled else None
            self._apply_config(config)
            if not self.enabled:  # readings of the time without aggregates are never replayed
                self._last_seq = 0
                self._restored_seq = None
            added = [c for c in self._calendars if before.get(c.kind.name) != c.tz.key]
            if added and self.reader_factory is not None:
                self._replay_added(added, self.wall_ms())
            if (config.aggregate if self.enabled else None) != section_before:
                log.info("aggregates reloaded: %s", ", ".join(c.kind.name for c in self._calendars) or "off")
            self._save()

    def _apply_config(self, config: Config) -> None:
        agg = config.aggregate
        self.config = config
        self.enabled = "aggregate" in config.model_fields_set
        tz = ZoneInfo(config.station.timezone)
        kinds: list[PeriodKind] = []
        if self.enabled:
            kinds.append(PeriodKind("minute", agg.minute))
            if agg.hour:
                kinds.append(PeriodKind("hour", 60))
            if agg.day:
                kinds.append(PeriodKind("day", 1440))
        old = {c.kind.name: c for c in self._calendars}
        calendars = []
        for kind in kinds:
            cal = old.get(kind.name)
            if cal is None or cal.tz.key != tz.key:
                cal = PeriodCalendar(kind, tz)
                dropped = self._open.pop(kind.name, {})
                if dropped:
                    log.warning("aggregates: time zone changed: %d open %s periods dropped", len(dropped), kind.name)
            calendars.append(cal)
        names = {k.name for k in kinds}
        for name in [n for n in self._open if n not in names]:
            dropped = self._open.pop(name)
            if dropped:
                log.warning("aggregates: %s periods no longer configured: %d open periods dropped", name, len(dropped))
        for kind in kinds:
            self._open.setdefault(kind.name, {})
        self._calendars = calendars
        self._hour_cal = PeriodCalendar(PeriodKind("hour", 60), tz)  # the hours a day's validity counts
        self._water = config.station.type in WATER_STATIONS
        self._grace_ms = round(agg.grace * 1000)
        self._min_valid = agg.min_valid.model_dump()
        if self._water and "min_valid" not in agg.model_fields_set:
            self._min_valid["minute"] = WATER_MINUTE_SHARE
        self._min_count = agg.min_count.model_dump() if agg.min_count is not None else {}
        self._day_by_hours = "day" not in agg.min_valid.model_fields_set and not self._min_count.get("day")
        self._intervals = {dev_id: dev.interval for dev_id, dev in config.devices.items()}
        self._flow_key: _Key | None = None
        self._flow_cap_ms = 0
        if agg.flow is not None:
            device, channel = agg.flow.split(".", 1)
            self._flow_key = (device, channel)
            self._flow_cap_ms = self._cap_ms(device)
            if self.enabled and device not in config.devices:
                log.warning("aggregate.flow: device %r is not configured; no flow-weighted values", device)
        self._weighted: frozenset[_Key] | None = None
        if agg.flow_weighted is not None:
            self._weighted = frozenset((ref.split(".", 1)[0], ref.split(".", 1)[1]) for ref in agg.flow_weighted)
            if agg.flow is None and self.enabled:
                log.warning("aggregate.flow_weighted needs aggregate.flow (the flow channel): ignored")
        self._roles.clear()

    def _cap_ms(self, device: str) -> int:
        return round(2 * self._intervals.get(device, UNKNOWN_INTERVAL_S) * 1000)

    def _role(self, key: _Key, unit: str | None) -> _Role:
        cached = self._roles.get(key)
        if cached is not None and cached[0] == unit:
            return cached[1]
        device, code = key
        u = _norm_unit(unit)
        volume = None
        if code in VOLUME_CODES or key == self._flow_key:
            volume = VOLUME_UNITS.get(u)
            if volume is None:
                assumed = VOLUME_CODES.get(code, "L/s")
                if u:
                    self._warn_once(f"unit:{device}.{code}:{u}", "aggregates: %s.%s: %r is not a flow unit this "
                                    "agent knows; assuming %s", device, code, unit, assumed)
                volume = VOLUME_UNITS[_norm_unit(assumed)]
        weighted = False
        load = None
        if self._flow_key is not None and volume is None:
            weighted = key in self._weighted if self._weighted is not None else u in LOAD_UNITS
            load = LOAD_UNITS.get(u) if weighted else None
        role = _Role(volume, weighted, load, self._cap_ms(device))
        self._roles[key] = (unit, role)
        return role

    # ------------------------------------------------------------------ readings into periods

    def _note_minute(self, ts_ms: int, seq: int) -> None:
        minute = ts_ms - ts_ms % 60_000
        if minute not in self._seq_at_minute:
            self._seq_at_minute[minute] = seq
            if len(self._seq_at_minute) > SEQ_INDEX_MINUTES:
                del self._seq_at_minute[min(self._seq_at_minute)]

    def _note_batch(self, readings: Iterable[Reading]) -> None:
        """Aggregates off: note only where the batch's minute starts and the highest seq, all that a
        reload adding the section needs to fill its current periods from the buffer (README)."""
        batch = readings if isinstance(readings, list) else list(readings)
        if batch:
            self._note_minute(min(r.ts_ms for r in batch), batch[0].seq)
            self._last_seq = max(self._last_seq, batch[-1].seq)

    def _ingest(self, r: Reading, now: int, *, replay: bool, only: set[str] | None = None) -> None:
        ts = r.ts_ms
        if ts < MIN_PLAUSIBLE_MS:
            if not replay:
                self._errlog.warning("aggregates: readings timed before 2020 (clock not set?) are left out, "
                                     "e.g. %s.%s at %s", r.device, r.channel, iso_utc_ms(max(ts, 0)))
            return
        if not replay and ts > now + FUTURE_TOLERANCE_MS:
            self._errlog.warning("aggregates: readings more than 5 minutes ahead of the clock are left out, "
                                 "e.g. %s.%s at %s", r.device, r.channel, iso_utc_ms(ts))
            return
        self._note_minute(ts, r.seq)
        key = (r.device, r.channel)
        role = self._role(key, r.unit)
        value = r.value
        valid = value is not None and math.isfinite(value) and r.flag in VALID_FLAGS
        abnormal = None
        if not valid:
            abnormal = FLAG_COMM if r.flag in VALID_FLAGS else r.flag
        elif r.flag != FLAG_NORMAL:
            abnormal = r.flag
        q = None
        if valid and self._flow_key is not None:
            held = self._hold.get(self._flow_key)
            if held is not None and abs(ts - held[0]) <= self._flow_cap_ms:
                q = held[1]
        for cal in self._calendars:
            name = cal.kind.name
            if only is not None and name not in only:
                continue
            start, end = cal.span(ts)
            periods = self._open[name]
            period = periods.get(start)
            if period is None:
                if not self._may_open(name, start, end, now, replay):
                    if not replay:
                        self._errlog.warning("aggregates: a reading later than its %s period (already computed) "
                                             "is left out of it, e.g. %s.%s at %s", name, r.device, r.channel,
                                             iso_utc_ms(ts))
                    continue
                period = periods[start] = _Period(cal.kind, start, end, r.seq, dict(self._hold))
            acc = period.accs.get(key)
            if acc is None:
                acc = period.accs[key] = _Acc(role)
            acc.n += 1
            if abnormal is not None:
                acc.abnormal.add(abnormal)
            if valid:
                assert value is not None
                acc.add_value(value)
                if cal.kind.family == "day":
                    hour = self._hour_cal.span(ts)[0]
                    acc.hours[hour] = acc.hours.get(hour, 0) + 1
                if acc.role.volume is not None:
                    acc.integrate(ts, value, start, self._hold.get(key))
                if q is not None and acc.role.weighted:
                    acc.cq += value * q
                    acc.qsum += q
        if valid and role.volume is not None:
            assert value is not None
            held = self._hold.get(key)
            if held is None or ts >= held[0]:
                self._hold[key] = (ts, value)

    def _may_open(self, name: str, start: int, end: int, now: int, replay: bool) -> bool:
        if self._inside(name, start):
            return False  # done already: never twice
        if replay:
            return start >= self._replay_floor.get(name, start)
        return end + self._grace_ms > now

    def _inside(self, name: str, start: int) -> bool:
        return any(lo <= start <= hi for lo, hi in self._ranges.get(name, ()))

    def _replay(self, from_seq: int, now: int) -> None:
        """Rebuild the open periods (and those that ended while the agent was down) from the stored
        readings with seq >= from_seq."""
        assert self.reader_factory is not None
        n = 0
        try:
            reader = self.reader_factory()
            try:
                self._done_as_stored(reader.newest_period_starts(), now)
                after = from_seq - 1
                while True:
                    batch = reader.readings_after(after, REPLAY_BATCH)
                    if not batch:
                        break
                    for r in batch:
                        self._ingest(r, now, replay=True)
                    n += len(batch)
                    after = batch[-1].seq
                    self._last_seq = max(self._last_seq, after)
            finally:
                reader.close()
        except Exception as exc:  # noqa: BLE001 - a start without history is better than no start
            log.error("aggregates: cannot rebuild the open periods from the buffer (%s); they restart empty", exc)
            for open_periods in self._open.values():
                open_periods.clear()
            return
        periods = [p for ps in self._open.values() for p in ps.values()]
        due = sum(p.end + self._grace_ms <= now for p in periods)
        log.info("aggregates: %d stored readings from seq %d replayed: %d open periods rebuilt, %d of them ended "
                 "while the agent was down", n, from_seq, len(periods), due)

    def _replay_added(self, added: list[PeriodCalendar], now: int) -> None:
        """Kinds added by a reload (another `minute`, hour or day switched on, another time zone): their
        current period is filled with the readings stored since its start (as far as this run has
        seen them), so that it is not computed from the part after the reload alone."""
        assert self.reader_factory is not None
        floors = {cal.kind.name: cal.span(now)[0] for cal in added}
        earliest = min(floors.values())
        seqs = [seq for minute, seq in self._seq_at_minute.items() if minute >= earliest]
        if not seqs or not self._last_seq:
            return
        upto, n = self._last_seq, 0
        if upto - min(seqs) > RELOAD_REPLAY_MAX:  # the recorder thread must not stall for long
            log.warning("aggregates: the %s periods the reload added start empty (%d stored readings since their "
                        "start: too many to replay while running)", ", ".join(sorted(floors)), upto - min(seqs))
            return
        self._replay_floor = floors
        try:
            reader = self.reader_factory()
            try:
                after = min(seqs) - 1
                while after < upto and (batch := reader.readings_after(after, REPLAY_BATCH)):
                    for r in batch:
                        if r.seq > upto:
                            break
                        self._ingest(r, now, replay=True, only=set(floors))
                        n += 1
                    after = batch[-1].seq
            finally:
                reader.close()
        except Exception as exc:  # noqa: BLE001 - the new kind then starts from the reload, as before
            log.error("aggregates: cannot fill the new periods from the buffer (%s); they start empty", exc)
            for name in floors:
                self._open[name].clear()
        finally:
            self._replay_floor = {}
        log.info("aggregates: %d stored readings replayed into the %s periods the reload added", n,
                 ", ".join(sorted(floors)))

    def _done_as_stored(self, newest: Mapping[str, int], now: int) -> None:
        """Periods whose rows the buffer holds are done, whatever the saved state says. The two are
        written together, but a salvaged file may hold rows newer than its state: without this, the
        periods between would be computed and published a second time. A period ahead of a plausible
        clock was computed while the clock was ahead (since corrected): it counts alone, not every period
        up to it (that would be every period until then, years maybe)."""
        for name, start in newest.items():
            if self._inside(name, start):
                continue
            if now >= MIN_PLAUSIBLE_MS and start > now + FUTURE_TOLERANCE_MS:
                log.warning("aggregates: the buffer holds the %s period of %s, ahead of the clock (%s): computed while "
                            "the clock was ahead; the periods before it are computed as they come", name,
                            iso_utc_ms(start), iso_utc_ms(now))
                self._ranges.setdefault(name, []).append([start, start])
                _trim(self._ranges[name])
                continue
            log.warning("aggregates: the buffer holds the %s period of %s that the saved state does not count as "
                        "done; the periods up to it are not computed again", name, iso_utc_ms(start))
            if self._ranges.get(name):
                self._mark_done(name, start)  # the last range now reaches it (periods are done in order)
            else:
                self._ranges[name] = [[0, start]]

    # ------------------------------------------------------------------ computing periods

    def _close_due(self, now: int) -> None:
        due: list[_Period] = []
        for cal in self._calendars:
            periods = self._open[cal.kind.name]
            if not periods:
                continue
            stepped = now >= MIN_PLAUSIBLE_MS and max(periods) > now + BACK_STEP_MS
            # Only the periods left ahead of the corrected clock (no reading can reach them any more): the
            # current one may hold a reading taken since the step, and waits for its end like any other.
            ahead = [p for p in periods.values() if stepped and p.start > now + FUTURE_TOLERANCE_MS]
            if ahead:
                log.warning("aggregates: the clock went back to %s; computing the %d open %s periods ahead of it now",
                            iso_utc_ms(now), len(ahead), cal.kind.name)
            due += ahead + [p for p in periods.values() if p not in ahead and p.end + self._grace_ms <= now]
        if not due:
            return
        due.sort(key=lambda p: (p.end, p.kind.minutes))
        for p in due:
            name = p.kind.name
            del self._open[name][p.start]
            if self._inside(name, p.start):
                continue  # cannot happen (never opened inside a range); kept as the last guard
            bodies = self._compute(p)
            for body in bodies:
                self.recorder.submit_event(STREAM_AGGREGATES, p.start, body)
            self._mark_done(name, p.start, 2 * p.kind.minutes * 60_000)  # the next period, DST days too
            log.debug("aggregates: %s period from %s computed: %d channels", name, iso_utc_ms(p.start), len(bodies))
        self._save()  # same recorder transaction as the events above

    def _compute(self, p: _Period) -> list[dict[str, Any]]:
        volumes = {key: acc.volume_m3(p.end) for key, acc in p.accs.items() if acc.role.volume is not None}
        flow_volume = None
        if self._flow_key is not None:
            flow_acc = p.accs.get(self._flow_key)
            if flow_acc is not None and flow_acc.count and self._flow_key in volumes:
                flow_volume = volumes[self._flow_key]
        bodies = []
        for key in sorted(p.accs):
            acc = p.accs[key]
            role = acc.role
            avg: float | None = None
            low: float | None = None
            high: float | None = None
            cou: float | None = None
            if acc.count:
                # 15 significant digits, as the readings themselves are published (SQLite's JSON):
                # a reading shown as 15.177 on the data topic is not 15.177000000000001 here.
                low, high = _as_published(acc.low), _as_published(acc.high)
                mean = acc.cq / acc.qsum if role.weighted and acc.qsum > 0 else math.nan
                if not math.isfinite(mean):  # not weighted, or c x q overflowed (a flow of 1e308): plain mean
                    mean = acc.mean()
                mean = min(max(mean, low), high)
                rounded = _number(mean)  # then kept within [min, max] too: rounding may leave them
                avg = None if rounded is None else min(max(rounded, low), high)
                if role.volume is not None:
                    cou = volumes[key]
                elif role.load is not None and flow_volume is not None:
                    cou = mean * flow_volume * role.load
            bodies.append({
                "device": key[0], "channel": key[1], "period": p.kind.name, "start": iso_utc_ms(p.start),
                "avg": avg, "min": low, "max": high, "cou": _number(cou), "count": acc.count,
                "flag": self._flag(acc, self._enough(p, key[0], acc)),
            })
        return bodies

    def _enough(self, p: _Period, device: str, acc: _Acc) -> bool:
        """Whether the period has the valid values flag N needs: a day DAY_VALID_HOURS valid hours (each
        with the hour's valid values), unless the file gives the day a share or count of its own."""
        if p.kind.family == "day" and self._day_by_hours:
            interval = self._intervals.get(device) or 0.0
            if interval <= 3600:
                needed = self._needed("hour", 3_600_000, device)
                return sum(n >= needed for n in acc.hours.values()) >= DAY_VALID_HOURS
            # Polled less often than hourly (an analyzer's 2-hour cycle): the same share of its polls.
            expected = (p.end - p.start) / 1000 / interval
            return acc.count >= max(1, min(math.ceil(DAY_VALID_HOURS / 24 * expected - 1e-9),
                                           math.floor(expected + 1e-9)))
        return acc.count >= self._needed(p.kind.family, p.end - p.start, device)

    def _needed(self, family: str, length_ms: int, device: str) -> int:
        """Valid values a period of `family` lasting `length_ms` needs for flag N."""
        fixed = self._min_count.get(family)
        if fixed:
            return int(fixed)
        interval = self._intervals.get(device)
        if not interval:
            return 1
        expected = length_ms / 1000 / interval
        # Never more than the polls that fit in the period (an interval that does not divide it).
        return max(1, min(math.ceil(self._min_valid[family] * expected - 1e-9), math.floor(expected + 1e-9)))

    def _flag(self, acc: _Acc, enough: bool) -> str:
        worst = min(acc.abnormal, key=_severity) if acc.abnormal else None
        if self._water:
            if worst is not None:
                return worst
            return FLAG_NORMAL if enough else FLAG_COMM
        if enough:
            return FLAG_NORMAL
        return worst or FLAG_COMM

    def _mark_done(self, name: str, start: int, within_ms: int | None = None) -> None:
        """`start` is done. The last range reaches it (the periods between, without readings, count as done)
        unless it lies more than `within_ms` after that range's end: then it starts a range of its own. A
        clock stepped years ahead and corrected must not leave every period until then counted as done
        (no aggregate for years, audit audu); an agent down for a while costs a range, at most MAX_RANGES."""
        ranges = self._ranges.setdefault(name, [])
        if ranges and start > ranges[-1][1] and (within_ms is None or start - ranges[-1][1] <= within_ms):
            last = ranges[-1]
            last[1] = start
            kept = []
            for r in ranges[:-1]:
                if last[0] <= r[0] <= last[1]:
                    last[1] = max(last[1], r[1])  # an older range now covered: merge it
                else:
                    kept.append(r)
            ranges[:] = [*kept, last]
        else:
            ranges.append([start, start])  # the first one, or the clock went back: a new range
        _trim(ranges)

    # ------------------------------------------------------------------ state

    def _state(self) -> dict[str, Any]:
        periods = [p for ps in self._open.values() for p in ps.values()]
        oldest = min(periods, key=lambda p: p.first_seq, default=None)
        if not self.enabled:
            seq = None
            carry = {}
        elif oldest is not None:
            seq, carry = oldest.first_seq, oldest.carry
        else:
            seq = self._last_seq + 1 if self._last_seq else self._restored_seq
            carry = dict(self._hold)
        kinds = {name: [list(r) for r in ranges] for name, ranges in self._ranges.items()}
        for cal in self._calendars:
            kinds.setdefault(cal.kind.name, [])
        return {"v": STATE_VERSION, "seq": seq, "kinds": kinds,
                "carry": [[k[0], k[1], ts, q] for k, (ts, q) in sorted(carry.items())]}

    def _save(self) -> None:
        state = self._state()
        self.recorder.set_meta(STATE_KEY, json.dumps(state, separators=(",", ":")))
        self._saved_seq = state["seq"]

    @staticmethod
    def _parse_state(saved: str | None) -> dict[str, Any]:
        if not saved:
            return {}
        try:
            state = json.loads(saved)
            if not isinstance(state, dict) or state.get("v") != STATE_VERSION:
                raise ValueError("unknown format")
            kinds = state.get("kinds")
            if not isinstance(kinds, dict):
                raise ValueError("no kinds")
            for ranges in kinds.values():
                for lo, hi in ranges:
                    int(lo), int(hi)
        except (TypeError, ValueError) as exc:
            log.error("aggregates: saved state unreadable (%s); starting afresh (periods before now are not "
                      "recomputed)", exc)
            return {}
        return state

    @staticmethod
    def _parse_carry(data: Any) -> dict[_Key, tuple[int, float]]:
        carry: dict[_Key, tuple[int, float]] = {}
        if isinstance(data, Sequence):
            for item in data:
                try:
                    device, channel, ts, q = item
                    carry[(str(device), str(channel))] = (int(ts), float(q))
                except (TypeError, ValueError):
                    continue
        return carry

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)


def _trim(ranges: list[list[int]]) -> None:
    """At most MAX_RANGES ranges of done period starts: beyond that the two ranges closest in time merge
    (the periods between, which got no reading, count as done). Dropping the oldest range instead let a
    restart's replay (from the first reading of the open day) open its periods again and publish them
    twice: an analyser read once an hour makes a range of every 10-minute period it falls in. The range
    last in the list (the one that grows) stays last. Ranges ahead of it (done while the clock was ahead,
    before a backward step) merge only when nothing else can: the periods between are still to come."""
    while len(ranges) > MAX_RANGES:
        ordered = sorted(ranges)
        behind = [k for k in range(len(ordered) - 1) if ordered[k + 1][1] <= ranges[-1][1]]
        i = min(behind or range(len(ordered) - 1), key=lambda k: ordered[k + 1][0] - ordered[k][1])
        early, late = ordered[i], ordered[i + 1]
        keep, drop = (late, early) if late is ranges[-1] else (early, late)
        keep[0], keep[1] = early[0], max(early[1], late[1])
        del ranges[next(k for k, r in enumerate(ranges) if r is drop)]
