"""The web console's HTTP server (`agent.console`): `_Server`, a `ThreadingHTTPServer` that holds at
most MAX_CLIENTS connections, and `_Handler`, which reads a request, checks who sends it (`_authorized`:
a password, or loopback names only without one), routes it to the page or the JSON API and answers it
with security headers; errors are JSON `{"error": ..., "status": ...}` with the status code, never a
stack trace, never the request's own bytes (but an unknown query parameter's name, at most 40 characters,
quoted in the JSON).

One request per connection (HTTP/1.0). Its request line and headers must arrive whole within
REQUEST_DEADLINE_S, or the connection is closed unanswered. At most MAX_CLIENTS connections are held; when
they are all taken, a new connection takes the place of the oldest one still sending its request of the
client holding the most (that one is closed), so that clients trickling headers to hold slots (slowloris),
or opening connections faster than the technician's request arrives, cannot lock the technician out.

Imports `agent.consoleauth` (`AUTH_WINDOW_S`, `client_key`), `agent.consoleapi`, `agent.consolepage`,
`agent.payloads` (`finite`) and, for type checking only, `agent.console` (`Console`); nothing else from
the project. Its log lines are the console's (logger `agent.console`).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from agent.consoleapi import _ROUTES, ApiError, _query
from agent.consoleauth import AUTH_WINDOW_S, client_key
from agent.consolepage import PAGE_BYTES, PAGE_CSP
from agent.payloads import finite

if TYPE_CHECKING:
    from agent.console import Console

log = logging.getLogger("agent.console")  # the console's lines, under one name as before the split

MAX_CLIENTS = 32  # connections held at once (the station is never affected); see _Server for who gets one
REQUEST_DEADLINE_S = 5.0  # a connection's request line and headers must all arrive within this, or it is closed
MAX_HEAD_BYTES = 64 * 1024  # request line and headers together (a browser sends 1-2 KB)


def _json_bytes(doc: Any) -> bytes:
    try:
        text = json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:
        text = json.dumps(finite(doc), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.encode("utf-8")


def _is_ip_or_localhost(host_header: str) -> bool:
    host = host_header.strip()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host.lower() == "localhost":
        return True
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True


def _head_end(data: bytearray, start: int) -> int:
    """Offset just past the blank line that ends a request head (CRLF or bare LF), or -1."""
    ends = [i + len(sep) for sep in (b"\n\r\n", b"\n\n") if (i := data.find(sep, start)) >= 0]
    return min(ends) if ends else -1


class _Server(ThreadingHTTPServer):
    """At most MAX_CLIENTS connections at once, each in a thread; IPv6 when asked.

    A connection holds a slot from accept to close. When all are taken, a new connection evicts one still
    sending its request (shut down under the lock: its handler's read ends and it closes): the oldest of
    those of the client (`client_key`: an IPv4 address, an IPv6 /64) holding the most slots. A client
    cannot keep the technician out by opening connections and trickling headers, however many it opens and
    however fast: it takes its own slots, and each slot it holds is lost after REQUEST_DEADLINE_S anyway.
    The new connection is closed unanswered instead when its client, another, would then hold more than
    that one, or when every slot is busy answering a complete request (those answers take milliseconds).
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 32

    def __init__(self, address: tuple[str, int], console: Console):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.console = console
        self._lock = threading.Lock()
        self._clients: dict[Any, bool] = {}  # connection -> still sending its request; in accept order
        self._client_of: dict[Any, str] = {}  # connection -> its client_key
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        key = client_key(str(client_address[0]))
        with self._lock:
            if len(self._clients) >= MAX_CLIENTS:
                victim = self._victim()
                held = Counter(self._client_of.values())
                owner = self._client_of[victim] if victim is not None else key
                if victim is None or (owner != key and held[key] + 1 > held[owner]):
                    self.shutdown_request(request)
                    return
                del self._clients[victim]
                del self._client_of[victim]
                try:
                    victim.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._clients[request] = True
            self._client_of[request] = key
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(request)
            raise

    def _victim(self) -> Any:
        """The oldest connection still sending its request of the client holding the most; None if none is
        sending (under the lock)."""
        held = Counter(self._client_of.values())
        sending = [conn for conn, still in self._clients.items() if still]
        return max(sending, key=lambda conn: held[self._client_of[conn]], default=None)  # the first of equals

    def request_arrived(self, request: Any) -> bool:
        """The handler has the whole request: no longer evictable. False if it was evicted meanwhile."""
        with self._lock:
            if request not in self._clients:
                return False
            self._clients[request] = False
            return True

    def _release(self, request: Any) -> None:
        with self._lock:
            self._clients.pop(request, None)
            self._client_of.pop(request, None)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - as socketserver does
            self.handle_error(request, client_address)
        finally:
            self._release(request)  # before the close: eviction never touches a closed socket
            self.shutdown_request(request)


_REQUEST_ERRORS = {
    400: "malformed request: expected METHOD /path HTTP/1.x and headers",
    414: "request line too long",
    431: "request headers too large or too many",
    501: "method not supported; the console is read-only: use GET",
    505: "HTTP version not supported; use HTTP/1.0 or HTTP/1.1",
}


class _Handler(BaseHTTPRequestHandler):
    """GET/HEAD only; everything answered with security headers and, for errors, a JSON body."""

    server: _Server
    server_version = "edge-agent-console"
    protocol_version = "HTTP/1.0"
    default_request_version = "HTTP/1.0"  # so that errors before the version is parsed have a status line too
    timeout = 10  # seconds for each write of the answer (the request itself: REQUEST_DEADLINE_S in all)

    def version_string(self) -> str:
        """The Server header: the name alone (http.server appends Python's version after a space)."""
        return self.server_version

    def handle(self) -> None:
        """One request per connection; its head read against one deadline, then parsed by http.server."""
        self.close_connection = True
        head = self._read_head()
        if head is None:
            return
        self.rfile.close()
        self.rfile = io.BytesIO(head)
        self.connection.settimeout(self.timeout)
        self.handle_one_request()

    def _read_head(self) -> bytes | None:
        """The request line and headers, read straight from the socket within REQUEST_DEADLINE_S in all (a
        timeout per read lets a client that trickles a line now and then hold its slot for ever). None when
        the client closed, was too slow or was evicted (see _Server), or the head was too large (answered)."""
        sock = self.connection
        deadline = time.monotonic() + REQUEST_DEADLINE_S
        data = bytearray()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                log.debug("console %s: request not complete within %g s; closed", self.address_string(),
                          REQUEST_DEADLINE_S)
                return None
            try:
                sock.settimeout(left)
                chunk = sock.recv(16384)
            except TimeoutError:
                continue
            except OSError:
                return None
            if chunk:
                start = max(0, len(data) - 2)
                data += chunk
                end = _head_end(data, start)
            elif data:
                end = len(data)  # the client stopped sending: what came is its request (as http.server does)
            else:
                return None
            if end >= 0:
                return bytes(data[:end]) if self.server.request_arrived(self.request) else None
            if len(data) > MAX_HEAD_BYTES:
                self.requestline, self.command, self.request_version = "", None, self.default_request_version
                self.send_error(431 if b"\n" in data else 414)
                return None

    def parse_request(self) -> bool:
        """http.server's, but a request line must be METHOD TARGET HTTP/x.y: an empty one or an HTTP/0.9 one
        (which http.server answers with no status line or headers at all) is a 400."""
        if len(str(self.raw_requestline, "iso-8859-1").split()) != 3:
            self.requestline, self.command, self.request_version = "", None, self.default_request_version
            self.send_error(400)
            return False
        return super().parse_request()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch()

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch()

    def _refuse_method(self) -> None:
        self._send_json(405, {"error": "the console is read-only: use GET", "status": 405},
                        [("Allow", "GET, HEAD")])

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method

    def _dispatch(self) -> None:
        console = self.server.console
        try:
            if not self._authorized(console):
                return
            url = urlsplit(self.path)
            if url.path in ("/", "/index.html"):
                _query(url.query, ())
                self._send(200, PAGE_BYTES, "text/html; charset=utf-8", csp=PAGE_CSP)
                return
            route = _ROUTES.get(url.path.rstrip("/") or "/")
            if route is None:
                raise ApiError(404, "not found; the console serves /, /api/status, /api/history and /api/alarms")
            handler, allowed = route
            params = _query(url.query, allowed)
            self._send(200, _json_bytes(handler(console, params)), "application/json; charset=utf-8")
        except ApiError as exc:
            self._send_json(exc.status, {"error": exc.message, "status": exc.status})
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        except Exception as exc:  # noqa: BLE001 - logged here; the client gets a plain 500, never a trace
            console.errlog.error("console: %s %s failed: %s", self.command, self.path[:200],
                                 f"{type(exc).__name__}: {exc}")
            log.debug("console request failure", exc_info=True)
            self._send_json(500, {"error": "internal error (see the agent's log)", "status": 500})

    def _authorized(self, console: Console) -> bool:
        if console.password is None:
            # Loopback only: refuse names other than an IP or localhost, so that a web page the
            # technician opens cannot reach the console through DNS rebinding. No Host (HTTP/1.0 by
            # hand) names nothing DNS could rebind: a browser always sends one.
            host = self.headers.get("Host", "")
            if host.strip() and not _is_ip_or_localhost(host):
                self._send_json(403, {"error": "open the console by address (http://127.0.0.1:PORT/)",
                                      "status": 403})
                return False
            return True
        client = str(self.client_address[0])
        if console.throttle.blocked(client):
            self._send_json(429, {"error": "too many wrong passwords; try again in a minute", "status": 429},
                            [("Retry-After", str(int(AUTH_WINDOW_S)))])
            return False
        header = self.headers.get("Authorization", "")
        given: str | None = None
        if header[:6].lower() == "basic ":
            try:
                decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                decoded = ""
            if ":" in decoded:
                given = decoded.split(":", 1)[1]
        ok = console.password.matches(given) if given is not None else False
        if ok is None:
            self._send_json(503, {"error": "the console password file cannot be read (see the agent's log)",
                                  "status": 503})
            return False
        if ok:
            return True
        if header:
            console.throttle.failed(client)
            console.errlog.warning("console: wrong password from %s", client)
        self._send_json(401, {"error": "password required (HTTP basic auth, any user name)", "status": 401},
                        [("WWW-Authenticate", 'Basic realm="edge-agent console", charset="UTF-8"')])
        return False

    def _send(self, status: int, body: bytes, ctype: str, extra: Iterable[tuple[str, str]] = (),
              csp: str = "default-src 'none'; frame-ancestors 'none'") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", csp)
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, doc: dict[str, Any], extra: Iterable[tuple[str, str]] = ()) -> None:
        self._send(status, _json_bytes(doc), "application/json; charset=utf-8", extra)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors found in the request itself (malformed request line or headers, unsupported method): a
        status line, the usual headers and JSON, with a fixed text: http.server's `message` quotes the
        request's bytes, which are never echoed."""
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self.close_connection = True
        try:
            self._send_json(code, {"error": _REQUEST_ERRORS.get(code, phrase.lower()), "status": code},
                            [("Connection", "close")])
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug("console %s: " + format, self.address_string(), *args)
