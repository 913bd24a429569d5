"""The technician's web console (issue 8) end to end: `edge-agent run` as a real process with simulated
instruments and a real mosquitto, the console's JSON API over real HTTP, check-config's refusal of an
unprotected public listener, basic auth, and the page itself in real headless Chromium (Debian's
`chromium` + `chromium-driver`, driven by Selenium) — no console errors, every device and channel, a
chart with points, an alarm raised by the test and a value that changes when the instrument does.
"""

from __future__ import annotations

import base64
import http.client
import json
import select
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest
from harness import REPO, AgentProcess, Broker, Collector, free_port, run_cli, sim_config, wait_for, write_config

from agent.console import MAX_CLIENTS, MAX_HEAD_BYTES, REQUEST_DEADLINE_S
from agent.consoleauth import AUTH_WINDOW_S, MAX_AUTH_FAILURES

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = REPO / "tests" / "artifacts"
ALARM_ID = "cod.w01018:above"
CHANNELS = {"sim0.c00", "sim0.c01", "cod.w01018"}
PASSWORD = "s3cret-Pass word"


def station(tmp_path: Path, broker: Broker, *, cod_mean: float = 60, console: dict | None = None) -> dict:
    """Two simulated instruments (sim0: c00, c01; cod: w01018, constant) and a COD limit of 50 mg/L,
    with the console on a free loopback port unless `console` says otherwise."""
    config = sim_config(tmp_path, broker, channels=2, interval=0.5,
                        alarms=[{"channel": "cod.w01018", "above": 50, "hysteresis": 2}])
    config["devices"]["cod"] = {"driver": "simulated", "interval": 0.5, "channels": {
        "w01018": {"unit": "mg/L", "mean": cod_mean, "amplitude": 0, "noise": 0}}}
    config["console"] = console if console is not None else {"listen": f"127.0.0.1:{free_port()}"}
    return config


def port_of(config: dict) -> int:
    return int(config["console"]["listen"].rsplit(":", 1)[1])


