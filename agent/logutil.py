"""Logging set-up for journald (one line per event on stderr) and a rate limiter for repeated errors.

Imports nothing from the project.
"""

from __future__ import annotations

import logging
import sys
import threading
import time


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


class OneLineFormatter(logging.Formatter):
    """Every record on one line, also a traceback or a message with line breaks (folded with ` | `):
    journald and `grep` see one event as one entry."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\r", "").replace("\n", " | ")


class RateLimitedLog:
    """Logs the first occurrence of each message template at once, then at most once per `every_s`
    seconds with a count of what was suppressed in between."""

    def __init__(self, logger: logging.Logger, every_s: float = 60.0):
        self.logger = logger
        self.every_s = every_s
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, int]] = {}

    def log(self, level: int, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._seen.get(msg, (-1e18, 0))
            if now - last < self.every_s:
                self._seen[msg] = (last, suppressed + 1)
                return
            self._seen[msg] = (now, 0)
        if suppressed:
            msg = msg + f" (and {suppressed} more like this in the last {self.every_s:.0f} s)"
        self.logger.log(level, msg, *args)

    def error(self, msg: str, *args: object) -> None:
        self.log(logging.ERROR, msg, *args)

    def warning(self, msg: str, *args: object) -> None:
        self.log(logging.WARNING, msg, *args)

    def reset(self, msg: str) -> None:
        """Forget a template so that its next occurrence is logged at once (e.g. after recovery)."""
        with self._lock:
            self._seen.pop(msg, None)
