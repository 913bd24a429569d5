"""Resident memory over time: the agent at a configurable rate, with alarm rules and `status` commands.

    .venv/bin/python bench/bench_memory.py [--devices 20] [--channels 10] [--interval 0.1]
        [--seconds 900] [--sample 30] [--alarms] [--status-every 1] [--big-command-mb 20]
        [--arena-max N] [--tracemalloc DIR]

Prints RSS (VmRSS), peak RSS (VmHWM), the anonymous part of the RSS (smaps_rollup), threads and open
file descriptors every `--sample` seconds, then the readings rate. `--alarms` adds rules on every
channel (above with a 300 s window, below, stale; on each device's c00 a plain above instead, raised and
cleared every minute). `--status-every S` sends the `status` command on P/cmd every S seconds (0: never)
and counts the replies. `--big-command-mb N` publishes one N MB message on P/cmd after the first sample
and prints the peak RSS while it is read, whether it was answered ok:false, and whether readings kept
flowing. `--arena-max N` runs the agent with MALLOC_ARENA_MAX=N. `--tracemalloc DIR` starts the agent
under tracemalloc and dumps into DIR at each sample (SIGUSR2) a snapshot (read it with
`tracemalloc.Snapshot.load`), gc counts and `sys._debugmallocstats()` (pymalloc's arenas and pools).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import paho.mqtt.client as mqtt  # noqa: E402
from harness import AgentProcess as _AgentProcess  # noqa: E402
from harness import Broker, Collector, db_last_seq, sim_config, wait_for, write_config  # noqa: E402

TRACER = """
import os, signal, sys, tracemalloc
tracemalloc.start(int(os.environ.get("BENCH_TRACE_DEPTH", "8")))
n = [0]
def dump(*_):
    n[0] += 1
    tracemalloc.take_snapshot().dump(os.path.join(os.environ["BENCH_TRACE_DIR"], f"snap{n[0]:03d}.bin"))
    import gc, io, contextlib
    err = io.StringIO()
    with open(os.path.join(os.environ["BENCH_TRACE_DIR"], f"stats{n[0]:03d}.txt"), "w") as f:
        f.write(f"gc counts {gc.get_count()} objects {len(gc.get_objects())} "
                f"traced {tracemalloc.get_traced_memory()}\\n")
        fd = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(fd, 2)
            os.close(fd)
signal.signal(signal.SIGUSR2, dump)
from agent.cli import main
sys.exit(main(sys.argv[1:]))
"""


class AgentProcess(_AgentProcess):
    """The harness's agent process, optionally started through another `python ARGV run -c FILE`."""

    def __init__(self, config_path: Path, env: dict, argv: list[str] | None):
        if argv is None:
            super().__init__(config_path, env=env)
            return
        self.config_path, self.log_path = config_path, config_path.with_suffix(".traced.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, *argv, "run", "-c", str(config_path)], stdout=self._log,
                                     stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=REPO)


