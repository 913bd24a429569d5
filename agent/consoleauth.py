"""Who may use the web console (`agent.console`): `_Password`, the console password (the file's
content, re-read when the file changes; unusable: every request is refused), `_Throttle`, the wrong
passwords of each client address (too many: 429), and `ConsoleError`, the console cannot start (a
password file it cannot read, an address it cannot listen on), and `client_key`, who counts as one
client (an IPv4 address, an IPv6 /64). The check of a request's credentials is the HTTP handler's
(`agent.consolehttp`).

Imports `agent.config` (`read_password_file`) and `agent.logutil`; nothing else from the project. Its
log lines are the console's (logger `agent.console`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import threading
import time
from collections import deque
from pathlib import Path

from agent.config import read_password_file
from agent.logutil import RateLimitedLog

log = logging.getLogger("agent.console")  # the console's lines, under one name as before the split

MAX_AUTH_FAILURES = 20  # wrong passwords from one address within AUTH_WINDOW_S before it gets 429
AUTH_WINDOW_S = 60.0


def client_key(host: str) -> str:
    """The client a peer address counts as, for the limits that are per client (wrong passwords,
    connections): an IPv4 address (also IPv4-mapped, as an IPv6 listener sees it), an IPv6 /64 (a host
    chooses its own interface identifier: one machine has the whole /64)."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class ConsoleError(Exception):
    """The console cannot start (unreadable password file, address in use, ...)."""


class _Password:
    """The console password: the file's one line (read as the MQTT password file is,
    `read_password_file`), re-read when the file changes. Unreadable, empty or of several lines →
    None (every request is then refused: the console fails closed). `shown`: the file's path as
    messages may show it, None where it may be the secret itself (`Config.shown_file`)."""

    def __init__(self, path: Path, shown: str | None):
        self.path = path
        self.name = f"console.password_file {shown}" if shown else "console.password_file"
        self._stamp: tuple[int, int] | None = None
        self._digest: bytes | None = None
        self._errlog = RateLimitedLog(log, every_s=300)
        self._lock = threading.Lock()

    def load(self) -> None:
        """Read the file now; raises ConsoleError (never quoting the file) when it is unusable."""
        if self.digest() is None:
            raise ConsoleError(f"{self.name}: cannot read a password from it")

    def digest(self) -> bytes | None:
        with self._lock:
            try:
                st = self.path.stat()
                stamp = (st.st_mtime_ns, st.st_size)
                if stamp != self._stamp:
                    text = read_password_file(self.path)  # an empty file raises ValueError
                    self._digest = hashlib.sha256(text.encode("utf-8")).digest()
                    self._stamp = stamp
            except (OSError, ValueError) as exc:  # str(OSError) would quote the path
                reason = str(exc) if isinstance(exc, ValueError) else exc.strerror or exc.__class__.__name__
                self._errlog.error("%s cannot be read (%s): every request is refused", self.name, reason)
                self._digest = None
                self._stamp = None
            return self._digest

    def matches(self, given: str) -> bool | None:
        """True/False; None when there is no usable password file."""
        digest = self.digest()
        if digest is None:
            return None
        return hmac.compare_digest(hashlib.sha256(given.encode("utf-8")).digest(), digest)


class _Throttle:
    """Wrong passwords per client (`client_key`: an IPv4 address, an IPv6 /64): MAX_AUTH_FAILURES in
    AUTH_WINDOW_S → 429."""

    def __init__(self) -> None:
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def blocked(self, client: str) -> bool:
        now = time.monotonic()
        with self._lock:
            q = self._failures.get(client_key(client))
            if q is None:
                return False
            while q and now - q[0] > AUTH_WINDOW_S:
                q.popleft()
            return len(q) >= MAX_AUTH_FAILURES

    def failed(self, client: str) -> None:
        with self._lock:
            if len(self._failures) > 10_000:
                self._failures.clear()
            self._failures.setdefault(client_key(client), deque(maxlen=MAX_AUTH_FAILURES)).append(time.monotonic())
