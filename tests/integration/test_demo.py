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

DATA_LINE = re.compile(r"^data\s+#\d+ (\w+)\.(\w+) ")
LINKS_LINE = re.compile(r"^== the demo's simulated serial ports: (\S+);")


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


def start_demo(copy: Path) -> subprocess.Popen:
    demo = subprocess.Popen(["bash", "deploy/demo.sh"], cwd=copy, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    LIVE_PROCESSES.append(demo)
    return demo


def held_listener(host: str, port: int) -> socket.socket:
    """A listener on `host:port`, or on nothing when that port is held already (another demo, another
    program): either way the port is not the demo's to take. SO_REUSEADDR: a connection of an earlier
    demo to that port may linger (TIME_WAIT)."""
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        taken.bind((host, port))
        taken.listen()
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
    return taken


@pytest.mark.parametrize("stop", sorted(STOPS))
def test_the_demo_shows_readings_of_every_protocol_and_stops_cleanly(tmp_path, stop):
    """Also while the example's Modbus TCP port (15020) is held by someone else, another demo say: the
    demo picked that fixed port and a fixed directory for its serial links (/tmp/edge-agent-demo), so a
    second demo, or a program on 15020, stopped it. Each demo now has free ports and a directory of
    its own, removed when it stops."""
    copy = repository_copy(tmp_path / "edge-agent")
    bus = yaml.safe_load((copy / "config/examples/demo-station.yaml").read_text())["buses"]["plant-lan"]
    taken = held_listener(bus["host"], bus["port"])
    demo = start_demo(copy)
    assert demo.stdout is not None
    seen: set[str] = set()
    links: Path | None = None
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
            if links_match := LINKS_LINE.match(line):
                links = Path(links_match.group(1))
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
            taken.close()
    output.append(demo.stdout.read().decode(errors="replace"))
    # The agent stops before its broker: a clean "offline", never its Last Will ("connection lost").
    assert "connection lost" not in "".join(output), "".join(output[-20:])
    port = int(re.search(r"listener (\d+)", (copy / "demo-data" / "mosquitto.conf").read_text()).group(1))
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "the demo's broker is stopped"
    assert links is not None and links.name.startswith("edge-agent-demo."), "".join(output[:20])
    assert not os.path.lexists(links), "the simulated ports and their directory are removed"
    assert "stopped cleanly" in (copy / "demo-agent.log").read_text()
    assert not list(copy.glob("config/examples/.demo-*.yaml")), "the demo's copy of the config is removed"
    assert not processes_working_in(copy), f"{stop} leaves no process of the demo behind"


def test_a_second_demo_in_the_same_directory_is_refused_and_the_first_runs_on(tmp_path):
    """Two demos from one directory would share the buffer (the second agent exits: another holds it),
    the config copy (removed by the first to stop) and the log: the second is refused at once, saying
    which demo runs there, and leaves the first alone."""
    copy = repository_copy(tmp_path / "edge-agent")
    first = start_demo(copy)
    assert first.stdout is not None
    output: list[str] = []
    selector = selectors.DefaultSelector()
    selector.register(first.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and first.poll() is None and not any(
                DATA_LINE.match(line) and not line.rstrip().endswith(" B") for line in output):
            if selector.select(timeout=1):
                output.append(first.stdout.readline().decode(errors="replace"))
        assert first.poll() is None, "".join(output)
        second = subprocess.Popen(["bash", "deploy/demo.sh"], cwd=copy, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True)
        LIVE_PROCESSES.append(second)
        try:
            out, err = second.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(second.pid, signal.SIGINT)  # Ctrl-C: the second demo ran
            out, err = second.communicate(timeout=30)
            raise AssertionError(f"a second demo ran in the same directory:\n{out[-3000:]}{err[-3000:]}") from None
        assert second.returncode != 0, out + err
        assert f"another demo is running from {copy} (pid {first.pid})" in err, err
        assert "starting" not in out, out
        output.clear()
        while time.monotonic() < deadline + 30 and first.poll() is None and not any(
                DATA_LINE.match(line) and not line.rstrip().endswith(" B") for line in output):
            if selector.select(timeout=1):
                output.append(first.stdout.readline().decode(errors="replace"))
        assert first.poll() is None and output, "the first demo runs on, its readings still arriving"
    finally:
        os.killpg(first.pid, signal.SIGINT)
        first.wait(30)
        selector.close()
    assert "stopped cleanly" in (copy / "demo-agent.log").read_text()
    assert not processes_working_in(copy), "nothing of the demo is left running"
