"""The publisher: drains the buffer to the MQTT broker in seq order and answers platform commands.

One thread owns the paho client and drives its socket with its own select loop (so that it can also
wake up when the recorder commits). Rows are read from the buffer with a read-only connection,
published at QoS 1 in batches of up to `max_batch` readings with a window of messages in flight, and
acknowledged to the recorder only when the broker's PUBACKs arrive, in order. A lost connection
drops the window: the next connection re-publishes from the last acknowledged seq (at-least-once).
While offline, between connection attempts, the backlog's next full data messages are encoded ahead
(up to PREPARED_MAX_BYTES), so that the drain after an outage mostly sends; they are dropped when in
doubt (another starting point, rows evicted by the size cap since).

Payload strategies (`mqtt.payload`): `json` (SPEC §4 messages, readings batched) or `hj212`: one
HJ 212-2017 CN 2011 packet per device poll on the data topic and one 2051/2061/2031 packet per period
start on the agg topic, built by `Hj212Payload` (also used by the TCP uplinks, `agent.uplink`). A
packet over 1024 characters is split (PNUM/PNO); each piece is its own message and only the last
piece's PUBACK (with every earlier one) moves the watermark to the packet's last seq. Alarms, gap
announcements, status and command replies stay JSON in both modes (HJ 212 has no way to say them).
Imports `agent.buffer`, `agent.recorder` (its type), `agent.payloads`, `agent.model`, `agent.hj212_payload`,
`agent.logutil`, `agent.memtrim`, `agent.mqttclient`; never `drivers`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import random
import select
import socket
import sqlite3
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from agent import __version__
from agent.buffer import Buffer, BufferError, Gap, is_corruption
from agent.certwatch import BROKER_ALERT, CertWatch
from agent.hj212_payload import Hj212Identity, Hj212Message, Hj212Payload, group_periods
from agent.logutil import RateLimitedLog
from agent.memtrim import release_free_memory
from agent.model import STREAM_AGGREGATES, STREAM_ALARMS, STREAM_READINGS, iso_utc_ms, now_ms, parse_iso_utc_ms
from agent.mqttclient import Client
from agent.payloads import (
    aggregates_message,
    alarm_message,
    data_message,
    gap_message,
    reply_message,
    status_message,
)
from agent.recorder import Recorder
from agent.threadname import name_this_thread
from agent.tlsfiles import TlsFilesError, tls_context

log = logging.getLogger(__name__)

WINDOW = 32  # messages in flight (unacknowledged) at once
MAX_COMMAND_BYTES = 4096
MAX_RESEND = 100_000  # readings one resend command may ask for
MAX_SEQ = 2**63 - 1  # SQLite's largest integer: a seq is never above it
STABLE_CONNECTION_S = 10.0  # a connection lost sooner is retried with backoff, not at once
SUMMARY_EVERY_S = 5.0  # the retained status's summary (failing devices, active alarms) is checked this often
SUMMARY_MIN_GAP_S = 30.0  # a change is published once it held for two checks, and at most once in this long
LIVE_SETTINGS = ("max_batch", "reconnect_max")  # a reload applies these on the connection there is
RELOAD_ATTEMPT_GAP_S = 1.0  # a SIGHUP with unchanged settings brings the next attempt no closer than this
SHORT_LIVED_HINT_AFTER = 3  # such connections in a row before the log suspects a duplicate client_id
# Reads of a resend's rows that may fail before it is answered ok:false (a damaged page: the recorder
# rescues the file meanwhile, and the platform may ask again) instead of holding up the resends after it.
RESEND_READ_TRIES = 10
MAX_RESENDS_QUEUED = 4  # resend commands under way at once; more are refused until one is answered
# Command replies published and not yet acknowledged; a command arriving while this many wait is dropped
# unanswered. Without a bound a platform looping on P/cmd queued every reply in paho (memory without
# limit, the data held behind them) until paho's message ids wrapped and the connection was dropped.
# Replies do not count in the data's window (`_inflight_count`): while costly commands (a resend refused
# after counting its range) keep the publisher's thread busy and their PUBACKs come late, the data goes on.
# A platform's burst of a few dozen commands is answered whole.
MAX_REPLIES_WAITING = 128
STATUS_REPLY_TTL_S = 1.0  # status commands within this share one status (each reads the buffer on the
# publisher's thread: a platform asking many times a second held the drain)
MAX_RESEND_SPAN_MS = 366 * 86_400_000  # the widest from_ts..to_ts a resend by time may ask for
# A resend by time reads the readings by seq and keeps those of its range (they have no time index, and
# `ts` steps back with the clock): this many seqs per read, reads for at most RESEND_SCAN_S per turn of
# the publisher's loop, so that live data, acknowledgements and commands go on during a long scan.
RESEND_SCAN_SEQS = 20_000
RESEND_SCAN_S = 0.05
EVENT_BATCH = 50  # aggregates per agg message
HJ212_EVENT_BATCH = 500  # aggregate rows read at once to group into period packets
PREPARED_MAX_BYTES = 16 * 1024 * 1024  # data messages of the backlog encoded ahead while offline
PACKET_TOO_LARGE = 0x95  # MQTT 5 PUBACK reason code of a message over the broker's size limit

@dataclass
class BrokerSettings:
    """What the publisher needs from the `mqtt` section (built by the runtime from the config)."""

    urls: list[str]
    client_id: str
    station_id: str
    topic_prefix: str = "env"
    qos: int = 1
    max_batch: int = 200
    reconnect_max: float = 30.0
    keepalive: int = 30
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_names: dict[str, str | None] | None = None  # how log lines name the TLS files (`tls_context`)
    connect_timeout: float = 5.0
    payload: str = "json"  # json | hj212
    hj212: Hj212Identity | None = None  # required with payload hj212

    @property
    def base_topic(self) -> str:
        return f"{self.topic_prefix}/{self.station_id}"


def describe_connack(reason: object) -> str:
    """Plain words for a refused CONNACK, pointing at the setting to check."""
    text = str(reason)
    low = text.lower()
    if "not authori" in low or "bad user" in low or "username" in low or "password" in low:
        return f"{text} (check mqtt.username and mqtt.password / password_file)"
    if "identifier" in low:
        return f"{text} (check mqtt.client_id)"
    return text


class Publisher(threading.Thread):
    """Delivers the buffer to the broker. `status_provider()` supplies the answer to the `status`
    command; `recorder` (an `agent.recorder.Recorder`) receives acknowledgements and broker state.
    `summary_provider()` gives what the retained status says of the station beside `online` (failing
    devices, active alarms), None while the station is not set up yet: it is published again when that
    changes (checked every SUMMARY_EVERY_S), and as soon as it is known when the birth went without it."""

    def __init__(
        self,
        settings: BrokerSettings,
        db_path: str,
        recorder: Recorder,
        status_provider: Callable[[], dict] | None = None,
        summary_provider: Callable[[], dict | None] | None = None,
        started: str | None = None,
    ):
        super().__init__(name="publisher", daemon=True)
        self.settings = settings
        self.db_path = db_path
        self.recorder = recorder
        self.status_provider = status_provider
        self.summary_provider = summary_provider
        self.started = started or iso_utc_ms(now_ms())  # when the agent started: the retained status says it
        self._summary_said: dict | None = None  # what the retained online status last said
        self._summary_seen: dict | None = None  # the summary at the last check
        self._summary_checked = 0.0
        self._summary_sent = -math.inf  # when a change of the summary was last published
        self._status_reply: tuple[float, dict] | None = None  # (monotonic time, status) of the last status command
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stop_event = threading.Event()
        self._drain_until: float | None = None
        self._lock = threading.Lock()
        self._new_settings: BrokerSettings | None = None
        self.client: mqtt.Client | None = None
        self.online = False
        self.state = "connecting"
        self.url: str | None = None  # the broker connected last
        self.last_error: str | None = None
        self._state_url: str | None = None  # the broker the recorded state is about
        self._state_since: str | None = None  # when `state` last changed (UTC ISO)
        self._url_index = 0
        self._v311_urls: set[str] = set()  # brokers that do not speak MQTT 5
        self._v311_next: set[str] = set()  # brokers to try in MQTT 3.1.1 next: they closed an MQTT 5 CONNECT
        self._batch = settings.max_batch  # readings per data message: halved by a broker that finds it too large
        self._refusal: str | None = None  # a message the broker refused in this round of I/O
        self._backoff = 0.5
        self._online_at = 0.0  # when the current (or last) connection was accepted
        self._hold_off = False  # wait a backoff before the next connection (the last one was short-lived)
        self._short_lived = 0  # connections in a row closed soon after they were accepted
        self._reader: Buffer | None = None
        self._cursor: dict[str, int] = {}
        self._offered_upto = 0  # the highest readings seq offered on a connection since lost (`in_flight_upto`)
        self._acked: dict[str, int] = {}
        self._inflight: dict[str, deque[list]] = {s: deque() for s in (STREAM_READINGS, STREAM_AGGREGATES,
                                                                       STREAM_ALARMS)}
        self._by_mid: dict[int, list] = {}
        self._replies_in_flight = 0  # entries of _by_mid that are command replies (`_replies_waiting`)
        self._early_acks: set[int] = set()  # QoS 0 messages reported written while `publish()` ran
        self._publishing = False  # in `client.publish()` (publisher thread)
        # Gaps as (id, last_seq): a gap that eviction extends after it was sent is sent again for its new part.
        self._gaps_inflight: set[tuple[int, int]] = set()
        self._gaps_done: dict[int, int] = {}  # gap id -> last seq acknowledged, maybe not yet marked in the file
        self._gaps_seen = -1  # the recorder's gaps_recorded when the pending gaps were last read
        self._check_gaps = True
        self._read_identity: tuple[int, int] | None = None  # the file the last reader opened was on
        self._need_fill = True
        # While offline, the backlog's next data messages, encoded ahead: (after_seq, first_seq,
        # last_seq, readings, payload), consecutive. The drain after reconnection then only sends them.
        self._prepared: deque[tuple[int, int, int, int, bytes]] = deque()
        self._prepared_bytes = 0
        self._connack: object = None
        self._paho_log = _PahoLog()
        self._dropped_because = ""  # why the last connection was dropped
        self.last_progress = time.monotonic()
        self._errlog = RateLimitedLog(log, every_s=300)
        self._failed_attempts = 0  # connection attempts failed in a row (said when one succeeds)
        self._failing_since = 0.0  # monotonic time of the first of them
        self._last_attempt = -math.inf  # monotonic start of the last connection attempt
        self._cmdlog = RateLimitedLog(log, every_s=60)  # refused commands: anyone may send them
        self._resends: deque[_Resend] = deque()
        self._resend_due = False  # a resend by time stopped its scan for this turn: the loop does not wait
        self._hj212 = self._payload_strategy(settings)
        self._certs = CertWatch(settings)  # the TLS files: expiry, renewal, how a refusal is said

    # ------------------------------------------------------------------ any thread

    def wake(self) -> None:
        """New rows were committed (or something else needs the thread's attention)."""
        self._need_fill = True
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass

    def update_settings(self, settings: BrokerSettings) -> None:
        """Apply new broker settings (SIGHUP): reconnect with them if they differ."""
        with self._lock:
            self._new_settings = settings
        self.wake()

    def drain_and_stop(self, grace: float) -> None:
        """Go on publishing the backlog for at most `grace` seconds, then say offline and stop. A thread
        still blocked then (a TLS handshake with a broker that never answers) is not waited for: it
        holds nothing the rest of the stop needs, and the process is about to end."""
        self._drain_until = time.monotonic() + grace
        self.wake()
        self.join(grace + 0.5)
        if self.is_alive():
            log.warning("the publisher is still blocked (connecting?) after the shutdown grace; not waiting for it")

    def stop(self) -> None:
        self._drain_until = time.monotonic()
        self.wake()
        self.join(10)

    def acked_upto(self, stream: str = STREAM_READINGS) -> int:
        """Highest seq of `stream` the broker has acknowledged (with all before it)."""
        return self._acked.get(stream, 0)

    # ------------------------------------------------------------------ thread

    def run(self) -> None:
        name_this_thread()
        try:
            while True:
                self.last_progress = time.monotonic()
                if self._drain_until is not None and (time.monotonic() >= self._drain_until or
                                                      (self.online and self._backlog_empty())):
                    break
                self._apply_new_settings()
                if self._certs.due():
                    self._check_certificates()
                if self.client is None:
                    if self._hold_off:
                        self._hold_off = False
                        self._sleep(self._next_backoff())
                    elif not self._connect_once():
                        self._sleep(self._next_backoff())
                    continue
                busy = self._window_full() or not self.online or self._drain_until is not None
                self._service_io(0.5 if busy else 0 if self._resend_due else 5.0)
                self._refresh_summary()
                # Read the buffer only when something new may be there: a commit woke us, or the window
                # was full and acknowledgements have made room.
                if self.online and self._need_fill and not self._window_full():
                    self._need_fill = False
                    self._fill_window()
                    if self._window_full():
                        self._need_fill = True
        except Exception:  # noqa: BLE001 - the publisher must never die silently
            log.exception("publisher crashed")
            self._close(clean=True, reason="crashed")  # not "stopped": the agent stops because of it
            raise
        self._close(clean=True)

    def _sleep(self, seconds: float) -> None:
        """Wait before the next connection attempt; meanwhile prepare the backlog's messages. New
        settings (a SIGHUP) end the wait; a SIGHUP with the same settings ends it no sooner than
        RELOAD_ATTEMPT_GAP_S after the last attempt (a burst of reloads is not a burst of attempts)."""
        end = time.monotonic() + seconds
        while not self._stopping():
            left = end - time.monotonic()
            if left <= 0:
                return
            prepared = self._prepare_backlog()
            wait = 0 if prepared else min(left, 1.0, self._grace_left())
            readable, _, _ = select.select([self._wake_r], [], [], wait)
            self.last_progress = time.monotonic()
            if readable:
                self._drain_wake()
                new = self._new_settings
                if new is not None and new != self.settings:
                    return  # other settings: tried at once
                if new is not None:  # a SIGHUP with the same (its TLS files may be renewed): soon, not at once
                    end = min(end, self._last_attempt + RELOAD_ATTEMPT_GAP_S)

    def _stopping(self) -> bool:
        return self._drain_until is not None and time.monotonic() >= self._drain_until

    def _grace_left(self) -> float:
        """Seconds left of a stop's grace (at least a little: a connection attempt needs some), or
        infinity when not stopping."""
        return math.inf if self._drain_until is None else max(self._drain_until - time.monotonic(), 0.05)

    def _next_backoff(self) -> float:
        delay = self._backoff
        self._backoff = min(self._backoff * 2, self.settings.reconnect_max)
        return random.uniform(delay / 2, delay)

    @staticmethod
    def _payload_strategy(settings: BrokerSettings) -> Hj212Payload | None:
        """None for JSON payloads, the HJ 212 packet builder for `payload: hj212`."""
        if settings.payload == "json":
            return None
        if settings.payload != "hj212" or settings.hj212 is None:
            raise ValueError(f"payload {settings.payload!r} needs the hj212 identity (hj212: st, pw)")
        return Hj212Payload(settings.hj212)

    def _apply_new_settings(self) -> None:
        with self._lock:
            new, self._new_settings = self._new_settings, None
        if new is None:
            return
        if new == self.settings:
            self._renewed_tls_files()
            return
        if dataclasses.replace(self.settings, **{key: getattr(new, key) for key in LIVE_SETTINGS}) == new:
            self._apply_live_settings(new)
            return
        log.info("broker settings changed; reconnecting")
        self._say_offline("reconfigured")  # where the agent was: it may not come back there (other broker, topic)
        self._hj212 = self._payload_strategy(new)
        self.settings = new
        self._batch = new.max_batch
        self._v311_urls.clear()
        self._v311_next.clear()
        self._clear_prepared()
        self._drop_connection("settings reloaded")
        self._backoff = 0.5
        self._url_index = 0
        self._errlog = RateLimitedLog(log, every_s=300)  # the new settings' errors are news
        self._certs.reset(new)

    def _apply_live_settings(self, new: BrokerSettings) -> None:
        """A reload that changed only `LIVE_SETTINGS`: they shape the batches and the backoff, not the
        connection, which is kept (dropping it said `offline` to the platform and sent what was in flight
        again)."""
        old = self.settings
        log.info("broker settings applied on the connection: %s", "; ".join(
            f"mqtt.{key}: {getattr(new, key):g} (was {getattr(old, key):g})" for key in LIVE_SETTINGS
            if getattr(new, key) != getattr(old, key)))
        # a batch the broker's size limit made smaller stays so (at most the new max_batch)
        self._batch = min(self._batch, new.max_batch) if self._batch < old.max_batch else new.max_batch
        self._backoff = min(self._backoff, new.reconnect_max)
        self._clear_prepared()  # batches prepared offline with the old size
        self.settings = new  # the TLS files are the same: what the certificate watch knows of them stays

    def _renewed_tls_files(self) -> None:
        """SIGHUP with the same settings: TLS files replaced at the same paths (a renewed client
        certificate) are used at once, by connecting again, so that the operator sees there and then
        whether the broker takes them (and the old certificate may be revoked). Files that cannot make
        a TLS client are said, and the connection that works goes on."""
        s = self.settings
        self._check_certificates()
        if self.client is None or not self._certs.renewed():
            return  # offline: the next attempt (brought forward by the SIGHUP: `_sleep`) reads them anyway
        try:
            tls_context(s.tls_ca, s.tls_cert, s.tls_key, names=s.tls_names)
        except TlsFilesError as exc:
            log.error("the TLS files changed but cannot be used: %s; the current connection goes on, the next "
                      "one fails until they are fixed", exc)
            return
        log.info("the TLS files changed (a renewed certificate?): connecting again with them")
        self._drop_connection("TLS files renewed")
        self._set_state("offline", "connecting again with the renewed TLS files")
        self._backoff = 0.5

    def _check_certificates(self) -> None:
        """The certificates' expiry read again (and warned of): `status` shows a change."""
        if self._certs.check():
            self._record_state()

    # ------------------------------------------------------------------ connection

    def _connect_once(self) -> bool:
        self._last_attempt = time.monotonic()
        s = self.settings
        url = s.urls[self._url_index % len(s.urls)]
        self._url_index += 1
        parts = urlsplit(url)
        tls = parts.scheme == "mqtts"
        host = parts.hostname or "localhost"
        port = parts.port or (8883 if tls else 1883)
        # MQTT 5 first: its PUBACK says when the broker refused a message (too large, not authorised),
        # where an MQTT 3.1.1 broker acknowledges it as taken and drops it. A broker that answers
        # "unsupported protocol version" is spoken to in 3.1.1 from then on; one that closes an MQTT 5
        # CONNECT without a CONNACK is tried in 3.1.1 at its next attempt (some 3.1.1 brokers say nothing
        # to a protocol level they do not know), and in MQTT 5 again after that connection.
        v311 = url in self._v311_urls or url in self._v311_next
        self._v311_next.discard(url)
        protocol = mqtt.MQTTv311 if v311 else mqtt.MQTTv5
        client = Client(CallbackAPIVersion.VERSION2, client_id=s.client_id, protocol=protocol,
                        **({"clean_session": True} if v311 else {}),
                        keep_payload=MAX_COMMAND_BYTES + 1)  # a longer command: refused
        self._paho_log.error = None
        client.enable_logger(self._paho_log)  # type: ignore[arg-type]  # paho only calls .log()
        client.max_inflight_messages_set(WINDOW)
        client.max_queued_messages_set(0)
        timeout = min(s.connect_timeout, self._grace_left())  # a stop's grace is not spent waiting here
        client.connect_timeout = timeout
        # Sent by the broker when the connection ends without a goodbye: a crash, a power cut, a lost link.
        client.will_set(f"{s.base_topic}/status", status_message(s.station_id, "offline", reason="connection lost"),
                        qos=1, retain=True)
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if tls:
            self._check_certificates()
            try:
                client.tls_set_context(self._certs.context())
            except TlsFilesError as exc:
                self._set_state("offline", f"TLS files unusable: {exc}", url)
                self._errlog.error("cannot use the TLS files: %s", exc, key=str(exc))
                return False
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._connack = None
        try:
            if v311:
                client.connect(host, port, keepalive=s.keepalive)
            else:
                client.connect(host, port, keepalive=s.keepalive, clean_start=True)
        except ssl.SSLCertVerificationError as exc:
            return self._connect_failed(url, f"TLS handshake failed: {self._certs.not_verified(exc, host)}")
        except ssl.SSLError as exc:  # with TLS 1.2, the broker's refusal of the client certificate is here
            refused = self._certs.refused(url, str(exc)) if BROKER_ALERT.search(str(exc)) else None
            return self._connect_failed(url, refused or f"TLS handshake failed: {exc}")
        except (OSError, ValueError) as exc:
            return self._connect_failed(url, f"{type(exc).__name__}: {exc}")
        self.client = client
        deadline = time.monotonic() + timeout
        while (self._connack is None and self.client is not None and time.monotonic() < deadline
               and not self._stopping()):  # a stop during the wait: its grace is not spent here
            self._service_io(0.2)
        if self.client is None and (self._connack is None or self._connack is True):  # the other end closed it
            refused = self._certs.refused(url, self._dropped_because) if tls and self._connack is None else None
            if refused:
                return self._connect_failed(url, refused)
            if self._connack is None and not v311:  # closed without a word in MQTT 5: the next attempt in 3.1.1
                self._v311_next.add(url)
            when = "before the broker answered CONNECT" if self._connack is None else "as soon as it was accepted"
            hint = (f" (a broker that refuses the client certificate {self._certs.name('cert')} may close it so)"
                    if tls and s.tls_cert and self._connack is None else "")
            return self._connect_failed(url, f"the connection was closed {when}: {self._dropped_because}{hint}")
        if self._connack is None:
            self._drop_connection("no CONNACK")
            return self._connect_failed(url, "broker did not answer CONNECT in time")
        if self._connack is not True:  # a refusal (the broker closes the connection after it)
            reason = describe_connack(self._connack)
            self._drop_connection("refused")
            if not v311 and str(self._connack) == "Unsupported protocol version":
                self._v311_urls.add(url)
                self._url_index -= 1  # the same broker again, in 3.1.1
                log.info("%s does not speak MQTT 5: using MQTT 3.1.1 (a message it drops, too large or not "
                         "authorised, is then acknowledged all the same)", _safe_url(url))
                return False
            return self._connect_failed(url, f"broker refused the connection: {reason}")
        if v311 and url not in self._v311_urls:
            self._errlog.warning("%s closed an MQTT 5 CONNECT without a CONNACK, then took MQTT 3.1.1: this "
                                 "connection speaks 3.1.1 (a message the broker drops, too large or not authorised, "
                                 "is then acknowledged all the same); MQTT 5 is tried again at the next one",
                                 _safe_url(url), key=f"v311 {url}")
        self._on_online(url)
        return True

    def _connect_failed(self, url: str, why: str) -> bool:
        self._set_state("offline", why, url)
        if not self._failed_attempts:
            self._failing_since = time.monotonic()
        self._failed_attempts += 1
        # One line per distinct reason (a new one, after a reload for instance, is logged at once).
        self._errlog.error("cannot connect to %s: %s; retrying with backoff", _safe_url(url), why, key=why)
        return False

    def _on_online(self, url: str) -> None:
        assert self.client is not None
        s = self.settings
        self.online = True
        self.url = url
        self._url_index = 0
        self._online_at = time.monotonic()
        self._certs.connected(url)
        if self._failed_attempts:  # the end of an outage: how long, so that the journal need not be added up
            log.info("connected to %s as %s, after %s of failed attempts (%d)", _safe_url(url), s.client_id,
                     _duration(time.monotonic() - self._failing_since), self._failed_attempts)
            self._failed_attempts = 0
        else:
            log.info("connected to %s as %s", _safe_url(url), s.client_id)
        self._set_state("online", None)
        self.client.subscribe(f"{s.base_topic}/cmd", qos=1)
        self._say_online()
        self._open_reader()
        self._check_gaps = True
        self._need_fill = True

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # paho callback
        self._connack = True if not reason_code.is_failure else reason_code
        receive_maximum = getattr(properties, "ReceiveMaximum", None)
        if receive_maximum:  # MQTT 5: the broker takes at most that many in flight
            client.heed_receive_maximum(receive_maximum)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # paho callback
        refused = [rc for rc in reason_codes if rc.is_failure]
        if client is self.client and refused:  # SUBACK 0x80 (3.1.1) or a reason code (5), e.g. an ACL
            why = str(refused[0])
            self._errlog.error("the broker refused the subscription to %s/cmd (%s): the platform's commands "
                               "(ping, status, resend) cannot reach the agent; check the broker's ACL",
                               self.settings.base_topic, why, key=f"suback {why}")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # paho callback
        if client is self.client:
            cause, self._paho_log.error = self._paho_log.error, None
            self._lost(f"disconnected ({reason_code}{': ' + cause if cause else ''})")

    def _lost(self, why: str) -> None:
        if self.online:
            lasted = time.monotonic() - self._online_at
            if lasted >= STABLE_CONNECTION_S:  # a connection that worked: reconnect at once, errors are news
                log.warning("connection to broker lost: %s", why)
                self._backoff = 0.5
                self._short_lived = 0
                self._errlog = RateLimitedLog(log, every_s=300)
            else:  # closed soon after it was accepted: reconnecting at once would hammer the broker
                self._hold_off = True
                self._short_lived += 1
                # Once is a link or broker that went down; again and again is the mark of another client
                # with this client_id taking the session over (the broker drops the older connection).
                hint = (f": is another client connected with client_id {self.settings.client_id}?"
                        if self._short_lived >= SHORT_LIVED_HINT_AFTER else "")
                self._errlog.warning("the broker closed the connection %.1f s after accepting it (%s)%s; "
                                     "reconnecting with backoff", lasted, why, hint,
                                     key="short-lived-hint" if hint else "short-lived")
        self._drop_connection(why, will=True)
        self._set_state("offline", why)

    def _drop_connection(self, why: str, will: bool = False) -> None:
        """Forget the connection. `will`: end it without a goodbye (DISCONNECT), so that the broker
        publishes the Last Will (`offline`, retained): a connection the agent gives up on while it goes
        on running offline (a refused message, a lost link) must not leave `online` retained through
        the reconnect backoff. A deliberate end (a stop, a reload) says its own `offline` first."""
        self._dropped_because = why
        client, self.client = self.client, None
        self.online = False
        self._reset_window()
        if client is not None:
            if not will:
                try:
                    client.on_disconnect = None
                    client.disconnect()
                except Exception:  # noqa: BLE001
                    pass
            try:
                sock = client.socket()
                if sock is not None:
                    sock.close()
            except Exception:  # noqa: BLE001
                pass

    def _set_state(self, state: str, error: str | None, url: str | None = None) -> None:
        """Record the broker state for `status`; `url` is the broker the error is about (default: the
        one connected last). `since` is when the state (online, offline) last changed: another error
        or broker while offline (each attempt of a failover, a refusal that also disconnects) is news
        for `error` and `url`, not for how long the station has been offline."""
        url = url or self.url
        changed = state != self.state or error != self.last_error or url != self._state_url
        if state != self.state or self._state_since is None:
            self._state_since = iso_utc_ms(now_ms())
        self.state = state
        self.last_error = error
        self._state_url = url
        if changed:
            self._record_state()

    def _record_state(self) -> None:
        """The broker state as `status` reads it (the buffer's meta `broker`); `cert_expires` when a
        client certificate is configured: when the one read last expires."""
        url = self._state_url
        record = {"state": self.state, "url": _safe_url(url) if url else None,
                  "since": self._state_since, "error": self.last_error, **self._certs.expires()}
        self.recorder.set_meta("broker", json.dumps(record))

    def _close(self, clean: bool, reason: str = "stopped") -> None:
        if clean:
            self._say_offline(reason)
        self._drop_connection("stopping")
        self._set_state("offline", "agent stopped")
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _summary(self) -> dict:
        """The summary, or {} when there is none (yet)."""
        if self.summary_provider is None:
            return {}
        try:
            return self.summary_provider() or {}
        except Exception:  # noqa: BLE001 - the retained status goes out without it rather than not at all
            log.exception("the status summary failed")
            return {}

    def _say_online(self, summary: dict | None = None) -> None:
        """The retained status: online, since when, and the summary of the station (SPEC §4 `P/status`)."""
        s = self.settings
        summary = self._summary() if summary is None else summary
        self._summary_said = self._summary_seen = summary
        self._summary_checked = time.monotonic()
        self._publish_raw(f"{s.base_topic}/status",
                          status_message(s.station_id, "online", ts=iso_utc_ms(now_ms()),
                                         agent=f"edge-agent {__version__}", **{"started": self.started, **summary},
                                         **self._certs.expires(connection=True)),
                          retain=True)

    def _refresh_summary(self) -> None:
        """Publish the retained status again when its summary changed (an operator watching many
        stations sees a device fail or an alarm rise without asking each gateway); a change is said once
        it held for two checks, and at most once every SUMMARY_MIN_GAP_S, so that a device failing every
        other poll costs the link little."""
        now = time.monotonic()
        if not self.online or self.summary_provider is None:
            return
        if not self._summary_said:  # the birth went out before the station was set up: say it once known
            summary = self._summary()
            if summary:
                self._say_online(summary)
            return
        if now - self._summary_checked < SUMMARY_EVERY_S:
            return
        summary, previous = self._summary(), self._summary_seen
        self._summary_checked, self._summary_seen = now, summary
        if summary != self._summary_said and summary == previous and now - self._summary_sent >= SUMMARY_MIN_GAP_S:
            self._summary_sent = now
            self._say_online(summary)

    def _say_offline(self, reason: str = "stopped") -> None:
        """Before a deliberate disconnect (a stop, or a reload moving to another broker or topic): the
        retained status says offline (the Last Will covers only an unexpected loss). Its acknowledgement
        is awaited within what is left of the shutdown grace (SPEC §1: at most that long), at most 2 s,
        and for one round of socket I/O in any case."""
        if self.client is None or not self.online:
            return
        s = self.settings
        try:
            info = self.client.publish(f"{s.base_topic}/status",
                                       status_message(s.station_id, "offline", ts=iso_utc_ms(now_ms()),
                                                      reason=reason),
                                       qos=1, retain=True)
            deadline = min(time.monotonic() + 2, self._drain_until or math.inf)
            self._service_io(0)
            while not info.is_published() and self.client is not None and time.monotonic() < deadline:
                self._service_io(min(0.1, max(deadline - time.monotonic(), 0)))
        except Exception as exc:  # noqa: BLE001
            log.warning("could not publish offline status: %s", exc)

    # ------------------------------------------------------------------ socket I/O

    def _service_io(self, timeout: float) -> bool:
        """One round of socket I/O; True when anything happened (so the window may be refilled)."""
        client = self.client
        if client is None:
            return False
        sock = client.socket()
        if sock is None:
            self._lost("socket closed")
            return False
        pending = sock.pending() if hasattr(sock, "pending") else 0
        wlist = [sock] if client.want_write() else []
        try:
            readable, writable, _ = select.select([sock, self._wake_r], wlist, [], 0 if pending else timeout)
        except (OSError, ValueError) as exc:
            self._lost(f"select failed: {exc}")
            return False
        if self._wake_r in readable:
            self._drain_wake()
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        if sock in readable or pending:
            rc = client.loop_read()
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self.client is client and client.want_write():
            rc = client.loop_write()
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self.client is client:
            rc = client.loop_misc()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS and self.client is client:
            self._lost(mqtt.error_string(rc))
        if self._refusal is not None:  # a message the broker refused: the next connection starts over
            why, self._refusal = self._refusal, None
            if self.client is client:
                self._hold_off = True
                self._drop_connection(why, will=True)
                self._set_state("offline", why)
        return bool(readable or writable or pending)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    # ------------------------------------------------------------------ draining the buffer

    def _open_reader(self) -> None:
        """Open the file the recorder writes (never another one found at the path: `Recorder.open_reader`);
        while there is none to open, the reader stays None and the next fill tries again."""
        if self._reader is None:
            try:
                self._reader = self.recorder.open_reader()
            except (BufferError, sqlite3.Error, OSError) as exc:
                self._errlog.error("cannot open the buffer to publish it (%s); waiting for the recorder", exc,
                                   key="open")
            else:
                self._opened()
        self._reset_window()

    def _opened(self) -> None:
        """A reader was just opened: on another file than the last one (a rescue, a put-back), that file's
        pending gaps are read (`_reading_a_new_file`), however many tries the opening took."""
        assert self._reader is not None
        if self._read_identity is not None and self._reader.identity != self._read_identity:
            self._reading_a_new_file()
        self._read_identity = self._reader.identity

    def _reset_window(self) -> None:
        """Forget messages in flight; publishing resumes after the last acknowledged seq."""
        self._need_fill = True
        # What was offered may have arrived: the eviction keeps it (`in_flight_upto`) though the cursor falls back.
        self._offered_upto = max(self._offered_upto, self._cursor.get(STREAM_READINGS, 0))
        for stream, q in self._inflight.items():
            q.clear()
            self._cursor[stream] = self._acked.get(stream, 0)
        self._by_mid.clear()
        self._replies_in_flight = 0
        self._early_acks.clear()
        self._gaps_inflight.clear()
        for job in self._resends:
            job.rewind()
        if self._reader is not None:
            try:
                for stream in self._inflight:
                    _, sent = self._reader.stream_state(stream)
                    self._acked[stream] = max(sent, self._acked.get(stream, 0))
                    self._cursor[stream] = self._acked[stream]
            except Exception as exc:  # noqa: BLE001
                self._reader_failed(exc)

    def _drop_reader(self) -> None:
        """Close the reader and forget the messages prepared from it."""
        self._clear_prepared()
        try:
            if self._reader is not None:
                self._reader.close()
        except Exception:  # noqa: BLE001
            pass
        self._reader = None

    def _reader_failed(self, exc: Exception) -> None:
        """A read failed: reopen the reader. The fill is tried again at the next turn (at least 0.5 s on),
        not at the next commit, which a quiet station (the drain of a stop, a slow analyzer) may not make."""
        self._errlog.error("reading the buffer failed (%s); reopening it", exc)
        self._need_fill = True
        if is_corruption(exc):
            self.recorder.suspect_corruption("publisher", exc)
        self._drop_reader()
        time.sleep(0.5)
        try:
            self._reader = self.recorder.open_reader()
        except Exception as exc2:  # noqa: BLE001 - the recorder may be rescuing the file: the next fill tries again
            self._errlog.error("cannot reopen the buffer: %s", exc2)
            return
        before = self._read_identity
        self._opened()
        if self._reader.identity != before:  # the recorder rescued the file meanwhile
            self._reset_window()

    def _follow_recorder(self) -> None:
        """The recorder writes another file now (a corrupt one rescued, or its own put back at the path
        after it was deleted, renamed or replaced): read that one. Until then the reader stays on the
        file the recorder writes, whatever the path names meanwhile."""
        self._drop_reader()
        self._open_reader()  # `_opened` notes the new file (now, or at the fill that manages to open it)

    def _reading_a_new_file(self) -> None:
        log.info("the recorder writes a new buffer file at %s: publishing from it", self.db_path)
        self._check_gaps = True  # a rescued file's salvage records the seqs the damage cost
        self._gaps_done.clear()  # gap ids are the old file's: the new one numbers its own from 1

    def _inflight_count(self) -> int:
        """Messages in the window: those in flight but command replies (bounded on their own)."""
        return len(self._by_mid) - self._replies_in_flight

    def _window_full(self) -> bool:
        return self._inflight_count() >= WINDOW

    def _backlog_empty(self) -> bool:
        if self._inflight_count():
            return False
        try:
            reader = self._reader or self.recorder.open_reader()
            try:
                for stream in self._inflight:
                    if reader.has_after(stream, self._cursor.get(stream, 0)):
                        return False
                return not self._unannounced(reader.pending_gaps())
            finally:
                if reader is not self._reader:
                    reader.close()
        except Exception:  # noqa: BLE001
            return False

    def _fill_window(self) -> None:
        # Set again by `_continue_resends` when this fill leaves a resend by time mid-scan; a fill that does not
        # get there (no reader to open while the recorder rescues its file, a failed read) must not leave the
        # loop turning without waiting (it did, at 100 % of a core, for as long as the reader could not open).
        self._resend_due = False
        if self._reader is not None and self._reader.identity != self.recorder.file_identity():
            self._follow_recorder()
        if self._reader is None:
            self._open_reader()
            if self._reader is None:
                return
        s = self.settings
        try:
            self._publish_events(STREAM_ALARMS, f"{s.base_topic}/alarm", 1)
            recorded = self.recorder.gaps_recorded
            if self._check_gaps or recorded != self._gaps_seen:  # connected, or eviction while online
                self._check_gaps = False
                self._gaps_seen = recorded
                for gap in self._unannounced(self._reader.pending_gaps()):
                    self._publish_gap(gap)
            with self.recorder.evict_lock:  # what is taken here is in flight before an eviction can drop it
                self._publish_readings(f"{s.base_topic}/data")
            self._publish_events(STREAM_AGGREGATES, f"{s.base_topic}/agg", min(EVENT_BATCH, self._batch))
            self._continue_resends_or_refuse()
            if self._resends:
                self._need_fill = True  # go on as acknowledgements make room
        except Exception as exc:  # noqa: BLE001 - a damaged or replaced file: reopen and go on
            if self.client is None:
                return
            self._reader_failed(exc)

    def _publish_readings(self, topic: str) -> None:
        """Fill the window with the readings after the cursor (prepared messages first)."""
        s = self.settings
        assert self._reader is not None
        while self._hj212 is not None and not self._window_full() and self.client is not None:
            if not self._publish_polls(topic):
                return
        while self._hj212 is None and not self._window_full() and self.client is not None:
            prepared = self._take_prepared(self._cursor[STREAM_READINGS])
            if prepared is not None:
                self._publish_tracked(STREAM_READINGS, topic, prepared[1], prepared[0])
                continue
            batch = self._reader.readings_json(self._cursor[STREAM_READINGS], self._batch)
            if batch is None:
                return
            self._publish_tracked(STREAM_READINGS, topic, data_message(s.station_id, batch.items), batch.last_seq)
            if batch.count < self._batch:
                return  # that was the newest

    def in_flight_upto(self) -> int:
        """The highest readings seq offered to the broker (and not yet known acknowledged), for the
        recorder's eviction, which calls it holding `evict_lock`: rows up to it may arrive, so they are
        never dropped as lost. A lost connection does not lower it, though the cursor falls back to the
        watermark: the messages in flight then may have arrived too (they are kept until acknowledged)."""
        return max(self._cursor.get(STREAM_READINGS, 0), self._offered_upto)

    def _prepare_backlog(self) -> bool:
        """Offline (JSON payload): encode the backlog's next full data message ahead of time, up to
        PREPARED_MAX_BYTES, so that the drain after reconnection costs little more than sending.
        True when one was prepared (there may be more)."""
        s = self.settings
        if self._hj212 is not None or self._prepared_bytes >= PREPARED_MAX_BYTES:
            return False
        if self._reader is None:
            try:
                self._open_reader()
            except Exception as exc:  # noqa: BLE001 - not there yet: the live drain will say so
                log.debug("cannot prepare the backlog: %s", exc)
                return False
            if self._reader is None:
                return False
        after = self._prepared[-1][2] if self._prepared else self._cursor.get(STREAM_READINGS, 0)
        if self.recorder.stored_upto(STREAM_READINGS) - after < self._batch:
            return False  # less than a full message: read it live
        try:
            batch = self._reader.readings_json(after, self._batch)
        except Exception as exc:  # noqa: BLE001
            self._reader_failed(exc)
            return False
        if batch is None or batch.count < self._batch:
            return False
        payload = data_message(s.station_id, batch.items)
        self._prepared.append((after, batch.first_seq, batch.last_seq, batch.count, payload))
        self._prepared_bytes += len(payload)
        return True

    def _take_prepared(self, cursor: int) -> tuple[int, bytes] | None:
        """The prepared message that follows `cursor`, as (last seq, payload), or None. Messages
        before the cursor are dropped; any doubt (another chain, rows evicted since) drops them all."""
        prepared = self._prepared
        if not prepared:
            return None
        while prepared and prepared[0][0] < cursor:
            self._prepared_bytes -= len(prepared.popleft()[4])
        if not prepared:
            self._clear_prepared()
            return None
        after, first, last, count, payload = prepared[0]
        assert self._reader is not None
        # Every one of its rows still stored? Not the oldest row stored alone: the cap keeps the rows in
        # flight (below the cursor) and drops those above them, the rows of the next prepared messages.
        if after != cursor or self._reader.count_between(STREAM_READINGS, first, last, count + 1) != count:
            self._clear_prepared()  # the size cap evicted some of its rows
            return None
        prepared.popleft()
        self._prepared_bytes -= len(payload)
        if not prepared:
            self._clear_prepared()
        return last, payload

    def _clear_prepared(self) -> None:
        """Forget the prepared messages; the megabytes they may have held go back to the system."""
        self._prepared.clear()
        self._prepared_bytes = 0
        release_free_memory()

    def _publish_polls(self, topic: str) -> bool:
        """`payload: hj212`: one CN 2011 packet per poll; False when nothing is left to publish."""
        assert self._reader is not None and self._hj212 is not None
        room = max(WINDOW - self._inflight_count(), 1)
        polls = self._reader.reading_polls(self._cursor[STREAM_READINGS], self.settings.max_batch, max_polls=room)
        for poll in polls:
            self._publish_message(STREAM_READINGS, topic, self._hj212.poll_message(poll))
            if self.client is None:
                return False
        return bool(polls)

    def _publish_periods(self, topic: str) -> None:
        """`payload: hj212`: one 2051/2061/2031 packet per period start (see `group_periods`)."""
        assert self._reader is not None and self._hj212 is not None
        while not self._window_full() and self.client is not None:
            rows = self._reader.events_after(STREAM_AGGREGATES, self._cursor[STREAM_AGGREGATES], HJ212_EVENT_BATCH)
            if not rows:
                return
            groups = list(group_periods(rows))
            if len(rows) == HJ212_EVENT_BATCH and len(groups) > 1:
                groups.pop()  # its period start may go on beyond this page: next round
            for group in groups:
                self._publish_message(STREAM_AGGREGATES, topic, self._hj212.period_message(group))
                if self.client is None:
                    return

    def _publish_message(self, stream: str, topic: str, message: Hj212Message) -> None:
        """Each frame of an HJ 212 packet as its own message. The pieces before the last carry the
        watermark as it was before the packet, so the packet counts as delivered only when every
        piece is acknowledged; a packet with no frames (unsayable rows) is skipped in order."""
        if not message.frames:
            self._inflight[stream].append([stream, message.last_seq, True])
            self._cursor[stream] = message.last_seq
            self._settle(stream)
            return
        for number, frame in enumerate(message.frames, start=1):
            upto = message.last_seq if number == len(message.frames) else message.first_seq - 1
            self._publish_tracked(stream, topic, frame, upto)
            if self.client is None:
                return

    def _publish_events(self, stream: str, topic: str, batch: int) -> None:
        assert self._reader is not None
        upto = self.recorder.stored_upto(stream)  # alarms: only those whose state is kept beside the file
        if self._cursor[stream] >= upto:
            return  # nothing new (alarms and aggregates are rare: most fills skip these queries)
        if stream == STREAM_AGGREGATES and self._hj212 is not None:
            self._publish_periods(topic)
            return
        while not self._window_full() and self.client is not None:
            rows = [r for r in self._reader.events_after(stream, self._cursor[stream], batch) if r.seq <= upto]
            if not rows:
                return
            if stream == STREAM_ALARMS:
                payload = alarm_message(self.settings.station_id, rows[0].body)
                rows = rows[:1]
            else:
                payload = aggregates_message(self.settings.station_id, [r.body for r in rows])
            self._publish_tracked(stream, topic, payload, rows[-1].seq)

    def _unannounced(self, pending: list[Gap]) -> list[Gap]:
        """The file's pending gaps minus what was said of them: acknowledged (the recorder has yet to
        write the mark) or on its way on this connection (a gap the cap extends while its announcement
        waits for its PUBACK behind a slow link is announced again for its new part only; a lost
        connection forgets what was on its way, and it is said again)."""
        self._gaps_done = {g.id: self._gaps_done[g.id] for g in pending if g.id in self._gaps_done}
        sent = dict(self._gaps_done)
        for gap_id, last_seq in self._gaps_inflight:
            sent[gap_id] = max(sent.get(gap_id, 0), last_seq)
        out = []
        for g in pending:  # a gap extended since its announcement: only what was not said yet
            said = sent.get(g.id, 0)
            if said < g.last_seq:
                out.append(dataclasses.replace(g, first_seq=max(g.first_seq, said + 1)) if said else g)
        return out

    def _publish_gap(self, gap: Gap) -> None:
        key = (gap.id, gap.last_seq)
        if key in self._gaps_inflight:
            return
        payload = gap_message(self.settings.station_id, gap.first_seq, gap.last_seq, gap.reason)
        if self._publish_raw(f"{self.settings.base_topic}/data", payload, entry=["gap", key, False]):
            self._gaps_inflight.add(key)

    def _publish_tracked(self, stream: str, topic: str, payload: bytes, last_seq: int) -> None:
        """Publish a message of `stream` up to `last_seq`, in flight until its PUBACK. A publish that
        fails may have dropped the connection meanwhile (`_lost`), which forgets the window, this
        entry included: only an entry still there is taken back."""
        entry = [stream, last_seq, False]
        inflight = self._inflight[stream]
        inflight.append(entry)
        self._cursor[stream] = last_seq
        if not self._publish_raw(topic, payload, entry=entry) and inflight and inflight[-1] is entry:
            inflight.pop()

    def _publish_raw(self, topic: str, payload: bytes, retain: bool = False, entry: list | None = None) -> bool:
        """Publish; every message is tracked by mid until its PUBACK (so mids are never confused)."""
        client = self.client
        if client is None:
            return False
        self._publishing = True
        try:
            info = client.publish(topic, payload, qos=self.settings.qos, retain=retain)
        finally:
            self._publishing = False
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self._lost(f"publish failed: {mqtt.error_string(info.rc)}")
            return False
        self._by_mid[info.mid] = entry if entry is not None else ["other", 0, False]
        self._replies_in_flight += _is_reply(self._by_mid[info.mid])
        if info.mid in self._early_acks:  # QoS 0: paho reported it written before we got the mid
            self._early_acks.discard(info.mid)
            self._acknowledge(info.mid)
        return True

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:  # paho callback
        if client is not self.client:
            return
        if reason_code.is_failure and mid in self._by_mid:  # MQTT 5: the broker did not take it
            self._refused(self._forget(mid), reason_code)
            return
        if mid not in self._by_mid:
            # Early only while `publish()` runs (QoS 0: written before its mid is returned). Any other is the
            # PUBACK of a message no longer tracked (the window was reset while connected: the birth status
            # at every connection): kept, it acknowledged the message that got its mid after paho's ids
            # wrapped (65535 messages later) as it was published, before any PUBACK.
            if self._publishing:
                self._early_acks.add(mid)
            return
        self._acknowledge(mid)

    def _refused(self, entry: list, reason: object) -> None:
        """The broker refused a message (a PUBACK with a failure reason code): it is not delivered, so
        nothing is marked sent. A data message too large for the broker halves the readings per message
        (down to one); the connection is dropped (after this round of I/O: paho is in its callback) and
        made again after a backoff, and publishing resumes from the watermark (the messages in flight
        after the refused one may arrive twice)."""
        kind = entry[0]
        why = f"the broker refused a {kind} message: {reason}"
        if kind == "other":  # the retained status or a command reply: said again at the next connection
            self._errlog.warning("%s", why, key=why)
            return
        if kind == "resend-reply":  # its reply refused (an ACL without P/cmd/reply): the job is over all the
            # same; dropping the connection had it rewind and reply again, refused again, for ever
            if self._resends and self._resends[0] is entry[1]:
                self._resends.popleft()
            self._errlog.warning("%s; the platform does not get the answer to resend %r", why, entry[1].cmd_id,
                                 key=why)
            self._need_fill = True
            return
        rows = self._rows_in(entry)
        if getattr(reason, "value", None) == PACKET_TOO_LARGE and rows > 1:
            # Half of what was refused: a message in flight built before the last halving, and refused
            # after it, says nothing new (halving again would go below what the broker takes).
            if rows // 2 >= self._batch:
                self._refusal = why
                return
            self._batch = max(1, rows // 2)
            self._clear_prepared()
            log.warning("%s; data messages carry at most %d readings from now on (mqtt.max_batch %d is more "
                        "than the broker takes: its message size limit)", why, self._batch, self.settings.max_batch)
        else:
            self._errlog.error("%s; nothing is marked sent, retrying with backoff", why, key=why)
        self._refusal = why

    def _rows_in(self, entry: list) -> int:
        """How many rows a message in flight carries: a resend batch its count; a readings or aggregates
        message the seqs it spans (from the one before it in the window); others (an alarm, a gap) 0."""
        kind = entry[0]
        if kind == "resend":
            return entry[4]
        if kind not in (STREAM_READINGS, STREAM_AGGREGATES):
            return 0
        before = self._acked.get(kind, 0)
        for other in self._inflight[kind]:
            if other is entry:
                return entry[1] - before
            before = other[1]
        return 0

    def _acknowledge(self, mid: int) -> None:
        entry = self._forget(mid)
        kind = entry[0]
        if kind == "gap":
            key = entry[1]
            self._gaps_inflight.discard(key)
            self._gaps_done[key[0]] = max(self._gaps_done.get(key[0], 0), key[1])
            self.recorder.gap_announced(*key, identity=self._read_identity)  # the file its id is of
            log.info("gap %d announced up to seq %d", *key)
            return
        if kind == "other":
            return
        entry[2] = True
        if kind == "resend":
            entry[1].settle()
            self._need_fill = True  # the next batch, or the reply once every batch is acknowledged
            return
        if kind == "resend-reply":
            if self._resends and self._resends[0] is entry[1]:
                self._resends.popleft()  # answered: the next queued resend may start
            self._need_fill = True
            return
        self._settle(kind)

    def _settle(self, kind: str) -> None:
        """Move the watermark over the acknowledged messages at the head of the window, in order."""
        q = self._inflight[kind]
        upto = None
        while q and q[0][2]:
            upto = q.popleft()[1]
        if upto is not None:
            self._acked[kind] = upto
            self.recorder.ack(kind, upto)

    # ------------------------------------------------------------------ commands

    def _on_message(self, client, userdata, message) -> None:  # paho callback
        s = self.settings
        cmd_id: object = None
        if message.retain:  # SPEC §4: P/cmd is not retained; one left there would run at every connection
            self._cmdlog.warning("ignored a retained message on %s: commands are never retained (clear it "
                                 "with an empty retained message)", message.topic)
            return
        if self._replies_waiting() >= MAX_REPLIES_WAITING:
            self._cmdlog.warning("commands on %s arrive faster than the broker acknowledges their replies: "
                                 "dropped unanswered while %d replies wait", message.topic, MAX_REPLIES_WAITING)
            return
        try:
            if len(message.payload) > MAX_COMMAND_BYTES:
                raise CommandError(f"command larger than {MAX_COMMAND_BYTES} bytes")
            try:
                cmd = json.loads(message.payload.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise CommandError(f"not JSON: {exc}") from None
            except RecursionError:
                raise CommandError("not JSON: nested too deeply") from None
            if not isinstance(cmd, dict):
                raise CommandError("a command is a JSON object")
            cmd_id = cmd.get("id")
            if not isinstance(cmd_id, (str, int)) or isinstance(cmd_id, bool):
                cmd_id = None
                raise CommandError("missing or invalid 'id' (a string or integer)")
            if "v" in cmd and (type(cmd["v"]) is not int or cmd["v"] != 1):
                raise CommandError("unsupported 'v' (this agent speaks version 1; 'v' may be left out)")
            name = cmd.get("cmd")
            if name is None:
                raise CommandError("missing 'cmd' (known: ping, resend, status)")
            handlers = {"ping": self._cmd_ping, "status": self._cmd_status, "resend": self._cmd_resend}
            handler = handlers.get(name) if isinstance(name, str) else None
            if handler is None:
                raise CommandError(f"unknown command {name!r} (known: ping, resend, status)")
            reply = handler(cmd_id, cmd)
            if reply is None:
                return  # answered once done (resend)
            payload = reply_message(cmd_id, True, **reply)
        except CommandError as exc:
            self._cmdlog.warning("refused command on %s: %s", message.topic, exc)
            payload = reply_message(cmd_id, False, error=str(exc))
        except Exception as exc:  # noqa: BLE001 - a command must never take the agent down
            # Rate-limited: anyone allowed on P/cmd can repeat the command that fails (a status on a damaged buffer).
            self._cmdlog.error("command failed", exc_info=True)
            payload = reply_message(cmd_id, False, error=f"internal error: {type(exc).__name__}")
        self._publish_raw(f"{s.base_topic}/cmd/reply", payload, entry=["other", "reply", False])

    def _replies_waiting(self) -> int:
        """Command replies published and not yet acknowledged (`_on_message` bounds them)."""
        return self._replies_in_flight

    def _forget(self, mid: int) -> list:
        """The entry of `mid`, no longer in flight."""
        entry = self._by_mid.pop(mid)
        self._replies_in_flight -= _is_reply(entry)
        return entry

    def _cmd_ping(self, cmd_id: object, cmd: dict) -> dict:
        _only_keys(cmd, {"id", "cmd"})
        return {"cmd": "ping", "pong": True, "ts": iso_utc_ms(now_ms())}

    def _cmd_status(self, cmd_id: object, cmd: dict) -> dict:
        _only_keys(cmd, {"id", "cmd"})
        now = time.monotonic()
        if self._status_reply is None or now - self._status_reply[0] >= STATUS_REPLY_TTL_S:
            self._status_reply = (now, self.status_provider() if self.status_provider else {})
        return {"cmd": "status", "status": self._status_reply[1]}

    def _cmd_resend(self, cmd_id: object, cmd: dict) -> None:
        """Queue the range (of seqs, or of times: `_resend_by_time`); `_continue_resends` publishes it
        within the window and then replies."""
        _only_keys(cmd, {"id", "cmd", "from_seq", "to_seq", "from_ts", "to_ts", "after_seq"})
        by_time = {"from_ts", "to_ts", "after_seq"} & set(cmd)
        if by_time and {"from_seq", "to_seq"} & set(cmd):
            raise CommandError("a resend names seqs (from_seq, to_seq) or times (from_ts, to_ts), not both")
        if self._reader is None:
            raise CommandError("buffer not available")
        if by_time:
            job = self._resend_by_time(cmd_id, cmd)
        else:
            first, last = (_seq_field(cmd, name) for name in ("from_seq", "to_seq"))
            if first > last:
                raise CommandError("'from_seq' is greater than 'to_seq'")
            if last - first + 1 > MAX_RESEND and self._reader.count_between(STREAM_READINGS, first, last,
                                                                             MAX_RESEND + 1) > MAX_RESEND:
                raise CommandError(f"at most {MAX_RESEND} readings per resend; split the range")
            job = _Resend(cmd_id, first, last, after=first - 1, acked=first - 1)
        if len(self._resends) >= MAX_RESENDS_QUEUED:
            raise CommandError(f"{len(self._resends)} resends are under way; ask again when one has been answered")
        self._resends.append(job)
        self._need_fill = True

    def _resend_by_time(self, cmd_id: object, cmd: dict) -> _Resend:
        """The resend of the readings whose `ts` lies in from_ts..to_ts (both inclusive), among those
        stored now (with seq > `after_seq`, the reply's cursor when a range held more than MAX_RESEND)."""
        assert self._reader is not None
        start, end = (_time_field(cmd, name) for name in ("from_ts", "to_ts"))
        if start > end:
            raise CommandError("'from_ts' is later than 'to_ts'")
        if end - start > MAX_RESEND_SPAN_MS:
            raise CommandError(f"at most {MAX_RESEND_SPAN_MS // 86_400_000} days per resend; split the range")
        after = _seq_field(cmd, "after_seq") if "after_seq" in cmd else 0
        top, _ = self._reader.stream_state(STREAM_READINGS)
        oldest = self._reader.first_seq(STREAM_READINGS)
        after = max(after, (oldest if oldest is not None else top + 1) - 1)
        return _Resend(cmd_id, after + 1, top, after=after, acked=after, ts_range=(start, end), end=top)

    def _continue_resends(self) -> None:
        """Publish the oldest queued resend's next batch while the window has room (after the live
        data: resent messages count in the window like any other, so a flood of resends is bounded
        in memory and never holds up what is new); reply once the broker has acknowledged its whole
        range. A lost connection drops the batches in flight: the job goes on from the first batch
        not acknowledged (`_reset_window`), so the reply counts only what the broker took. A resend
        by time reads RESEND_SCAN_SEQS seqs at a time, for at most RESEND_SCAN_S per call, and stops
        at MAX_RESEND readings (its reply then says where: `_Resend.stop_here`)."""
        topic = f"{self.settings.base_topic}/data"
        deadline = time.monotonic() + RESEND_SCAN_S
        self._resend_due = False
        while self._resends and not self._window_full() and self.client is not None:
            job = self._resends[0]
            assert self._reader is not None
            if job.read_all:
                if job.inflight or job.replied:
                    return  # the rest of its batches, or its reply, to be acknowledged first
                self._answer_resend(job)
                return
            if job.ts_range is not None and time.monotonic() >= deadline:
                self._resend_due = True  # more to read: the next turn of the loop comes back at once
                return
            scan = job.last if job.ts_range is None else min(job.last, job.after + RESEND_SCAN_SEQS)
            room = job.room()
            if room <= 0:
                job.stop_here()
                continue
            if self._hj212 is not None:  # payload hj212: the stored polls again, as 2011 packets
                polls = self._reader.reading_polls(job.after, min(self.settings.max_batch, room),
                                                   upto_seq=job.last, max_polls=WINDOW, ts_range=job.ts_range,
                                                   scan_upto=scan)
                for poll in polls:
                    if len(poll.readings) > job.room():
                        job.stop_here()
                        break
                    frames = self._hj212.poll_message(poll).frames
                    if not self._publish_resend(job, topic, frames, poll.first_seq, poll.last_seq,
                                                len(poll.readings), _holes([r.seq for r in poll.readings])):
                        return
                found = bool(polls)
            else:
                with self._reader.snapshot():  # the holes as the batch saw the file: an eviction may commit between
                    batch = self._reader.readings_json(job.after, min(self._batch, room), upto_seq=scan,
                                                       ts_range=job.ts_range)
                    holes = (self._reader.missing_between(STREAM_READINGS, batch.first_seq, batch.last_seq)
                             if batch is not None and job.ts_range is None
                             and batch.last_seq - batch.first_seq + 1 > batch.count else [])
                if batch is not None:
                    payload = data_message(self.settings.station_id, batch.items)
                    if not self._publish_resend(job, topic, [payload], batch.first_seq, batch.last_seq,
                                                batch.count, holes):
                        return
                found = batch is not None
            if not found and scan < job.last:  # nothing of the range in this step: on to the next stored seq
                nxt = self._reader.first_seq(STREAM_READINGS, after=scan)
                upto = job.last if nxt is None else max(scan, min(job.last, nxt - 1))
                self._publish_resend(job, topic, [], upto, upto, 0, [])
            elif not found:
                job.read_all = True

    def _continue_resends_or_refuse(self) -> None:
        """`_continue_resends`; the resend whose rows fail to be read RESEND_READ_TRIES times is answered
        ok:false with the reason and dropped, so that a damaged page never holds up the queue for good."""
        try:
            self._continue_resends()
        except sqlite3.DatabaseError as exc:
            job = self._resends[0] if self._resends else None
            if job is not None:
                job.read_failures += 1
                if job.read_failures >= RESEND_READ_TRIES:
                    self._resends.popleft()
                    error = f"cannot read the stored readings after seq {job.after}: {exc}; ask again later"
                    self._publish_raw(f"{self.settings.base_topic}/cmd/reply", reply_message(job.cmd_id, False,
                                                                                          error=error))
            raise

    def _publish_resend(self, job: _Resend, topic: str, frames: list[bytes], first_seq: int, last_seq: int,
                        count: int, holes: list[list[int]]) -> bool:
        """One batch of a resend (an HJ 212 packet's frames, or one data message), tracked by mid: it
        counts (and moves the job's acknowledged point) when the last of its messages is acknowledged,
        with every earlier one. `holes`: the seq ranges missing inside the batch (evicted, or lost with a
        damaged page). False when the connection was lost meanwhile."""
        # The seqs before the batch that the range holds and the buffer does not (a resend by time skips
        # the readings of other times: it says nothing of seqs).
        skipped = [[job.after + 1, first_seq - 1]] if first_seq > job.after + 1 and job.ts_range is None else []
        skipped += holes
        if not frames:  # unsayable rows (HJ 212): nothing to send, counted in order as before
            job.inflight.append(["resend", job, True, last_seq, count, skipped])
            job.after = last_seq
            job.settle()
            return True
        for number, frame in enumerate(frames, start=1):
            final = number == len(frames)
            entry = ["resend", job, False, last_seq if final else job.after, count if final else 0,
                     skipped if final else []]
            job.inflight.append(entry)
            if not self._publish_raw(topic, frame, entry=entry):
                if job.inflight and job.inflight[-1] is entry:
                    job.inflight.pop()
                return False
        job.after = last_seq
        return True

    def _answer_resend(self, job: _Resend) -> None:
        """The reply, once the broker has acknowledged every batch of the range; the job stays queued
        until the reply is acknowledged too (a lost connection then makes it reply again)."""
        reply: dict = {"cmd": "resend"}
        if job.ts_range is not None:
            reply.update(from_ts=iso_utc_ms(job.ts_range[0]), to_ts=iso_utc_ms(job.ts_range[1]), count=job.count)
            if job.last < job.end:  # stopped at MAX_RESEND: the same command with this after_seq goes on
                reply.update(more=True, after_seq=job.last)
        else:
            missing = job.missing + ([[job.acked + 1, job.last]] if job.acked < job.last else [])
            reply.update(from_seq=job.first, to_seq=job.last, count=job.count)
            if missing:  # purged (older than keep_sent_days), evicted, or not issued yet
                reply["missing"] = missing
        job.replied = True
        self._publish_raw(f"{self.settings.base_topic}/cmd/reply", reply_message(job.cmd_id, True, **reply),
                          entry=["resend-reply", job, False])


class _PahoLog(logging.LoggerAdapter):
    """paho's logger. Its ERROR lines about a socket ("failed to receive on socket: [Errno 104]
    Connection reset by peer", once per attempt) are not logged on their own: the publisher gives
    them as the cause in its own line about the connection, which is rate-limited. Exceptions raised
    in the publisher's callbacks are still logged."""

    def __init__(self) -> None:
        super().__init__(logging.getLogger("paho"), {})
        self.error: str | None = None  # the last socket error, until the publisher takes it

    def log(self, level: int, msg: object, *args: object, **kwargs: object) -> None:
        if level >= logging.ERROR and not str(msg).startswith("Caught exception"):
            try:
                self.error = str(msg) % args if args else str(msg)
            except (TypeError, ValueError):
                self.error = str(msg)
            return
        super().log(level, msg, *args, **kwargs)


def _holes(seqs: list[int]) -> list[list[int]]:
    """The seq ranges missing between the first and the last of `seqs` (ascending), as [from, to] pairs."""
    return [[a + 1, b - 1] for a, b in itertools.pairwise(seqs) if b > a + 1]


@dataclass
class _Resend:
    """A resend command under way: its range, how far it has got, and what it found missing. Its
    batches in flight are entries `["resend", job, acknowledged, last_seq, count, [seq ranges
    skipped]]`; `count` and `missing` take in a batch only once it (and every batch before it) is
    acknowledged, so a lost connection rewinds the job to `acked` and nothing is counted twice."""

    cmd_id: object
    first: int
    last: int
    after: int  # the last seq published so far (first - 1 at the start)
    acked: int  # the last seq of the batches acknowledged so far, in order (first - 1 at the start)
    count: int = 0  # readings in the acknowledged batches
    missing: list[list[int]] = field(default_factory=list)  # found missing before `acked`
    read_all: bool = False  # the range is read to its end; the reply waits for the batches in flight
    replied: bool = False  # the reply is published, not yet acknowledged (the job stays queued until it is)
    read_failures: int = 0  # reads of its rows that failed (RESEND_READ_TRIES)
    inflight: deque[list] = field(default_factory=deque)  # bounded by the publisher's window (they hold mids)
    ts_range: tuple[int, int] | None = None  # a resend by time: (from, to) in Unix ms; first..last are then
    end: int = 0  # the seqs stored when it came, and `last` drops to where it stopped at MAX_RESEND (< end)

    def room(self) -> int:
        """How many more readings a resend by time may publish (MAX_RESEND in all); a seq resend's
        range was checked against the limit when it came."""
        if self.ts_range is None:
            return MAX_RESEND
        return MAX_RESEND - self.count - sum(entry[4] for entry in self.inflight)

    def stop_here(self) -> None:
        """A resend by time reached MAX_RESEND: its range ends with what it has published."""
        self.last = self.after
        self.read_all = True

    def settle(self) -> None:
        """Take in the acknowledged batches at the head of the job's window, in order."""
        q = self.inflight
        while q and q[0][2]:
            _, _, _, upto, count, skipped = q.popleft()
            self.missing += skipped
            self.acked = upto
            self.count += count

    def rewind(self) -> None:
        """The connection was lost: what was in flight is forgotten, publishing resumes after `acked`."""
        self.inflight.clear()
        self.after = self.acked
        self.read_all = self.replied = False


class CommandError(Exception):
    """A command that is refused (answered with ok:false)."""


def _seq_field(cmd: dict, name: str) -> int:
    value = cmd.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEQ:
        raise CommandError(f"'{name}' must be an integer from 0 to {MAX_SEQ}")
    return value


def _time_field(cmd: dict, name: str) -> int:
    """A command's ISO 8601 time with its offset (`2026-11-29T02:00:00Z`, `…T10:00:00.000+08:00`), in Unix ms;
    one whose UTC falls outside the years 1..9999 (`0001-01-01T00:00:00+14:00`) is refused: the reply could
    not say it (and, taken, the resend failed at its reply for ever, holding up every later one)."""
    value = cmd.get(name)
    try:
        if not isinstance(value, str) or "T" not in value:
            raise ValueError("not a date and time")
        ms = parse_iso_utc_ms(value)
        iso_utc_ms(ms)  # raises for a UTC year outside 1..9999
        return ms
    except (ValueError, OverflowError) as exc:
        raise CommandError(f"'{name}' must be an ISO 8601 UTC time such as 2026-11-29T02:00:00Z or "
                           f"2026-11-29T10:00:00.000+08:00 (an offset is required): {exc}") from None


def _is_reply(entry: list) -> bool:
    return entry[0] == "other" and entry[1] == "reply"


def _only_keys(cmd: dict, allowed: set[str]) -> None:
    """Refuse a command with a field it does not take; "v" (the version every message of the agent carries,
    checked before) is taken by every command."""
    extra = sorted(set(cmd) - allowed - {"v"})
    if extra:
        raise CommandError(f"unknown field(s) {', '.join(map(repr, extra))} for command {cmd.get('cmd')!r}")


def _duration(seconds: float) -> str:
    """`42 s`, `17 min`, `3.5 h`: how long an outage lasted, for a log line."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _safe_url(url: str | None) -> str:
    """A broker URL without any user:password part, for logs."""
    if not url:
        return ""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"

