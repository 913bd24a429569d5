"""Soak run: the agent as it lives for years on a gateway, with faults on a schedule; prints figures.

    .venv/bin/python bench/bench_soak.py [--minutes 35] [--sample 30] [--max-mb 3] [--keep-sent-days 0.005]

A real `edge-agent run -c FILE` with ~40 simulated channels at 1 s, two Modbus TCP devices served by
`edge-agent simulate` and alarm rules that toggle, against a real mosquitto on a free loopback port, with
a persistent subscriber counting seqs. Faults: the broker stopped and started every 3 minutes (down 5 s
or --long-outage, 30 s, alternately), the Modbus simulator killed (-9) and restarted every 5 minutes (down 20 s),
SIGHUP every 2 minutes alternating two valid configs (the Modbus devices' interval 1 s / 2 s),
`edge-agent status --json` every 10 s, a `status` command every 10 s and a `resend` command every minute.

Every `--sample` seconds it prints, from /proc/PID: VmRSS, VmHWM, open fds, threads, CPU seconds, and the
buffer's and its -wal's sizes. At the end: the seqs missing between the first and last received (outside
the gaps the agent announced), each figure's slope over the second half of the run (per hour), the
largest WAL and DB seen, and the commands answered. Figures only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
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
from harness import AgentProcess, Broker, free_port, run_cli, sim_config, wait_for, write_config  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

STATION = "SOAK0001"
PREFIX = f"env/{STATION}"


def station_config(tmp: Path, broker: Broker, modbus_port: int, modbus_interval: float, args) -> dict:
    config = sim_config(tmp, broker, station_id=STATION, channels=10, devices=4, interval=1.0,
                        storage={"max_mb": args.max_mb, "keep_sent_days": args.keep_sent_days,
                                 "commit_interval_ms": 200},
                        mqtt={"reconnect_max": 5})
    # c00 of sim0 swings 10 +- 5 over 2 minutes: the rule below raises and clears once a minute.
    config["devices"]["sim0"]["channels"]["c00"] = {"mean": 10, "amplitude": 5, "period": 120, "noise": 0.1}
    config["buses"] = {"plant-lan": {"type": "tcp", "host": "127.0.0.1", "port": modbus_port,
                                     "timeout": 0.5, "retries": 1}}
    config["devices"]["flow"] = {"bus": "plant-lan", "slave": 1, "interval": modbus_interval,
                                 "profile": "flow-meter"}
    config["devices"]["dust"] = {"bus": "plant-lan", "slave": 2, "interval": modbus_interval,
                                 "profile": "dust-monitor"}
    config["alarms"] = [{"channel": "sim0.c00", "above": 12, "hysteresis": 1},
                        {"channel": "*", "stale": 15}]
    return config


class Subscriber:
    """A persistent-session subscriber on P/#: reading seqs, announced gaps, command replies."""

    def __init__(self, broker: Broker):
        self.seqs: set[int] = set()
        self.received = 0
        self.gaps: list[tuple[int, int]] = []
        self.alarm_seqs: set[int] = set()
        self.replies: dict[str, int] = {}
        self.answered: set[str] = set()
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"soak-{os.getpid()}", clean_session=False)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{PREFIX}/#", qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        with self.lock:
            if msg.topic.endswith("/data"):
                if "gap" in body:
                    self.gaps.append(tuple(body["gap"]))
                for r in body.get("readings", []):
                    self.seqs.add(r["seq"])
                    self.received += 1
            elif msg.topic.endswith("/alarm") and "alarm" in body:
                self.alarm_seqs.add(body["alarm"]["seq"])
            elif msg.topic.endswith("/cmd/reply"):
                self.answered.add(str(body.get("id")))
                key = f"{body.get('cmd', '?')}:{body.get('ok')}"
                self.replies[key] = self.replies.get(key, 0) + 1

    def command(self, body: dict) -> None:
        self.client.publish(f"{PREFIX}/cmd", json.dumps(body), qos=1)


