"""Soak run: the agent as it lives for years on a gateway, with faults on a schedule; prints figures.

    .venv/bin/python bench/bench_soak.py [--minutes 35] [--paths tcp,rtu,serial,tls,uplink] [--sample 30]
                                         [--max-mb 3] [--keep-sent-days 0.005]

A real `edge-agent run -c FILE` with ~40 simulated channels at 1 s and alarm rules that toggle, against a
real mosquitto on a free loopback port, with a persistent subscriber counting seqs. `--paths` picks what
else the station has (default: all of them):

* `tcp`: two Modbus TCP devices served by `edge-agent simulate`, killed (-9) and restarted every
  `--modbus-every` s (down 20 s).
* `rtu`: a Modbus RTU bus over a socat pseudo-terminal pair (the agent opens one end, a simulated
  COD and NH3-N analyzer answer on the other, in a child process). Faults: the slaves killed (-9) and
  restarted every `--rtu-every` s (down 20 s); every `--garble-every` s 1-30 random bytes written
  towards the agent; every `--pty-every` s socat stopped (the port vanishes) and restarted 10 s later.
* `serial`: an HJ 212 analyzer and a PMS5003 dust sensor streaming frames on two ptys (a child process:
  drivers/sim/serial_sim.py) with garbage, split frames and poison frames (bad checksum or length,
  values that must never be stored); killed and restarted every `--serial-every` s (down 15 s: the
  ports vanish).
* `tls`: the broker speaks MQTT over TLS only, with a client certificate and a password (CA, server and
  client certificates made with openssl at start).
* `uplink`: an HJ 212 TCP uplink (`hj212.uplinks`) to an in-process platform (tests/hj212_platform.py)
  that acknowledges every packet; it is closed and reopened every `--uplink-every` s (down 20 s).

Always: the broker stopped and started every 3 minutes (down 5 s or --long-outage, 30 s, alternately),
SIGHUP every 2 minutes alternating two valid configs (the Modbus devices' interval 1 s / 2 s),
`edge-agent status --json` every 10 s, a `status` command every 10 s and a `resend` command every minute.

Every `--sample` seconds it prints, from /proc/PID: VmRSS, VmHWM, open fds, threads, CPU seconds, and the
buffer's and its -wal's sizes. At the end: per stream (readings, alarms, aggregates) the seqs missing
between the first and last received (outside the gaps the agent announced) and the duplicates; per device
the readings received and those with flag B; poison values stored (must be none); on the uplink the
device polls the platform never received (from its first packet on) and those it received twice; each
figure's slope over the second half of the run (per hour); the largest WAL and DB seen; the commands
answered; the agent log's WARNING/ERROR/CRITICAL lines by message. Figures only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import atexit
import json
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import paho.mqtt.client as mqtt  # noqa: E402
from harness import AgentProcess, Broker, free_port, run_cli, sim_config, wait_for, write_config  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

STATION = "SOAK0001"
PREFIX = f"env/{STATION}"
TZ = "Asia/Shanghai"
PATHS = ("tcp", "rtu", "serial", "tls", "uplink")
MQTT_USER, MQTT_PASS = "station", "soak-pass-1"
POISON = (999.0, 999.9, 9999.0)  # drivers/sim/serial_sim.py: HJ212_POISON, SDS011_POISON, PMS5003_POISON


def station_config(tmp: Path, broker: Broker, modbus_interval: float, args, ports: dict, tls: dict | None) -> dict:
    config = sim_config(tmp, broker, station_id=STATION, channels=10, devices=4, interval=1.0,
                        storage={"max_mb": args.max_mb, "keep_sent_days": args.keep_sent_days,
                                 "commit_interval_ms": 200},
                        mqtt={"reconnect_max": 5})
    for d in range(4):  # channel codes unique per device: the uplink check tells device polls apart by them
        dev = config["devices"][f"sim{d}"]
        dev["channels"] = {f"s{d}{code}": spec for code, spec in dev["channels"].items()}
    # s0c00 of sim0 swings 10 +- 5 over 2 minutes: the rule below raises and clears once a minute.
    config["devices"]["sim0"]["channels"]["s0c00"] = {"mean": 10, "amplitude": 5, "period": 120, "noise": 0.1}
    config["alarms"] = [{"channel": "sim0.s0c00", "above": 12, "hysteresis": 1},
                        {"channel": "*", "stale": 15}]
    config["buses"] = {}
    if "tcp" in args.paths:
        config["buses"]["plant-lan"] = {"type": "tcp", "host": "127.0.0.1", "port": ports["modbus"],
                                        "timeout": 0.5, "retries": 1}
        config["devices"]["flow"] = {"bus": "plant-lan", "slave": 1, "interval": modbus_interval,
                                     "profile": "flow-meter"}
        config["devices"]["dust"] = {"bus": "plant-lan", "slave": 2, "interval": modbus_interval,
                                     "profile": "dust-monitor"}
    if "rtu" in args.paths:
        config["buses"]["rs485"] = {"type": "rtu", "port": str(tmp / "ttyRTU-agent"), "baudrate": 9600,
                                    "timeout": 0.5, "retries": 1}
        config["devices"]["cod"] = {"bus": "rs485", "slave": 1, "interval": modbus_interval,
                                    "profile": "cod-analyzer"}
        config["devices"]["nh3n"] = {"bus": "rs485", "slave": 2, "interval": modbus_interval,
                                     "profile": "nh3n-analyzer"}
    if "serial" in args.paths:
        config["buses"]["analyzer-rs232"] = {"type": "serial", "port": str(tmp / "ttyHJ212")}
        config["buses"]["pm-uart"] = {"type": "serial", "port": str(tmp / "ttyPM")}
        config["devices"]["wq"] = {"bus": "analyzer-rs232", "driver": "hj212", "interval": 5}
        config["devices"]["pm"] = {"bus": "pm-uart", "driver": "pms5003", "interval": 2}
    if tls:
        config["mqtt"].update({"url": broker.url, "username": MQTT_USER, "password": MQTT_PASS,
                               "tls": {"ca": tls["ca"], "cert": tls["client_cert"], "key": tls["client_key"]}})
    if "uplink" in args.paths:
        config["hj212"] = {"st": 32, "pw": "123456",
                           "uplinks": [{"host": "127.0.0.1", "port": ports["uplink"], "timeout": 5, "retries": 2}]}
    if not config["buses"]:
        del config["buses"]
    return config


def make_certs(d: Path) -> dict:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, with openssl."""
    d.mkdir(parents=True, exist_ok=True)

    def openssl(*a: str) -> None:
        subprocess.run(["openssl", *a], check=True, capture_output=True, cwd=d)

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
            "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=soak CA")
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, ext in (("server", "server.ext"), ("client", "client.ext")):
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
                f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", ext)
    return {"ca": str(d / "ca.pem"), "server_cert": str(d / "server.pem"), "server_key": str(d / "server.key"),
            "client_cert": str(d / "client.pem"), "client_key": str(d / "client.key")}