def request(port: int, path: str, *, method: str = "GET", password: str | None = None, user: str = "technician",
            headers: dict | None = None, host: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        sent = dict(headers or {})
        if password is not None:
            sent["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        conn.request(method, path, headers=sent)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def get_json(port: int, path: str, **kwargs) -> tuple[int, dict]:
    status, headers, body = request(port, path, **kwargs)
    assert headers["content-type"] == "application/json; charset=utf-8", (path, headers)
    return status, json.loads(body)


def console_up(port: int, **kwargs) -> bool:
    try:
        return request(port, "/api", **kwargs)[0] in (200, 401)
    except OSError:
        return False


def cod_value(port: int, **kwargs):
    status, doc = get_json(port, "/api/status", **kwargs)
    return status == 200 and doc["devices"].get("cod", {}).get("channels", {}).get("w01018", {}).get("value")


def history_readings(port: int, channel: str) -> tuple[bool, int]:
    status, doc = get_json(port, f"/api/history?channel={channel}&hours=24")
    assert status == 200, doc
    return doc["ready"], sum(p["n"] for p in doc["points"])


def test_check_config_refuses_a_public_console_without_password_file(tmp_path):
    broker = Broker(tmp_path / "broker")  # only its url is used
    path = write_config(tmp_path / "station.yaml", station(tmp_path, broker, console={"listen": "0.0.0.0:8080"}))
    result = run_cli("check-config", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if text.strip().startswith("listen:"))
    assert f"{path}:{line}:3: console.listen: 0.0.0.0:8080 is reachable from other machines" in result.stderr
    assert "password_file" in result.stderr

    (tmp_path / "console.pass").write_text(PASSWORD + "\n")
    write_config(path, station(tmp_path, broker, console={"listen": "0.0.0.0:8080", "password_file": "console.pass"}))
    result = run_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr


def test_console_api_serves_status_history_and_alarms_and_keeps_history_across_a_restart(tmp_path, broker):
    config = station(tmp_path, broker)
    cfg = write_config(tmp_path / "station.yaml", config)
    port = port_of(config)
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: console_up(port), 15, "the console listening")
        wait_for(lambda: cod_value(port) == 60, 15, "the COD reading in /api/status")
        alarms = wait_for(lambda: (a := get_json(port, "/api/alarms")[1])["active"] and a, 15, "the alarm")
        assert [a["id"] for a in alarms["active"]] == [ALARM_ID]
        assert alarms["active"][0]["threshold"] == 50 and alarms["active"][0]["value"] == 60
        assert alarms["recent"][0]["id"] == ALARM_ID and alarms["recent"][0]["state"] == "raised"

        # /api/status is the `status --json` document, plus the console's own key. It is cached for
        # STATUS_TTL_S: the document read before the alarm was raised may still be served for a moment.
        status, doc = wait_for(lambda: (r := get_json(port, "/api/status"))[1]["alarms"] and r, 15,
                               "the alarm in /api/status")
        cli = json.loads(run_cli("status", "-c", str(cfg), "--json").stdout)
        assert status == 200 and set(cli) <= set(doc) and set(doc) - set(cli) == {"console"}
        assert doc["station"] == "TEST0001" and set(doc["devices"]) == set(cli["devices"]) == {"sim0", "cod"}
        assert set(doc["devices"]["sim0"]["channels"]) == {"c00", "c01"}
        assert [a["id"] for a in doc["alarms"]] == [ALARM_ID]
        extra = doc["console"]
        assert extra["station"] == {"id": "TEST0001", "name": "test station", "type": "other",
                                    "timezone": "Asia/Shanghai"}
        assert extra["devices"]["cod"]["channels"] == ["w01018"] and extra["devices"]["cod"]["interval"] == 0.5
        assert extra["devices"]["cod"]["polls"]["last_hour"]["polls"] >= 1
        assert extra["devices"]["cod"]["polls"]["last_hour"]["failed"] == 0
        assert extra["buffer"]["max_bytes"] == 256 * 1024 * 1024 and extra["buffer"]["used_bytes"] > 0
        assert extra["drain"]["state"] in ("measuring", "up to date", "draining")
        assert extra["agent"]["uptime_s"] >= 0 and extra["clock"]["timezone"] == "Asia/Shanghai"

        status, hist = get_json(port, "/api/history?channel=cod.w01018&hours=0.5")
        assert status == 200 and hist["unit"] == "mg/L" and hist["bucket_s"] == 60 and hist["hours"] == 0.5
        assert hist["limits"] == [{"rule": "above", "value": 50}]
        assert hist["points"] and all(p["avg"] == p["min"] == p["max"] == 60 for p in hist["points"])

        # Read-only and self-protecting: HEAD works, writes are refused, foreign host names too.
        status, headers, body = request(port, "/", method="HEAD")
        assert status == 200 and body == b"" and headers["content-type"].startswith("text/html")
        status, headers, page = request(port, "/")
        assert status == 200 and b"<script src" not in page and b'rel="stylesheet"' not in page, "self-contained"
        assert "script-src 'sha256-" in headers["content-security-policy"]
        for method in ("POST", "PUT", "DELETE"):
            status, err = get_json(port, "/api/status", method=method)
            assert status == 405 and err["status"] == 405
        status, err = get_json(port, "/api/status", headers={"Host": "rebound.example.com"})
        assert status == 403, "a loopback console without password answers only to an IP or localhost"
        # Without a Host header (HTTP/1.0: `printf 'GET /api/status HTTP/1.0\r\n\r\n' | nc`) there is no name
        # that DNS could rebind (a browser always sends one): answered, not refused with a misleading 403.
        answer = raw_exchange(port, b"GET /api/status HTTP/1.0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.0 200 OK\r\n"), answer[:300]

        wait_for(lambda: history_readings(port, "cod.w01018")[1] >= 10, 15, "10 COD readings in the history")
        before = history_readings(port, "cod.w01018")[1]
    finally:
        assert agent.stop() == 0

    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: console_up(port), 15, "the console listening again")
        ready, after = wait_for(lambda: (r := history_readings(port, "cod.w01018"))[0] and r, 15, "the prefill")
        assert after >= before, "the chart keeps what was stored before the restart"
    finally:
        assert agent.stop() == 0


BAD_QUERIES = [
    "/api/history",
    "/api/history?channel=cod",
    "/api/history?channel=cod.w01018&hours=abc",
    "/api/history?channel=cod.w01018&hours=-1",
    "/api/history?channel=cod.w01018&hours=0",
    "/api/history?channel=cod.w01018&hours=25",
    "/api/history?channel=cod.w01018&hours=nan",
    "/api/history?channel=cod.w01018&hours=1e3",
    "/api/history?channel=cod.w01018&hours=1%00",
    "/api/history?channel=cod.w01018&channel=sim0.c00",
    "/api/history?channel=cod.w01018&drop=table",
    "/api/history?channel=%3Cscript%3E.x",
    "/api/history?channel=cod.w01018&&hours",
    "/api/alarms?limit=0",
    "/api/alarms?limit=2.5",
    "/api/alarms?limit=501",
    "/api/status?verbose=1",
    "/?x=1",
]


