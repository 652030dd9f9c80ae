"""The proxy: a listener, the backend pool, routing and balancing, tied together.

ProxyServer is what every Call asks "where next?" (`pick`) and "get me there" (`attach`), and
what it tells how it ended (`call_ended`: stats, outlier detection, the access log).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from random import random
from time import perf_counter
from typing import TYPE_CHECKING, Final

import structlog

from proxy.balancing import Balancer, NoPick, NoPickKind
from proxy.h2.errors import FloodError, H2ConnectionError, TLSOnCleartextError
from proxy.h2.limits import Limits
from proxy.health.outlier import OutlierDetector
from proxy.pool.connections import BackendPool
from proxy.pool.endpoints import Endpoint, PoolSnapshot, TargetPool
from proxy.relay.call import Call, Refusal
from proxy.relay.downstream import Downstream
from proxy.relay.flusher import Flusher
from proxy.relay.grpc_status import Status
from proxy.relay.retry_budget import RetryBudget
from proxy.relay.stats import (
    BUCKET0,
    DURATION_BUCKETS,
    DURATION_SUM,
    MAX_STATUS,
    NO_BACKEND,
    STATUS0,
    CallStats,
    split_path,
)
from proxy.relay.tls_accept import TLSListener
from proxy.routing import Router, service_of
from proxy.tls import UpstreamTLS
from proxy.units import SECONDS

if TYPE_CHECKING:
    from proxy.discovery.watcher import EtcdDiscovery
    from proxy.health import HealthSource

log = structlog.get_logger("proxy.server")
access_log = structlog.get_logger("proxy.access")

# A plain int: comparing with the IntEnum member costs a metaclass attribute lookup per call.
_UNAVAILABLE: Final = int(Status.UNAVAILABLE)

DRAIN_POLL_S = 0.05
DRAIN_LINGER_S = 1.0


@dataclass(frozen=True, slots=True)
class ServerOptions:
    max_retries: int = 2  # other backends tried for a call that reached no backend code
    replay_limit: int = 256 * 1024  # request bytes kept for such a retry
    connect_timeout_s: float = 5 * SECONDS
    max_connections_per_backend: int = 16
    # Retries in flight <= max(min, percent % of calls in flight) (see retry_budget.py).
    retry_budget_percent: float = 20.0
    retry_budget_min: int = 3
    # Passive outlier detection (see proxy/health/outlier.py); 0 failures: off.
    outlier_consecutive_failures: int = 5
    outlier_base_ejection_s: float = 30 * SECONDS
    outlier_max_ejection_s: float = 300 * SECONDS
    outlier_max_ejection_percent: float = 10.0
    access_log_sample: float = 1.0  # share of calls logged on "proxy.access"; 0: off
    tls_handshake_timeout_s: float = 5 * SECONDS
    tls_max_pending_handshakes: int = 1024


class ProxyServer:
    def __init__(
        self,
        router: Router,
        limits: Limits | None = None,
        options: ServerOptions | None = None,
        balancer: Balancer | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.router = router
        self.limits = limits or Limits()
        self.options = options or ServerOptions()
        self.flusher = Flusher(self.loop)
        options = self.options
        self.pool = BackendPool(
            self.flusher,
            self.limits,
            connect_timeout_s=options.connect_timeout_s,
            max_connections_per_backend=options.max_connections_per_backend,
            on_failure=self.backend_failed,
        )
        self.outliers = OutlierDetector(
            options.outlier_consecutive_failures,
            options.outlier_base_ejection_s,
            options.outlier_max_ejection_s,
            options.outlier_max_ejection_percent,
            clock=self.loop.time,
        )
        self.budget = RetryBudget(options.retry_budget_percent, options.retry_budget_min)
        # Active health checks, when on (set by whoever runs them).
        self.health: HealthSource | None = None
        self.access_log_sample = options.access_log_sample
        # The balancer's filter, made once: a bound method reading the time of the pick in
        # progress, rather than a closure built per call.
        self._pick_time = 0.0
        self._usable_fn = self._usable
        self.balancer = balancer or Balancer()
        self.connections: set[Downstream] = set()
        # Calls in flight per backend address: what least-request and bounded load weigh.
        self.inflight: dict[str, int] = {}
        self.connection_errors: Counter[str] = Counter()
        # Failed TLS handshakes on the listeners, by kind (see proxy.relay.tls_accept).
        self.tls_failures: Counter[str] = Counter()
        self._tls_listeners: list[TLSListener] = []
        self._unix_paths: list[str] = []
        # TLS towards backends: per target name, else the default (None: cleartext).
        self.upstream_tls: UpstreamTLS | None = None
        self.target_tls: dict[str, UpstreamTLS | None] = {}
        # Services that only some client identities may call (empty: no such rule).
        self.allowed: dict[str, frozenset[str]] = {}
        self.stats = CallStats()
        # Set by whoever runs discovery, so the admin endpoint can report the watches.
        self.discovery: EtcdDiscovery | None = None
        self.draining = False
        # Set once the listener is bound and the signal handlers are in (run_until_stopped):
        # before that /readyz says "starting", so that a readiness probe, or a supervisor
        # about to pass on a SIGHUP, does not take an admin answer for a process that serves.
        self.serving = False
        self.started_at = time.time()
        self._servers: list[asyncio.Server] = []
        # Every pool listened to: those of the first router, then those reloads brought. A
        # listener is never removed; one left on a pool no longer routed to is harmless.
        self._subscribed_pools: set[TargetPool] = set()
        self._pool_addresses: dict[str, frozenset[str]] = {
            pool.target: pool.snapshot.addresses for pool in router.pools()
        }
        self._subscribe(router)

    # ------------------------------------------------------------------ CallRouter

    @property
    def max_attempts(self) -> int:
        return 1 + self.options.max_retries

    @property
    def replay_limit(self) -> int:
        return self.options.replay_limit

    def pick(self, call: Call) -> Endpoint | Refusal:
        if not call.attempts:  # its first pick: the call starts now
            # Not loop.time(): uvloop's is libuv's cached millisecond clock, too coarse for
            # the sub-millisecond buckets of the duration histogram.
            call.started_at = perf_counter()
        path = call.path
        target = self.router.route(path)
        call.target = target
        if self.allowed:
            denied = self._denied(call, path)
            if denied is not None:
                return denied
        if target is None:
            service = service_of(path) or path.decode("latin-1")
            return Refusal(Status.UNIMPLEMENTED, f"no route for service {service!r}")
        snap = target.snapshot
        if not snap.endpoints:
            return Refusal(
                Status.UNAVAILABLE, f"no backend for target {target.target!r}: {snap.reason}"
            )
        # Only when some backend may be unusable is the filter passed: most picks skip it.
        if self.pool.backing_off or self.outliers.ejected or self.health is not None:
            self._pick_time = self.loop.time()  # read only when the filter runs
            usable: Callable[[str], bool] | None = self._usable_fn
        else:
            usable = None
        picked = self.balancer.pick(snap, call.headers, call.tried, usable, self.inflight)
        if isinstance(picked, NoPick):
            # A pinned session must learn that its instance is gone: that message is final.
            if picked.kind in (NoPickKind.NO_INSTANCE, NoPickKind.INSTANCE_TRIED):
                return Refusal(Status.UNAVAILABLE, picked.message, final=True)
            return Refusal(Status.UNAVAILABLE, call.no_backend_message())
        return picked

    def _denied(self, call: Call, path: bytes) -> Refusal | None:
        """PERMISSION_DENIED when the call's service allows only some identities and the
        client's certificate names none of them (or the client has no certificate)."""
        service = service_of(path)
        allowed = self.allowed.get(service)
        if allowed is None:
            return None
        identity = call.client.identity
        if identity is not None and not allowed.isdisjoint(identity.names()):
            return None
        who = (
            f"client {identity.primary!r}"
            if identity is not None
            else "a client without a verified certificate"
        )
        return Refusal(Status.PERMISSION_DENIED, f"{who} may not call {service}", final=True)

    def _usable(self, address: str) -> bool:
        """Not in connect backoff, not ejected, not failing its health checks. When no
        backend of a pool passes, the balancer still picks one of them as a probe, so a
        pool of sick backends gets tried rather than failing every call."""
        now = self._pick_time
        if now < self.pool.retry_at.get(address, 0.0):
            return False
        outliers = self.outliers
        if outliers.ejected and not outliers.usable(address, now):
            return False
        health = self.health
        return health is None or health.usable(address)

    def retry(self, call: Call, kind: str) -> Refusal | None:
        if not call.retry_slot:
            budget = self.budget
            # Calls in flight: those at a backend now. Summed here, on a retry, so that the
            # path of every call pays nothing for the budget.
            calls = sum(self.inflight.values())
            if not budget.acquire(calls):
                self.stats.budget_refused()
                return Refusal(
                    Status.UNAVAILABLE,
                    f"retry budget exhausted ({budget.retries} retries in flight, at most "
                    f"{budget.limit(calls):g}): not retrying {call.path.decode('latin-1')} after "
                    + "; ".join(call.errors),
                )
            call.retry_slot = True
        self.stats.retried(kind)
        return None

    def backend_failed(self, address: str) -> None:
        if not self.outliers.consecutive_failures:
            return
        pools = [
            snap.addresses
            for snap in (target_pool.snapshot for target_pool in self.router.pools())
            if address in snap.addresses
        ]
        if pools:  # in no pool any more: nothing to eject it from
            self.outliers.failed(address, pools)

    def call_ended(self, call: Call, status: int, answered: bool) -> None:
        duration = perf_counter() - call.started_at
        endpoint = call.endpoint
        row = call.stats_row
        if endpoint is None:
            backend = NO_BACKEND
            row = self.stats.call_started(call.path, backend)  # refused before any backend
        else:
            backend = endpoint.address
            if call.holding:
                call.holding = False
                inflight = self.inflight
                left = inflight[backend] - 1
                if left:
                    inflight[backend] = left
                else:
                    del inflight[backend]
            if answered:
                if status == _UNAVAILABLE:
                    self.backend_failed(backend)
                elif self.outliers.failures:
                    self.outliers.succeeded(backend)
        if call.retry_slot:
            self.budget.release()
        if call.attempts > 1:  # retried: the row is that of the backend it ended on
            row = None
        if row is not None and 0 <= status <= MAX_STATUS:
            # The usual case, inline: a few increments on the row the call took at its start.
            i = STATUS0 + 3 * status
            row[i] += 1
            row[i + 1] += call.request_bytes
            row[i + 2] += call.response_bytes
            row[BUCKET0 + bisect_left(DURATION_BUCKETS, duration)] += 1
            row[DURATION_SUM] += duration
        else:
            self.stats.call_finished(
                call.path, backend, status, duration, call.request_bytes, call.response_bytes, row
            )
        sample = self.access_log_sample
        if sample and (sample >= 1.0 or random() < sample):
            self._log_access(call, backend, status, duration)

    def set_access_log_sample(self, sample: float) -> None:
        """The share of calls logged from now on (a reload may change it)."""
        self.access_log_sample = sample

    def _log_access(self, call: Call, backend: str, status: int, duration: float) -> None:
        service, method = split_path(call.path)
        target = call.target
        access_log.info(
            "call",
            service=service,
            method=method,
            target=target.target if target is not None else "",
            backend=backend,
            grpc_status=status,
            duration_ms=round(duration * 1000, 3),
            request_bytes=call.request_bytes,
            response_bytes=call.response_bytes,
            peer=call.client.peer,
            **({} if call.client.identity is None else {"client": call.client.identity.primary}),
        )

    def attach(self, endpoint: Endpoint, call: Call) -> None:
        address = endpoint.address
        inflight = self.inflight
        inflight[address] = inflight.get(address, 0) + 1
        call.holding = True
        if call.attempts == 1:  # counted once, on the backend first picked
            call.stats_row = self.stats.call_started(call.path, address)
        tls = self.upstream_tls
        if self.target_tls:
            target = call.target
            if target is not None:
                tls = self.target_tls.get(target.target, tls)
        self.pool.get(address, tls).attach(call)

    def release(self, call: Call) -> None:
        if call.holding and call.endpoint is not None:
            call.holding = False
            address = call.endpoint.address
            left = self.inflight[address] - 1
            if left:
                self.inflight[address] = left
            else:
                del self.inflight[address]

    # ------------------------------------------------------------------ lifecycle

    def reconfigure(self, router: Router, balancer: Balancer) -> None:
        """Route and balance the next picks with these (SIGHUP). Calls in flight keep their
        backend; connections to backends left in no pool are retired once their calls end."""
        self._subscribe(router)
        self.router = router
        self.balancer = balancer
        self._pools_changed()

    def _subscribe(self, router: Router) -> None:
        for target_pool in router.pools():
            if target_pool not in self._subscribed_pools:
                self._subscribed_pools.add(target_pool)
                target_pool.subscribe(self._pool_changed)

    def _pool_changed(self, snap: PoolSnapshot) -> None:
        """One line per change of a pool (not per call): what joined, what left."""
        before = self._pool_addresses.get(snap.target, frozenset())
        self._pool_addresses[snap.target] = snap.addresses
        added, removed = snap.addresses - before, before - snap.addresses
        if added or removed:
            log.info(
                "pool_changed",
                target=snap.target,
                added=sorted(added),
                removed=sorted(removed),
                size=len(snap.addresses),
            )
        self._pools_changed()

    def _pools_changed(self) -> None:
        live: set[str] = set()
        for target_pool in self.router.pools():
            live |= target_pool.snapshot.addresses
        self.pool.retain(frozenset(live))
        self.outliers.retain(live)

    def count_connection_error(self, exc: H2ConnectionError) -> None:
        if isinstance(exc, FloodError):
            key = exc.limit
        elif isinstance(exc, TLSOnCleartextError):
            key = "TLS_ON_CLEARTEXT_PORT"
        else:
            key = exc.code.name
        self.connection_errors[key] += 1

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
        this context (see proxy.relay.tls_accept)."""
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
        TLSListener accept (see proxy.relay.tls_accept for why it accepts on its own)."""
        options = self.options
        listener = TLSListener(
            context,
            lambda: Downstream(self),
            self.tls_failures,
            options.tls_handshake_timeout_s,
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
        log.info("listening", addresses=[f"unix:{path}"], tls=False)
        return path

    def set_listener_tls(self, context: ssl.SSLContext) -> None:
        """New handshakes on every TLS listener use this context (SIGHUP); open connections
        keep theirs."""
        for listener in self._tls_listeners:
            listener.context = context

    def set_upstream_tls(
        self, default: UpstreamTLS | None, per_target: dict[str, UpstreamTLS | None]
    ) -> None:
        """New backend connections use these (SIGHUP); open ones keep theirs."""
        self.upstream_tls = default
        self.target_tls = per_target

    async def drain(self, timeout_s: float) -> None:
        """Graceful shutdown: refuse new connections, GOAWAY in two steps on every client
        connection (see proxy.relay.downstream), let the calls in flight finish for up to
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
        # Polled: a few wake-ups a second for at most the drain time, no hook on the hot path.
        while loop.time() < deadline and any(not c.closed for c in self.connections):
            await asyncio.sleep(DRAIN_POLL_S)
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
        for server in self._servers:
            server.close()
        self._close_listeners()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        await self.pool.close()


def _is_socket(path: str) -> bool:
    import stat

    return stat.S_ISSOCK(os.stat(path).st_mode)


def with_nodelay(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
