"""The station's TLS files (`mqtt.tls`) made into a client context: used by the publisher to
connect, and by `check-config` to find an unusable file before it matters — a certificate that is
not PEM, a key that does not match its certificate, a key protected by a passphrase. Imports
nothing from the project.
"""

from __future__ import annotations

import ssl


class TlsFilesError(Exception):
    """The files cannot be used: `key` is the config key at fault (ca, cert or key), `reason` what is
    wrong; the message names the key, the file and the reason."""

    def __init__(self, key: str, files: str, reason: str):
        super().__init__(f"mqtt.tls.{key} ({files}): {reason}")
        self.key = key
        self.reason = reason


def tls_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    """A client TLS context that verifies the broker's certificate and host name (against `ca`, or
    the system's CAs), with the station's client certificate when `cert` and `key` are given. A key
    protected by a passphrase is refused with that reason: OpenSSL would otherwise ask for the
    passphrase on the terminal (and hang a technician's `run`)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    asked: list[bool] = []

    def no_passphrase() -> bytes:
        asked.append(True)
        return b""

    at, files = "ca", str(ca)
    try:
        if ca:
            ctx.load_verify_locations(cafile=ca)
        else:
            ctx.load_default_certs()
        if cert:
            at, files = "cert", f"{cert}, {key}"
            ctx.load_cert_chain(cert, key, password=no_passphrase)
    except (OSError, ssl.SSLError, ValueError) as exc:
        if asked:
            raise TlsFilesError("key", str(key), "protected by a passphrase; edge-agent needs the key without "
                                                 "one (readable by the service user only)") from None
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if at == "cert" and cert and _parses_as_certificate(cert):
            # The certificate is sound: the key is not a PEM key, or not the one of this certificate.
            raise TlsFilesError("key", str(key), f"not the PEM private key of {cert} ({reason})") from None
        raise TlsFilesError(at, files, reason) from None
    return ctx


def _parses_as_certificate(path: str) -> bool:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
        return True
    except (OSError, ssl.SSLError, ValueError):
        return False
