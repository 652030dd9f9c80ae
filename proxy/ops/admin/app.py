"""The admin endpoint's answers for one proxy process (see ``proxy.ops.admin.http.AdminApp``)."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from proxy.ops.admin.state import calls_by_backend, endpoint_state, health_of, targets
from proxy.ops.metrics import ServerMetrics

if TYPE_CHECKING:
    from proxy.core.endpoints import TargetPool
    from proxy.runtime.server import ProxyServer


class ServerAdmin:
    """/metrics, /pool, /readyz and /healthz of one :class:`ProxyServer`.

    ``worker`` is this process's index when the supervisor runs several; /pool carries it so
    that the supervisor can concatenate its workers' answers as they are.
    """

    def __init__(self, server: ProxyServer, worker: int = 0) -> None:
        self.server = server
        self.worker = worker
        self.exporter = ServerMetrics(server)

    async def metrics(self) -> bytes:
        return await self.exporter.render()

    async def healthy(self) -> tuple[bool, str]:
        if self.server.draining:
            return False, "draining"
        return True, "ok"

    async def ready(self) -> tuple[bool, str]:
        if self.server.draining:
            return False, "draining"
        if not self.server.serving:
            return False, "starting: not listening yet"
        pools = targets(self.server)
        if not pools:
            return False, "no target configured"
        # Ready once every target's pool is known: its first etcd listing arrived (a static
        # pool is known from the start). An empty pool does not count against readiness, as
        # in Envoy (ready once clusters are warm): on a shared ingress, one service with no
        # backends would otherwise take every replica out of its load balancer, and with it
        # every other service. Its calls get UNAVAILABLE with the reason instead.
        discovery = self.server.discovery
        unknown = []
        for pool, _services in pools:
            watch = discovery.watches.get(pool.target) if discovery is not None else None
            # A static fallback serving while etcd is out of reach counts as known.
            if watch is not None and not watch.has_listed and not pool.snapshot.endpoints:
                reason = pool.snapshot.reason or "not listed yet"
                unknown.append(f"target {pool.target!r}: {reason}")
        if unknown:
            return False, "; ".join(unknown)
        return True, "ready"

    async def pool(self) -> dict[str, Any]:
        ready, _reason = await self.ready()
        calls = calls_by_backend(self.server)
        return {
            "workers": [
                {
                    "worker": self.worker,
                    "pid": os.getpid(),
                    "draining": self.server.draining,
                    "ready": ready,
                    "targets": [
                        self._target(pool, services, calls)
                        for pool, services in targets(self.server)
                    ],
                }
            ]
        }

    def _target(
        self, pool: TargetPool, services: list[str], calls: dict[str, int]
    ) -> dict[str, Any]:
        server = self.server
        discovery = server.discovery
        watch = discovery.watches.get(pool.target) if discovery is not None else None
        now = server.loop.time()
        wall = time.time()
        endpoints = []
        for endpoint in pool.snapshot.endpoints:
            address = endpoint.address
            until = server.dispatcher.outliers.ejected_until(address)
            conns = sum(len(ep.conns) for ep in server.dispatcher.pool.of_address(address))
            endpoints.append(
                {
                    "address": address,
                    "key": endpoint.key,
                    "metadata": endpoint.metadata,
                    "state": endpoint_state(server, address, now),
                    "in_flight": server.dispatcher.inflight.get(address, 0),
                    "calls_total": calls.get(address, 0),
                    # Ejections run on the loop's monotonic clock; readers want wall time.
                    "ejected_until": wall + (until - now)
                    if until is not None and until > now
                    else None,
                    "times_ejected": server.dispatcher.outliers.times_ejected(address),
                    "health": health_of(server, address),
                    "connections": conns,
                }
            )
        return {
            "target": pool.target,
            "services": services,
            "watch": None
            if watch is None
            else {"state": watch.state.value, "revision": watch.last_revision},
            "endpoints": endpoints,
        }
