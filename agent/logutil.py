"""Logging set-up for journald (one line per event on stderr) and a rate limiter for repeated errors.

Imports nothing from the project.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import unicodedata


def setup_logging(level: str = "INFO") -> None:
    """One line per event on stderr: `LEVEL logger: message` (journald adds the time)."""
    handler = logging.StreamHandler(sys.stderr)
    fmt = "%(levelname)s %(name)s: %(message)s"
    if sys.stderr.isatty() or "JOURNAL_STREAM" not in __import__("os").environ:
        fmt = "%(asctime)s " + fmt
    handler.setFormatter(OneLineFormatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("pymodbus", "paho"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


# Bidirectional overrides and isolates: they reorder what a terminal shows ("Trojan source").
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: str, keep: str = "\t") -> str:
    """`text` with its control characters (C0 but those in `keep`, DEL, C1), line and paragraph separators
    and bidirectional overrides written as Python escapes (`\\x1b`, `\\u2028`): text that came from
    outside (a payload, a platform's field) can then neither start a line of its own, nor drive the
    terminal (escape sequences), nor end a journald entry (NUL)."""
    if text.isprintable() and not (_BIDI & set(text)):
        return text
    return "".join(ch.encode("unicode_escape").decode("ascii") if _unsafe(ch) and ch not in keep else ch
                   for ch in text)


def _unsafe(ch: str) -> bool:
    return ch in _BIDI or unicodedata.category(ch) in ("Cc", "Zl", "Zp")


class OneLineFormatter(logging.Formatter):
    """Every record on one line, also a traceback or a message with line breaks (folded with ` | `):
    journald and `grep` see one event as one entry. Other control characters (a NUL ends a journald
    entry too; escape sequences drive a terminal) are written as escapes (`printable`)."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record).replace("\r", "").replace("\n", " | "))


class RateLimitedLog:
    """Logs the first occurrence of each message template at once, then at most once per `every_s`
    seconds with a count of what was suppressed in between."""

    def __init__(self, logger: logging.Logger, every_s: float = 60.0):
        self.logger = logger
        self.every_s = every_s
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, int]] = {}

    def log(self, level: int, msg: str, *args: object, key: str | None = None, exc_info: bool = False) -> None:
        """`key` (default: the template) tells occurrences apart: one per distinct key is logged;
        `exc_info`: with the traceback of the exception being handled."""
        now = time.monotonic()
        key = msg if key is None else f"{msg}\0{key}"
        with self._lock:
            last, suppressed = self._seen.get(key, (-1e18, 0))
            if now - last < self.every_s:
                self._seen[key] = (last, suppressed + 1)
                return
            self._seen[key] = (now, 0)
        if suppressed:
            msg = msg + f" (and {suppressed} more like this in the last {self.every_s:.0f} s)"
        self.logger.log(level, msg, *args, exc_info=exc_info)

    def error(self, msg: str, *args: object, key: str | None = None, exc_info: bool = False) -> None:
        self.log(logging.ERROR, msg, *args, key=key, exc_info=exc_info)

    def warning(self, msg: str, *args: object, key: str | None = None) -> None:
        self.log(logging.WARNING, msg, *args, key=key)


class FlapLimiter:
    """When to log a state that goes away and comes back (a link, a sensor's frames): each loss at
    once and its return, but while it flaps at most `burst` "lost" lines per `every_s` seconds; the
    next one says how many losses went unlogged, and a loss left unlogged that lasts is logged once
    the period is over. Not thread-safe: one owner (a bus poller). Times are monotonic seconds."""

    def __init__(self, every_s: float = 60.0, burst: int = 3):
        self.every_s = every_s
        self.burst = burst
        self._period_start = -float("inf")
        self._lines = 0  # "lost" lines in the current period
        self._unlogged = 0  # losses since the last "lost" line
        self._down = False
        self._down_logged = False

    def lost(self, now: float) -> int | None:
        """The state is lost (call at every failed check; repeated calls while lost change nothing but
        may make a deferred line due). When a "lost" line is due now: how many other losses went
        unlogged since the previous one; else None."""
        if not self._down:
            self._down, self._down_logged = True, False
            self._unlogged += 1
        if self._down_logged:
            return None
        if now - self._period_start >= self.every_s:
            self._period_start, self._lines = now, 0
        if self._lines >= self.burst:
            return None
        self._lines += 1
        self._down_logged = True
        unlogged, self._unlogged = self._unlogged - 1, 0
        return unlogged

    def back(self) -> bool:
        """The state is back: True when that is worth a line (its loss was logged)."""
        say = self._down and self._down_logged
        self._down = False
        return say
