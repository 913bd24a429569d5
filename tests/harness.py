"""Real parts for integration tests: a mosquitto broker on a free loopback port, an MQTT collector,
the agent as a real process, and waiting on conditions with a deadline (never sleep-and-hope)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parent.parent
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def as_published(value: float) -> float:
    """A stored value as the data topic carries it: 15 significant digits (SQLite's JSON numbers)."""
    return float(f"{value:.15g}")


def wait_for(predicate: Callable[[], object], timeout: float, what: str = "condition", interval: float = 0.05):
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def build_preload_shim(source: str, name: str, build: Path, what: str) -> Path:
    """`source` (C) compiled with gcc into `build/name.so`, for LD_PRELOAD; the test is skipped where
    there is no gcc (.ci/run installs it), and fails where it does not compile."""
    import pytest

    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip(f"gcc is needed to build the LD_PRELOAD {what} shim (.ci/run installs it)")
    (build / f"{name}.c").write_text(source)
    cc = subprocess.run([gcc, "-shared", "-fPIC", "-O2", "-o", f"{name}.so", f"{name}.c", "-ldl", "-lpthread"],
                        cwd=build, capture_output=True, text=True, timeout=60)
    assert cc.returncode == 0, f"cannot build the {what} shim (libc6-dev missing?):\n{cc.stderr}"
    return build / f"{name}.so"


def fill_disk(disk: Path, leave_bytes: int) -> Path:
    """Take all the space of `disk` but `leave_bytes` with a filler file (like logs gone wild); returns it."""
    filler = disk / "filler"
    st = os.statvfs(disk)
    filler.write_bytes(b"\0" * max(st.f_bavail * st.f_frsize - leave_bytes, 0))
    return filler


def wired_publisher(writer, path: Path, port: int, *, commit_interval_ms: int, max_mb: float, **settings):
    """(recorder, publisher) in this process: a Recorder over the open `writer` and a Publisher of the buffer
    at `path` to the broker on 127.0.0.1:`port` (station ST1; `settings`: more BrokerSettings), wired as the
    agent wires them (each commit wakes the publisher; eviction spares the rows in flight); not started."""
    from agent.publisher import BrokerSettings, Publisher
    from agent.recorder import Recorder

    recorder = Recorder(writer, commit_interval_ms=commit_interval_ms, keep_sent_days=7, max_mb=max_mb)
    publisher = Publisher(BrokerSettings(urls=[f"mqtt://127.0.0.1:{port}"], station_id="ST1", **settings),
                          str(path), recorder)
    recorder.add_listener(publisher.wake)
    recorder.set_in_flight_check(publisher.in_flight_upto)
    return recorder, publisher


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_PORTS_FLOOR = 10_000
_next_port: int | None = None


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range, from this test worker's own share of it.

    A port of the ephemeral range (what binding port 0 gives) fails a test now and then: a client that keeps
    connecting to it while nothing listens (the broker stopped, a relay not started yet) can be given that
    very port as its source, and TCP's simultaneous open then connects the client to itself and holds the
    port, so the broker or relay cannot bind it again (CI saw socat refused for 30 s). Any other connection
    of the machine can take it as a source the same way. Ports below the range are never given as sources;
    each pytest-xdist worker draws from its own slice so two workers never pick the same one."""
    global _next_port
    low = _ephemeral_low()
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    workers = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), worker + 1)
    floor = _PORTS_FLOOR if low - _PORTS_FLOOR >= 100 * workers else 1024  # a machine with a wide ephemeral range
    span = (low - floor) // workers
    first = floor + worker * span
    if _next_port is None:
        _next_port = first + (os.getpid() * 7919) % span  # not the same ports at every run of the suite
    for _ in range(span):
        port = first + (_next_port - first) % span
        _next_port = port + 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {first}..{first + span - 1}")


def start_tail(cfg: Path, out: Path, *args: str, env: dict | None = None,
               stderr: int = subprocess.STDOUT) -> subprocess.Popen:
    """`edge-agent tail -c cfg [args]` printing into the file `out` (its stderr there too, unless
    `stderr` says otherwise: subprocess.PIPE, read as text)."""
    with out.open("w") as stdout:
        return subprocess.Popen([sys.executable, "-m", "agent.cli", "tail", "-c", str(cfg), *args], cwd=REPO,
                                stdout=stdout, stderr=stderr, env=env, text=True)


@contextmanager
def silent_listener() -> Iterator[tuple[int, list[socket.socket]]]:
    """A loopback port that accepts TCP and never says anything (a frozen broker, a wrong service):
    (its port, the connections it took so far); all closed on exit."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=16)
    held: list[socket.socket] = []

    def accept_and_say_nothing() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept_and_say_nothing, daemon=True).start()
    try:
        yield listener.getsockname()[1], held
    finally:
        listener.close()
        for conn in held:
            conn.close()


