"""The proxy: a listener, the backend pool, routing and balancing, tied together.

ProxyServer is what every Call asks "where next?" (`pick`) and "get me there" (`attach`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from proxy.balancing import Balancer, NoPick, NoPickKind
from proxy.h2.errors import FloodError, H2ConnectionError
from proxy.h2.limits import Limits
from proxy.pool.connections import BackendPool
from proxy.pool.endpoints import Endpoint
from proxy.relay.call import Call, Refusal
from proxy.relay.downstream import Downstream
from proxy.relay.flusher import Flusher
from proxy.relay.grpc_status import Status
from proxy.relay.stats import CallStats
from proxy.routing import Router, service_of
from proxy.units import SECONDS

if TYPE_CHECKING:
    from proxy.discovery.watcher import EtcdDiscovery

log = structlog.get_logger("proxy.server")


@dataclass(frozen=True, slots=True)
class ServerOptions:
    max_attempts: int = 3  # the first try plus retries of calls that reached no backend code
    replay_limit: int = 256 * 1024  # request bytes kept for such a retry
    connect_timeout_s: float = 5 * SECONDS
    max_connections_per_backend: int = 16


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
        self.pool = BackendPool(
            self.flusher,
            self.limits,
            connect_timeout_s=self.options.connect_timeout_s,
            max_connections_per_backend=self.options.max_connections_per_backend,
        )
        self.balancer = balancer or Balancer()
        self.connections: set[Downstream] = set()
        # Calls in flight per backend address: what least-request and bounded load weigh.
        self.inflight: dict[str, int] = {}
        self.connection_errors: Counter[str] = Counter()
        self.stats = CallStats()
        # Set by whoever runs discovery, so the admin endpoint can report the watches.
        self.discovery: EtcdDiscovery | None = None
        self.draining = False
        self.started_at = time.time()
        self._servers: list[asyncio.Server] = []
        for target_pool in router.pools():
            target_pool.subscribe(lambda _snap: self._pools_changed())

    # ------------------------------------------------------------------ CallRouter

    @property
    def max_attempts(self) -> int:
        return self.options.max_attempts

    @property
    def replay_limit(self) -> int:
        return self.options.replay_limit

    def pick(self, call: Call) -> Endpoint | Refusal:
        path = call.path
        target = self.router.route(path)
        if target is None:
            service = service_of(path) or path.decode("latin-1")
            return Refusal(Status.UNIMPLEMENTED, f"no route for service {service!r}")
        snap = target.snapshot
        if not snap.endpoints:
            return Refusal(
                Status.UNAVAILABLE, f"no backend for target {target.target!r}: {snap.reason}"
            )
        now = self.loop.time()
        pool = self.pool
        picked = self.balancer.pick(
            snap,
            call.headers,
            call.tried,
            lambda address: pool.usable(address, now),
            self.inflight,
        )
        if isinstance(picked, NoPick):
            # A pinned session must learn that its instance is gone: that message is final.
            if picked.kind in (NoPickKind.NO_INSTANCE, NoPickKind.INSTANCE_TRIED):
                return Refusal(Status.UNAVAILABLE, picked.message, final=True)
            return Refusal(Status.UNAVAILABLE, call.no_backend_message())
        return picked

    def attach(self, endpoint: Endpoint, call: Call) -> None:
        inflight = self.inflight
        inflight[endpoint.address] = inflight.get(endpoint.address, 0) + 1
        call.holding = True
        self.pool.get(endpoint.address).attach(call)

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

    def _pools_changed(self) -> None:
        live: set[str] = set()
        for target_pool in self.router.pools():
            live |= target_pool.snapshot.addresses
        self.pool.retain(frozenset(live))

    def count_connection_error(self, exc: H2ConnectionError) -> None:
        key = exc.limit if isinstance(exc, FloodError) else exc.code.name
        self.connection_errors[key] += 1

    async def listen(self, host: str, port: int) -> list[tuple[str, int]]:
        server = await self.loop.create_server(
            lambda: Downstream(self), host, port, reuse_address=True, backlog=1024
        )
        self._servers.append(server)
        bound = []
        for sock in server.sockets:
            with_nodelay(sock)
            addr = sock.getsockname()
            bound.append((addr[0], addr[1]))
        log.info("listening", addresses=[f"{h}:{p}" for h, p in bound])
        return bound

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        await self.pool.close()


def with_nodelay(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
