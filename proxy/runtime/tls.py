"""TLS settings made into `ssl` contexts, and the identity a client certificate proves.

Theory of operation
-------------------
The listener side and the backend side each build one `ssl.SSLContext` from files when the
proxy starts and again on SIGHUP. A context is immutable for us once made: a reload builds a new
one and swaps it in, so a connection keeps the context it was made with (open connections go on
working) and the next connection gets the new certificate. A file that fails to load raises
`TLSFileError` naming the setting and the file: at start the CLI exits 2 with it, on reload the
old context stays and the error is logged.

Both sides speak TLS 1.2 or 1.3 only, with ALPN `h2` (RFC 9113 section 3.2: h2 over TLS is
negotiated with ALPN, and TLS 1.2 needs the ECDHE AEAD suites of its section 9.2.2, which is
what OpenSSL's default list for 1.2 starts with) and renegotiation off (9.2.1 forbids it).
Verification is on by default; the one way to skip it towards backends
(`backend_tls_skip_verify`) is an explicit setting that the CLI warns about at start.

A client's identity is what its verified certificate names: the subject CN, the URI SANs (a
SPIFFE id is a URI SAN) and the DNS SANs. Only a listener that requires client certificates
(`tls_client_ca`) has one; the access log shows it and routes may allow only some identities.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Final

ALPN_H2: Final = "h2"
# Offered after h2 by a TLS listener that serves gRPC-Web: an HTTP/1.1-only client (curl
# --http1.1, an old browser stack) gets the HTTP/1.1 front end, the others keep h2.
ALPN_HTTP1: Final = "http/1.1"


class TLSFileError(Exception):
    """A certificate, key or CA file that cannot be used; `str()` names the setting."""

    def __init__(self, setting: str, path: str, reason: str) -> None:
        super().__init__(f"{setting}: {path}: {reason}")
        self.setting = setting
        self.path = path
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ServerTLSFiles:
    """What a TLS listener is made of. `client_ca`: require and verify client certificates."""

    cert: str
    key: str
    client_ca: str | None = None


@dataclass(frozen=True, slots=True)
class UpstreamTLSFiles:
    """What TLS towards one target's backends is made of. `ca` None: the system store;
    `server_name` None: the host of each endpoint's address."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None
    skip_verify: bool = False


@dataclass(frozen=True, slots=True, eq=False)
class UpstreamTLS:
    """A built upstream context. `files` keys the connection pool: connections to one address
    made with different settings are never shared, while a reload of the same settings (new
    context, same files) replaces the context for new connections only."""

    files: UpstreamTLSFiles
    context: ssl.SSLContext


def _base(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    context.set_alpn_protocols([ALPN_H2])
    return context


def _load_chain(context: ssl.SSLContext, cert: str, key: str, names: tuple[str, str]) -> None:
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        missing = cert if exc.filename in (None, cert) else key
        setting = names[0] if missing == cert else names[1]
        raise TLSFileError(setting, missing, "no such file") from None
    except (ssl.SSLError, OSError) as exc:
        # OpenSSL does not say which of the two was wrong; a key that does not match the
        # certificate is the usual case ("key values mismatch").
        raise TLSFileError(f"{names[0]}/{names[1]}", f"{cert}, {key}", _reason(exc)) from None


def _load_ca(context: ssl.SSLContext, path: str, setting: str) -> None:
    try:
        context.load_verify_locations(cafile=path)
    except FileNotFoundError:
        raise TLSFileError(setting, path, "no such file") from None
    except (ssl.SSLError, OSError) as exc:
        raise TLSFileError(setting, path, _reason(exc)) from None


def server_context(files: ServerTLSFiles, http1: bool = False) -> ssl.SSLContext:
    """`http1`: offer http/1.1 after h2 in ALPN (gRPC-Web is on)."""
    context = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    if http1:
        context.set_alpn_protocols([ALPN_H2, ALPN_HTTP1])
    _load_chain(context, files.cert, files.key, ("tls_cert", "tls_key"))
    if files.client_ca:
        _load_ca(context, files.client_ca, "tls_client_ca")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def upstream_context(files: UpstreamTLSFiles) -> UpstreamTLS:
    context = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    if files.skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif files.ca:
        _load_ca(context, files.ca, "backend_ca")
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if files.cert or files.key:
        if not (files.cert and files.key):
            missing = "backend_key" if files.cert else "backend_cert"
            raise TLSFileError(missing, "", "backend_cert and backend_key go together")
        _load_chain(context, files.cert, files.key, ("backend_cert", "backend_key"))
    return UpstreamTLS(files, context)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    return str(getattr(exc, "strerror", None) or exc)


def handshake_reason(exc: BaseException) -> str:
    """A short, stable reason for a failed handshake, for logs, metrics and call errors."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return _reason(exc)
    if isinstance(exc, TimeoutError) or "taking longer" in str(exc):
        return "handshake timed out"
    if isinstance(exc, ConnectionError | EOFError):
        return "peer closed during the handshake"
    return str(exc) or type(exc).__name__