def proc_sample(pid: int, db: Path) -> dict:
    status = dict(line.split(":\t") for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    wal = db.with_name(db.name + "-wal")
    return {
        "rss_kb": int(status["VmRSS"].split()[0]), "hwm_kb": int(status["VmHWM"].split()[0]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": len(os.listdir(f"/proc/{pid}/task")),
        "cpu_s": (int(stat[11]) + int(stat[12])) / tick,
        "db_kb": db.stat().st_size // 1024 if db.exists() else 0,
        "wal_kb": wal.stat().st_size // 1024 if wal.exists() else 0,
    }


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per hour."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    return 3600 * sum((t - mx) * (v - my) for t, v in points) / var if var else 0.0


def start_simulator(config_path: Path, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "agent.cli", "simulate", "-c", str(config_path)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=35)
    ap.add_argument("--sample", type=float, default=30)
    ap.add_argument("--max-mb", type=float, default=3)
    ap.add_argument("--keep-sent-days", type=float, default=0.005)
    ap.add_argument("--broker-every", type=float, default=180)
    ap.add_argument("--modbus-every", type=float, default=300)
    ap.add_argument("--reload-every", type=float, default=120)
    ap.add_argument("--long-outage", type=float, default=30, help="seconds of every second broker outage")
    ap.add_argument("--dir", help="work directory (default: a new temporary one, kept)")
    args = ap.parse_args()

    tmp = Path(args.dir or tempfile.mkdtemp(prefix="soak-"))
    tmp.mkdir(parents=True, exist_ok=True)
    broker = Broker(tmp / "broker", persistence=True).start()
    modbus_port = free_port()
    configs = [write_config(tmp / f"station{i}.yaml", station_config(tmp, broker, modbus_port, iv, args))
               for i, iv in enumerate((1.0, 2.0))]
    live = tmp / "station.yaml"
    live.write_text(configs[0].read_text())
    db = tmp / "buffer.db"
    sim_log = open(tmp / "simulate.log", "ab")
    sim = start_simulator(live, sim_log)
    sub = Subscriber(broker)
    agent = AgentProcess(live)
    pid = agent.proc.pid
    print(f"work dir {tmp}; agent pid {pid}; broker port {broker.port}; modbus port {modbus_port}", flush=True)

    t0 = time.monotonic()
    end = t0 + args.minutes * 60
    samples: list[tuple[float, dict]] = []
    counts = {"status_cli_ok": 0, "status_cli_fail": 0, "status_cmd": 0, "resend_cmd": 0, "reloads": 0,
              "broker_stops": 0, "modbus_kills": 0}
    broker_up_at = modbus_up_at = None
    broker_started = t0
    sent: dict[str, float] = {}  # command id -> seconds since the broker (re)started when it was sent
    next_ = {"sample": t0 + 5, "broker": t0 + args.broker_every, "modbus": t0 + args.modbus_every,
             "reload": t0 + args.reload_every, "status_cli": t0 + 10, "status_cmd": t0 + 5, "resend": t0 + 60}
    print(f"{'min':>5} {'rss_kb':>8} {'hwm_kb':>8} {'fds':>4} {'thr':>4} {'cpu_s':>7} {'db_kb':>7} {'wal_kb':>7}"
          f" {'recv':>8} {'last':>8} {'backlog':>7}", flush=True)
    last_backlog = "?"
    while time.monotonic() < end and agent.alive():
        now = time.monotonic()
        if now >= next_["sample"]:
            s = proc_sample(pid, db)
            samples.append((now - t0, s))
            with sub.lock:
                recv, top = sub.received, max(sub.seqs, default=0)
            print(f"{(now - t0) / 60:5.1f} {s['rss_kb']:8d} {s['hwm_kb']:8d} {s['fds']:4d} {s['threads']:4d}"
                  f" {s['cpu_s']:7.1f} {s['db_kb']:7d} {s['wal_kb']:7d} {recv:8d} {top:8d} {last_backlog:>7}",
                  flush=True)
            next_["sample"] += args.sample
        if broker_up_at is None and now >= next_["broker"]:
            broker.stop()
            counts["broker_stops"] += 1
            broker_up_at = now + (args.long_outage if counts["broker_stops"] % 2 == 0 else 5)
            next_["broker"] += args.broker_every
        if broker_up_at is not None and now >= broker_up_at:
            broker.start()
            broker_up_at = None
            broker_started = time.monotonic()
        if modbus_up_at is None and now >= next_["modbus"]:
            sim.kill()
            sim.wait()
            counts["modbus_kills"] += 1
            modbus_up_at = now + 20
            next_["modbus"] += args.modbus_every
        if modbus_up_at is not None and now >= modbus_up_at:
            sim = start_simulator(live, sim_log)
            modbus_up_at = None
        if now >= next_["reload"]:
            counts["reloads"] += 1
            live.write_text(configs[counts["reloads"] % 2].read_text())
            agent.signal(signal.SIGHUP)
            next_["reload"] += args.reload_every
        if now >= next_["status_cli"]:
            r = run_cli("status", "-c", str(live), "--json")
            if r.returncode == 0:
                counts["status_cli_ok"] += 1
                last_backlog = str(json.loads(r.stdout).get("backlog"))
            else:
                counts["status_cli_fail"] += 1
                print(f"status --json failed ({r.returncode}): {r.stderr[-300:]}", flush=True)
            next_["status_cli"] += 10
        if now >= next_["status_cmd"]:
            if broker_up_at is None:
                counts["status_cmd"] += 1
                sent[f"s{counts['status_cmd']}"] = now - broker_started
                sub.command({"id": f"s{counts['status_cmd']}", "cmd": "status"})
            next_["status_cmd"] += 10
        if now >= next_["resend"]:
            with sub.lock:
                top = max(sub.seqs, default=0)
            if broker_up_at is None and top > 100:
                counts["resend_cmd"] += 1
                sent[f"r{counts['resend_cmd']}"] = now - broker_started
                sub.command({"id": f"r{counts['resend_cmd']}", "cmd": "resend", "from_seq": top - 100,
                             "to_seq": top - 50})
            next_["resend"] += 60
        time.sleep(0.2)

    alive = agent.alive()
    if broker_up_at is not None:
        broker.start()
    if modbus_up_at is not None:
        sim = start_simulator(live, sim_log)
    # Let the backlog drain: wait until the subscriber has every seq the buffer holds.
    from harness import db_last_seq

    last = db_last_seq(db)
    try:
        wait_for(lambda: max(sub.seqs, default=0) >= last, 120, "the backlog to drain", interval=0.5)
    except AssertionError as exc:
        print(exc)
    rc = agent.stop(60) if alive else agent.proc.returncode
    sim.kill()
    sim.wait()
    time.sleep(1)
    sub.client.loop_stop()
    broker.stop()

    print(f"\nagent {'ran to the end' if alive else 'DIED'}, exit code {rc}; faults {counts}")
    print(f"command replies: {sub.replies}")
    unanswered = {i: round(t, 1) for i, t in sent.items() if i not in sub.answered}
    print(f"commands unanswered (id: seconds after the broker last started when sent): {unanswered}")
    seqs = sorted(sub.seqs)
    if seqs:
        announced = {s for a, b in sub.gaps for s in range(a, b + 1)}
        missing = sorted(set(range(seqs[0], seqs[-1] + 1)) - set(seqs) - announced)
        print(f"readings: first seq {seqs[0]}, last {seqs[-1]}, distinct {len(seqs)}, received {sub.received}"
              f" (duplicates {sub.received - len(seqs)}), announced gaps {sub.gaps[:10]}"
              f"{'...' if len(sub.gaps) > 10 else ''} ({len(announced)} seqs)")
        print(f"missing outside announced gaps: {len(missing)}" + (f" e.g. {missing[:20]}" if missing else ""))
    if sub.alarm_seqs:
        alarms = sorted(sub.alarm_seqs)
        holes = sorted(set(range(alarms[0], alarms[-1] + 1)) - sub.alarm_seqs)
        print(f"alarm events: seqs {alarms[0]}..{alarms[-1]}, missing {len(holes)}"
              + (f" e.g. {holes[:10]}" if holes else ""))
    half = [(t, s) for t, s in samples if t >= samples[-1][0] / 2] if samples else []
    for key, unit in (("rss_kb", "kB"), ("hwm_kb", "kB"), ("fds", ""), ("threads", ""), ("db_kb", "kB"),
                      ("wal_kb", "kB")):
        values = [s[key] for _, s in samples]
        print(f"{key:8s} min {min(values)} max {max(values)} last {values[-1]}; slope over the second half "
              f"{slope_per_hour([(t, s[key]) for t, s in half]):+.1f} {unit}/h")
    if len(samples) > 1:
        cpu = (samples[-1][1]["cpu_s"] - samples[0][1]["cpu_s"]) / (samples[-1][0] - samples[0][0])
        print(f"cpu: {100 * cpu:.1f} % of a core on average (indicative: the machine is shared)")
    print(f"db cap max_mb {args.max_mb} = {int(args.max_mb * 1024)} kB; work dir {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
