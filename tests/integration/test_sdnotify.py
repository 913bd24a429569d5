"""The sd_notify protocol of a real `edge-agent run` process, through a real NOTIFY_SOCKET datagram
socket bound by the test (as systemd would with Type=notify, NotifyAccess=main, WatchdogSec=2):
READY=1, WATCHDOG=1 every WATCHDOG_USEC/2, STATUS=, STOPPING=1 — and no pings while a poller hangs.

A poller is made to hang on purpose without any test hook in the product: the agent process gets a
`sitecustomize` module (on PYTHONPATH) that wraps the simulated driver's poll() of one device so that
it blocks while a trigger file exists, and shortens `agent.runtime.PROGRESS_DEADLINE_S` (60 s in
production, far above the 15 s ping period of WatchdogSec=30) so that the test fits in seconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path

import pytest
from harness import AgentProcess, Collector, sim_config, wait_for, write_config

WATCHDOG_USEC = 2_000_000  # pings expected every ~1 s
PING_PERIOD = WATCHDOG_USEC / 2_000_000

SITECUSTOMIZE = '''\
"""Test-only hooks for tests/integration/test_sdnotify.py (loaded by Python at start-up)."""
import importlib.machinery
import importlib.util
import os
import sys
import time

_dev = os.environ.get("EDGE_AGENT_TEST_HANG_DEVICE")
if _dev:
    import drivers.simulated as _sim

    _orig_poll = _sim.SimulatedDriver.poll
    _trigger = os.environ["EDGE_AGENT_TEST_HANG_FILE"]

    def _poll(self, ts_ms):
        if self.device_id == _dev:
            while os.path.exists(_trigger):  # hung: no return while the trigger exists
                time.sleep(0.05)
        return _orig_poll(self, ts_ms)

    _sim.SimulatedDriver.poll = _poll

_deadline = os.environ.get("EDGE_AGENT_TEST_PROGRESS_DEADLINE")
if _deadline:
    import agent.runtime as _rt

    if not hasattr(_rt, "PROGRESS_DEADLINE_S"):
        sys.stderr.write("TEST HOOK BROKEN: agent.runtime.PROGRESS_DEADLINE_S is gone\\n")
    _rt.PROGRESS_DEADLINE_S = float(_deadline)

# Chain to a sitecustomize this one shadows (e.g. Debian's), so that nothing else changes.
_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _here])
if _spec is not None and _spec.loader is not None:
    _mod = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_mod)
'''


class NotifySocket:
    """A NOTIFY_SOCKET like systemd's: a Unix datagram socket; keeps (monotonic time, sender pid,
    line) for every line of every datagram."""

    def __init__(self):
        # Not tmp_path: a Unix socket path must stay under 108 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="ea-ntf-", dir="/tmp"))
        self.path = str(self.dir / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # sender pid, as systemd checks it
        self.sock.settimeout(0.2)
        self.lines: list[tuple[float, int, str]] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data, ancdata, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            pid = -1
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", cdata[:12])[0]
            with self._lock:
                self.lines += [(now, pid, line) for line in data.decode("utf-8", "replace").split("\n") if line]

    def snapshot(self) -> list[tuple[float, int, str]]:
        with self._lock:
            return list(self.lines)

    def times(self, line: str, after: float = 0.0) -> list[float]:
        return [t for t, _, text in self.snapshot() if text == line and t > after]

    def first(self, prefix: str) -> tuple[float, int, str] | None:
        return next((entry for entry in self.snapshot() if entry[2].startswith(prefix)), None)

    def close(self) -> None:
        self._closed.set()
        self.sock.close()
        self._thread.join(2)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def notify_socket():
    ns = NotifySocket()
    yield ns
    ns.close()


@pytest.fixture
def agents():
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        if agent.alive():
            agent.kill9()


def _start(tmp_path: Path, broker, notify: NotifySocket, agents: list, monkeypatch, *, devices: dict | None = None,
           extra_env: dict | None = None) -> AgentProcess:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)  # in case the test runner itself runs under systemd
    config = sim_config(tmp_path, broker, interval=0.2, channels=2)
    if devices is not None:
        config["devices"] = devices
    path = write_config(tmp_path / "station.yaml", config)
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": str(WATCHDOG_USEC), **(extra_env or {})}
    agent = AgentProcess(path, env=env)
    agents.append(agent)
    return agent


def _ready(notify: NotifySocket, agent: AgentProcess) -> float:
    def ready():
        if not agent.alive():
            raise AssertionError(f"agent exited before READY=1:\n{agent.log()[-3000:]}")
        return notify.first("READY=1")

    t_ready, pid, _ = wait_for(ready, 20, "READY=1 on NOTIFY_SOCKET")
    assert pid == agent.proc.pid, "READY=1 must come from the main process (NotifyAccess=main)"
    return t_ready


def test_ready_watchdog_pings_status_and_stopping_through_a_real_notify_socket(
        tmp_path, broker, notify_socket, agents, monkeypatch):
    agent = _start(tmp_path, broker, notify_socket, agents, monkeypatch)
    t_ready = _ready(notify_socket, agent)

    # WATCHDOG=1 about every WATCHDOG_USEC/2 = 1 s: 5 pings well within 12 s, and not a flood.
    wait_for(lambda: len(notify_socket.times("WATCHDOG=1", after=t_ready)) >= 5, 12, "5 WATCHDOG=1 pings")
    pings = notify_socket.times("WATCHDOG=1", after=t_ready)
    span = pings[-1] - t_ready
    assert len(pings) <= span / PING_PERIOD * 2 + 2, f"{len(pings)} pings in {span:.1f}s: too many"
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    assert max(gaps) < 2 * WATCHDOG_USEC / 1e6, f"a gap between pings reached the watchdog timeout: {gaps}"
    assert all(pid == agent.proc.pid for _, pid, text in notify_socket.snapshot() if text == "WATCHDOG=1")

    # STATUS=: a one-line summary for `systemctl status` (beyond the "running" sent with READY=1).
    def summary():
        return [text for _, _, text in notify_socket.snapshot()
                if text.startswith("STATUS=") and text != "STATUS=running"]

    statuses = wait_for(summary, 10, "a STATUS= summary line")
    assert all(len(s) > len("STATUS=") for s in statuses)
    assert any("broker" in s for s in statuses), statuses

    # SIGTERM: STOPPING=1, then a clean exit 0.
    t_term = time.monotonic()
    agent.signal(signal.SIGTERM)
    wait_for(lambda: notify_socket.times("STOPPING=1", after=t_term), 10, "STOPPING=1 after SIGTERM")
    assert agent.stop(timeout=20) == 0


def test_a_hung_poller_stops_the_watchdog_pings_until_it_moves_again(
        tmp_path, broker, notify_socket, agents, monkeypatch):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    trigger = tmp_path / "hang-now"
    pythonpath = os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH", "")) if p)
    channels = {"c00": {"unit": "mg/L", "mean": 10, "amplitude": 1, "period": 60, "noise": 0.1}}
    devices = {"healthy": {"driver": "simulated", "interval": 0.2, "channels": channels},
               "stuck": {"driver": "simulated", "interval": 0.2, "channels": channels}}
    agent = _start(tmp_path, broker, notify_socket, agents, monkeypatch, devices=devices, extra_env={
        "PYTHONPATH": pythonpath,
        "EDGE_AGENT_TEST_HANG_DEVICE": "stuck",
        "EDGE_AGENT_TEST_HANG_FILE": str(trigger),
        "EDGE_AGENT_TEST_PROGRESS_DEADLINE": "4",
    })
    t_ready = _ready(notify_socket, agent)
    wait_for(lambda: len(notify_socket.times("WATCHDOG=1", after=t_ready)) >= 2, 10, "pings while all is well")
    assert "TEST HOOK BROKEN" not in agent.log()

    # Hang the poller of device "stuck" in the middle of a poll.
    trigger.touch()
    t_hang = time.monotonic()

    def withheld():
        return [line for line in agent.log().splitlines() if "stuck" in line and "watchdog" in line.lower()]

    wait_for(withheld, 15, "a log line naming the hung poller and the withheld watchdog ping")
    t_withheld = time.monotonic()
    assert t_withheld - t_hang >= 3, "the hang was reported before the progress deadline"
    # From now on: no ping for longer than the watchdog timeout (2 s) — systemd would kill the agent.
    window = 2 * WATCHDOG_USEC / 1e6 + 1
    deadline = t_withheld + window
    while time.monotonic() < deadline:
        assert not notify_socket.times("WATCHDOG=1", after=t_withheld), "a WATCHDOG=1 ping while a poller hangs"
        assert agent.alive()
        time.sleep(0.1)

    # The poll returns: the loop makes progress again and the pings resume.
    trigger.unlink()
    t_free = time.monotonic()
    wait_for(lambda: len(notify_socket.times("WATCHDOG=1", after=t_free)) >= 2, 10, "pings again after the hang")

    agent.signal(signal.SIGTERM)
    wait_for(lambda: notify_socket.first("STOPPING=1"), 10, "STOPPING=1 after SIGTERM")
    assert agent.stop(timeout=20) == 0


def test_a_refused_reload_is_said_in_status_at_once_until_a_good_one(tmp_path, broker, notify_socket, agents,
                                                                     monkeypatch):
    """`systemctl reload` reports success whatever the file holds (ExecReload only sends SIGHUP): the
    technician's next look is `systemctl status`, whose STATUS= line says, right after the reload and
    not at the next 30 s summary, that it was refused and the previous configuration runs."""
    agent = _start(tmp_path, broker, notify_socket, agents, monkeypatch)
    _ready(notify_socket, agent)
    path = agent.config_path
    good = path.read_text()
    path.write_text(good.replace("interval:", "intervall:", 1))
    t_hup = time.monotonic()
    agent.signal(signal.SIGHUP)
    said = wait_for(lambda: [text for t, _, text in notify_socket.snapshot()
                             if t > t_hup and text.startswith("STATUS=") and "reload was refused" in text], 10,
                    "STATUS= saying the reload was refused")
    assert "previous configuration runs" in said[0], said
    path.write_text(good)
    t_good = time.monotonic()
    agent.signal(signal.SIGHUP)
    wait_for(lambda: [text for t, _, text in notify_socket.snapshot()
                      if t > t_good and text.startswith("STATUS=backlog")], 10, "STATUS= without it")
    assert agent.stop(timeout=20) == 0


def test_the_service_waits_for_an_agent_run_by_hand_instead_of_using_up_its_start_limit(
        tmp_path, broker, notify_socket, agents, monkeypatch):
    """A technician runs the agent by hand (debugging at the station) and the service is restarted
    meanwhile: a service that exits at once (as a run by hand does) is restarted 10 times within a
    minute and left failed by systemd's start limit, recording nothing after the technician's run
    ends. Under systemd it reports itself running, says why in STATUS=, and takes over the buffer
    (numbering going on) as soon as the other agent ends."""
    collector = Collector(broker, "env/#")
    try:
        cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker, interval=0.2, channels=2))
        by_hand = AgentProcess(cfg)
        agents.append(by_hand)
        wait_for(lambda: len(collector.reading_seqs()) >= 5, 20, "the run by hand publishing")
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        service = AgentProcess(cfg, env={"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
        agents.append(service)
        said = wait_for(lambda: notify_socket.first("STATUS=another edge-agent"), 20, "STATUS= saying why it waits")
        assert f"(pid {by_hand.proc.pid})" in said[2]
        assert notify_socket.first("READY=1") is not None  # running for systemd: no restart loop
        wait_for(lambda: len(notify_socket.times("WATCHDOG=1")) >= 2, 20, "watchdog pings while it waits")
        assert service.alive()
        assert by_hand.stop() == 0
        last_by_hand = max(collector.reading_seqs())
        wait_for(lambda: max(collector.reading_seqs()) > last_by_hand + 5, 30, "the service recording and publishing")
        seqs = collector.reading_seqs()
        assert set(range(1, max(seqs) + 1)) <= set(seqs), "every seq from the first to the last arrived"
        assert service.stop() == 0
    finally:
        collector.close()
