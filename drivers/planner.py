"""Read planner: groups a device's register map into as few Modbus read requests as possible.

Pure logic, no I/O: `plan()` once per device (the map does not change between polls), then per poll
one read per `Request` and `slice_response()` to hand each entry its registers. Imports nothing from
`agent`.

Rules. Entries of one table are merged into one request while the hole between them (registers no entry
uses) is at most `max_gap` and the request stays within `max_block` (and the protocol's limits: 125
registers for holding/input, 2000 bits for coil/discrete). Every register of every entry is read by
exactly one request; an entry is never split over two requests; entries that overlap (two views of the
same registers) always share a request. Requests come sorted by table (holding, input, coil, discrete)
then address. Greedy merging in address order is optimal here (fewest requests): requests cover runs of
consecutive entry clusters, and any part of a feasible run is feasible.

Why `max_gap` = 8 by default: on RTU a separate request costs a request frame (8 bytes), the response
header and CRC (5 bytes) and two 3.5-character silences, 20 character times before the slave's own
turnaround (typically several ms more); reading a hole costs 2 characters per register. Up to 10 hole
registers are therefore cheaper than a new request even with an instant slave; 8 leaves a margin and
keeps reads from wandering far into undefined registers. Instruments that answer a read across an
undefined register with an exception need `max_gap: 0` (contiguous entries are still merged).
The gap is counted in the table's units (registers, or bits for coil/discrete).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from drivers.registers import BIT_TABLES, RegisterSpec, Table

DEFAULT_MAX_GAP = 8
REGISTER_LIMIT = 125  # Modbus read holding/input registers: at most 125 per request
BIT_LIMIT = 2000  # Modbus read coils/discrete inputs: at most 2000 per request
TABLE_ORDER: tuple[Table, ...] = ("holding", "input", "coil", "discrete")
FUNCTION_CODES: dict[str, int] = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}


@dataclass(frozen=True, slots=True)
class Request:
    """One read: `count` registers (bits for coil/discrete) of `table` from `address`, carrying the
    entries `members` (sorted by address)."""

    table: Table
    address: int
    count: int
    members: tuple[RegisterSpec, ...]

    @property
    def end(self) -> int:
        """First address after the request."""
        return self.address + self.count

    @property
    def function_code(self) -> int:
        """Modbus function code of the read (1 coils, 2 discrete inputs, 3 holding, 4 input)."""
        return FUNCTION_CODES[self.table]


def table_limit(table: Table) -> int:
    """Protocol maximum per read request for `table` (125 registers or 2000 bits)."""
    return BIT_LIMIT if table in BIT_TABLES else REGISTER_LIMIT


def plan(
    specs: Iterable[RegisterSpec], max_gap: int = DEFAULT_MAX_GAP, max_block: int | None = None
) -> list[Request]:
    """The fewest read requests that read every entry of `specs` (see the module docstring).

    `max_block` (default: the protocol limit of each table) is capped at the protocol limit.
    Raises ValueError for a negative `max_gap`, a `max_block` below 1, or entries that cannot fit
    one request (a 64-bit value with `max_block` < 4, overlapping entries spanning more than it).
    """
    if max_gap < 0:
        raise ValueError(f"max_gap must be >= 0, got {max_gap}")
    if max_block is not None and max_block < 1:
        raise ValueError(f"max_block must be >= 1, got {max_block}")
    by_table: dict[str, list[RegisterSpec]] = {}
    for spec in specs:
        by_table.setdefault(spec.table, []).append(spec)
    requests: list[Request] = []
    for table in TABLE_ORDER:
        entries = by_table.get(table)
        if not entries:
            continue
        limit = table_limit(table) if max_block is None else min(max_block, table_limit(table))
        for start, end, members in _blocks(_clusters(entries, limit), max_gap, limit):
            requests.append(Request(table, start, end - start, tuple(members)))
    return requests


def naive_plan(specs: Iterable[RegisterSpec]) -> list[Request]:
    """One request per entry (what a driver without planning does), in the same sort order."""
    ordered = sorted(specs, key=lambda s: (TABLE_ORDER.index(s.table), s.address, -s.count))
    return [Request(s.table, s.address, s.count, (s,)) for s in ordered]


def _clusters(entries: list[RegisterSpec], limit: int) -> list[tuple[int, int, list[RegisterSpec]]]:
    """Entries sorted by address, chained where they overlap: (start, end, members), disjoint."""
    entries = sorted(entries, key=lambda s: (s.address, -s.count, s.channel))
    clusters: list[tuple[int, int, list[RegisterSpec]]] = []
    for spec in entries:
        if clusters and spec.address < clusters[-1][1]:
            start, end, members = clusters[-1]
            members.append(spec)
            clusters[-1] = (start, max(end, spec.end), members)
        else:
            clusters.append((spec.address, spec.end, [spec]))
    for start, end, members in clusters:
        if end - start > limit:
            names = ", ".join(m.channel for m in members)
            raise ValueError(f"{members[0].table} {start}..{end - 1} ({names}) needs {end - start} "
                             f"registers in one request, more than max_block {limit}")
    return clusters


def _blocks(
    clusters: list[tuple[int, int, list[RegisterSpec]]], max_gap: int, limit: int
) -> list[tuple[int, int, list[RegisterSpec]]]:
    blocks: list[tuple[int, int, list[RegisterSpec]]] = []
    for start, end, members in clusters:
        if blocks:
            b_start, b_end, b_members = blocks[-1]
            if start - b_end <= max_gap and end - b_start <= limit:
                b_members.extend(members)
                blocks[-1] = (b_start, end, b_members)
                continue
        blocks.append((start, end, list(members)))
    return blocks


def slice_response(request: Request, words: Sequence[int]) -> list[tuple[RegisterSpec, list[int]]]:
    """Each member of `request` with its own registers (bits) out of the response `words`.

    `words` must hold at least `request.count` items (a coil response padded to a whole byte may hold
    more; the extra bits are ignored). Raises ValueError for a short response.
    """
    if len(words) < request.count:
        raise ValueError(f"response to {request.table} {request.address}+{request.count} holds only "
                         f"{len(words)} values")
    base = request.address
    return [(m, list(words[m.address - base : m.end - base])) for m in request.members]


def rtu_frame_bytes(request: Request) -> tuple[int, int]:
    """(request, response) sizes in bytes of the RTU frames for `request`: a read request is slave 1 +
    function 1 + address 2 + count 2 + CRC 2 = 8; the response slave 1 + function 1 + byte count 1 +
    data + CRC 2, data being 2 bytes per register or one bit per coil rounded up to whole bytes."""
    data = (request.count + 7) // 8 if request.table in BIT_TABLES else 2 * request.count
    return 8, 5 + data


def rtu_char_bits(bytesize: int = 8, parity: str = "N", stopbits: float = 1) -> float:
    """Bits one character takes on a serial line: start bit, data bits, a parity bit unless parity N,
    stop bits (10 for 8N1, 11 for 8E1 and 8N2, the 11 bits Modbus RTU specifies)."""
    return 1 + bytesize + (0 if str(parity).upper() == "N" else 1) + stopbits


def rtu_gap_s(baudrate: int, char_s: float) -> float:
    """The RTU frame gap: 3.5 characters of silence, fixed at 1.75 ms above 19200 baud (Modbus over
    serial line)."""
    return 3.5 * char_s if baudrate <= 19200 else 0.00175


def rtu_wire_s(requests: Iterable[Request], baudrate: int, bytesize: int = 8, parity: str = "N",
               stopbits: float = 1) -> float:
    """Seconds the reads `requests` keep an RTU line busy at least: each request and answer frame
    (`rtu_frame_bytes`) at the line's character time, plus the frame gap after each; the slave's own
    turnaround, unknown, is not counted. At 9600 8N1: ~25 ms for 2 registers, ~100 ms for 40 (DOMAIN.md)."""
    char_s = rtu_char_bits(bytesize, parity, stopbits) / max(1, baudrate)
    gap_s = rtu_gap_s(baudrate, char_s)
    return sum(sum(rtu_frame_bytes(r)) * char_s + 2 * gap_s for r in requests)
