"""The accept side of a TLS listener: the handshake, with its limits, before HTTP/2 starts.

A TLS listener accepts on its own socket (`loop.sock_accept`) and hands each connection to
`loop.connect_accepted_socket` with the listener's SSL context, which runs the handshake in
uvloop's SSL protocol (in C) and returns, or raises, when it is over. Why not
`create_server(ssl=...)`: uvloop drops a failed server-side handshake without a word, and we
want a log line and a counter for each (h2c sent to the TLS port, an untrusted or missing
client certificate, a timeout). Why not accept cleartext and `start_tls` afterwards: uvloop
starts reading a server connection after `connection_made`, so a ClientHello that arrives at
once reaches the cleartext protocol before the SSL one is in place. On an accepted socket the
SSL protocol is there before the first read.

A connection whose handshake succeeded becomes a `Downstream`, which checks ALPN and reads the
client's identity from the SSL object (see `Downstream.connection_made`).

Bounds (HAProxy's `maxsslconn` and `timeout client`, Envoy's `transport_socket_connect_timeout`):
a handshake takes at most `handshake_timeout_s`, and at most `max_pending` handshakes run at
once; a connection over that count is closed on accept, before any TLS work is spent on it.
Each pending handshake holds one task and uvloop's SSL buffers (tens of KiB), so the memory a
flood can take is bounded by the product.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import Counter
from collections.abc import Callable

import structlog

from proxy.runtime.tls import handshake_reason

log = structlog.get_logger("proxy.tls")


class TLSListener:
    """The accept loops of one TLS listener and what their handshakes share: the current
    context (swapped whole on reload; a handshake in progress keeps the one it began with),
    the bounds and the failure counters."""

    def __init__(
        self,
        context: ssl.SSLContext,
        make_protocol: Callable[[], asyncio.Protocol],
        failures: Counter[str],
        handshake_timeout_s: float,
        max_pending: int,
    ) -> None:
        self.context = context
        self.make_protocol = make_protocol
        self.failures = failures
        self.handshake_timeout_s = handshake_timeout_s
        self.max_pending = max_pending
        self.sockets: list[socket.socket] = []
        self.pending: set[asyncio.Task[None]] = set()
        self._accepting: set[asyncio.Task[None]] = set()

    def start(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sockets.append(sock)
        task = asyncio.get_running_loop().create_task(
            self._accept(sock), name=f"tls accept {sock.getsockname()}"
        )
        self._accepting.add(task)
        task.add_done_callback(self._accepting.discard)

    def failed(self, peer: str, kind: str, reason: str) -> None:
        self.failures[kind] += 1
        log.warning("tls_handshake_failed", peer=peer, kind=kind, reason=reason)

    def close(self) -> None:
        """Stop accepting (the kernel then refuses new connections) and drop the handshakes
        in progress: those clients were not served yet."""
        for task in (*self._accepting, *self.pending):
            task.cancel()
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(sock)
            except OSError as exc:  # EMFILE and the like: wait rather than spin
                log.error("tls_accept_failed", error=str(exc))
                await asyncio.sleep(0.1)
                continue
            peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else "?"
            if len(self.pending) >= self.max_pending:
                conn.close()
                self.failed(peer, "pending_limit", f"{self.max_pending} handshakes pending")
                continue
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(self._handshake(conn, peer), name=f"tls handshake {peer}")
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)

    async def _handshake(self, conn: socket.socket, peer: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            # The outer timeout is a safety net: the handshake timeout aborts the connection.
            async with asyncio.timeout(self.handshake_timeout_s + 1.0):
                await loop.connect_accepted_socket(
                    self.make_protocol,
                    conn,
                    ssl=self.context,
                    ssl_handshake_timeout=self.handshake_timeout_s,
                )
        except (OSError, TimeoutError, EOFError) as exc:
            reason = handshake_reason(exc)
            kind = "timeout" if reason == "handshake timed out" else _kind(exc)
            self.failed(peer, kind, reason)
            conn.close()


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
        if any(word in reason for word in ("WRONG_VERSION", "HTTP_REQUEST", "UNSUPPORTED_PROTO")):
            return "not_tls"
        return "tls_error"
    return "closed"
