"""Opening a serial port the way every driver here does: exclusive, with the line settings of its bus.

Imports pyserial only.
"""

from __future__ import annotations

import serial


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
