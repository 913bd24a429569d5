"""The README's first command, `bash deploy/demo.sh`, as a newcomer runs it: simulated instruments over
Modbus RTU (pseudo-terminal), Modbus TCP, PMS5003 and HJ 212 serial frames -> the agent -> the demo's
own mosquitto, with the live view printing what arrives; Ctrl-C stops everything and leaves nothing
behind. It runs in a copy of the repository whose `.venv` is this test's interpreter environment (the
package installed from the repository, as `bash .ci/run` makes it), so it installs nothing.
"""

from __future__ import annotations

import errno
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from harness import LIVE_PROCESSES, REPO

DEMO_LINKS = [Path("/tmp/edge-agent-demo") / name for name in ("ttySIM0", "ttyPMS0", "ttyHJ0")]
DATA_LINE = re.compile(r"^data\s+#\d+ (\w+)\.(\w+) ")


def repository_copy(dest: Path) -> Path:
    """The repository as a clone or an unpacked archive has it (without `.git`, which an archive lacks
    and the demo does not need), with `.venv` this interpreter's."""
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache", "build", "demo-data",
        "demo-agent.log", ".demo-*"))
    (dest / ".venv").symlink_to(sys.prefix)
    return dest


def processes_working_in(directory: Path) -> list[str]:
    """The command lines of the processes whose working directory is `directory` (the demo's own)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")) == directory:
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue  # ended meanwhile, or not ours to look at
    return found


STOPS = {
    "ctrl-c": lambda demo: os.killpg(demo.pid, signal.SIGINT),  # the terminal's: the whole foreground group
    # `kill PID` of the demo alone: bash ran its trap only once the live view (in the foreground) ended,
    # which nothing ended, so the demo ran on until its terminal closed.
    "kill": lambda demo: demo.terminate(),
}


@pytest.mark.parametrize("stop", sorted(STOPS))
def test_the_demo_shows_readings_of_every_protocol_and_stops_cleanly(tmp_path, stop):
    copy = repository_copy(tmp_path / "edge-agent")
    demo = subprocess.Popen(["bash", "deploy/demo.sh"], cwd=copy, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    LIVE_PROCESSES.append(demo)
    assert demo.stdout is not None
    seen: set[str] = set()
    wanted = {"cod", "flow", "pm", "wq"}  # Modbus RTU, Modbus TCP, PMS5003 frames, HJ 212 packets
    output: list[str] = []
    selector = selectors.DefaultSelector()
    selector.register(demo.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + 60
    try:
        while not wanted <= seen and time.monotonic() < deadline and demo.poll() is None:
            if not selector.select(timeout=1):
                continue
            line = demo.stdout.readline().decode(errors="replace")
            output.append(line)
            match = DATA_LINE.match(line)
            if match and not line.rstrip().endswith(" B"):
                seen.add(match.group(1))
        assert wanted <= seen, f"the live view showed readings of {sorted(seen)}:\n{''.join(output[-40:])}"
    finally:
        STOPS[stop](demo)
        try:
            demo.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C, so that it cleans up after itself
            demo.wait(30)
            raise AssertionError(f"the demo ran on for 30 s after {stop}") from None
        finally:
            selector.close()
    output.append(demo.stdout.read().decode(errors="replace"))
    # The agent stops before its broker: a clean "offline", never its Last Will ("connection lost").
    assert "connection lost" not in "".join(output), "".join(output[-20:])
    port = int(re.search(r"listener (\d+)", (copy / "demo-data" / "mosquitto.conf").read_text()).group(1))
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "the demo's broker is stopped"
    assert not any(os.path.lexists(link) for link in DEMO_LINKS), "the simulated ports are removed"
    assert "stopped cleanly" in (copy / "demo-agent.log").read_text()
    assert not list(copy.glob("config/examples/.demo-*.yaml")), "the demo's copy of the config is removed"
    assert not processes_working_in(copy), f"{stop} leaves no process of the demo behind"


def test_the_demo_stops_with_a_reason_when_its_instruments_cannot_be_simulated(tmp_path):
    """The demo's Modbus TCP instrument listens on a fixed port (another demo may hold it): `edge-agent
    simulate` then ends at once, saying so. The demo used to sleep 2 s and run the agent anyway, whose
    live view then scrolled readings of instruments that were not there (null, flag B) past the reason."""
    copy = repository_copy(tmp_path / "edge-agent")
    bus = yaml.safe_load((copy / "config/examples/demo-station.yaml").read_text())["buses"]["plant-lan"]
    with socket.socket() as taken:
        # SO_REUSEADDR: a connection of an earlier demo to that port may linger (TIME_WAIT); a listener
        # already there (another demo) holds the port as well as this one would.
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            taken.bind((bus["host"], bus["port"]))
            taken.listen()
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
        demo = subprocess.Popen(["bash", "deploy/demo.sh"], cwd=copy, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        LIVE_PROCESSES.append(demo)
        try:
            out, _ = demo.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C: the demo ran on
            out, _ = demo.communicate(timeout=30)
            raise AssertionError(f"the demo ran on without its instruments:\n{out[-3000:]}") from None
    assert demo.returncode != 0, out
    assert "Address already in use" in out and "could not start" in out, out
    assert "starting the agent" not in out and not (copy / "demo-agent.log").exists()
    assert not processes_working_in(copy), "nothing of the demo is left running"