def test_the_charts_limits_are_those_of_the_alarms_in_force(tmp_path, broker):
    """The dashed limits of a chart: a preset's limit is drawn, and a wildcard rule that a rule naming the
    channel overrides is not (the technician compares the curve with the limits the alarms use)."""
    config = station(tmp_path, broker)
    config["alarms"] = [{"channel": "*", "above": 1000}, {"channel": "cod.w01018", "above": 50, "hysteresis": 2},
                        {"channel": "cod.w01018", "preset": "gb3838-iii"}]
    cfg = write_config(tmp_path / "station.yaml", config)
    port = port_of(config)
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: console_up(port), 15, "the console listening")
        status, hist = get_json(port, "/api/history?channel=cod.w01018&hours=1")
        assert status == 200 and hist["limits"] == [{"rule": "above", "value": 50}, {"rule": "above", "value": 20}]
        status, hist = get_json(port, "/api/history?channel=sim0.c00&hours=1")
        assert status == 200 and hist["limits"] == [{"rule": "above", "value": 1000}]
    finally:
        assert agent.stop() == 0


def test_bad_queries_are_answered_with_json_400_never_a_stack_trace(tmp_path, broker):
    config = station(tmp_path, broker)
    port = port_of(config)
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    try:
        wait_for(lambda: console_up(port), 15, "the console listening")
        for path in BAD_QUERIES:
            status, headers, body = request(port, path)
            assert status == 400, (path, status, body)
            assert headers["content-type"] == "application/json; charset=utf-8", path
            doc = json.loads(body)
            assert doc["status"] == 400 and isinstance(doc["error"], str) and doc["error"], (path, doc)
            assert b"Traceback" not in body and b"File \"" not in body
        for path in ("/api/history?channel=cod.nothere", "/api/history?channel=ghost.w01018", "/etc/passwd",
                     "/api/../api/status"):
            status, doc = get_json(port, path)
            assert status == 404 and doc["status"] == 404, (path, doc)
        assert get_json(port, "/api/history?channel=cod.w01018&hours=24")[0] == 200
        for path in ("/api/history?channel=cod.w01018&hours=24&", "/api/history?&channel=cod.w01018&&hours=1",
                     "/api/status?", "/api/status?&"):  # empty fields, as scripts that build queries leave them
            assert get_json(port, path)[0] == 200, path
        assert agent.alive()
    finally:
        assert agent.stop() == 0
    assert "Traceback" not in agent.log()


def test_console_password_wrong_is_401_right_is_200(tmp_path, broker):
    (tmp_path / "console.pass").write_text(PASSWORD + "\n")
    config = station(tmp_path, broker, console={"listen": f"127.0.0.1:{free_port()}", "password_file": "console.pass"})
    port = port_of(config)
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    try:
        wait_for(lambda: console_up(port), 15, "the console listening")
        for path in ("/", "/api/status", "/api/history?channel=cod.w01018", "/api/alarms"):
            for password in (None, "wrong", PASSWORD + "x", PASSWORD[:-1], ""):
                status, headers, body = request(port, path, password=password)
                assert status == 401, (path, password, status)
                assert headers["www-authenticate"].startswith('Basic realm="edge-agent console"')
                assert json.loads(body)["status"] == 401
            status, headers, _ = request(port, path, password=PASSWORD)
            assert status == 200, path
        assert request(port, "/api/status", password=PASSWORD, user="anyone")[0] == 200
        status, _, _ = request(port, "/api/status", headers={"Authorization": "Basic !!notbase64!!"})
        assert status == 401
    finally:
        assert agent.stop() == 0
    assert PASSWORD not in agent.log()
    assert "wrong password" in agent.log()


