"""The TLS files of `mqtt.tls` as the publisher watches them: when the client certificate and the CAs
expire (for `status` and the retained status, and a warning from CERT_WARN_DAYS days before), whether
the files were replaced at the same paths (a renewal), and how a failed handshake is said (a broker
refusing the client certificate, a broker certificate that does not verify).

Imports `agent.tlsfiles`, `agent.logutil` and `agent.model`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import ssl
import time
from typing import Any

from agent.logutil import RateLimitedLog
from agent.model import iso_utc_ms
from agent.tlsfiles import CERT_WARN_DAYS, earliest_ca_expiry, not_after, tls_context

log = logging.getLogger("agent.publisher")  # its lines are the publisher's, as before this module

CHECK_EVERY_S = 3600.0  # how often the certificates' expiry is read again while nothing else reads it
# A TLS alert the broker sent about the client's certificate, as OpenSSL words it in the error text.
BROKER_ALERT = re.compile(r"\b(?:sslv3|tlsv1[0-9]?) alert ([a-z ]+?)\s*\(")


class CertWatch:
    """One per publisher; `settings` are the publisher's (tls_ca, tls_cert, tls_key, tls_names, urls)."""

    def __init__(self, settings: Any):
        self.settings = settings
        self.not_after: float | None = None  # when the client certificate read last expires (Unix time)
        self.in_use: float | None = None  # when the one the current connection was made with expires
        self._checked = -math.inf
        self._log = RateLimitedLog(log, every_s=86400)  # "expires in N days": once a day at most
        self._alerts: dict[str, str] = {}  # the alert a broker last refused the certificate with, by URL
        self._digest: bytes | None = None  # the files' digest the last context was built of

    def reset(self, settings: Any) -> None:
        """New settings (a reload): read everything again. The files the last context was built of are
        forgotten: the reload reconnects (building the new settings' context when they use TLS); kept, a
        reload that dropped mqtt.tls had every later SIGHUP take the absent files for renewed ones and
        drop the working connection."""
        self.settings = settings
        self._alerts.clear()
        self._digest = None
        self._checked = -math.inf

    def due(self) -> bool:
        return time.monotonic() - self._checked >= CHECK_EVERY_S

    def check(self) -> bool:
        """Read when the client certificate and the CA expire, and say it, at most once a day each, from
        CERT_WARN_DAYS days before: a certificate that expires unseen takes the station offline, and a
        fleet's certificates tend to expire on the same day. True when the client certificate's expiry
        changed (the publisher records it for `status`)."""
        s = self.settings
        self._checked = time.monotonic()
        tls = any(u.lower().startswith("mqtts") for u in s.urls)
        cert = not_after(s.tls_cert) if tls and s.tls_cert else None
        ca = earliest_ca_expiry(s.tls_ca) if tls and s.tls_ca else None
        changed, self.not_after = cert != self.not_after, cert
        for what, part, when in (("the client certificate", "cert", cert), ("a CA certificate of", "ca", ca)):
            if when is None:
                continue
            left = when - time.time()
            if left >= CERT_WARN_DAYS * 86400:
                continue
            where = self.name(part)
            stamp = iso_utc_ms(int(when * 1000))
            if left <= 0:
                self._log.error("%s %s expired at %s: the broker refuses the connection; put the renewed "
                                "files in place (used at the next connection attempt, or at once on SIGHUP)",
                                what, where, stamp, key=f"{part} {when}")
            else:
                self._log.warning("%s %s expires at %s (in %s): renew it; the renewed files are used at the "
                                  "next connection attempt, or at once on SIGHUP",
                                  what, where, stamp, _days(left), key=f"{part} {when}")
        return changed

    def context(self) -> ssl.SSLContext:
        """The client context of the files as they are now (TlsFilesError when they cannot make one);
        remembered as the connection's (`renewed`, `in_use`), with the expiry of the certificate it was
        built of: a renewal renamed into place after `check` read the expiry had the connection use the
        renewed files while `status` said the old date until the next check (an hour). Files replaced
        while they are read are read again (a renewal renames two files: at most a few times)."""
        s = self.settings
        for _ in range(3):
            digest = self._files_digest()
            ctx = tls_context(s.tls_ca, s.tls_cert, s.tls_key, names=s.tls_names)
            expiry = not_after(s.tls_cert) if s.tls_cert else None
            if self._files_digest() == digest:
                break
        self._digest, self.not_after, self.in_use = digest, expiry, expiry
        return ctx

    def renewed(self) -> bool:
        """Whether the files were replaced since the connection's context was built of them."""
        return self._digest is not None and self._files_digest() != self._digest

    def _files_digest(self) -> bytes | None:
        """A digest of the TLS files' contents (never logged), to tell files replaced at the same paths."""
        s = self.settings
        h = hashlib.sha256()
        for path in (s.tls_ca, s.tls_cert, s.tls_key):
            if path:
                try:
                    with open(path, "rb") as f:
                        h.update(f.read())
                except OSError:
                    return None
            h.update(b"\0")
        return h.digest()

    def name(self, part: str) -> str:
        """`mqtt.tls.cert (FILE)`: how a log line names a TLS file (without its path where it may be a secret)."""
        s = self.settings
        path = getattr(s, f"tls_{part}")
        shown = s.tls_names.get(part) if s.tls_names is not None else path
        return f"mqtt.tls.{part} ({shown})" if shown else f"mqtt.tls.{part}"

    def not_verified(self, exc: ssl.SSLCertVerificationError, host: str) -> str:
        """Why the broker's certificate was not accepted, and what to check."""
        said = exc.verify_message or str(exc)
        if exc.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
            return (f"the broker's certificate is not for {host} ({said}): the host in mqtt.url must be a name "
                    "its certificate gives")
        against = self.name("ca") if self.settings.tls_ca else "the system's CAs (mqtt.tls.ca not set)"
        return f"the broker's certificate does not verify against {against}: {said}"

    def refused(self, url: str, error: str) -> str | None:
        """Why a TLS connection with a client certificate failed (`error`), when the broker refused the
        certificate. It says so by an alert: with TLS 1.2 in the handshake; with TLS 1.3 after the
        client's side of it is done, where the alert is read, or the socket found closed first: the
        alert seen last on this URL stands for both, so that the log and `status` say one thing. A
        certificate expired by this gateway's clock is said as such."""
        if not self.settings.tls_cert:
            return None
        alert = BROKER_ALERT.search(error or "")
        if alert:
            self._alerts[url] = alert.group(1)
        said = self._alerts.get(url)
        if self.not_after is not None and self.not_after <= time.time():
            return (f"the broker refused the client certificate {self.name('cert')}: it expired at "
                    f"{iso_utc_ms(int(self.not_after * 1000))}")
        if said is None:
            return None
        return f"the broker refused the client certificate {self.name('cert')}: TLS alert \"{said}\""

    def connected(self, url: str) -> None:
        """The broker at `url` took the certificate: an alert it sent before is history."""
        self._alerts.pop(url, None)

    def expires(self, connection: bool = False) -> dict:
        """`cert_expires` where a client certificate is configured ({} otherwise): of the one read last,
        or of the one the connection uses (`connection`: the retained status, by which an operator of
        many stations finds those due for renewal without asking each one)."""
        if not self.settings.tls_cert:
            return {}
        when = self.in_use if connection else self.not_after
        return {"cert_expires": iso_utc_ms(int(when * 1000)) if when is not None else None}


def _days(seconds: float) -> str:
    """`12 days`, `36 h`: how long until a certificate expires."""
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.0f} days"
    return f"{seconds / 3600:.0f} h"