class Subscriber:
    """A persistent-session subscriber on P/#: seqs per stream, announced gaps, readings per device,
    poison values, command replies."""

    def __init__(self, broker: Broker, tls: dict | None):
        self.seqs: dict[str, set[int]] = {"readings": set(), "alarms": set(), "aggregates": set()}
        self.received: Counter[str] = Counter()
        self.gaps: list[tuple[int, int]] = []
        self.per_device: Counter[str] = Counter()
        self.flag_b: Counter[str] = Counter()
        self.polls: dict[tuple[str, str], set[str]] = {}  # (device, ts) of each poll -> its channels
        self.poison: list[dict] = []
        self.replies: dict[str, int] = {}
        self.answered: set[str] = set()
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"soak-{os.getpid()}", clean_session=False)
        self.client.reconnect_delay_set(0.1, 0.5)
        if tls:
            self.client.username_pw_set("platform", "platform-pass")
            self.client.tls_set(ca_certs=tls["ca"], certfile=tls["client_cert"], keyfile=tls["client_key"])
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
                    self.seqs["readings"].add(r["seq"])
                    self.received["readings"] += 1
                    self.per_device[r["device"]] += 1
                    if r.get("flag") == "B":
                        self.flag_b[r["device"]] += 1
                    if r.get("value") in POISON:
                        self.poison.append(r)
                    # (a poll's readings may come in two messages: a batch is cut at max_batch)
                    self.polls.setdefault((r["device"], r["ts"]), set()).add(r["channel"])
            elif msg.topic.endswith("/alarm") and "alarm" in body:
                self.seqs["alarms"].add(body["alarm"]["seq"])
                self.received["alarms"] += 1
            elif msg.topic.endswith("/agg"):
                for a in body.get("aggregates", []):
                    self.seqs["aggregates"].add(a["seq"])
                    self.received["aggregates"] += 1
            elif msg.topic.endswith("/cmd/reply"):
                self.answered.add(str(body.get("id")))
                key = f"{body.get('cmd', '?')}:{body.get('ok')}"
                self.replies[key] = self.replies.get(key, 0) + 1

    def command(self, body: dict) -> None:
        self.client.publish(f"{PREFIX}/cmd", json.dumps(body), qos=1)


