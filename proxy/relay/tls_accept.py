"""The accept side of a TLS listener: the handshake, with its limits, before HTTP/2 starts.

A TLS listener accepts TCP with `Handshake`, which pauses reading, and runs the handshake
through `loop.start_tls` (uvloop's SSL protocol, in C): only a connection that completed it,
with ALPN `h2`, becomes a `Downstream`. Doing the handshake here rather than with
`create_server(ssl=...)` is what lets every failure be seen: uvloop drops a failed server-side
handshake silently, and we want a log line and a counter for each (h2c sent to the TLS port, an
untrusted or missing client certificate, a timeout), and the client's identity in hand before
the first request.

Bounds (HAProxy's `maxsslconn` and `timeout client`, Envoy's `transport_socket_connect_timeout`):
a handshake takes at most `handshake_timeout_s`, and at most `max_pending` handshakes run at
once; a connection over that count is closed on accept, before any TLS work is spent on it.
Each pending handshake holds one task and uvloop's SSL buffers (tens of KiB), so the memory a
flood can take is bounded by the product.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import Counter
from collections.abc import Callable

import structlog

from proxy.relay.downstream import Downstream
from proxy.tls import ALPN_H2, handshake_reason, identity_of

log = structlog.get_logger("proxy.tls")


class TLSListener:
    """What the handshakes of one listener share: the current context, bounds and counters.
    `context` is swapped whole on reload; a handshake in progress keeps the one it began with."""

    def __init__(
        self,
        context: ssl.SSLContext,
        make_downstream: Callable[[], Downstream],
        failures: Counter[str],
        handshake_timeout_s: float,
        max_pending: int,
    ) -> None:
        self.context = context
        self.make_downstream = make_downstream
        self.failures = failures
        self.handshake_timeout_s = handshake_timeout_s
        self.max_pending = max_pending
        self.pending: set[asyncio.Task[None]] = set()

    def protocol(self) -> Handshake:
        return Handshake(self)

    def failed(self, peer: str, kind: str, reason: str) -> None:
        self.failures[kind] += 1
        log.warning("tls_handshake_failed", peer=peer, kind=kind, reason=reason)

    def close(self) -> None:
        for task in list(self.pending):
            task.cancel()


class Handshake(asyncio.Protocol):
    """Owns an accepted connection until its TLS handshake is over."""

    def __init__(self, listener: TLSListener) -> None:
        self.listener = listener
        self.peer = "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        listener = self.listener
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        if len(listener.pending) >= listener.max_pending:
            listener.failed(
                self.peer, "pending_limit", f"{listener.max_pending} handshakes pending"
            )
            transport.abort()  # type: ignore[attr-defined]
            return
        # start_tls takes the transport over; nothing may be read before it does.
        transport.pause_reading()  # type: ignore[attr-defined]
        task = asyncio.get_running_loop().create_task(
            self._handshake(transport),  # type: ignore[arg-type]  # uvloop's is not a subclass
            name=f"tls handshake {self.peer}",
        )
        listener.pending.add(task)
        task.add_done_callback(listener.pending.discard)

    async def _handshake(self, transport: asyncio.Transport) -> None:
        listener = self.listener
        loop = asyncio.get_running_loop()
        downstream = listener.make_downstream()
        try:
            # The outer timeout is a safety net: start_tls's own aborts the connection.
            async with asyncio.timeout(listener.handshake_timeout_s + 1.0):
                tls = await loop.start_tls(
                    transport,
                    downstream,
                    listener.context,
                    server_side=True,
                    ssl_handshake_timeout=listener.handshake_timeout_s,
                )
        except (OSError, TimeoutError, EOFError) as exc:
            reason = handshake_reason(exc)
            kind = "timeout" if reason == "handshake timed out" else _kind(exc)
            listener.failed(self.peer, kind, reason)
            transport.abort()
            return
        if tls is None:  # the connection was closed under the handshake
            listener.failed(self.peer, "closed", "peer closed during the handshake")
            return
        ssl_object = tls.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN_H2:
            # RFC 9113 3.2: h2 over TLS is chosen by ALPN. Python's ssl cannot send the
            # no_application_protocol alert, so the client gets close_notify at once.
            listener.failed(self.peer, "no_h2", "the client did not offer ALPN h2")
            tls.close()
            return
        downstream.identity = identity_of(ssl_object.getpeercert())
        downstream.connection_made(tls)


def _kind(exc: BaseException) -> str:
    """A metric label: what went wrong, in a few fixed words."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "bad_client_certificate"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reason or "CERTIFICATE_REQUIRED" in reason:
            return "no_client_certificate"
        if "CERTIFICATE" in reason or "UNKNOWN_CA" in reason:
            return "bad_client_certificate"
        # Cleartext (an h2c preface, an HTTP/1 request) on the TLS port.
        if (
            "WRONG_VERSION" in reason
            or "HTTP_REQUEST" in reason
            or "UNSUPPORTED_PROTOCOL" in reason
        ):
            return "not_tls"
        return "tls_error"
    return "closed"
