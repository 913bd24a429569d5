"""The station's TLS files (`mqtt.tls`) made into a client context: used by the publisher to
connect, and by `check-config` to find an unusable file before it matters — a certificate that is
not PEM, a key that does not match its certificate, a key protected by a passphrase. Imports
nothing from the project.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping


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


def _parses_as_certificate(path: str) -> bool:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
        return True
    except (OSError, ssl.SSLError, ValueError):
        return False