class UplinkPeer:
    """The HJ 212 platform of the uplink (tests/hj212_platform.py), closed and reopened on its port;
    keeps the CN 2011 packets of every incarnation."""

    def __init__(self, port: int):
        self.port = port
        self.platform = None
        self.packets: list = []
        self.restarts = 0

    def start(self) -> None:
        from hj212_platform import Platform

        self.platform = Platform(port=self.port)

    def stop(self) -> None:
        if self.platform is not None:
            self.platform.close()
            self.packets += self.platform.of_cn("2011")
            self.platform = None

    def all_packets(self) -> list:
        return self.packets + (self.platform.of_cn("2011") if self.platform is not None else [])


def serve_rtu(config_path: str, bus: str, path: str) -> None:
    """Child process: the simulated slaves of RTU bus `bus` answering on the tty `path` (socat's far end)."""
    import tty

    from agent.config import load_config
    from drivers.sim.serve import plan_simulation
    from drivers.sim.slave import RtuPtyServer, SlaveCore

    sim_bus = next(b for b in plan_simulation(load_config(config_path))[0] if b.name == bus)
    server = RtuPtyServer(SlaveCore(sim_bus.units), path)  # its framing loop, on a tty opened here
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd)
    server._master = fd
    server._run()  # returns when the tty goes away (socat stopped)


def serve_serial(ports: dict[str, str]) -> None:
    """Child process: streaming serial instruments on ptys linked at `ports` (driver -> path), with
    garbage, split frames and poison frames."""
    from drivers.sim.serial_sim import SerialSim, make_instrument

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # for sigwait below (threads inherit it)
    stop = threading.Event()
    sims = [SerialSim([make_instrument(driver, driver, timezone=TZ, station_id=STATION, period=1.0, garbage=0.1,
                                       split=0.2, bad_checksum=0.05, seed=i)], path, stop_event=stop)
            for i, (driver, path) in enumerate(ports.items())]
    for s in sims:
        s.start()
    signal.sigwait({signal.SIGTERM})
    stop.set()
    for s in sims:
        s.join(5)


class Line:
    """An RTU line: socat joining two ptys (the agent's end, the slaves' end) and the slaves' process."""

    def __init__(self, tmp: Path, config_path: Path, log):
        self.agent_end, self.slave_end = tmp / "ttyRTU-agent", tmp / "ttyRTU-slaves"
        self.config_path, self.log = config_path, log
        self.socat: subprocess.Popen | None = None
        self.slaves = None
        self.ctx = multiprocessing.get_context("spawn")

    def start_socat(self) -> None:
        self.socat = subprocess.Popen(["socat", f"PTY,link={self.agent_end},raw,echo=0",
                                       f"PTY,link={self.slave_end},raw,echo=0"], stdout=self.log, stderr=self.log)
        wait_for(lambda: self.agent_end.exists() and self.slave_end.exists(), 10, "socat's ptys")

    def stop_socat(self) -> None:
        if self.socat is not None:
            self.socat.terminate()
            self.socat.wait(10)
            self.socat = None

    def start_slaves(self) -> None:
        self.slaves = self.ctx.Process(target=serve_rtu, args=(str(self.config_path), "rs485", str(self.slave_end)),
                                       daemon=True)
        self.slaves.start()

    def kill_slaves(self) -> None:
        if self.slaves is not None:
            self.slaves.kill()
            self.slaves.join(10)
            self.slaves = None

    def garble(self, rng: random.Random) -> int:
        """Random bytes towards the agent (written into the slaves' end: socat carries them over)."""
        data = bytes(rng.randrange(256) for _ in range(rng.randint(1, 30)))
        try:
            fd = os.open(self.slave_end, os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError:
            return 0
        try:
            return os.write(fd, data)
        except OSError:
            return 0
        finally:
            os.close(fd)


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


def data_time(ts: str) -> str:
    """A reading's `ts` as the HJ 212 DataTime of its poll (station time, to the second)."""
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).astimezone(ZoneInfo(TZ)).strftime("%Y%m%d%H%M%S")


