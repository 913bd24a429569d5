"""The systemd notification protocol (sd_notify) over NOTIFY_SOCKET, standard library only."""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends `READY=1`, `WATCHDOG=1`, `STATUS=…` when started by systemd; does nothing otherwise."""

    def __init__(self, env: dict[str, str] | None = None):
        env = dict(os.environ) if env is None else env
        address = env.get("NOTIFY_SOCKET")
        self.address: str | None = None
        if address:
            self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_usec = 0
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_usec = int(usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None without a watchdog."""
        return self.watchdog_usec / 2_000_000 if self.watchdog_usec else None

    def notify(self, message: str) -> bool:
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(self.address)
                sock.sendall(message.encode())
            return True
        except OSError:
            return False
