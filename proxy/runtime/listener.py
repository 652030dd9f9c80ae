"""The listeners: sockets that accept client connections (TCP, TLS, Unix), the open client
connections, and the graceful drain.

Each accepted connection is a `Downstream` built with this object as its `ListenerContext`: the
codec limits, the flusher, the dispatcher its calls go to, and the counters it reports to.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import resource
import socket
import ssl
from collections import Counter
from typing import Final

import structlog

from proxy.core.buffers import SHED_AT, BufferMeter
from proxy.core.grpcweb import WebSettings, cors_policy
from proxy.core.h2 import frames as fr
from proxy.core.h2.errors import FloodError, H2ConnectionError, TLSOnCleartextError
from proxy.core.h2.limits import Limits
from proxy.core.options import ServerOptions
from proxy.core.ports import CallRouter
from proxy.runtime.downstream import Downstream
from proxy.runtime.flusher import Flusher
from proxy.runtime.http1 import Http1Connection
from proxy.runtime.tls_accept import TLSListener

log = structlog.get_logger("proxy.server")

DRAIN_POLL_S: Final = 0.05
DRAIN_LINGER_S: Final = 1.0
# How often the listener looks for stalled streams and, over the budget, connections to shed.
SWEEP_S: Final = 1.0


class Listeners:
    def __init__(
        self,
        router: CallRouter,
        flusher: Flusher,
        limits: Limits,
        options: ServerOptions,
        loop: asyncio.AbstractEventLoop,
        meter: BufferMeter | None = None,
    ) -> None:
        self.router = router
        self.max_connections = options.max_connections or default_max_connections()
        self.preface_timeout = options.preface_timeout
        self.flusher = flusher
        self.limits = limits
        self.options = options
        self.loop = loop
        self.connections: set[Downstream] = set()
        # gRPC-Web (None: off), and the client connections that speak it over HTTP/1.1.
        self.web = web_settings(options)
        self.http1_connections: set[Http1Connection] = set()
        self.connection_errors: Counter[str] = Counter()
        # Failed TLS handshakes on the listeners, by kind (see proxy.runtime.tls_accept).
        self.tls_failures: Counter[str] = Counter()
        self.draining = False
        # The buffer budget (proxy/core/buffers.py), and what overload made the proxy shed.
        self.meter = meter or BufferMeter(options.buffer_budget)
        self.connection_buffer = options.connection_buffer
        self.base_stream_window = options.base_stream_window
        # Client streams start with the base window too, but never below HTTP/2's default: a
        # client may send that much before it has read our SETTINGS (RFC 9113 6.9.2). A call
        # grows it to the full window (proxy.core.buffers).
        self.client_limits = dataclasses.replace(
            limits, stream_window=max(fr.DEFAULT_WINDOW, options.base_stream_window)
        )
        self.overload: Counter[str] = Counter()
        self._sweeper: asyncio.TimerHandle | None = None
        self._shed_soon = False
        self.meter.on_over = self._over_budget
        self._servers: list[asyncio.Server] = []
        self._tls_listeners: list[TLSListener] = []
        self._unix_paths: list[str] = []

    def count_connection_error(self, exc: H2ConnectionError) -> None:
        if isinstance(exc, FloodError):
            key = exc.limit
        elif isinstance(exc, TLSOnCleartextError):
            key = "TLS_ON_CLEARTEXT_PORT"
        else:
            key = exc.code.name
        self.connection_errors[key] += 1

    def _start_sweeping(self) -> None:
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(SWEEP_S, self._sweep)

    def make_room(self, new: Downstream) -> bool:
        """Past --max-connections: close the connection idle the longest so that `new` is
        served; with none idle, refuse `new` (False)."""
        idle = [c for c in self.connections if c is not new and c.idle]
        if idle:
            min(idle, key=lambda c: c.idle_since).close_idle("at --max-connections")
            self.overload["idle_closed"] += 1
            return True
        self.connections.discard(new)
        new.refuse()
        self.overload["connection_refused"] += 1
        return False

    def _over_budget(self) -> None:
        """Over the budget: shed in this loop turn's end, not at the next sweep."""
        if not self._shed_soon:
            self._shed_soon = True
            self.loop.call_soon(self._shed)

    def _shed(self) -> None:
        """Close the connections holding the most until the bytes held are under SHED_AT."""
        self._shed_soon = False
        meter = self.meter
        if not meter.over():
            return
        target = meter.budget * SHED_AT
        for conn in sorted(self.connections, key=lambda c: c.h2.queued, reverse=True):
            if meter.used <= target or not conn.h2.queued:
                break
            conn.shed()
            self.overload["goaway"] += 1

    def _sweep(self) -> None:
        """Once a second: reset streams stalled past the timeout, and when the buffered bytes
        are over the budget, shed the connections holding the most until back under SHED_AT."""
        self._sweeper = self.loop.call_later(SWEEP_S, self._sweep)
        now = self.loop.time()
        timeout = self.options.stalled_stream_timeout
        idle_timeout = self.options.idle_timeout
        for conn in list(self.connections):
            # Called whatever the connection holds: with nothing queued it forgets its marks,
            # so that a stream stalled later is timed from then, not from an earlier stall.
            reset = conn.reset_stalled(now, timeout)
            if reset:
                self.overload["stalled_stream"] += reset
            elif conn.idle and now - conn.idle_since >= idle_timeout:
                conn.close_idle("idle timeout")
                self.overload["idle_timeout"] += 1
        for http1 in list(self.http1_connections):
            closed = http1.sweep(now, idle_timeout, timeout)
            if closed is not None:
                self.overload[closed] += 1
        self._shed()  # it checks the budget itself

    async def listen(
        self,
        host: str,
        port: int,
        reuse_port: bool = False,
        *,
        tls: ssl.SSLContext | None = None,
    ) -> list[tuple[str, int]]:
        """`reuse_port`: SO_REUSEPORT, so that several worker processes share the port and
        the kernel spreads new connections over them. `tls`: the listener speaks TLS with
        this context (see proxy.runtime.tls_accept)."""
        if tls is not None:
            return self._listen_tls(host, port, reuse_port, tls)
        server = await self.loop.create_server(
            lambda: Downstream(self),
            host,
            port,
            reuse_address=True,
            reuse_port=reuse_port,
            backlog=1024,
        )
        self._servers.append(server)
        self._start_sweeping()
        bound = []
        for sock in server.sockets:
            with_nodelay(sock)
            addr = sock.getsockname()
            bound.append((addr[0], addr[1]))
        log.info("listening", addresses=[f"{h}:{p}" for h, p in bound], tls=False)
        return bound

    def _listen_tls(
        self, host: str, port: int, reuse_port: bool, context: ssl.SSLContext
    ) -> list[tuple[str, int]]:
        """Bind the way create_server does (every address the host resolves to), then let a
        TLSListener accept (see proxy.runtime.tls_accept for why it accepts on its own)."""
        options = self.options
        listener = TLSListener(
            context,
            lambda: Downstream(self),
            self.tls_failures,
            options.tls_handshake_timeout,
            options.tls_max_pending_handshakes,
        )
        bound = []
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            addr = (addr[0], port, *addr[2:])  # port 0 resolved by the first bind
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
                sock.listen(1024)
            except OSError:
                sock.close()
                listener.close()
                raise
            listener.start(sock)
            if port == 0:  # the other addresses take the same port, as create_server does
                port = sock.getsockname()[1]
            name = sock.getsockname()
            bound.append((name[0], name[1]))
        self._tls_listeners.append(listener)
        self._start_sweeping()
        log.info("listening", addresses=[f"{h}:{p}" for h, p in bound], tls=True)
        return bound

    async def listen_unix(self, path: str) -> str:
        """A Unix socket listener (cleartext h2c: the file's permissions guard it). A socket
        file left by an earlier run is replaced; any other file there is an error."""
        with contextlib.suppress(FileNotFoundError):
            if os.path.exists(path) and not _is_socket(path):
                raise FileExistsError(f"{path} exists and is not a socket")
            os.unlink(path)
        server = await self.loop.create_unix_server(lambda: Downstream(self), path, backlog=1024)
        self._servers.append(server)
        self._unix_paths.append(path)
        self._start_sweeping()
        log.info("listening", addresses=[f"unix:{path}"], tls=False)
        return path

    def set_listener_tls(self, context: ssl.SSLContext) -> None:
        """New handshakes on every TLS listener use this context (SIGHUP); open connections
        keep theirs."""
        for listener in self._tls_listeners:
            listener.context = context

    async def drain(self, timeout_s: float) -> None:
        """Graceful shutdown: refuse new connections, GOAWAY in two steps on every client
        connection (see proxy.runtime.downstream), let the calls in flight finish for up to
        `timeout_s`, closing each connection when its last call ends; then end the calls
        still running (UNAVAILABLE "proxy shutting down") and close what is left.

        Envoy (drain_timeout, then the final GOAWAY) and grpc-go (GracefulStop) do the same;
        nginx's graceful quit closes idle connections and waits for requests without bound,
        which a gRPC stream can make forever, hence a deadline."""
        if self.draining:
            return
        self.draining = True
        loop = self.loop
        deadline = loop.time() + timeout_s
        # Closing the listeners makes the kernel refuse new connections (RST to a SYN), which
        # a client reads at once as "try another address", unlike one accepted to be told
        # GOAWAY; connections in the accept queue are reset too.
        for listener in self._servers:
            listener.close()
        self._close_listeners()
        conns = list(self.connections)
        log.info(
            "draining",
            connections=len(conns),
            calls=sum(len(c.calls) for c in conns),
            timeout_s=timeout_s,
        )
        for conn in conns:
            conn.start_drain()
        for http1 in list(self.http1_connections):
            http1.start_drain()
        # Polled: a few wake-ups a second for at most the drain time, no hook on the hot path.
        while loop.time() < deadline and (
            any(not c.closed for c in self.connections) or self.http1_connections
        ):
            await asyncio.sleep(DRAIN_POLL_S)
        for http1 in list(self.http1_connections):
            http1.terminate("proxy shutting down")
        left = [c for c in self.connections if not c.closed]
        if left:
            log.warning(
                "drain_timeout",
                connections=len(left),
                calls=sum(len(c.calls) for c in left),
            )
            for conn in left:
                conn.terminate("proxy shutting down")
        # The last bytes (final GOAWAY, trailers) are written and our side shut; a client
        # closes its side once it has read them. Closing the socket before that could reset
        # the connection under bytes it has not read yet.
        grace = loop.time() + DRAIN_LINGER_S
        while self.connections and loop.time() < grace:
            await asyncio.sleep(DRAIN_POLL_S)
        log.info("drained", connections_left=len(self.connections))

    def _close_listeners(self) -> None:
        for tls_listener in self._tls_listeners:
            tls_listener.close()  # handshakes in progress: those clients are not served yet
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._unix_paths.clear()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for server in self._servers:
            server.close()
        self._close_listeners()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        for http1 in list(self.http1_connections):
            if http1.transport is not None:
                http1.transport.close()


def web_settings(options: ServerOptions) -> WebSettings | None:
    """gRPC-Web as the options say, or None when it is switched off."""
    if not options.grpc_web:
        return None
    return WebSettings(
        cors_policy(
            options.cors_allowed_origins, options.cors_allow_headers, options.cors_expose_headers
        ),
        options.http1_max_header_size,
        options.http1_max_request_line,
        options.http1_max_body_size,
    )


def default_max_connections() -> int:
    """What the open-files limit allows, less a reserve for backend connections, listeners and
    files (at least 64)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(64, soft - max(128, soft // 8))


def _is_socket(path: str) -> bool:
    import stat

    return stat.S_ISSOCK(os.stat(path).st_mode)


def with_nodelay(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