def test_wrong_passwords_are_throttled_per_client_on_an_ipv6_listener(tmp_path, broker):
    """A console on [::1]: MAX_AUTH_FAILURES wrong passwords from ::1 and its /64 (::/64, `client_key`;
    loopback has no second address of it: the grouping of a /64 is tests/unit/test_console_clients.py's)
    gets 429 for AUTH_WINDOW_S, the right password too, never the password in an answer or the log."""
    (tmp_path / "console.pass").write_text(PASSWORD + "\n")
    config = station(tmp_path, broker, console={"listen": f"[::1]:{free_port()}", "password_file": "console.pass"})
    port = port_of(config)
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    try:
        wait_for(lambda: console_up(port, host="::1"), 15, "the console listening on [::1]")
        assert request(port, "/api/status", password=PASSWORD, host="::1")[0] == 200
        answers = [request(port, "/api/status", password=f"guess{i}", host="::1") for i in range(MAX_AUTH_FAILURES)]
        assert [status for status, _, _ in answers] == [401] * MAX_AUTH_FAILURES
        for password in ("guess", PASSWORD):
            status, headers, body = request(port, "/api/status", password=password, host="::1")
            assert status == 429 and headers["retry-after"] == str(int(AUTH_WINDOW_S)), (status, headers)
            assert json.loads(body) == {"error": "too many wrong passwords; try again in a minute", "status": 429}
            answers.append((status, headers, body))
        assert all(PASSWORD.encode() not in body and PASSWORD not in str(headers) for _, headers, body in answers)
    finally:
        assert agent.stop() == 0
    assert "console: wrong password from ::1" in agent.log() and PASSWORD not in agent.log()


# --------------------------------------------------------------------------------------------------
# Clients that never finish their request (slowloris) and malformed requests, over raw sockets

REQUEST_START = b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n"