def proc_memory(pid: int) -> dict:
    status = dict(line.split(":\t") for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    rollup = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        rollup[key] = int(value.split()[0])
    return {"rss": int(status["VmRSS"].split()[0]) / 1024, "hwm": int(status["VmHWM"].split()[0]) / 1024,
            "anon": rollup.get("Anonymous", 0) / 1024, "threads": int(status["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def alarm_rules(devices: int) -> list[dict]:
    return [*({"channel": f"sim{d}.c00", "above": 10.5, "hysteresis": 0.1} for d in range(devices)),  # every minute

        {"channel": "*", "above": 1000, "window": 300},
        {"channel": "*", "below": -1000},
        {"channel": "*", "stale": 60},
    ]


class Commander:
    """Sends commands on P/cmd and counts the replies on P/cmd/reply."""

    def __init__(self, broker: Broker, base: str):
        self.base, self.replies, self._lock = base, [], threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-cmd-{os.getpid()}")
        self._ready = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{base}/cmd/reply", qos=1)
        self.client.on_subscribe = lambda *a: self._ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        if not self._ready.wait(10):
            raise SystemExit("commander could not subscribe")

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.replies.append(json.loads(msg.payload))

    def send(self, payload: bytes) -> None:
        self.client.publish(f"{self.base}/cmd", payload, qos=1).wait_for_publish(60)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--channels", type=int, default=10)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--seconds", type=float, default=900)
    parser.add_argument("--sample", type=float, default=30)
    parser.add_argument("--alarms", action="store_true")
    parser.add_argument("--status-every", type=float, default=0)
    parser.add_argument("--big-command-mb", type=float, default=0)
    parser.add_argument("--arena-max", type=int, default=0)
    parser.add_argument("--tracemalloc", type=Path)
    args = parser.parse_args()
    env = {"MALLOC_ARENA_MAX": str(args.arena_max)} if args.arena_max else {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        tmp = Path(d)
        broker = Broker(tmp / "broker").start()
        config = sim_config(tmp, broker, station_id="MEMORY01", channels=args.channels, interval=args.interval,
                            devices=args.devices, storage={"commit_interval_ms": 200},
                            mqtt={"reconnect_max": 30, "shutdown_grace": 5})
        if args.alarms:
            config["alarms"] = alarm_rules(args.devices)
        cfg = write_config(tmp / "station.yaml", config)
        collector = Collector(broker, "env/MEMORY01/status")
        commander = Commander(broker, "env/MEMORY01")
        db = tmp / "buffer.db"
        if args.tracemalloc:
            args.tracemalloc.mkdir(parents=True, exist_ok=True)
            env.update(BENCH_TRACE_DIR=str(args.tracemalloc.resolve()))
        agent = AgentProcess(cfg, env=env, argv=["-c", TRACER] if args.tracemalloc else None)
        pid = agent.proc.pid
        stop = threading.Event()

        def send_status() -> None:
            n = 0
            while not stop.wait(args.status_every):
                n += 1
                commander.send(json.dumps({"id": f"s{n}", "cmd": "status"}).encode())

        try:
            wait_for(lambda: not agent.alive() or any(m.get("state") == "online"
                                                      for m in collector.json_messages("/status")),
                     300 if args.tracemalloc else 60,
                     "the agent's birth message")
            assert agent.alive(), "the agent stopped"
            if args.status_every > 0:
                threading.Thread(target=send_status, daemon=True).start()
            t0, n0 = time.monotonic(), db_last_seq(db)
            print(f"bench_memory  {time.strftime('%Y-%m-%d %H:%M')}  {platform.machine()} {os.cpu_count()} cores  "
                  f"python {platform.python_version()}")
            rate = args.devices * args.channels / args.interval
            arena = f", MALLOC_ARENA_MAX={args.arena_max}" if args.arena_max else ""
            print(f"  {args.devices} devices x {args.channels} channels every {args.interval} s ({rate:.0f} "
                  f"readings/s), alarms {'on' if args.alarms else 'off'}, status every {args.status_every or '-'} s"
                  f"{arena}")
            print("      t_s   RSS_MB  HWM_MB  anon_MB  threads  fds  replies")
            k = 0
            while True:
                m = proc_memory(pid)
                elapsed = time.monotonic() - t0
                print(f"  {elapsed:7.0f}  {m['rss']:7.1f} {m['hwm']:7.1f}  {m['anon']:7.1f}  {m['threads']:7d} "
                      f"{m['fds']:4d}  {len(commander.replies):7d}", flush=True)
                if args.tracemalloc:
                    os.kill(pid, signal.SIGUSR2)
                if k == 0 and args.big_command_mb:
                    big_command(commander, pid, args.big_command_mb, db)
                k += 1
                if elapsed >= args.seconds:
                    break
                time.sleep(min(args.sample, args.seconds - elapsed + 0.01))
            n1, t1 = db_last_seq(db), time.monotonic()
            print(f"  readings stored: {n1 - n0} ({(n1 - n0) / (t1 - t0):.0f}/s); "
                  f"status replies ok: {sum(1 for r in commander.replies if r.get('ok'))}")
        except BaseException:
            print(agent.log()[-3000:], file=sys.stderr)
            raise
        finally:
            stop.set()
            agent.stop()
            commander.close()
            collector.close()
            broker.stop()


def big_command(commander: Commander, pid: int, mb: float, db: Path) -> None:
    """One oversized message on P/cmd: the peak RSS while it is read, the answer, readings after it."""
    before = proc_memory(pid)
    refused = len([r for r in commander.replies if r.get("ok") is False])
    payload = b'{"id": "big", "cmd": "ping", "pad": "' + b"x" * int(mb * 1e6) + b'"}'
    threading.Thread(target=commander.send, args=(payload,), daemon=True).start()
    deadline, peak = time.monotonic() + 120, before["rss"]
    while time.monotonic() < deadline:
        peak = max(peak, proc_memory(pid)["rss"])
        if len([r for r in commander.replies if r.get("ok") is False]) > refused:
            break
        time.sleep(0.01)
    seq = db_last_seq(db)
    wait_for(lambda: db_last_seq(db) > seq, 30, "readings after the big command")
    after = proc_memory(pid)
    answer = [r for r in commander.replies if r.get("ok") is False][refused:]
    print(f"  big command {mb:g} MB: RSS {before['rss']:.1f} MB before, peak seen {peak:.1f} MB (VmHWM "
          f"{after['hwm']:.1f}), {after['rss']:.1f} MB after; answer {answer[:1]}", flush=True)


if __name__ == "__main__":
    main()
