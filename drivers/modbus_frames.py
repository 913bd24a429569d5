"""Modbus requests and answers as bytes, for the master in `drivers.modbus` and its links in
`drivers.modbus_link`: `_Ask`, one request as it goes on the wire and what answers it (`mismatch`: unit,
function code, byte count, echo) with the values of a checked answer; `crc16`, the RTU checksum; and
`_take_rtu_frame` / `_take_mbap_frame`, which cut received bytes into RTU and Modbus TCP answer frames
(`_OutOfStep`: a stream that is not Modbus TCP). Pure logic, no I/O.

Imports nothing from the project.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_READ_FC = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}
FC_WRITE_COIL = 5
FC_WRITE_REGISTER = 6
COIL_ON = 0xFF00


class _BadFrame(Exception):
    """A frame that is not an answer to the request it arrived for."""


class _OutOfStep(_BadFrame):
    """A Modbus TCP stream that does not parse as MBAP frames: it cannot be resynchronised."""


@dataclass(frozen=True)
class _Ask:
    """One request as it goes on the wire, and what answers it (`mismatch`).

    `count` is the quantity of a read (registers or bits); `value` the field a single write sends
    (0xFF00 / 0x0000 for a coil, the register for a holding register)."""

    unit: int
    fc: int
    address: int
    count: int = 1
    value: int = 0

    @classmethod
    def read(cls, unit: int, table: str, address: int, count: int) -> _Ask:
        return cls(int(unit), _READ_FC[table], int(address), int(count))

    @property
    def is_read(self) -> bool:
        return self.fc in (1, 2, 3, 4)

    def data_bytes(self) -> int:
        """Bytes of data in a normal answer to a read: 2 per register, 1 per 8 bits."""
        return (self.count + 7) // 8 if self.fc in (1, 2) else 2 * self.count

    def pdu(self) -> bytes:
        return struct.pack(">BHH", self.fc, self.address, self.count if self.is_read else self.value)

    def answer_length(self) -> int:
        """Length of the RTU frame of a normal answer (unit, function, data, CRC)."""
        return 5 + self.data_bytes() if self.is_read else 8

    def mismatch(self, unit: int, fc: int, data: bytes) -> str | None:
        """Why the answer PDU `fc` + `data` from `unit` does not answer this request; None when it does."""
        if unit != self.unit:
            return f"an answer from unit {unit} to a request to unit {self.unit}"
        if fc == self.fc | 0x80:
            return None if len(data) == 1 and data[0] else f"a malformed exception reply ({data.hex()})"
        if fc != self.fc:
            return f"function code {fc} in the answer to a function {self.fc} request"
        if self.is_read:
            want = self.data_bytes()
            if not data or data[0] != want or len(data) != want + 1:
                got = data[0] if data else "no"
                what = "bits" if self.fc in (1, 2) else "registers"
                return f"byte count {got} in the answer to a read of {self.count} {what} ({want} expected)"
            return None
        if data != self.pdu()[1:]:
            return f"the echo {data.hex()} does not match the write {self.pdu()[1:].hex()}"
        return None

    def values(self, data: bytes) -> list[int]:
        """The registers, or the bits as 0/1, of a checked answer's data."""
        if self.fc in (1, 2):
            return [(data[1 + i // 8] >> (i % 8)) & 1 for i in range(self.count)]
        return [int.from_bytes(data[i : i + 2], "big") for i in range(1, 1 + 2 * self.count, 2)]

    @property
    def what(self) -> str:
        """The request without its unit, as a technician reads it: "holding 0+2", "write coil 3 = 65280"."""
        name = {1: "coil", 2: "discrete", 3: "holding", 4: "input", 5: "write coil", 6: "write register"}
        tail = f"+{self.count}" if self.is_read else f" = {self.value}"
        return f"{name.get(self.fc, f'function {self.fc}')} {self.address}{tail}"

    def __str__(self) -> str:
        return f"{self.what} of unit {self.unit}"


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc16_table()


def crc16(data: bytes | bytearray) -> int:
    """Modbus RTU CRC-16 (init 0xFFFF, reflected polynomial 0xA001); it goes on the wire low byte first."""
    crc = 0xFFFF
    for byte in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ byte) & 0xFF]
    return crc


def _rtu_answer_length(buf: bytearray, start: int) -> int | None:
    """Length of an answer frame starting at `buf[start]` judging by its function code (None: not the start
    of an answer we know, or its byte count has not arrived yet)."""
    fc = buf[start + 1]
    if fc & 0x80:
        return 5
    if fc in (1, 2, 3, 4):
        return 5 + buf[start + 2] if start + 2 < len(buf) else None
    if fc in (5, 6, 15, 16):
        return 8
    return None


def _take_rtu_frame(buf: bytearray) -> tuple[int, int, bytes] | None:
    """The first complete, CRC-valid answer frame in `buf` as (unit, function code, data); it and every
    byte before it (noise, a broken frame) are removed from `buf`. None while there is none: a frame
    still arriving, or garbage whose supposed length has not arrived, does not hide a valid frame after it."""
    for start in range(len(buf) - 3):
        length = _rtu_answer_length(buf, start)
        if length is None or start + length > len(buf):
            continue
        end = start + length
        if crc16(buf[start : end - 2]) == int.from_bytes(buf[end - 2 : end], "little"):
            frame = bytes(buf[start:end])
            del buf[:end]
            return frame[0], frame[1], frame[2:-2]
    return None


def _take_mbap_frame(buf: bytearray) -> tuple[int, int, int, bytes] | None:
    """The first Modbus TCP frame in `buf` as (transaction id, unit, function code, data), removed from
    `buf`; None while it is incomplete. Raises _OutOfStep when the stream is not Modbus TCP: it cannot be
    resynchronised, the caller closes the connection."""
    if len(buf) < 7:
        return None
    tid, proto, length, unit = struct.unpack(">HHHB", buf[:7])
    if proto != 0 or not 2 <= length <= 254:
        raise _OutOfStep(f"not a Modbus TCP answer ({bytes(buf[:16]).hex()})")
    if len(buf) < 6 + length:
        return None
    pdu = bytes(buf[7 : 6 + length])
    del buf[: 6 + length]
    return tid, unit, pdu[0], pdu[1:]