def db_last_seq(path) -> int:
    """Highest readings seq stored in the agent's buffer (0 while the file is being created or rescued)."""
    try:  # closed at once (`with` on a connection only commits): a connection left to the garbage collector
        # keeps the -shm open for writing, and a remount read-only of the disk is refused as busy meanwhile
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            top = conn.execute("SELECT max(seq) FROM readings").fetchone()[0] or 0
            row = conn.execute("SELECT floor_seq FROM streams WHERE name='readings'").fetchone()
    except sqlite3.DatabaseError:  # still being created, or (corrupt) about to be moved aside
        return 0
    return max(top, row[0] if row else 0)


class Broker:
    """A mosquitto process owned by a test: start, stop, restart on the same port; optional TLS with
    client certificates and a password file."""

    def __init__(self, workdir: Path, *, tls: dict | None = None, passwords: dict[str, str] | None = None,
                 extra: str = "", persistence: bool = False):
        self.persistence = persistence
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls = tls
        self.passwords = passwords
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self._write_conf()

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def _write_conf(self) -> None:
        # With persistence, what the broker acknowledged survives its restart (as a production broker's
        # would): a subscriber with a persistent session then receives every message it was due.
        persist = ["persistence true", f"persistence_location {self.workdir}/"] if self.persistence else [
            "persistence false"]
        lines = [f"listener {self.port} 127.0.0.1", *persist, f"log_dest file {self.log}",
                 "log_type error", "log_type warning", "log_type notice", "max_inflight_messages 0",
                 "max_queued_messages 100000"]
        if os.geteuid() == 0:  # mosquitto would drop to its own user and lose access to the test's files
            lines.append("user root")
        if self.passwords is not None:
            pwfile = self.workdir / "passwd"
            pwfile.write_text("")
            for user, pw in self.passwords.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pwfile), user, pw], check=True,
                               capture_output=True)
            os.chmod(pwfile, 0o600)
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
        else:
            lines += ["allow_anonymous true"]
        if self.tls:
            lines += [f"cafile {self.tls['ca']}", f"certfile {self.tls['server_cert']}",
                      f"keyfile {self.tls['server_key']}", "require_certificate true"]
        if self.extra:
            lines.append(self.extra)
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> Broker:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        LIVE_PROCESSES.append(self.proc)  # a test that fails before its stop() must not leave it running
        wait_for(self._accepts, 10, f"mosquitto on port {self.port}")
        return self

    def _accepts(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"mosquitto exited: {self.log.read_text() if self.log.exists() else ''}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def client_kwargs(self) -> dict:
        return {"host": "127.0.0.1", "port": self.port}


class Collector:
    """A subscriber that keeps every message of a topic filter, for assertions."""

    def __init__(self, broker: Broker, topic: str, *, username: str | None = None, password: str | None = None,
                 tls: dict | None = None, persistent: bool = False):
        """`persistent`: a platform-like subscriber with a persistent session (QoS 1) that reconnects by
        itself, so that it receives every message the broker acknowledged, across broker restarts."""
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"collector-{os.getpid()}-{id(self)}",
                                  clean_session=not persistent)
        self.client.reconnect_delay_set(0.1, 0.5)
        if username:
            self.client.username_pw_set(username, password)
        if tls:
            self.client.tls_set(ca_certs=tls["ca"], certfile=tls["client_cert"], keyfile=tls["client_key"])
        self.topic = topic
        self._subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise AssertionError("collector could not subscribe")

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def json_messages(self, suffix: str = "") -> list[dict]:
        with self._lock:
            msgs = list(self.messages)
        out = []
        for topic, payload, _ in msgs:
            if topic.endswith(suffix):
                try:
                    out.append(json.loads(payload))
                except ValueError:
                    pass
        return out

    def reading_seqs(self) -> list[int]:
        """Every reading seq received on the data topic, in arrival order."""
        return [r["seq"] for m in self.json_messages("/data") for r in m.get("readings", [])]

    def has_readings_upto(self, last: int) -> bool:
        """Every reading seq from 1 to `last` has been received (duplicates and later seqs allowed)."""
        return set(range(1, last + 1)) <= set(self.reading_seqs())

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def sim_config(tmp: Path, broker: Broker, *, station_id: str = "TEST0001", channels: int = 3,
               interval: float = 0.5, devices: int = 1, **overrides) -> dict:
    """A station of simulated devices publishing to `broker`."""
    config: dict = {
        "station": {"id": station_id, "name": "test station", "type": "other", "timezone": "Asia/Shanghai"},
        "storage": {"path": str(tmp / "buffer.db"), "commit_interval_ms": 100},
        "mqtt": {"url": broker.url, "topic_prefix": "env", "reconnect_max": 1, "shutdown_grace": 3},
        "devices": {},
    }
    for d in range(devices):
        config["devices"][f"sim{d}"] = {
            "driver": "simulated", "interval": interval,
            "channels": {f"c{c:02d}": {"unit": "mg/L", "mean": 10 + c, "amplitude": 1, "period": 60, "noise": 0.1}
                         for c in range(channels)},
        }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    return config


