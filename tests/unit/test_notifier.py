"""agent.sdnotify.Notifier: the environment systemd gives a Type=notify service (NOTIFY_SOCKET as a path
or an abstract '@name', WATCHDOG_USEC, WATCHDOG_PID) and the datagrams it sends to a real socket."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import uuid
from pathlib import Path

import pytest

from agent.sdnotify import Notifier


@pytest.fixture
def notify_dir():
    # Not tmp_path: a Unix socket path must stay under 108 bytes, and pytest's paths can be long.
    d = Path(tempfile.mkdtemp(prefix="ea-sdn-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _bound(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def test_without_notify_socket_it_is_disabled_and_sends_nothing():
    n = Notifier({})
    assert not n.enabled
    assert n.notify("READY=1") is False
    assert n.watchdog_interval is None


def test_path_socket_receives_each_message_as_one_datagram(notify_dir):
    path = str(notify_dir / "notify")
    with _bound(path) as sock:
        n = Notifier({"NOTIFY_SOCKET": path})
        assert n.enabled
        assert n.notify("READY=1\nSTATUS=running") is True
        assert n.notify("WATCHDOG=1") is True
        assert sock.recv(4096) == b"READY=1\nSTATUS=running"
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_abstract_socket_name_starting_with_at_is_reached():
    name = f"edge-agent-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with _bound("\0" + name) as sock:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.notify("STATUS=broker online, backlog 0") is True
        assert sock.recv(4096) == b"STATUS=broker online, backlog 0"


def test_status_text_is_sent_as_utf8(notify_dir):
    path = str(notify_dir / "notify")
    with _bound(path) as sock:
        assert Notifier({"NOTIFY_SOCKET": path}).notify("STATUS=站点 online, 3 °C")
        assert sock.recv(4096).decode("utf-8") == "STATUS=站点 online, 3 °C"


def test_unreachable_socket_is_not_an_error(notify_dir):
    # systemd gone (or the socket removed): the agent must go on running, not crash.
    n = Notifier({"NOTIFY_SOCKET": str(notify_dir / "nobody-listens")})
    assert n.enabled
    assert n.notify("WATCHDOG=1") is False


def test_watchdog_interval_is_half_of_watchdog_usec():
    n = Notifier({"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000"})
    assert n.watchdog_usec == 30_000_000
    assert n.watchdog_interval == pytest.approx(15.0)
    assert Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "2000000"}).watchdog_interval == pytest.approx(1.0)


def test_watchdog_pid_of_this_process_enables_the_watchdog():
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(env).watchdog_interval == pytest.approx(1.0)


def test_watchdog_meant_for_another_process_is_ignored():
    # WATCHDOG_PID names the process systemd watches; a child that inherited the variables must not ping.
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier(env).watchdog_interval is None


@pytest.mark.parametrize("value", ["", "0", "abc", "-5", "1.5"])
def test_absent_or_invalid_watchdog_usec_means_no_watchdog(value):
    assert Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": value}).watchdog_interval is None


def test_reads_the_process_environment_by_default(notify_dir, monkeypatch):
    path = str(notify_dir / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    with _bound(path) as sock:
        n = Notifier()
        assert n.watchdog_interval == pytest.approx(2.0)
        assert n.notify("STOPPING=1")
        assert sock.recv(4096) == b"STOPPING=1"


def test_datagram_comes_from_this_process(notify_dir):
    # NotifyAccess=main: systemd accepts a message only when its sender is the main PID.
    path = str(notify_dir / "notify")
    with _bound(path) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        assert Notifier({"NOTIFY_SOCKET": path}).notify("READY=1")
        data, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
        assert data == b"READY=1"
        creds = [d for level, kind, d in ancdata if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
        assert creds and struct.unpack("3i", creds[0][:12])[0] == os.getpid()  # pid, uid, gid
