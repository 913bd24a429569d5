"""HJ 212-2017 packets built from buffer rows: a CN 2011 packet per device poll and 2051/2061/2031
packets per period start, for `payload: hj212` on MQTT (`agent.publisher`) and the TCP uplinks
(`agent.uplink`). Packets longer than 1024 characters come back split (PNUM/PNO) as several frames.
Imports `agent.buffer` (row types), `agent.hj212`, `agent.logutil` and `agent.model`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from agent.buffer import EventRow, Poll
from agent.hj212 import (
    CN_DAY,
    CN_HOUR,
    CN_MINUTE,
    FLAG_V2017,
    QnSource,
    encode,
    period_packet,
    realtime_packet,
)
from agent.logutil import RateLimitedLog
from agent.model import FLAGS

log = logging.getLogger(__name__)

# HJ 212 period commands by the unit of the aggregate's period name ("10m", "1h", "1d").
PERIOD_CN = {"m": CN_MINUTE, "h": CN_HOUR, "d": CN_DAY}


@dataclass(frozen=True)
class Hj212Identity:
    """Who the station is in HJ 212 (`MN`, `ST`, `PW`) and the timezone of its `DataTime` values."""

    mn: str
    st: str  # 2 digits
    pw: str = field(repr=False)
    timezone: str = "Asia/Shanghai"

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


@dataclass(frozen=True, slots=True)
class Hj212Message:
    """One HJ 212 packet built from stored rows: its frames (one, or the pieces of a split packet),
    its QN, and the seqs it carries. `frames` is empty when no row could be said in HJ 212 (the rows
    are then skipped, never retried forever)."""

    frames: list[bytes]
    qn: str
    first_seq: int
    last_seq: int
    count: int


def _number(value: object) -> float | int | None:
    """A stored value HJ 212 can carry (finite number), else None (sent as a flag without value)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def period_unit(body: dict) -> str | None:
    """The unit ("m", "h", "d") of an aggregate body's `period`, None when it is not one of those."""
    period = body.get("period")
    if isinstance(period, str) and period and period[-1] in PERIOD_CN:
        return period[-1]
    return None


def group_periods(rows: Iterable[EventRow]) -> Iterator[list[EventRow]]:
    """Consecutive aggregate rows with the same period and period start, as the rows of one packet.

    A group is cut where a channel code would repeat (two devices measuring the same pollutant), so
    that no packet carries the same item twice; such a period start then goes out as several packets.
    """
    group: list[EventRow] = []
    key: tuple | None = None
    channels: set[object] = set()
    for row in rows:
        row_key = (row.body.get("period"), row.ts_ms)
        channel = row.body.get("channel")
        if group and (row_key != key or channel in channels):
            yield group
            group, channels = [], set()
        group.append(row)
        key = row_key
        channels.add(channel)
    if group:
        yield group


class Hj212Payload:
    """Builds HJ 212-2017 packets from stored rows (SPEC §4 "With payload: hj212"): a CN 2011 packet
    per device poll and a 2051/2061/2031 packet per period start, `MN`/`ST`/`PW` from `identity`,
    `DataTime` in the station timezone, numbers in plain decimal. QNs come from a `QnSource`, so
    every packet (and every split packet's pieces, which share theirs) has its own."""

    def __init__(self, identity: Hj212Identity, clock: Callable[[], float] = time.time) -> None:
        self.identity = identity
        self.tz = identity.tz
        self.next_qn = QnSource(self.tz, clock)
        self._errlog = RateLimitedLog(log, every_s=300)

    def poll_message(self, poll: Poll, flag: int = FLAG_V2017, *, qn: str | None = None) -> Hj212Message:
        """The CN 2011 packet of one poll: ``DataTime``, then ``<channel>-Rtd`` and ``<channel>-Flag``
        per reading (a reading without value is sent as its flag alone). `qn` defaults to a fresh QN
        (a backfill answer passes the request's)."""
        items: dict[str, tuple[float | int | None, str]] = {}
        for r in poll.readings:
            if r.flag in FLAGS:
                items[r.channel] = (_number(r.value), r.flag)
        qn = qn or self.next_qn()
        frames = self._frames(lambda: realtime_packet(
            self.identity.mn, self.identity.st, self.identity.pw, _utc(poll.ts_ms), items, qn, flag, tz=self.tz))
        return Hj212Message(frames, qn, poll.first_seq, poll.last_seq, len(poll.readings))

    def period_message(self, rows: Sequence[EventRow], flag: int = FLAG_V2017, *, qn: str | None = None,
                       st: str | None = None) -> Hj212Message:
        """The 2051/2061/2031 packet of aggregate rows of one period start (see `group_periods`):
        ``DataTime`` = period start, then ``-Cou -Min -Avg -Max -Flag`` per channel. `qn` and `st`
        default to a fresh QN and the station's ST (a backfill answer passes the request's QN)."""
        first, last = rows[0], rows[-1]
        unit = period_unit(first.body)
        qn = qn or self.next_qn()
        items: dict[str, dict[str, float | int | str | None]] = {}
        for row in rows:
            body = row.body
            stats: dict[str, float | int | str | None] = {
                name: _number(body.get(name)) for name in ("avg", "min", "max", "cou")}
            stats["flag"] = body.get("flag") if body.get("flag") in FLAGS else None
            if isinstance(body.get("channel"), str) and any(v is not None for v in stats.values()):
                items[body["channel"]] = stats
        if unit is None or not items:
            self._errlog.error("aggregate rows seq %d..%d cannot be said in HJ 212 (period %r); skipped",
                               first.seq, last.seq, first.body.get("period"))
            return Hj212Message([], qn, first.seq, last.seq, len(rows))
        frames = self._frames(lambda: period_packet(
            PERIOD_CN[unit], self.identity.mn, st or self.identity.st, self.identity.pw, _utc(first.ts_ms), items,
            qn, flag, tz=self.tz))
        return Hj212Message(frames, qn, first.seq, last.seq, len(rows))

    def _frames(self, build: Callable) -> list[bytes]:
        try:
            return encode(build())
        except ValueError as exc:  # a row HJ 212 cannot carry (bad channel code...): skip it, say why
            self._errlog.error("cannot encode an HJ 212 packet: %s; rows skipped", exc)
            return []


def _utc(ts_ms: int) -> datetime:
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC)
