"""Benchmark of the Modbus driver against a real slave: requests and wire bytes per poll of a 40-point map,
naive (one request per entry) vs planned, counted by the slave; the RTU wire time those bytes imply at
9600 baud; and the CPU time of one poll cycle in the polling thread (the bus's Modbus master + decoding +
flags).

The slave is the project's simulator (`drivers.sim.slave`) on a pseudo-terminal (Modbus RTU) and on
loopback TCP, in threads of this process; CPU is measured with `time.thread_time()` in the polling thread
only, so the slave's work is not counted. Wall time per poll on a pty says little about a real line
(a pty has no baud rate, so the frame gap and transfer times are a pty's): the implied wire time is the
figure to quote. Run: `.venv/bin/python bench/bench_modbus.py [--polls N]`. Prints figures and
parameters; asserts nothing about time. Imports `drivers` and the 40-point map of bench_planner.py.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import serial  # noqa: E402
from bench_planner import forty_point_map  # noqa: E402

from drivers.modbus import ModbusBus, ModbusDriver  # noqa: E402
from drivers.modbus_codec import encode  # noqa: E402
from drivers.planner import naive_plan, plan, rtu_char_bits, rtu_gap_s  # noqa: E402
from drivers.registers import RegisterSpec  # noqa: E402
from drivers.sim.slave import RegisterBank, RtuPtyServer, SlaveCore, TcpServer  # noqa: E402

BAUD = 9600
CHAR_S = rtu_char_bits() / BAUD  # 8N1: start + 8 data + stop


def filled_bank(specs: list[RegisterSpec]) -> RegisterBank:
    bank = RegisterBank()
    for i, s in enumerate(specs):
        if s.role == "status":
            bank.set(s.table, s.address, [0])
        elif s.table in ("coil", "discrete"):
            bank.set(s.table, s.address, [i % 2])
        else:
            bank.set(s.table, s.address, encode(12.34 + i, s))
    return bank


def wire_ms(total_bytes: float, requests: float) -> float:
    """RTU wire time of a poll: every character, plus 3.5 characters of silence after each frame
    (request and answer), without the slave's own turnaround (as `drivers.planner.rtu_wire_s`, from the
    bytes the slave counted)."""
    return 1000.0 * (total_bytes * CHAR_S + requests * 2 * rtu_gap_s(BAUD, CHAR_S))


def run(kind: str, mode: str, polls: int, tmp: Path) -> dict[str, float]:
    specs = forty_point_map()
    core = SlaveCore({1: filled_bank(specs)})
    if kind == "rtu":
        server: RtuPtyServer | TcpServer = RtuPtyServer(core, tmp / f"tty-{mode}").start()
        bus = ModbusBus("bench", "rtu", port=str(tmp / f"tty-{mode}"), baudrate=BAUD, timeout=1.0, retries=0)
    else:
        server = TcpServer(core, "127.0.0.1", 0).start()
        assert isinstance(server, TcpServer)
        bus = ModbusBus("bench", "tcp", host="127.0.0.1", tcp_port=server.port, timeout=1.0, retries=0)
    requests = naive_plan(specs) if mode == "naive" else plan(specs)
    driver = ModbusDriver("bench", bus, 1, 1.0, specs, requests=requests)
    try:
        driver.poll(0)  # open the port, warm up
        core.counters[1].reset()
        cpu, wall = [], []
        for _ in range(polls):
            c0, w0 = time.thread_time(), time.perf_counter()
            readings = driver.poll(0)
            cpu.append(time.thread_time() - c0)
            wall.append(time.perf_counter() - w0)
            assert all(r.flag == "N" for r in readings), readings
    finally:
        driver.close()
        server.stop()
    c = core.counters[1]
    return {
        "requests": c.requests / polls,
        "bytes": (c.rx_bytes + c.tx_bytes) / polls,
        "cpu_ms": 1000 * statistics.median(cpu),
        "wall_ms": 1000 * statistics.median(wall),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--polls", type=int, default=50, help="polls per case (default 50)")
    args = parser.parse_args()
    specs = forty_point_map()
    print("bench_modbus: 40-point map (bench_planner.forty_point_map), slave = drivers.sim.slave")
    print(f"  python {platform.python_version()}, pyserial {serial.__version__}, {platform.machine()}, "
          f"{platform.platform()}")
    print(f"  polls per case: {args.polls}; entries: {len(specs)}; planned requests: {len(plan(specs))}; "
          f"wire time at {BAUD} baud 8N1 with 3.5-char silences, slave turnaround excluded")
    print()
    print(f"  {'link':<5}{'plan':<9}{'req/poll':>9}{'bytes/poll':>11}{'wire ms @9600':>14}"
          f"{'CPU ms/poll':>12}{'wall ms/poll':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("rtu", "tcp"):
            for mode in ("naive", "planned"):
                r = run(kind, mode, args.polls, Path(tmp))
                wire = f"{wire_ms(r['bytes'], r['requests']):.0f}" if kind == "rtu" else "-"
                print(f"  {kind:<5}{mode:<9}{r['requests']:>9.0f}{r['bytes']:>11.0f}{wire:>14}"
                      f"{r['cpu_ms']:>12.2f}{r['wall_ms']:>13.1f}")


if __name__ == "__main__":
    main()
