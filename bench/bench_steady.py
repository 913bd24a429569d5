"""Steady state: the agent process polling 40 channels at 1 s into SQLite and a real mosquitto.

    .venv/bin/python bench/bench_steady.py [--seconds 300] [--channels 40] [--interval 1] [--sync full]
                                           [--driver simulated|modbus] [--existing-buffer]

`--driver simulated` computes the readings in the agent (`driver: simulated`); `--driver modbus`
reads them as float32 holding registers from a Modbus TCP slave (the project's simulator, in its own
process, so that its work is not counted), one planned request per poll — as ThingsBoard's gateway
was measured.

Reads the agent's own counters from /proc after a warm-up: CPU seconds (utime+stime) per 1000
readings, peak RSS (VmHWM), and bytes the process caused to be written to storage (write_bytes of
/proc/PID/io) per reading. Also reports the broker outage reconnect time: the broker is stopped
for `--outage` seconds at the end and the time from its restart to the agent's next birth message
is measured.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from harness import AgentProcess, Broker, Collector, db_last_seq, sim_config, wait_for, write_config  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")

SLAVE = r"""
import sys, signal, threading
from drivers.modbus_codec import encode
from drivers.registers import RegisterSpec
from drivers.sim.slave import RegisterBank, SlaveCore, TcpServer
n = int(sys.argv[1])
bank = RegisterBank()
for i in range(n):
    bank.set("holding", 2 * i, encode(10.0 + i / 8, RegisterSpec(f"c{i:02d}", 2 * i, type="float32")))
server = TcpServer(SlaveCore({1: bank}), "127.0.0.1", 0).start()
print(server.port, flush=True)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
stop.wait()
server.stop()
"""


def modbus_station(channels: int) -> tuple[subprocess.Popen, dict, dict]:
    """A Modbus TCP slave process with `channels` float32 values; the bus and device sections."""
    slave = subprocess.Popen([sys.executable, "-c", SLAVE, str(channels)], cwd=REPO, stdout=subprocess.PIPE,
                             text=True)
    assert slave.stdout is not None
    port = int(slave.stdout.readline())
    buses = {"lan": {"type": "tcp", "host": "127.0.0.1", "port": port, "timeout": 1.0}}
    device = {"bus": "lan", "slave": 1, "registers": [
        {"channel": f"c{i:02d}", "address": 2 * i, "type": "float32", "unit": "mg/L"} for i in range(channels)]}
    return slave, buses, device


def proc_sample(pid: int) -> dict:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(stat[11]) + int(stat[12])) / TICK
    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    status = dict(line.split(":\t") for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    return {"cpu": cpu, "write_bytes": int(io["write_bytes"]), "hwm_kb": int(status["VmHWM"].split()[0]),
            "rss_kb": int(status["VmRSS"].split()[0])}


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds used so far by each thread of `pid` (schedstat: nanosecond resolution), by name.
    The agent names its threads (recorder, publisher, bus:NAME) for the kernel too."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            ns = int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError):
            continue  # the thread ended meanwhile
        out[name] = out.get(name, 0.0) + ns / 1e9
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--channels", type=int, default=40)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--sync", choices=["full", "normal"], default="full")
    parser.add_argument("--commit-ms", type=int, default=200)
    parser.add_argument("--warmup", type=float, default=10)
    parser.add_argument("--outage", type=float, default=120)
    parser.add_argument("--driver", choices=["simulated", "modbus"], default="simulated")
    parser.add_argument("--existing-buffer", action="store_true",
                        help="measure a restart: run the agent once first, so that the buffer file exists")
    args = parser.parse_args()
    slave = None
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        tmp = Path(d)
        broker = Broker(tmp / "broker").start()
        config = sim_config(tmp, broker, station_id="STEADY01", channels=args.channels, interval=args.interval,
                            storage={"commit_interval_ms": args.commit_ms, "sync": args.sync},
                            mqtt={"reconnect_max": 30, "shutdown_grace": 5})
        if args.driver == "modbus":
            slave, config["buses"], device = modbus_station(args.channels)
            config["devices"] = {"analyzer": {**device, "interval": args.interval}}
        cfg = write_config(tmp / "station.yaml", config)
        collector = Collector(broker, "env/#")
        db = tmp / "buffer.db"
        if args.existing_buffer:  # every start but a station's first finds its buffer file
            first = AgentProcess(cfg)
            wait_for(lambda: db.exists() and db_last_seq(db) > 0, 30, "first run's readings")
            first.stop()
        agent = AgentProcess(cfg)
        try:
            seq_before = db_last_seq(db) if db.exists() else 0
            wait_for(lambda: db.exists() and db_last_seq(db) > seq_before, 30, "first readings")
            time.sleep(args.warmup)
            th0 = thread_cpu(agent.proc.pid)
            s0, n0, t0 = proc_sample(agent.proc.pid), db_last_seq(db), time.monotonic()
            time.sleep(args.seconds)
            s1, n1, t1 = proc_sample(agent.proc.pid), db_last_seq(db), time.monotonic()
            th1 = thread_cpu(agent.proc.pid)
            reconnect = None
            if args.outage > 0:
                collector.close()
                broker.stop()
                time.sleep(args.outage)
                broker.start()
                t_up = time.monotonic()
                collector = Collector(broker, "env/#")
                wait_for(lambda: any(m.get("state") == "online" for m in collector.json_messages("/status")),
                         args.outage + 120, "reconnect", interval=0.05)
                reconnect = time.monotonic() - t_up
        finally:
            agent.stop()
            collector.close()
            broker.stop()
            if slave is not None:
                slave.terminate()
                slave.wait(10)
    readings = n1 - n0
    cpu = s1["cpu"] - s0["cpu"]
    written = s1["write_bytes"] - s0["write_bytes"]
    print(f"bench_steady  {time.strftime('%Y-%m-%d')}  {platform.machine()} {os.cpu_count()} cores  "
          f"python {platform.python_version()}")
    print(f"  {args.channels} channels ({args.driver}) every {args.interval} s for {t1 - t0:.0f} s "
          f"(after {args.warmup:.0f} s warm-up), "
          f"commit_interval_ms {args.commit_ms}, sync {args.sync}, "
          f"{'existing' if args.existing_buffer else 'fresh'} buffer file")
    print(f"  readings stored      : {readings}  ({readings / (t1 - t0):.1f}/s)")
    print(f"  CPU per 1000 readings: {cpu / readings * 1000 * 1000:.1f} ms  (target <= 20 ms; {cpu:.2f} CPU-s total)")
    for name in sorted(th1, key=lambda n: th0.get(n, 0.0) - th1[n]):
        used = th1[name] - th0.get(name, 0.0)
        print(f"    thread {name:<14}: {used / readings * 1e6:5.1f} ms per 1000 readings")
    print(f"  peak RSS (VmHWM)     : {s1['hwm_kb'] / 1024:.1f} MB  (target <= 45 MB; "
          f"{s1['rss_kb'] / 1024:.1f} MB at the end)")
    print(f"  written per reading  : {written / readings:.0f} bytes  (target <= 150; {written / 1e6:.2f} MB total)")
    if reconnect is not None:
        print(f"  reconnect after a {args.outage:.0f} s broker outage: {reconnect:.1f} s from broker start to birth "
              f"message (reconnect_max 30)")


if __name__ == "__main__":
    main()
