"""Opening a serial port the way every driver here does: exclusive, with the line settings of its bus.

Imports pyserial only.
"""

from __future__ import annotations

import errno
import os

import serial

#: What to check when a port cannot be opened, by errno.
_OPEN_HINTS = {
    errno.EACCES: "the user running edge-agent must be in the dialout group, as the service's user is",
    errno.ENOENT: "unplugged, or another name: ls -l /dev/serial/by-id/",
    errno.EBUSY: "another program has it open",
}


def open_error(exc: BaseException) -> str:
    """Why a port could not be opened, once and with what to check: pyserial's text repeats the errno
    and the path ("could not open port X: [Errno 13] Permission denied: 'X'")."""
    code = getattr(exc, "errno", None)
    if not isinstance(code, int):
        text = str(exc) or type(exc).__name__
        return text if len(text) <= 160 else text[:157] + "..."
    hint = _OPEN_HINTS.get(code)
    return os.strerror(code) + (f" ({hint})" if hint else "")


def open_exclusive(path: str, *, baudrate: int, parity: str, bytesize: int, stopbits: float,
                   read_timeout: float, write_timeout: float) -> serial.Serial:
    """The open port at `path`. Exclusive: a second agent (or master) on the same port would interleave
    its frames with ours. Raises OSError / ValueError / serial.SerialException when it cannot be opened."""
    ser = serial.Serial()
    ser.port = path
    ser.baudrate = baudrate
    ser.parity = parity
    ser.bytesize = bytesize
    ser.stopbits = stopbits
    ser.timeout = read_timeout
    ser.write_timeout = write_timeout
    ser.exclusive = True
    ser.open()
    return ser
