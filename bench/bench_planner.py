"""Benchmark of the read planner: requests, wire bytes and wire time per poll of a 40-point map on
Modbus RTU, naive (one request per entry) vs planned, and the CPU time of planning + decoding.

Run from the repository: `.venv/bin/python bench/bench_planner.py [--iterations N]`. Prints its figures
and parameters; asserts nothing about time. Imports `drivers` only.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drivers.modbus_codec import decode, encode, flag_from_status  # noqa: E402
from drivers.planner import (  # noqa: E402
    DEFAULT_MAX_GAP,
    Request,
    naive_plan,
    plan,
    rtu_char_bits,
    rtu_frame_bytes,
    rtu_wire_s,
    slice_response,
)
from drivers.registers import RegisterSpec  # noqa: E402

BAUD = 9600
BITS_PER_CHAR = rtu_char_bits()  # 8N1: start + 8 data + stop
SILENCE_CHARS = 3.5  # Modbus RTU inter-frame gap, after every frame (drivers.planner.rtu_gap_s)


def forty_point_map() -> list[RegisterSpec]:
    """The 40-point map of tests/unit/test_planner.py: 24 float32 CDAB at 0..47, a float64 totalizer
    at 52, 8 int16 /100 in the input table every 3rd register, 4 status words at 100..103, an alarm
    bit word at 120, 2 coils at 10..11."""
    specs = [RegisterSpec(f"v{i}", 2 * i, type="float32", order="CDAB") for i in range(24)]
    specs.append(RegisterSpec("total", 52, type="float64"))
    specs += [RegisterSpec(f"raw{i}", 3 * i, type="int16", table="input", scale=0.01) for i in range(8)]
    specs += [RegisterSpec(f"st{i}", 100 + i, role="status", flags={0: "N", 1: "M", 2: "D"}) for i in range(4)]
    specs += [RegisterSpec("status_bits", 120, role="status", bits={0: "D"})]
    specs += [RegisterSpec(f"alarm{i}", 10 + i, table="coil") for i in range(2)]
    assert len(specs) == 40
    return specs


def wire(requests: list[Request], turnaround_ms: float) -> tuple[int, float]:
    """(bytes, milliseconds) on the wire for one poll: every frame's characters plus 3.5 characters of
    silence after each frame (`drivers.planner.rtu_wire_s`), plus the slave's turnaround per request."""
    total_bytes = sum(sum(rtu_frame_bytes(r)) for r in requests)
    ms = 1000.0 * rtu_wire_s(requests, BAUD) + len(requests) * turnaround_ms
    return total_bytes, ms


def register_image(specs: list[RegisterSpec]) -> dict[tuple[str, int], int]:
    image: dict[tuple[str, int], int] = {}
    for i, s in enumerate(specs):
        value = 0 if s.role == "status" else (1 if s.table == "coil" else 12.34 + i)
        for k, w in enumerate(encode(value, s)):
            image[(s.table, s.address + k)] = w
    return image


def one_cycle(specs: list[RegisterSpec], responses: dict[Request, list[int]], replan: bool, max_gap: int) -> int:
    """What a driver does per poll once the bytes are in: (plan,) slice, decode values and status."""
    requests = plan(specs, max_gap=max_gap) if replan else list(responses)
    decoded = 0
    for r in requests:
        for s, part in slice_response(r, responses[r]):
            if s.role == "status":
                flag_from_status(part, s)
            else:
                decode(part, s)
            decoded += 1
    return decoded


def cpu_us_per_cycle(specs: list[RegisterSpec], iterations: int, replan: bool, max_gap: int) -> float:
    image = register_image(specs)
    requests = plan(specs, max_gap=max_gap)
    responses = {r: [image.get((r.table, r.address + k), 0) for k in range(r.count)] for r in requests}
    assert one_cycle(specs, responses, replan, max_gap) == len(specs)  # warm up
    start = time.process_time()
    for _ in range(iterations):
        one_cycle(specs, responses, replan, max_gap)
    return (time.process_time() - start) / iterations * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5000)
    parser.add_argument("--turnaround-ms", type=float, default=5.0,
                        help="slave response latency per request (0 = ideal slave)")
    args = parser.parse_args()
    specs = forty_point_map()
    char_ms = 1000.0 * BITS_PER_CHAR / BAUD

    print("bench_planner: 40-point Modbus map, naive vs planned")
    print(f"  date {time.strftime('%Y-%m-%d %H:%M:%S %z')}, {platform.node()}, {platform.machine()}, "
          f"{platform.processor() or 'cpu ?'}, Python {platform.python_version()}")
    print(f"  RTU {BAUD} baud 8N1 ({BITS_PER_CHAR:g} bits/char = {char_ms:.3f} ms/char), "
          f"{SILENCE_CHARS} chars of silence after every frame; request frame 8 bytes, "
          "response 5 + 2N bytes (coils 5 + ceil(N/8))")
    print(f"  map: {len(specs)} entries (24 float32, 1 float64, 8 int16 input, 5 status words, 2 coils) "
          f"= {sum(s.count for s in specs)} registers/bits")
    two, forty = (Request("holding", 0, 2, ()), Request("holding", 0, 40, ()))
    print(f"  check against DOMAIN.md: 2 registers {wire([two], 0)[1]:.1f} ms (~25), "
          f"40 registers {wire([forty], 0)[1]:.1f} ms (~100)")
    print()
    header = f"  {'plan':<22}{'requests':>9}{'wire bytes':>12}{'ms ideal':>10}" \
             f"{f'ms +{args.turnaround_ms:g}ms/req':>16}{'registers read':>16}"
    print(header)
    rows = [("naive (1 per entry)", naive_plan(specs))]
    for gap in (0, DEFAULT_MAX_GAP):
        rows.append((f"planned max_gap={gap}", plan(specs, max_gap=gap)))
    for label, requests in rows:
        nbytes, ms = wire(requests, 0.0)
        _, ms_latency = wire(requests, args.turnaround_ms)
        print(f"  {label:<22}{len(requests):>9}{nbytes:>12}{ms:>10.1f}{ms_latency:>16.1f}"
              f"{sum(r.count for r in requests):>16}")
    print()
    print(f"  CPU per poll cycle (time.process_time, {args.iterations} iterations, max_gap={DEFAULT_MAX_GAP}):")
    for replan, label in ((True, "plan + slice + decode all 40"), (False, "slice + decode (plan cached)")):
        us = cpu_us_per_cycle(specs, args.iterations, replan, DEFAULT_MAX_GAP)
        print(f"    {label:<32}{us:8.1f} us")


if __name__ == "__main__":
    main()