def open_trickling(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A connection (from the loopback address `source`) that has sent a request line and a header, and not
    the blank line that ends the request."""
    sock = socket.create_connection(("127.0.0.1", port), 5, source_address=(source, 0))
    sock.sendall(REQUEST_START)
    return sock


def trickle(sock: socket.socket) -> bytes | None:
    """One more header line, as a slowloris client sends now and then; what the console sent back instead
    (b"" once it closed the connection), or None while it still waits for the rest of the request."""
    try:
        if select.select([sock], [], [], 0)[0]:
            return sock.recv(65536)
        sock.sendall(b"X-Trickle: 1\r\n")
    except OSError:
        return b""
    return None


class Trickler:
    """`count` trickling connections, each sending a header line every `every` s; a connection the console
    closes is opened again at the next round, so that they keep taking every slot they can get."""

    def __init__(self, port: int, count: int, every: float = 1.0, source: str = "127.0.0.1"):
        self.port, self.count, self.every, self.source = port, count, every, source
        self.socks = [open_trickling(port, source) for _ in range(count)]
        self.closed = 0  # connections the console closed
        self.answered = 0  # ... after sending something back (it never should: no request ever ends)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trickler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            live = []
            for sock in self.socks:
                got = trickle(sock)
                if got is None:
                    live.append(sock)
                    continue
                sock.close()
                self.closed += 1
                self.answered += bool(got)
            while len(live) < self.count and not self._stop.is_set():
                try:
                    live.append(open_trickling(self.port, self.source))
                except OSError:
                    break
            self.socks = live

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for sock in self.socks:
            sock.close()


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send `data` as is and read everything the console answers until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), 10) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def password_station(tmp_path: Path, broker: Broker) -> tuple[dict, int]:
    (tmp_path / "console.pass").write_text(PASSWORD + "\n")
    config = station(tmp_path, broker, console={"listen": f"127.0.0.1:{free_port()}", "password_file": "console.pass"})
    return config, port_of(config)


def answered_200(port: int) -> bool:
    try:
        return request(port, "/api/status", password=PASSWORD)[0] == 200
    except (OSError, http.client.HTTPException):
        return False  # closed unanswered: no slot for it


def test_trickling_clients_cannot_lock_the_technician_out(tmp_path, broker):
    config, port = password_station(tmp_path, broker)
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    trickler = None
    try:
        wait_for(lambda: console_up(port), 15, "the console listening")
        extra = 8
        trickler = Trickler(port, MAX_CLIENTS + extra)
        # The console holds at most MAX_CLIENTS connections: once it has closed `extra` of them, every slot
        # is held by a client that will never finish its request and keeps reconnecting.
        wait_for(lambda: trickler.closed >= extra, 10, f"the console full ({extra} trickling connections closed)")
        started = time.monotonic()
        wait_for(lambda: answered_200(port), REQUEST_DEADLINE_S, "the technician's request answered")
        assert time.monotonic() - started <= REQUEST_DEADLINE_S
        # Not once by luck (a slot freed by the deadline just before the trickler takes it again): through a
        # whole deadline of trickling, every request of the technician is answered at once.
        until, requests = time.monotonic() + REQUEST_DEADLINE_S + 1, 0
        while time.monotonic() < until:
            assert answered_200(port), f"refused after {requests} answered requests"
            requests += 1
            time.sleep(0.05)
        assert trickler.closed > 2 * extra, "the trickler kept reconnecting all along"
        assert trickler.answered == 0, "an unfinished request is never answered"
        assert agent.alive()
    finally:
        if trickler is not None:
            trickler.stop()
        assert agent.stop() == 0
    assert "Traceback" not in agent.log()


def test_a_client_flooding_connections_evicts_its_own_not_the_technicians(tmp_path, broker):
    """When every slot is taken, a new connection took the place of the oldest one still sending its
    request, whoever's it was: a client opening connections faster than the technician's request arrives
    (a slow link, a request sent in pieces) closed the technician's. It now takes the place of one of the
    client holding the most (an IPv4 address, an IPv6 /64: `consoleauth.client_key`)."""
    config, port = password_station(tmp_path, broker)
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    trickler = None
    try:
        wait_for(lambda: console_up(port), 15, "the console listening")
        auth = base64.b64encode(f"technician:{PASSWORD}".encode())
        with socket.create_connection(("127.0.0.1", port), 10) as technician:
            technician.sendall(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the rest comes later
            extra = 8
            trickler = Trickler(port, MAX_CLIENTS + extra, every=0.2, source="127.0.0.2")
            wait_for(lambda: trickler.closed >= extra, REQUEST_DEADLINE_S - 2, "the console full")
            technician.sendall(b"Authorization: Basic " + auth + b"\r\n\r\n")
            answer = technician.recv(65536)
        assert answer.startswith(b"HTTP/1.0 200 OK\r\n"), answer[:200]
        assert trickler.answered == 0
        assert agent.alive()
    finally:
        if trickler is not None:
            trickler.stop()
        assert agent.stop() == 0


def test_a_request_must_arrive_whole_within_the_deadline(tmp_path, broker):
    config, port = password_station(tmp_path, broker)
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    try:
        wait_for(lambda: console_up(port), 15, "the console listening")
        # A request line and headers sent in pieces, all within the deadline, is a request like any other.
        auth = base64.b64encode(f"technician:{PASSWORD}".encode())
        with socket.create_connection(("127.0.0.1", port), 10) as sock:
            for piece in (b"GET /api/status HTTP/1.1\r\n", b"Host: 127.0.0.1\r\nAuthorization: Basic ",
                          auth + b"\r\n", b"\r\n"):
                sock.sendall(piece)
                time.sleep(0.2)
            assert sock.recv(65536).startswith(b"HTTP/1.0 200 OK\r\n")

        # A header line every 0.5 s resets no timer: the connection is closed once the deadline has passed.
        sock = open_trickling(port)
        started = time.monotonic()
        try:
            got = wait_for(lambda: (r := trickle(sock)) is not None and [r], REQUEST_DEADLINE_S + 2,
                           "the trickling connection closed", interval=0.5)[0]
        finally:
            sock.close()
        assert got == b"", f"closed unanswered, not {got[:80]!r}"
        assert REQUEST_DEADLINE_S - 1 <= time.monotonic() - started <= REQUEST_DEADLINE_S + 2
        assert answered_200(port)
    finally:
        assert agent.stop() == 0


MALFORMED = [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03ECHO-ME\x00\xff\r\n\r\n",  # a TLS ClientHello
    b"ECHO-ME\r\n\r\n",
    b"GET /ECHO-ME\r\n\r\n",  # HTTP/0.9
    b"GET /ECHO-ME HTTP/ECHO-ME\r\n\r\n",
    b"GET /ECHO-ME HTTP/1.1 ECHO-ME\r\n\r\n",
    b"\r\n\r\n",
]


def test_a_malformed_request_gets_a_400_with_status_line_and_headers_and_no_echo(tmp_path, broker):
    config = station(tmp_path, broker)
    port = port_of(config)
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    try:
        wait_for(lambda: console_up(port), 15, "the console listening")
        for raw in MALFORMED:
            answer = raw_exchange(port, raw)
            head, _, body = answer.partition(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            assert status_line == "HTTP/1.0 400 Bad Request", (raw, answer[:200])
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
            assert headers["content-type"] == "application/json; charset=utf-8", (raw, headers)
            assert "Server: edge-agent-console" in header_lines, header_lines  # no version, no trailing space
            assert int(headers["content-length"]) == len(body) and headers["x-content-type-options"] == "nosniff"
            assert json.loads(body)["status"] == 400, (raw, body)
            assert b"ECHO-ME" not in answer, f"the request's bytes echoed: {answer!r}"
        answer = raw_exchange(port, b"ECHO-ME /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.0 501 ") and b"ECHO-ME" not in answer, answer
        # More than MAX_HEAD_BYTES without the end of the request: refused without waiting for the rest.
        for raw, status_line in ((b"GET /ECHO-ME" + b"a" * MAX_HEAD_BYTES, b"HTTP/1.0 414 "),
                                 (b"GET /ECHO-ME HTTP/1.1\r\nX: " + b"a" * MAX_HEAD_BYTES, b"HTTP/1.0 431 ")):
            answer = raw_exchange(port, raw)
            assert answer.startswith(status_line) and b"Content-Type: application/json" in answer, answer[:200]
            assert b"ECHO-ME" not in answer
        assert get_json(port, "/api/status")[0] == 200
        assert agent.alive()
    finally:
        assert agent.stop() == 0
    assert "Traceback" not in agent.log()


# --------------------------------------------------------------------------------------------------
# A hostile client on the station's LAN, all at once: the station records on, the console answers after

MQTT_PASSWORD = "mqtt-Secret-4711"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"technician:{PASSWORD}".encode()).decode()}
AUTH_LINE = f"Authorization: {AUTH['Authorization']}\r\n".encode()

# (raw request, the one status line it gets): each sent as is over its own connection
ODD_REQUESTS = [
    (b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n" + AUTH_LINE + b"Content-Length: 10\r\n\r\n0123456789",
     "200 OK"),  # a body on GET: ignored
    (b"GET /api/status HTTP/1.1\r\nHost: x\r\n" + AUTH_LINE + b"Content-Length: 999999999999999999\r\n\r\nabc",
     "200 OK"),
    (b"GET /api/status HTTP/1.1\r\nHost: x\r\n" + AUTH_LINE + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
     "200 OK"),
    (b"GET /api/alarms HTTP/1.1\r\nHost: x\r\n" + AUTH_LINE + b"\r\n"
     b"GET /api/status HTTP/1.1\r\nHost: x\r\n" + AUTH_LINE + b"\r\n", "200 OK"),  # pipelined: one answer
    (b"GET /api/status HTTP/1.0\r\n" + AUTH_LINE + b"\r\n", "200 OK"),  # HTTP/1.0 without Host
    (b"HEAD /api/status HTTP/1.1\r\nHost: x\r\n" + AUTH_LINE + b"\r\n", "200 OK"),
    (b"GET /api/status HTTP/1.1\nHost: x\n" + AUTH_LINE.replace(b"\r", b"") + b"\n", "200 OK"),  # bare LF
    (b"GET /api/history?channel=cod%zz.w01018 HTTP/1.1\r\nHost: x\r\n" + AUTH_LINE + b"\r\n", "400 Bad Request"),
    (b"GET /api/history?channel=%ff%fe.w01018 HTTP/1.1\r\nHost: x\r\n" + AUTH_LINE + b"\r\n", "400 Bad Request"),
    (b"GET /api/history?channel=cod.w01018&hours=%EF%BC%91 HTTP/1.1\r\nHost: x\r\n" + AUTH_LINE + b"\r\n",
     "400 Bad Request"),  # a fullwidth digit
    (b"GET /api/history?channel=cod.w01018&hours=1% HTTP/1.1\r\nHost: x\r\n" + AUTH_LINE + b"\r\n",
     "400 Bad Request"),
    (b"GET /api/history?channel=cod.w01018&hours=1&hours=2 HTTP/1.1\r\nHost: x\r\n" + AUTH_LINE + b"\r\n",
     "400 Bad Request"),
    (b"GET /api/hist%6Fry?channel=cod.w01018 HTTP/1.1\r\nHost: x\r\n" + AUTH_LINE + b"\r\n", "404 Not Found"),
    (b"GET /%ff%00/../api/status HTTP/1.1\r\nHost: x\r\n" + AUTH_LINE + b"\r\n", "404 Not Found"),
    (b"GET //api/status HTTP/1.1\r\nHost: x\r\n" + AUTH_LINE + b"\r\n", "200 OK"),  # http.server: one /
    (b"GET /api/status HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + AUTH_LINE + b"\r\n",
     "431 Request Header Fields Too Large"),
    (b"GET /api/status HTTP/1.1\r\nHost: x\r\nAuthorization: Basic " + base64.b64encode(b"a:" + b"x" * 40_000)
     + b"\r\n\r\n", "401 Unauthorized"),
    (b"GET /api/status HTTP/1.1\r\nHost: x\r\nAuthorization: Basic \xff\xfe\r\n\r\n", "401 Unauthorized"),
]


def flood_connections(port: int, source: str, stop: threading.Event, opened: list[int]) -> None:
    """Connections opened as fast as the kernel takes them, never sending anything, closed in bulk."""
    held: list[socket.socket] = []
    while not stop.is_set():
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((source, 0))
        sock.connect_ex(("127.0.0.1", port))
        held.append(sock)
        opened[0] += 1
        if len(held) >= 500:
            for old in held:
                old.close()
            held.clear()
            time.sleep(0.01)
    for sock in held:
        sock.close()


def test_a_hostile_client_neither_stops_the_station_nor_keeps_the_technician_out(tmp_path):
    """Idle and trickling connections, a connection flood and odd requests (a body on GET, pipelined
    requests, HTTP/1.0 without Host, bad percent-encoding, repeated parameters, too many headers, a huge
    Authorization) at once: readings reach the broker throughout, each odd request gets one answer of its
    own, a legitimate request is answered within REQUEST_DEADLINE_S afterwards, and no password is in
    any answer or log line."""
    broker = Broker(tmp_path / "broker", passwords={"station": MQTT_PASSWORD}).start()
    (tmp_path / "mqtt.pass").write_text(MQTT_PASSWORD + "\n")
    config, port = password_station(tmp_path, broker)
    config["mqtt"].update({"username": "station", "password_file": "mqtt.pass"})
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    collector = Collector(broker, "env/TEST0001/data", username="station", password=MQTT_PASSWORD)
    trickler, stop, opened, flooders, idle = None, threading.Event(), [0], [], []
    answers: list[bytes] = []
    try:
        wait_for(lambda: console_up(port), 15, "the console listening")
        wait_for(lambda: collector.reading_seqs(), 15, "readings at the broker")
        idle = [socket.create_connection(("127.0.0.1", port), 5, source_address=("127.0.0.2", 0))
                for _ in range(2 * MAX_CLIENTS)]
        trickler = Trickler(port, MAX_CLIENTS, every=0.5, source="127.0.0.3")
        for raw, status in ODD_REQUESTS:
            answer = raw_exchange(port, raw)
            answers.append(answer)
            assert answer.split(b"\r\n", 1)[0].decode("latin-1") == f"HTTP/1.0 {status}", (raw[:80], answer[:300])
            assert answer.count(b"HTTP/1.0 ") == 1, f"one answer per connection: {answer[:300]!r}"
            assert b"Traceback" not in answer
        # Then a flood as well (the listen queue overflows: the console may answer slowly meanwhile).
        flooders = [threading.Thread(target=flood_connections, args=(port, "127.0.0.4", stop, opened), daemon=True)
                    for _ in range(2)]
        for thread in flooders:
            thread.start()
        wait_for(lambda: opened[0] >= 1000, 15, "the flood under way")
        before = max(collector.reading_seqs())
        wait_for(lambda: max(collector.reading_seqs()) >= before + 10, 15, "10 more readings during the attack")
    finally:
        stop.set()
        for thread in flooders:
            thread.join(10)
        if trickler is not None:
            trickler.stop()
        for sock in idle:
            sock.close()
    try:
        started = time.monotonic()
        wait_for(lambda: answered_200(port), REQUEST_DEADLINE_S, "the technician answered after the attack")
        assert time.monotonic() - started <= REQUEST_DEADLINE_S
        status, headers, body = request(port, "/api/status", password=PASSWORD)
        answers.append(body)
        assert status == 200 and agent.alive()
    finally:
        collector.close()
        assert agent.stop() == 0
        broker.stop()
    for secret in (PASSWORD, MQTT_PASSWORD):
        assert not [a for a in answers if secret.encode() in a], "a password in an answer"
        assert secret not in agent.log(), "a password in the log"
    assert "Traceback" not in agent.log()


# --------------------------------------------------------------------------------------------------
# The page in real headless Chromium

PAGE_STATE = """
const q = (s) => [...document.querySelectorAll(s)];
return {
  station: document.getElementById("st-id").textContent,
  marker: window.__testMarker || null,
  devices: q("#device-table tbody tr[data-device]").map((r) => r.dataset.device),
  values: Object.fromEntries(q(".ch[data-channel]").map((c) => [c.dataset.channel,
    c.querySelector(".value").textContent])),
  points: Object.fromEntries(q(".ch[data-channel]").map((c) => [c.dataset.channel,
    Number(c.querySelector("svg.chart").getAttribute("data-points"))])),
  dots: q(".ch[data-channel] svg.chart circle.pt").length,
  alarms: q("#active-alarms tbody tr[data-alarm]").map((r) => r.dataset.alarm),
  alarmCards: q(".ch.alarm").map((c) => c.dataset.channel),
  recent: q("#recent-alarms tbody tr[data-event]").map((r) => r.textContent),
  connectionLost: document.getElementById("conn").classList.contains("show"),
  periods: [...new Set(q(".ch svg.chart text.axis").map((t) => t.textContent).filter((t) => t.endsWith(" h")))],
};
"""


def _chromium():
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (the test extra)")
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1400", f"--user-data-dir={tempfile.mkdtemp(prefix='console-chromium-')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def _screenshot(driver, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(max(int(height) + 120, 800), 4000))
    driver.save_screenshot(str(ARTIFACTS / name))


def test_console_page_in_headless_chromium_shows_devices_charts_alarms_and_live_values(tmp_path, broker):
    path = tmp_path / "station.yaml"
    config = station(tmp_path, broker)
    port = port_of(config)
    agent = AgentProcess(write_config(path, config))
    driver = None
    errors: list[dict] = []

    def state() -> dict:
        assert driver is not None
        errors.extend(e for e in driver.get_log("browser") if e["level"] == "SEVERE")
        return driver.execute_script(PAGE_STATE)

    try:
        wait_for(lambda: console_up(port), 15, "the console listening")
        wait_for(lambda: cod_value(port) == 60, 15, "the COD reading")
        driver = _chromium()
        driver.get(f"http://127.0.0.1:{port}/")
        driver.execute_script("window.__testMarker = 'same page';")

        s = wait_for(lambda: (s := state())["values"].get("cod.w01018") == "60" and s["alarms"] and
                     s["points"].get("cod.w01018") and s, 20, "devices, values, the alarm and a chart on the page")
        assert s["station"] == "TEST0001"
        assert s["devices"] == ["sim0", "cod"], "every device of the config, in config order"
        assert set(s["values"]) == CHANNELS and set(s["points"]) == CHANNELS, "every channel of the config"
        assert s["alarms"] == [ALARM_ID] and s["alarmCards"] == ["cod.w01018"]
        assert any(ALARM_ID in row and "raised" in row for row in s["recent"])
        assert s["dots"] >= 1 and s["points"]["cod.w01018"] >= 1
        wait_for(lambda: all(v >= 1 for v in state()["points"].values()), 20, "a chart with points on every channel")
        assert not s["connectionLost"] and s["periods"] == ["\u221224 h"]
        _screenshot(driver, "console.png")

        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import Select

        Select(driver.find_element(By.ID, "hours")).select_by_value("1")
        wait_for(lambda: (s := state())["periods"] == ["\u22121 h"] and all(v >= 1 for v in s["points"].values()), 10,
                 "the charts redrawn for the last hour")

        # The instrument changes (new mean, SIGHUP): the page follows by itself, without reloading.
        write_config(path, station(tmp_path, broker, cod_mean=20, console=config["console"]))
        agent.signal(signal.SIGHUP)
        s = wait_for(lambda: (s := state())["values"].get("cod.w01018") == "20" and not s["alarms"] and s, 30,
                     "the new COD value and the alarm cleared on the page")
        assert s["marker"] == "same page", "refreshed through fetch(), not by reloading the page"
        assert any(ALARM_ID in row and "cleared" in row for row in s["recent"])
        _screenshot(driver, "console-after-change.png")
        state()
        assert errors == [], f"browser console errors: {errors}"
    finally:
        if driver is not None:
            driver.quit()
        assert agent.stop() == 0