def uplink_report(sub: Subscriber, peer: UplinkPeer) -> None:
    """Device polls (DataTime + channel codes) published on MQTT since the uplink's first packet that
    the platform never received, and those it received more than once."""
    got = Counter()
    for p in peer.all_packets():
        items = p.items()
        codes = frozenset(k.rsplit("-", 1)[0] for k in items if k.endswith("-Flag"))
        got[(p.header.get("DataTime") or items.get("DataTime"), codes)] += 1
    if not got:
        print("uplink: the platform received no CN 2011 packet")
        return
    first = min(t for t, _ in got)
    with sub.lock:
        expected = {(data_time(ts), frozenset(ch)) for (_, ts), ch in sub.polls.items()}
    expected = {e for e in expected if e[0] > first}
    missing = sorted(expected - set(got))
    dups = sum(n - 1 for n in got.values())
    print(f"uplink: {len(peer.all_packets())} CN 2011 packets over {peer.restarts + 1} platform runs; device polls "
          f"expected since {first}: {len(expected)}, missing {len(missing)}"
          + (f" e.g. {missing[:5]}" if missing else "") + f"; received more than once: {dups}")


def log_report(log_text: str) -> None:
    """The agent log's WARNING/ERROR/CRITICAL lines, counted by message (numbers masked)."""
    kinds: Counter[str] = Counter()
    for line in log_text.splitlines():
        m = re.search(r"\b(WARNING|ERROR|CRITICAL)\b(.*)", line)
        if m:
            kinds[f"{m.group(1)}{re.sub(r'[0-9]+', 'N', m.group(2))[:160]}"] += 1
    print(f"agent log: {sum(kinds.values())} WARNING/ERROR/CRITICAL lines, {len(kinds)} kinds")
    for kind, n in kinds.most_common():
        print(f"  {n:5d} x {kind}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=35)
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    ap.add_argument("--sample", type=float, default=30)
    ap.add_argument("--max-mb", type=float, default=3)
    ap.add_argument("--keep-sent-days", type=float, default=0.005)
    ap.add_argument("--broker-every", type=float, default=180)
    ap.add_argument("--modbus-every", type=float, default=300)
    ap.add_argument("--rtu-every", type=float, default=240)
    ap.add_argument("--garble-every", type=float, default=20)
    ap.add_argument("--pty-every", type=float, default=420)
    ap.add_argument("--serial-every", type=float, default=270)
    ap.add_argument("--uplink-every", type=float, default=200)
    ap.add_argument("--reload-every", type=float, default=120)
    ap.add_argument("--long-outage", type=float, default=30, help="seconds of every second broker outage")
    ap.add_argument("--dir", help="work directory (default: a new temporary one, kept)")
    args = ap.parse_args()
    args.paths = {p.strip() for p in args.paths.split(",") if p.strip()}
    if args.paths - set(PATHS):
        ap.error(f"--paths: unknown {sorted(args.paths - set(PATHS))}")

    tmp = Path(args.dir or tempfile.mkdtemp(prefix="soak-"))
    tmp.mkdir(parents=True, exist_ok=True)
    tls = make_certs(tmp / "certs") if "tls" in args.paths else None
    broker_tls = {k: tls[k] for k in ("ca", "server_cert", "server_key")} if tls else None
    broker = Broker(tmp / "broker", persistence=True, tls=broker_tls,
                    passwords={MQTT_USER: MQTT_PASS, "platform": "platform-pass"} if tls else None).start()
    ports = {"modbus": free_port(), "uplink": free_port()}
    configs = [write_config(tmp / f"station{i}.yaml", station_config(tmp, broker, iv, args, ports, tls))
               for i, iv in enumerate((1.0, 2.0))]
    live = tmp / "station.yaml"
    live.write_text(configs[0].read_text())
    # `edge-agent simulate` serves the TCP devices only: the RTU line and the serial ports are the
    # bench's own (socat, child processes), with their faults.
    tcp_only = station_config(tmp, broker, 1.0, args, ports, tls)
    tcp_only["buses"] = {k: v for k, v in tcp_only.get("buses", {}).items() if v["type"] == "tcp"}
    tcp_only["devices"] = {k: v for k, v in tcp_only["devices"].items() if v.get("bus") in tcp_only["buses"]}
    sim_conf = write_config(tmp / "simulate.yaml", tcp_only)
    db = tmp / "buffer.db"
    sim_log = open(tmp / "simulate.log", "ab")
    ctx = multiprocessing.get_context("spawn")
    sim = start_simulator(sim_conf, sim_log) if "tcp" in args.paths else None
    line = None
    if "rtu" in args.paths:
        line = Line(tmp, live, sim_log)
        line.start_socat()
        line.start_slaves()
    serial_ports = {"hj212": str(tmp / "ttyHJ212"), "pms5003": str(tmp / "ttyPM")}

    def start_serial():
        p = ctx.Process(target=serve_serial, args=(serial_ports,), daemon=True)
        p.start()
        return p

    serial = start_serial() if "serial" in args.paths else None
    if serial is not None:
        wait_for(lambda: all(Path(p).exists() for p in serial_ports.values()), 20, "the serial ptys")
    peer = None
    if "uplink" in args.paths:
        peer = UplinkPeer(ports["uplink"])
        peer.start()
    sub = Subscriber(broker, tls)
    agent = AgentProcess(live)

    def leftovers() -> None:
        """At exit, also after a crash of the bench: no agent, simulator, socat or broker left running."""
        if agent.alive():
            agent.proc.kill()
        for proc in (sim, line and line.socat):
            if proc is not None and proc.poll() is None:
                proc.kill()
        for child in (serial, line and line.slaves):
            if child is not None and child.is_alive():
                child.kill()
        broker.stop()

    atexit.register(leftovers)
    pid = agent.proc.pid
    print(f"work dir {tmp}; paths {sorted(args.paths)}; agent pid {pid}; broker port {broker.port}"
          f"{' (TLS, client certificate, password)' if tls else ''}; ports {ports}", flush=True)

    rng = random.Random(1)
    t0 = time.monotonic()
    end = t0 + args.minutes * 60
    samples: list[tuple[float, dict]] = []
    counts = Counter()
    up_at: dict[str, float] = {}  # fault -> when it ends
    broker_started = t0
    sent: dict[str, float] = {}  # command id -> seconds since the broker (re)started when it was sent
    never = float("inf")
    next_ = {"sample": t0 + 5, "broker": t0 + args.broker_every, "reload": t0 + args.reload_every,
             "status_cli": t0 + 10, "status_cmd": t0 + 5, "resend": t0 + 60,
             "modbus": t0 + args.modbus_every if sim else never,
             "rtu": t0 + args.rtu_every if line else never, "garble": t0 + args.garble_every if line else never,
             "pty": t0 + args.pty_every if line else never,
             "serial": t0 + args.serial_every if serial else never,
             "uplink": t0 + args.uplink_every if peer else never}
    print(f"{'min':>5} {'rss_kb':>8} {'hwm_kb':>8} {'fds':>4} {'thr':>4} {'cpu_s':>7} {'db_kb':>7} {'wal_kb':>7}"
          f" {'recv':>8} {'last':>8} {'backlog':>7}", flush=True)
    last_backlog = "?"
    while time.monotonic() < end and agent.alive():
        now = time.monotonic()
        if now >= next_["sample"]:
            s = proc_sample(pid, db)
            samples.append((now - t0, s))
            with sub.lock:
                recv, top = sub.received["readings"], max(sub.seqs["readings"], default=0)
            print(f"{(now - t0) / 60:5.1f} {s['rss_kb']:8d} {s['hwm_kb']:8d} {s['fds']:4d} {s['threads']:4d}"
                  f" {s['cpu_s']:7.1f} {s['db_kb']:7d} {s['wal_kb']:7d} {recv:8d} {top:8d} {last_backlog:>7}",
                  flush=True)
            next_["sample"] += args.sample
        # Faults: each starts at its time and ends when up_at says (then restarted).
        if "broker" not in up_at and now >= next_["broker"]:
            broker.stop()
            counts["broker_stops"] += 1
            up_at["broker"] = now + (args.long_outage if counts["broker_stops"] % 2 == 0 else 5)
            next_["broker"] += args.broker_every
        if now >= up_at.get("broker", never):
            broker.start()
            del up_at["broker"]
            broker_started = time.monotonic()
        if "modbus" not in up_at and now >= next_["modbus"]:
            sim.kill()
            sim.wait()
            counts["modbus_kills"] += 1
            up_at["modbus"] = now + 20
            next_["modbus"] += args.modbus_every
        if now >= up_at.get("modbus", never):
            sim = start_simulator(sim_conf, sim_log)
            del up_at["modbus"]
        if "rtu" not in up_at and "pty" not in up_at and now >= next_["rtu"]:
            line.kill_slaves()
            counts["rtu_slave_kills"] += 1
            up_at["rtu"] = now + 20
            next_["rtu"] += args.rtu_every
        if now >= up_at.get("rtu", never):
            line.start_slaves()
            del up_at["rtu"]
        if "rtu" not in up_at and "pty" not in up_at and now >= next_["pty"]:
            line.stop_socat()
            line.kill_slaves()
            counts["rtu_pty_closes"] += 1
            up_at["pty"] = now + 10
            next_["pty"] += args.pty_every
        if now >= up_at.get("pty", never):
            line.start_socat()
            line.start_slaves()
            del up_at["pty"]
        if now >= next_["garble"]:
            if "pty" not in up_at:
                counts["rtu_garbled_bytes"] += line.garble(rng)
                counts["rtu_garbles"] += 1
            next_["garble"] += args.garble_every * rng.uniform(0.5, 1.5)
        if "serial" not in up_at and now >= next_["serial"]:
            serial.kill()
            serial.join(10)
            for p in serial_ports.values():  # SIGKILL left the links behind: the ports vanish meanwhile
                Path(p).unlink(missing_ok=True)
            counts["serial_kills"] += 1
            up_at["serial"] = now + 15
            next_["serial"] += args.serial_every
        if now >= up_at.get("serial", never):
            serial = start_serial()
            del up_at["serial"]
        if "uplink" not in up_at and now >= next_["uplink"]:
            peer.stop()
            counts["uplink_restarts"] += 1
            peer.restarts += 1
            up_at["uplink"] = now + 20
            next_["uplink"] += args.uplink_every
        if now >= up_at.get("uplink", never):
            peer.start()
            del up_at["uplink"]
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
            if "broker" not in up_at:
                counts["status_cmd"] += 1
                sent[f"s{counts['status_cmd']}"] = now - broker_started
                sub.command({"id": f"s{counts['status_cmd']}", "cmd": "status"})
            next_["status_cmd"] += 10
        if now >= next_["resend"]:
            with sub.lock:
                top = max(sub.seqs["readings"], default=0)
            if "broker" not in up_at and top > 100:
                counts["resend_cmd"] += 1
                sent[f"r{counts['resend_cmd']}"] = now - broker_started
                sub.command({"id": f"r{counts['resend_cmd']}", "cmd": "resend", "from_seq": top - 100,
                             "to_seq": top - 50})
            next_["resend"] += 60
        time.sleep(0.2)

    alive = agent.alive()
    if "broker" in up_at:
        broker.start()
    if "uplink" in up_at:
        peer.start()
    # Let the backlog drain: wait until the subscriber has every seq the buffer holds, and the uplink
    # has sent the polls made up to now.
    from harness import db_last_seq

    last = db_last_seq(db)
    try:
        wait_for(lambda: max(sub.seqs["readings"], default=0) >= last, 120, "the backlog to drain", interval=0.5)
        if peer is not None and alive:  # the platform has the polls made up to now (it lags a few packets)
            now_dt = datetime.now(ZoneInfo(TZ)).strftime("%Y%m%d%H%M%S")
            wait_for(lambda: max((p.items().get("DataTime", "") for p in peer.all_packets()), default="") >= now_dt,
                     120, "the uplink to catch up", interval=1)
    except AssertionError as exc:
        print(exc)
    rc = agent.stop(60) if alive else agent.proc.returncode
    if sim is not None:
        sim.kill()
        sim.wait()
    if line is not None:
        line.kill_slaves()
        line.stop_socat()
    if serial is not None:
        serial.terminate()
        serial.join(10)
    time.sleep(1)
    sub.client.loop_stop()
    broker.stop()
    if peer is not None:
        peer.stop()

    print(f"\nagent {'ran to the end' if alive else 'DIED'}, exit code {rc}; faults {dict(counts)}")
    print(f"command replies: {sub.replies}")
    unanswered = {i: round(t, 1) for i, t in sent.items() if i not in sub.answered}
    print(f"commands unanswered (id: seconds after the broker last started when sent): {unanswered}")
    resent = 51 * sub.replies.get("resend:True", 0)  # each resend command asks for 51 seqs
    for stream, got in sub.seqs.items():
        seqs = sorted(got)
        if not seqs:
            print(f"{stream}: none received")
            continue
        announced = {s for a, b in sub.gaps for s in range(a, b + 1)} if stream == "readings" else set()
        missing = sorted(set(range(seqs[0], seqs[-1] + 1)) - got - announced)
        print(f"{stream}: first seq {seqs[0]}, last {seqs[-1]}, distinct {len(seqs)}, received {sub.received[stream]}"
              f" (duplicates {sub.received[stream] - len(seqs)}"
              + (f", of which resent on command {resent}" if stream == "readings" else "")
              + f"); missing outside announced gaps: {len(missing)}"
              + (f" e.g. {missing[:20]}" if missing else ""))
    print(f"announced gaps {sub.gaps[:10]}{'...' if len(sub.gaps) > 10 else ''}")
    print("per device: readings received (flag B): "
          + ", ".join(f"{d} {n} ({sub.flag_b[d]})" for d, n in sorted(sub.per_device.items())))
    print(f"poison values published: {len(sub.poison)}" + (f" e.g. {sub.poison[:3]}" if sub.poison else ""))
    if peer is not None:
        uplink_report(sub, peer)
        with sub.lock:  # for a closer look afterwards
            polls = sorted([dev, ts, data_time(ts), sorted(ch)] for (dev, ts), ch in sub.polls.items())
        (tmp / "uplink-check.json").write_text(json.dumps({
            "mqtt_polls": polls,
            "platform": [[p.header.get("DataTime") or p.items().get("DataTime"), sorted(p.items()),
                          getattr(p, "recv_time", None)] for p in peer.all_packets()]}))
    half = [(t, s) for t, s in samples if t >= samples[-1][0] / 2] if samples else []
    for key, unit in (("rss_kb", "kB"), ("hwm_kb", "kB"), ("fds", ""), ("threads", ""), ("db_kb", "kB"),
                      ("wal_kb", "kB")):
        values = [s[key] for _, s in samples]
        print(f"{key:8s} first {values[0]} min {min(values)} max {max(values)} last {values[-1]}; slope over the "
              f"second half {slope_per_hour([(t, s[key]) for t, s in half]):+.1f} {unit}/h")
    if len(samples) > 1:
        cpu = (samples[-1][1]["cpu_s"] - samples[0][1]["cpu_s"]) / (samples[-1][0] - samples[0][0])
        print(f"cpu: {100 * cpu:.1f} % of a core on average (indicative: the machine is shared)")
    log_report(agent.log())
    print(f"db cap max_mb {args.max_mb} = {int(args.max_mb * 1024)} kB; work dir {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
