"""The station's TLS files (`mqtt.tls`) made into a client context: used by the publisher to
connect, and by `check-config` to find an unusable file before it matters — a certificate that is
not PEM, a key that does not match its certificate, a key protected by a passphrase, a file the
service user may not read. Also when a certificate expires (`not_after`, `earliest_ca_expiry`), for
the operator's view (`status`, a warning before it happens). Imports nothing from the project.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping

CERT_WARN_DAYS = 30  # a certificate expiring within this many days is warned of (`run`, `check-config`)


class TlsFilesError(Exception):
    """The files cannot be used: `key` is the config key at fault (ca, cert or key), `reason` what is
    wrong; the message names the key, the files (those that may be shown) and the reason."""

    def __init__(self, key: str, files: list[str | None], reason: str):
        shown = ", ".join(f for f in files if f)
        super().__init__(f"mqtt.tls.{key} ({shown}): {reason}" if shown else f"mqtt.tls.{key}: {reason}")
        self.key = key
        self.reason = reason


def tls_context(ca: str | None, cert: str | None, key: str | None,
                names: Mapping[str, str | None] | None = None) -> ssl.SSLContext:
    """A client TLS context that verifies the broker's certificate and host name (against `ca`, or
    the system's CAs), with the station's client certificate when `cert` and `key` are given. A key
    protected by a passphrase is refused with that reason: OpenSSL would otherwise ask for the
    passphrase on the terminal (and hang a technician's `run`). `names`: how errors name each file
    ("ca", "cert", "key"): by default its path; None for a file not to be named at all (a value that
    may be the secret itself: `agent.config.Config.tls_file_names`)."""
    shown = {"ca": ca, "cert": cert, "key": key} if names is None else names
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    asked: list[bool] = []

    def no_passphrase() -> bytes:
        asked.append(True)
        return b""

    for part, path in (("ca", ca), ("cert", cert), ("key", key)):
        _check_readable(part, path, shown.get(part))
    at, files = "ca", [shown.get("ca")]
    try:
        if ca:
            ctx.load_verify_locations(cafile=ca)
        else:
            ctx.load_default_certs()
        if cert:
            at, files = "cert", [shown.get("cert"), shown.get("key")]
            ctx.load_cert_chain(cert, key, password=no_passphrase)
    except (OSError, ssl.SSLError, ValueError) as exc:
        if asked:
            raise TlsFilesError("key", [shown.get("key")], "protected by a passphrase; edge-agent needs the key "
                                "without one (readable by the service user only)") from None
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if at == "cert" and cert and _parses_as_certificate(cert):
            # The certificate is sound: the key is not a PEM key, or not the one of this certificate.
            of = shown.get("cert") or "the certificate (mqtt.tls.cert)"
            raise TlsFilesError("key", [shown.get("key")], f"not the PEM private key of {of} ({reason})") from None
        raise TlsFilesError(at, files, reason) from None
    return ctx


def _check_readable(part: str, path: str | None, shown: str | None) -> None:
    """A file that cannot be opened is named by itself, with the system's reason ("Permission denied":
    renewal tooling that wrote a new key readable by root only), rather than through what OpenSSL makes
    of it: an unreadable key read as "not the PEM private key of" its certificate."""
    if not path:
        return
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise TlsFilesError(part, [shown], exc.strerror or type(exc).__name__) from None


def not_after(cert: str) -> float | None:
    """When the (first) certificate in the PEM file `cert` expires, as a Unix time; None when it cannot
    be read or parsed (`tls_context` says why), or this Python cannot decode certificates."""
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)  # CPython's; no dependency
    if decode is None:
        return None
    try:
        return _cert_time(decode(cert).get("notAfter"))
    except (OSError, ssl.SSLError, ValueError, AttributeError):
        return None


def earliest_ca_expiry(ca: str) -> float | None:
    """When the first of the CA certificates of the PEM file `ca` expires (a Unix time), or None."""
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=ca)
        times = [_cert_time(c.get("notAfter")) for c in ctx.get_ca_certs()]
    except (OSError, ssl.SSLError, ValueError):
        return None
    known = [t for t in times if t is not None]
    return min(known) if known else None


def _cert_time(text: object) -> float | None:
    """A certificate's "Dec  3 00:33:27 2026 GMT" as a Unix time."""
    if not isinstance(text, str):
        return None
    try:
        return float(ssl.cert_time_to_seconds(text))
    except ValueError:
        return None


def _parses_as_certificate(path: str) -> bool:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
        return True
    except (OSError, ssl.SSLError, ValueError):
        return False