LIVE_PROCESSES: list[subprocess.Popen] = []  # killed after each test (tests/conftest.py), even a failed one
AGENT_LOGS: list[Path] = []  # every agent log of the test, scanned for secrets afterwards
SECRETS: set[str] = set()  # passwords and key material a test used: they must never reach a log line


def cod_alarm_station(tmp_path: Path, broker: Broker, cod_mean: float) -> dict:
    """A station with one COD analyzer (simulated, constant value) and a COD limit of 50 mg/L."""
    config = sim_config(tmp_path, broker, devices=0, alarms=[{"channel": "cod.w01018", "above": 50, "hysteresis": 2}])
    config["devices"] = {"cod": {"driver": "simulated", "interval": 0.2, "channels": {
        "w01018": {"unit": "mg/L", "mean": cod_mean, "amplitude": 0, "noise": 0}}}}
    return config


def start_station(tmp_path: Path, broker: Broker) -> tuple[Path, Path, AgentProcess]:
    """(buffer path, config path, agent) of a station of 3 simulated channels at 0.2 s whose buffer is
    `tmp_path`/data/buffer.db (a directory of its own: what `rm buffer.db*` there removes is the buffer's)."""
    data = tmp_path / "data"
    data.mkdir()
    path = data / "buffer.db"
    config = sim_config(tmp_path, broker, channels=3, interval=0.2,
                        storage={"path": str(path), "commit_interval_ms": 100})
    cfg = write_config(tmp_path / "station.yaml", config)
    return path, cfg, AgentProcess(cfg)


def secret(value: str) -> str:
    """Register a secret for the after-test log scan; returns it."""
    SECRETS.add(value)
    return value


def leaked_secrets() -> list[str]:
    """Log files (of this test's agents) that contain a registered secret."""
    found = []
    for path in AGENT_LOGS:
        text = path.read_text(errors="replace") if path.exists() else ""
        found += [f"{path.name}: {s[:3]}…" for s in SECRETS if s and s in text]
    AGENT_LOGS.clear()
    return found


def kill_leftovers() -> None:
    while LIVE_PROCESSES:
        proc = LIVE_PROCESSES.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


class AgentProcess:
    """`edge-agent run -c FILE` as a real process; stderr captured to a file for assertions."""

    def __init__(self, config_path: Path, env: dict | None = None):
        self.config_path = config_path
        self.log_path = config_path.with_suffix(f".{int(time.time() * 1000)}.log")
        self._log = open(self.log_path, "wb")
        full_env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "-c", str(config_path)],
            stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=REPO,
        )
        LIVE_PROCESSES.append(self.proc)
        AGENT_LOGS.append(self.log_path)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"agent did not stop within {timeout}s:\n{self.log()[-3000:]}") from None
        self._log.close()
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc.poll() is None


def run_cli(*args: str, env: dict | None = None, timeout: float = 60,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`edge-agent ARGS` as a process (in the repository, or in `cwd`: relative paths as a technician
    types them), its output captured."""
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd or REPO, timeout=timeout)


@contextmanager
def as_another_user() -> Iterator[None]:
    """Root may read any file: as root, act as `nobody` (effective ids) meanwhile; else as oneself."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
