"""Pooled HTTP/2 connections to backends, opened on demand and shared by many calls.

Per backend address: connections are opened when a call needs one and none has room; another
is opened when the backend's MAX_CONCURRENT_STREAMS is reached; a connection that got GOAWAY
takes no new streams and closes once its streams finish. A failed connect puts the address in
exponential backoff (with jitter), which balancing avoids while other backends are usable.
Connection-level failures (a failed connect, a handshake that timed out, a connection lost under
calls) are also reported once each to `BackendPool.on_failure`, for outlier detection.

With TLS towards a target's backends, connections are pooled per address and TLS settings
(`UpstreamTLSFiles`), so two targets that reach one address with different certificates never
share a connection; connect backoff stays per address. A TLS failure (an untrusted certificate,
no ALPN h2) is a failed connect like any other: backoff, outlier counting, and the calls
waiting for the connection try another backend or fail with UNAVAILABLE naming the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import structlog

from proxy.core.backoff import Backoff
from proxy.core.call import DONE
from proxy.core.h2.limits import Limits
from proxy.core.units import SECONDS
from proxy.core.waiting import WaitQueue
from proxy.runtime.flusher import Flusher
from proxy.runtime.tls import ALPN_H2, UpstreamTLS, UpstreamTLSFiles, handshake_reason
from proxy.runtime.upstream import BackendConnection, State

if TYPE_CHECKING:
    from proxy.core.buffers import BufferMeter
    from proxy.core.call import Call

log = structlog.get_logger("proxy.pool")

# Calls that may wait for one connection being set up; past that, another is opened. Once the
# backend's SETTINGS arrive, those over its real limit move on to another connection.
_ASSUMED_CAPACITY: Final = 100


class _NoH2(Exception):
    def __init__(self, alpn: str | None) -> None:
        super().__init__(f"ALPN {alpn!r}")
        self.alpn = alpn


# Backend connects: x1.6 up to 10 s, as gRPC's connection backoff but from 0.1 s, since
# balancing has other backends to try meanwhile.
CONNECT_BACKOFF: Final = Backoff(initial_s=0.1 * SECONDS, max_s=10 * SECONDS, factor=1.6)


class EndpointConnections:
    def __init__(self, pool: BackendPool, address: str, tls: UpstreamTLS | None = None) -> None:
        self.pool = pool
        self.address = address
        # Swapped by the pool when a reload rebuilt the same settings' context: connections
        # opened from now on use the new one.
        self.tls = tls
        host, _, port = address.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self.conns: list[BackendConnection] = []
        self.backlog = WaitQueue()
        self.failures = 0
        self.retired = False

    @property
    def connect_timeout_s(self) -> float:
        return self.pool.connect_timeout_s

    def backend_failed(self) -> None:
        self.pool.backend_failed(self.address)

    @property
    def retry_at(self) -> float:
        return self.pool.retry_at.get(self.address, 0.0)

    def usable(self, now: float) -> bool:
        return now >= self.retry_at

    def attach(self, call: Call) -> None:
        for conn in self.conns:
            if conn.has_capacity:
                conn.open(call)
                return
        for conn in self.conns:
            if conn.is_pending and len(conn.waiting) < _ASSUMED_CAPACITY:
                conn.waiting.add(call)
                return
        if len(self.conns) < self.pool.max_connections_per_backend:
            conn = self._connect()
            conn.waiting.add(call)
            return
        self.park(call)

    def park(self, call: Call) -> None:
        """Every connection is full: wait for a stream to finish."""
        self.backlog.add(call)

    def _connect(self) -> BackendConnection:
        conn = BackendConnection(self, self.pool.flusher, self.pool.limits, self.pool.meter)
        self.conns.append(conn)
        self.pool.spawn(self._run_connect(conn), f"connect {self.address}")
        return conn

    async def _run_connect(self, conn: BackendConnection) -> None:
        loop = asyncio.get_running_loop()
        tls = self.tls
        try:
            async with asyncio.timeout(self.pool.connect_timeout_s):
                if tls is None:
                    transport, _ = await loop.create_connection(lambda: conn, self.host, self.port)
                else:
                    transport, _ = await loop.create_connection(
                        lambda: conn,
                        self.host,
                        self.port,
                        ssl=tls.context,
                        server_hostname=tls.files.server_name or self.host,
                        ssl_handshake_timeout=self.pool.connect_timeout_s,
                    )
                    alpn = transport.get_extra_info("ssl_object").selected_alpn_protocol()
                    if alpn != ALPN_H2:
                        transport.abort()
                        raise _NoH2(alpn)
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, TimeoutError, _NoH2) as exc:
            timed_out = isinstance(exc, TimeoutError)
            if timed_out:
                reason = "connect timed out"
            elif isinstance(exc, _NoH2):
                reason = f"TLS: the backend did not negotiate ALPN h2 (got {exc.alpn!r})"
            elif isinstance(exc, ssl.SSLError):
                reason = f"TLS handshake failed: {handshake_reason(exc)}"
            else:
                reason = f"connect failed: {exc.strerror or exc}"
            self.failures += 1
            delay = self.pool.backoff.delay(self.failures)
            self.pool.retry_at[self.address] = loop.time() + delay
            self.pool.backing_off.add(self.address)
            log.warning(
                "backend_connect_failed",
                backend=self.address,
                reason=reason,
                failures=self.failures,
                retry_in_s=round(delay, 3),
            )
            if conn in self.conns:
                self.conns.remove(conn)
            self.pool.backend_failed(self.address)
            conn.connect_failed(reason, "connect_timeout" if timed_out else "connect_failed")
            return
        self.failures = 0
        self.pool.retry_at.pop(self.address, None)
        self.pool.backing_off.discard(self.address)

    def stream_finished(self, conn: BackendConnection) -> None:
        while self.backlog and conn.has_capacity:
            call = self.backlog.pop()
            if call.phase != DONE:
                conn.open(call)
        if (conn.state is State.DRAINING and not conn.calls) or (self.retired and not conn.calls):
            conn.close()

    def capacity_changed(self, conn: BackendConnection) -> None:
        self.stream_finished(conn)

    def connection_draining(self, conn: BackendConnection) -> None:
        # New calls must not pick it; those parked for room go to a fresh connection.
        for call in self.backlog.take_all():
            if call.phase != DONE:
                self.attach(call)

    def connection_closed(self, conn: BackendConnection) -> None:
        if conn in self.conns:
            self.conns.remove(conn)
        if not self.conns and self.backlog:
            for call in self.backlog.take_all():
                call.retry_or_fail(
                    "connection closed before the call could start", "closed_before_start"
                )

    def close_idle(self) -> None:
        for conn in list(self.conns):
            if not conn.calls and not conn.is_pending:
                conn.close()


class BackendPool:
    def __init__(
        self,
        flusher: Flusher,
        limits: Limits,
        connect_timeout_s: float = 5 * SECONDS,
        max_connections_per_backend: int = 16,
        backoff: Backoff | None = None,
        on_failure: Callable[[str], None] | None = None,
        meter: BufferMeter | None = None,
    ) -> None:
        self.meter = meter
        self.flusher = flusher
        self.limits = limits
        self.connect_timeout_s = connect_timeout_s
        self.max_connections_per_backend = max_connections_per_backend
        self.backoff = backoff or CONNECT_BACKOFF
        self.on_failure = on_failure
        # Keyed by address (cleartext) or (address, TLS settings).
        self.endpoints: dict[str | tuple[str, UpstreamTLSFiles], EndpointConnections] = {}
        # When each address that failed to connect may be tried again (loop time).
        self.retry_at: dict[str, float] = {}
        # Addresses whose last connect failed (their backoff may be over): while there are
        # none, balancing need not ask about backoff at all.
        self.backing_off: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def get(self, address: str, tls: UpstreamTLS | None = None) -> EndpointConnections:
        key: str | tuple[str, UpstreamTLSFiles] = address if tls is None else (address, tls.files)
        ep = self.endpoints.get(key)
        if ep is None:
            ep = self.endpoints[key] = EndpointConnections(self, address, tls)
        elif ep.tls is not tls:
            ep.tls = tls  # the same settings, reloaded: new connections take the new context
        return ep

    def of_address(self, address: str) -> list[EndpointConnections]:
        return [ep for ep in self.endpoints.values() if ep.address == address]

    def usable(self, address: str, now: float) -> bool:
        return now >= self.retry_at.get(address, 0.0)

    def backend_failed(self, address: str) -> None:
        if self.on_failure is not None:
            self.on_failure(address)

    def spawn(self, coro: asyncio.Future[None] | object, name: str) -> None:
        """Tasks are owned here (named, referenced) and cancelled on close."""
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def retain(self, addresses: frozenset[str]) -> None:
        """Backends no longer in any pool: finish their streams, then close their connections."""
        for key, ep in list(self.endpoints.items()):
            address = ep.address
            if address in addresses:
                ep.retired = False
                continue
            ep.retired = True
            ep.close_idle()
            if not ep.conns:
                del self.endpoints[key]
                if not self.of_address(address):
                    self.backing_off.discard(address)
                    self.retry_at.pop(address, None)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for ep in self.endpoints.values():
            for conn in list(ep.conns):
                conn.close()
